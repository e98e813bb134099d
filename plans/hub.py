"""Plans on the Hugging Face Hub: ``hf://owner/repo[/subdir][@revision]`` addresses, download and push.

Downloads go through the real ``huggingface_hub`` client (``hf_hub_download``), so its cache
(``HF_HUB_CACHE``), revision pinning and offline mode (``HF_HUB_OFFLINE=1``: served from the cache) apply.
``plan.json`` is fetched first; ``plan.safetensors`` (only when the header has a head table) is fetched from
the commit ``plan.json`` resolved to, so the two files always come from one commit. Errors from the client
are re-raised as :class:`PlanHubError` naming the ``hf://`` address.
"""

from __future__ import annotations

import inspect
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .files import PLAN_TENSORS, PlanFileError

PREFIX = "hf://"
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_-])?"  # Hub owner / repo names
_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")  # one subdir level: no '.', '..', no hidden files
_REVISION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/-]{0,254}")
_REPO_ID = re.compile(rf"{_NAME}/{_NAME}")
_COMMIT = re.compile(r"[0-9a-f]{40}")


class PlanHubError(OSError):
    """A plan that could not be fetched from or pushed to the Hub (missing repo / revision / file, offline)."""


@dataclass(frozen=True)
class HubAddress:
    """``hf://repo_id[/subdir][@revision]``: a plan directory in a Hub model repo."""

    repo_id: str
    subdir: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        s = PREFIX + self.repo_id + (f"/{self.subdir}" if self.subdir else "")
        return s + (f"@{self.revision}" if self.revision else "")

    def path_in_repo(self, filename: str) -> str:
        return f"{self.subdir}/{filename}" if self.subdir else filename


def parse_hf_address(address: str) -> HubAddress:
    """Strictly parse ``hf://owner/repo[/subdir][@revision]``.

    Refused: other schemes, a missing owner, ``..`` / ``.`` / hidden or empty path segments, absolute paths,
    backslashes, ``%`` escapes, whitespace or control characters, ``..`` in the revision.
    """
    if not isinstance(address, str) or not address.startswith(PREFIX):
        raise ValueError(f"a Hub plan address is 'hf://owner/repo[/subdir][@revision]', got {address!r}")
    rest = address[len(PREFIX) :]
    bad = sorted({c for c in rest if c in "\\%?#:" or c.isspace() or not c.isprintable()})
    if bad or not rest.isascii():
        raise ValueError(
            f"{address!r}: characters {bad or 'non-ASCII'} are not allowed in a Hub plan address"
        )
    path, at, revision = rest.partition("@")
    if at and (
        not _REVISION.fullmatch(revision) or ".." in revision or "//" in revision or revision.endswith("/")
    ):
        raise ValueError(f"{address!r}: bad revision {revision!r}; expected a branch, tag or commit hash")
    parts = path.split("/")
    if len(parts) < 2 or not _REPO_ID.fullmatch("/".join(parts[:2])) or ".." in "/".join(parts[:2]):
        raise ValueError(f"{address!r}: expected hf://owner/repo[/subdir][@revision] with a valid owner/repo")
    for seg in parts[2:]:
        if not _SEGMENT.fullmatch(seg) or ".." in seg:
            raise ValueError(
                f"{address!r}: bad subdir segment {seg!r}; subdirs are plain names (no '.', '..', empty or "
                "hidden segments, no leading '/')"
            )
    return HubAddress("/".join(parts[:2]), "/".join(parts[2:]) or None, revision if at else None)


