"""A small in-memory Hugging Face Hub for tests: enough of the Hub's HTTP API for the real ``huggingface_hub``
client to download (``hf_hub_download``) and upload (``create_repo`` + ``upload_folder``) plain files.

Served on 127.0.0.1 by a stdlib ``ThreadingHTTPServer``; no xet, no LFS (preupload answers "regular", the
commit endpoint takes base64 file contents). Every commit gets a deterministic 40-hex id so revisions can be
pinned. Endpoints:

* ``HEAD|GET /{org}/{name}/resolve/{revision}/{path}`` -- ``X-Repo-Commit``, quoted ``ETag`` (sha256 of the
  content), ``Content-Length``; 404 with ``X-Error-Code: RepoNotFound | RevisionNotFound | EntryNotFound``.
* ``GET /api/models/{org}/{name}[/revision/{rev}]`` -- ``{id, sha, private, siblings: [{rfilename}]}``.
* ``GET /api/models/{org}/{name}/tree/{rev}[/{path}]`` -- ``[{type, path, size, oid}]`` (``?recursive=``).
* ``POST /api/repos/create``, ``POST /api/models/{org}/{name}/preupload/{rev}``,
  ``POST /api/models/{org}/{name}/commit/{rev}`` (NDJSON: header, file, deletedFile, deletedFolder).

Tests seed repos directly with :meth:`HubServer.commit` and tamper with :meth:`HubServer.corrupt`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


class _Repo:
    def __init__(self):
        self.commits: dict[str, dict[str, bytes]] = {}  # commit id -> {path: content}
        self.branches: dict[str, str] = {}

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


class HubServer:
    """The fake Hub: ``start()``, then point ``HF_ENDPOINT`` at ``url``. ``requests`` logs (method, path)."""

    def __init__(self):
        self.repos: dict[str, _Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        hub = self

        class Handler(_Handler):
            server_hub = hub

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    # ------------------------------------------------------------------ repository state
    def create_repo(self, repo_id: str) -> bool:
        with self.lock:
            if repo_id in self.repos:
                return False
            self.repos[repo_id] = _Repo()
            self._commit(
                repo_id, "main", {".gitattributes": b"*.safetensors filter=lfs diff=lfs\n"}, [], "init"
            )
            return True

    def commit(
        self, repo_id: str, files: dict[str, bytes], deletes=(), message="commit", branch="main"
    ) -> str:
        """A new commit on ``branch`` adding/replacing ``files`` and deleting ``deletes`` (paths or folders/)."""
        self.create_repo(repo_id)
        with self.lock:
            return self._commit(repo_id, branch, files, list(deletes), message)

    def _commit(self, repo_id, branch, files, deletes, message) -> str:
        repo = self.repos[repo_id]
        parent = repo.branches.get(branch, "")
        tree = dict(repo.commits.get(parent, {}))
        for d in deletes:
            for path in [p for p in tree if p == d or (d.endswith("/") and p.startswith(d))]:
                del tree[path]
        tree.update(files)
        h = hashlib.sha1(f"{repo_id}\n{parent}\n{message}\n".encode())
        for path in sorted(tree):
            h.update(f"{path}\0{hashlib.sha256(tree[path]).hexdigest()}\n".encode())
        sha = h.hexdigest()
        repo.commits[sha] = tree
        repo.branches[branch] = sha
        return sha

    def corrupt(self, repo_id: str, path: str, content: bytes, revision: str = "main") -> None:
        """Replace a file's bytes in place at ``revision`` (no new commit): a corrupt file on the server."""
        with self.lock:
            repo = self.repos[repo_id]
            repo.commits[repo.resolve(revision)][path] = content


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_hub: HubServer

    def log_message(self, *args):  # quiet
        pass

    # ------------------------------------------------------------------ plumbing
    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
        self.send_response(status)
        headers = {"Content-Type": "application/json", **(headers or {})}
        headers.setdefault("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict | None = None, head: bool = False):
        self._send(status, json.dumps(obj).encode(), headers, head)

    def _error(self, status: int, code: str | None, message: str, headers: dict | None = None, head=False):
        h = dict(headers or {})
        if code:
            h["X-Error-Code"] = code
        h["X-Error-Message"] = message
        self._json(status, {"error": message}, h, head)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _repo(self, repo_id: str, head=False):
        repo = self.server_hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head=head)
        return repo

    def _log(self):
        self.server_hub.requests.append((self.command, self.path))

    # ------------------------------------------------------------------ verbs
    def do_HEAD(self):
        self._log()
        self._route(head=True)

    def do_GET(self):
        self._log()
        self._route(head=False)

    def _route(self, head: bool):
        url = urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        query = parse_qs(url.query)
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(
                f"{parts[0]}/{parts[1]}", unquote(parts[3]), unquote("/".join(parts[4:])), head
            )
        if len(parts) >= 4 and parts[:2] == ["api", "models"]:
            repo_id, rest = f"{parts[2]}/{parts[3]}", parts[4:]
            if not rest or rest[0] == "revision":
                return self._info(repo_id, unquote("/".join(rest[1:])) if rest else "main", head)
            if rest[0] == "tree" and len(rest) >= 2:
                recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
                return self._tree(repo_id, unquote(rest[1]), unquote("/".join(rest[2:])), recursive, head)
        self._error(404, None, f"no route {self.path}", head=head)

    def _resolve(self, repo_id: str, revision: str, path: str, head: bool):
        repo = self._repo(repo_id, head)
        if repo is None:
            return
        sha = repo.resolve(revision)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head=head)
        content = repo.commits[sha].get(path)
        if content is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist", {"X-Repo-Commit": sha}, head)
        headers = {"Content-Type": "application/octet-stream", "X-Repo-Commit": sha,
                   "ETag": f'"{hashlib.sha256(content).hexdigest()}"'}  # fmt: skip
        self._send(200, content, headers, head)

    def _info(self, repo_id: str, revision: str, head: bool):
        repo = self._repo(repo_id, head)
        if repo is None:
            return
        sha = repo.resolve(revision)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head=head)
        siblings = [{"rfilename": p} for p in sorted(repo.commits[sha])]
        self._json(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": False, "siblings": siblings},
                   head=head)  # fmt: skip

    def _tree(self, repo_id: str, revision: str, prefix: str, recursive: bool, head: bool):
        repo = self._repo(repo_id, head)
        if repo is None:
            return
        sha = repo.resolve(revision)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head=head)
        base = prefix.strip("/") + "/" if prefix.strip("/") else ""
        entries, folders = [], set()
        for path, content in sorted(repo.commits[sha].items()):
            if not path.startswith(base):
                continue
            rel = path[len(base) :]
            if "/" in rel and not recursive:
                folders.add(base + rel.split("/")[0])
                continue
            oid = hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
            entries.append({"type": "file", "path": path, "size": len(content), "oid": oid})
        entries += [{"type": "directory", "path": f, "oid": "0" * 40} for f in sorted(folders)]
        self._json(200, entries, head=head)

    def do_POST(self):
        self._log()
        parts = urlsplit(self.path).path.strip("/").split("/")
        body = self._body()
        if parts == ["api", "repos", "create"]:
            req = json.loads(body)
            repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
            url = {"url": f"http://{self.headers['Host']}/{repo_id}", "name": repo_id}
            if not self.server_hub.create_repo(repo_id):  # the Hub's 409 also carries the url
                return self._json(409, {"error": "You already created this model repo", **url})
            return self._json(200, url)
        if len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] in ("preupload", "commit"):
            repo_id, revision = f"{parts[2]}/{parts[3]}", unquote("/".join(parts[5:]))
            repo = self._repo(repo_id)
            if repo is None:
                return
            if repo.resolve(revision) is None or revision not in repo.branches:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            if parts[4] == "preupload":
                files = json.loads(body)["files"]
                return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                  for f in files]})  # fmt: skip
            return self._commit(repo_id, revision, body)
        self._error(404, None, f"no route {self.path}")

    def _commit(self, repo_id: str, branch: str, body: bytes):
        files, deletes, message = {}, [], "commit"
        for line in body.decode().splitlines():
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                message = value.get("summary") or message
            elif key == "file":
                if value.get("encoding") != "base64":
                    return self._error(400, None, "only base64 file contents are supported")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                deletes.append(value["path"].rstrip("/") + ("/" if key == "deletedFolder" else ""))
            else:
                return self._error(400, None, f"unsupported commit operation {key!r} (no LFS/xet here)")
        sha = self.server_hub.commit(repo_id, files, deletes, message, branch)
        host = self.headers["Host"]
        self._json(
            200, {"success": True, "commitOid": sha, "commitUrl": f"http://{host}/{repo_id}/commit/{sha}"}
        )