def fetch_plan_file(addr: HubAddress, filename: str, *, revision: str | None = None,
                    max_bytes: int | None = None) -> tuple[Path, str | None]:  # fmt: skip
    """Download ``filename`` of the plan at ``addr`` (at ``revision``, default the address's) into the
    Hub cache. Returns (local path, the commit it was resolved to, or None if unknown)."""
    from huggingface_hub import hf_hub_download

    rev = revision or addr.revision or "main"
    kw = {"subfolder": addr.subdir, "revision": rev}
    try:
        if max_bytes is not None and "dry_run" in inspect.signature(hf_hub_download).parameters:
            info = hf_hub_download(addr.repo_id, filename, dry_run=True, **kw)  # HEAD only: the size first
            if info.file_size is not None and info.file_size > max_bytes:
                raise PlanFileError(
                    f"{addr}: {filename} is {info.file_size} bytes, more than a plan file may hold ({max_bytes})"
                )
        path = Path(hf_hub_download(addr.repo_id, filename, **kw))
    except Exception as e:  # huggingface_hub's errors, re-raised with the hf:// address
        err = _hub_error(e, addr, filename, rev)
        if err is e:
            raise
        raise err from e
    depth = len(addr.subdir.split("/")) if addr.subdir else 0
    snap = path.parents[depth]  # <cache>/models--owner--repo/snapshots/<commit>/[subdir/]filename
    commit = snap.name if _COMMIT.fullmatch(snap.name) and snap.parent.name == "snapshots" else None
    return path, commit


def _hub_error(e: Exception, addr: HubAddress, filename: str, rev: str) -> Exception:
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(e, PlanFileError):
        return e
    if isinstance(e, RepositoryNotFoundError):
        return PlanHubError(f"{addr}: no model repo {addr.repo_id!r} on {constants.ENDPOINT} (or it is private "
                            "and no valid token was given)")  # fmt: skip
    if isinstance(e, RevisionNotFoundError):
        return PlanHubError(f"{addr}: repo {addr.repo_id!r} has no revision {rev!r}")
    if isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        why = (
            "offline mode is on (HF_HUB_OFFLINE=1)"
            if constants.HF_HUB_OFFLINE
            else "the Hub was not reachable"
        )
        return PlanHubError(
            f"{addr}: {addr.path_in_repo(filename)} is not in the Hub cache ({constants.HF_HUB_CACHE}) and {why}"
        )
    if isinstance(e, EntryNotFoundError):
        return PlanHubError(
            f"{addr}: {addr.repo_id}@{rev} has no {addr.path_in_repo(filename)}; a plan folder holds plan.json "
            "(and plan.safetensors when it has a head table)"
        )
    if isinstance(e, (HfHubHTTPError, OSError)):
        return PlanHubError(f"{addr}: could not fetch {filename}: {e}")
    return e


def push_plan(plan, repo_id: str, subdir: str | None = None, token: str | None = None, meta=None,
              private: bool | None = None, revision: str | None = None) -> str:  # fmt: skip
    """Save ``plan`` (an :class:`AttentionPlan`) as a plan directory and upload it to the model repo
    ``repo_id`` (created if missing) under ``subdir``, on branch ``revision`` (default ``main``; the branch
    must exist). A stale ``plan.safetensors`` there is deleted when the plan has no head table.

    Returns the pinned address ``hf://repo_id[/subdir]@<commit>``.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from .files import save_plan

    addr = parse_hf_address(PREFIX + repo_id + (f"/{subdir.strip('/')}" if subdir else ""))
    if revision is not None:
        parse_hf_address(f"{PREFIX}{addr.repo_id}@{revision}")
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        save_plan(plan, tmp, meta)
        try:
            api.create_repo(addr.repo_id, exist_ok=True, private=private)
            info = api.upload_folder(
                repo_id=addr.repo_id, folder_path=tmp, path_in_repo=addr.subdir or "", revision=revision,
                commit_message=f"Upload fastattn plan{' to ' + addr.subdir if addr.subdir else ''}",
                delete_patterns=[PLAN_TENSORS],
            )  # fmt: skip
        except HfHubHTTPError as e:
            raise PlanHubError(f"{addr}: push failed: {e}") from e
    return str(HubAddress(addr.repo_id, addr.subdir, info.oid))
