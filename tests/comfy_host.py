"""Helpers for real-host ComfyUI tests: start a real ComfyUI (``main.py --cpu``) from a source checkout in a
subprocess, with the fastattn pack in a temporary ``custom_nodes/fastattn``, and talk to it over HTTP.

ComfyUI is GPL-3.0 and none of its code is in this repository: the checkout lives outside the tracked tree
(``COMFYUI_DIR``, e.g. the ignored ``.comfyui/``), and it is only ever run in subprocesses.

``COMFYUI_PYTHON`` (default: this interpreter) is the host's Python: torch + torchvision, ComfyUI's
requirements, ``comfyui-frontend-package`` and fastattn (``pip install --no-deps -e .``). Where torchvision is
missing or does not load against the installed torch, the boot script puts an import-only stand-in in its place
(ComfyUI imports it at module level; nothing used here calls it).

Loaded by the tests with ``importlib`` (``--import-mode=importlib``), like ``tests/hub_server.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE_TAG = "FASTATTN_PROBE_JSON "

# Runs inside the ComfyUI subprocess (cwd = COMFYUI_DIR).
#   boot.py main ARGS...         starts main.py as `python main.py ARGS...` would
#   boot.py load-checkpoints BASE  loads every file in BASE/models/diffusion_models with ComfyUI's own loader and
#                                  prints one JSON line: detected model config, key differences, parameter count
# The part every boot script starts with: torchvision stand-in, optional hiding of an installed fastattn.
BOOT_PRELUDE = textwrap.dedent(
    r'''
    import importlib
    import importlib.abc
    import importlib.machinery
    import json
    import os
    import runpy
    import sys
    import types


    class _ImportOnlyTorchvision(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        """Any `torchvision[.x.y]` import gives an empty module whose attributes are submodules."""

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "torchvision":
                return importlib.machinery.ModuleSpec(name, self, is_package=True)
            return None

        def create_module(self, spec):
            module = types.ModuleType(spec.name)

            def __getattr__(attr, _name=spec.name):
                if attr.startswith("__"):
                    raise AttributeError(attr)
                return importlib.import_module(f"{_name}.{attr}")

            module.__getattr__ = __getattr__
            return module

        def exec_module(self, module):
            pass


    class _BlockFastattn(importlib.abc.MetaPathFinder):
        """Hides an installed fastattn: the pack must then work from custom_nodes alone."""

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "fastattn":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None


    def _prepare():
        try:
            import torchvision  # noqa: F401
        except Exception:  # missing, or built for another torch (its _C extension fails to load)
            for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
                del sys.modules[name]
            sys.meta_path.insert(0, _ImportOnlyTorchvision())
            print("fastattn-test: torchvision replaced by an import-only stub", file=sys.stderr)
        if os.environ.get("FASTATTN_TEST_HIDE_FASTATTN") == "1":
            sys.meta_path.insert(0, _BlockFastattn())
        sys.path.insert(0, os.getcwd())
    '''
)

BOOT = BOOT_PRELUDE + textwrap.dedent(
    r'''


    def _load_checkpoints(base):
        sys.argv = ["main.py", "--cpu", "--base-directory", base, "--disable-api-nodes"]
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.sd
        import comfy.utils

        out = {}
        folder = os.path.join(base, "models", "diffusion_models")
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            patcher = comfy.sd.load_diffusion_model(path)
            if patcher is None:
                out[name] = None
                continue
            model = patcher.model
            have = {k: list(v.shape) for k, v in model.diffusion_model.state_dict().items()}
            sd = comfy.utils.load_torch_file(path)
            given = {k: list(v.shape) for k, v in sd.items()}
            out[name] = {
                "model_config": type(model.model_config).__name__,
                "model_class": type(model.diffusion_model).__name__,
                "unet_config": json.loads(json.dumps(model.model_config.unet_config, default=repr)),
                "missing": sorted(set(have) - set(given)),
                "unexpected": sorted(set(given) - set(have)),
                "shape_mismatch": sorted(k for k in have if k in given and have[k] != given[k]),
                "parameters": sum(v.numel() for v in sd.values()),
                "dtype": str(model.get_dtype()),
            }
            del patcher, model, sd
        return out


    _prepare()
    if sys.argv[1] == "main":
        sys.argv = ["main.py", *sys.argv[2:]]
        runpy.run_path(os.path.join(os.getcwd(), "main.py"), run_name="__main__")
    elif sys.argv[1] == "load-checkpoints":
        print("PROBE_TAG" + json.dumps(_load_checkpoints(sys.argv[2])), flush=True)
    else:
        sys.exit(f"unknown mode {sys.argv[1]!r}")
    '''
).replace("PROBE_TAG", PROBE_TAG)


def comfyui_dir() -> str | None:
    """``COMFYUI_DIR`` as an absolute path, or None when unset."""
    d = os.environ.get("COMFYUI_DIR")
    return os.path.abspath(d) if d else None


def checkout_or_skip() -> str:
    """``COMFYUI_DIR`` for a real-host test module; skips the module when unset, fails it when not a checkout."""
    import pytest

    d = comfyui_dir()
    if not d:
        pytest.skip(
            "real-host ComfyUI test: set COMFYUI_DIR to a ComfyUI source checkout to run it", allow_module_level=True
        )
    if not os.path.isfile(os.path.join(d, "nodes.py")):
        pytest.fail(f"COMFYUI_DIR={d} is not a ComfyUI source checkout (no nodes.py)", pytrace=False)
    return d


def host_python() -> str:
    return os.environ.get("COMFYUI_PYTHON", sys.executable)


def copy_pack(dest: str) -> None:
    """The pack as a user's clone has it: git's tracked and untracked-but-not-ignored files, or a filtered copy."""
    try:
        files = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout.split(b"\0")
    except (OSError, subprocess.CalledProcessError):
        skip = shutil.ignore_patterns(".*", "__pycache__", "*.egg-info", "build", "dist", "out")
        shutil.copytree(ROOT, dest, ignore=skip)
        return
    for rel in filter(None, (f.decode() for f in files)):
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))


def make_base(tmp) -> dict:
    """A ComfyUI base directory under ``tmp`` with the pack in custom_nodes/fastattn, and the boot script."""
    tmp = str(tmp)
    base = os.path.join(tmp, "base")
    copy_pack(os.path.join(base, "custom_nodes", "fastattn"))
    boot = os.path.join(tmp, "boot.py")
    with open(boot, "w") as f:
        f.write(BOOT)
    return {"base": base, "boot": boot, "tmp": tmp}


def host_env(**extra) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    env.pop("PYTHONPATH", None)  # nothing of this repo's checkout shadows the installed fastattn
    return env


def run_probe(host: dict, mode: str, *args: str, timeout: float = 300, **env) -> dict:
    proc = subprocess.run(
        [host_python(), host["boot"], mode, *args],
        cwd=comfyui_dir(),
        env=host_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(PROBE_TAG)]
    assert proc.returncode == 0 and lines, (
        f"ComfyUI probe failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}"
    )
    return json.loads(lines[-1][len(PROBE_TAG) :])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, data=None, timeout: float = 30):
    """(status, JSON body) of a GET, or of a POST of ``data`` as JSON."""
    req = urllib.request.Request(url, data=None if data is None else json.dumps(data).encode())
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
            return r.status, json.loads(body) if body else None
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            return e.code, json.loads(body or b"null")
        except ValueError:
            return e.code, body.decode(errors="replace")


class ComfyServer:
    """``main.py --cpu`` on a free loopback port, with ``base`` as its base directory."""

    def __init__(
        self, host: dict, ready_path: str = "/object_info/KSampler", startup_timeout: float = 180, **env
    ):
        self.host = host
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = os.path.join(host["tmp"], f"comfyui-{self.port}.log")
        self.output_dir = os.path.join(host["base"], "output")
        cmd = [
            host_python(),
            host["boot"],
            "main",
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        cmd += ["--base-directory", host["base"], "--disable-api-nodes", "--dont-print-server"]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=comfyui_dir(), env=host_env(**env), stdout=log, stderr=subprocess.STDOUT
            )
        try:
            self._wait_ready(ready_path, startup_timeout)
        except BaseException:
            self.stop()
            raise

    def log_tail(self, n: int = 4000) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return ""

    def _wait_ready(self, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"ComfyUI exited (rc={self.proc.returncode}):\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"ComfyUI did not come up in {timeout}s:\n{self.log_tail()}")
            try:
                status, _ = http(self.url + path, timeout=5)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def get(self, path: str):
        return http(self.url + path)

    def post_prompt(self, graph: dict):
        """(status, response) of ``POST /prompt``: 200 with a prompt_id, or 400 with ``node_errors``."""
        return http(f"{self.url}/prompt", {"prompt": graph, "client_id": "fastattn-test"})

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        """The history entry of ``prompt_id`` once it has finished (success or error)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _, hist = http(f"{self.url}/history/{prompt_id}")
            if hist and prompt_id in hist:
                entry = hist[prompt_id]
                if entry.get("status", {}).get("completed") is not None:
                    return entry
            if self.proc.poll() is not None:
                raise AssertionError(f"ComfyUI exited (rc={self.proc.returncode}):\n{self.log_tail()}")
            time.sleep(0.25)
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout}s:\n{self.log_tail()}")

    def run(self, graph: dict, timeout: float = 300) -> dict:
        """Queues ``graph`` (it must pass validation) and returns its finished history entry."""
        status, resp = self.post_prompt(graph)
        assert status == 200 and not resp.get("node_errors"), f"/prompt refused the graph: {status} {resp}"
        return self.wait(resp["prompt_id"], timeout=timeout)

    def output_file(self, entry: dict, node_id: str, kind: str = "latents") -> str:
        """Path of the first file that output node ``node_id`` wrote (from the history's ``ui`` outputs)."""
        item = entry["outputs"][node_id][kind][0]
        assert item.get("type", "output") == "output", item
        return os.path.join(self.output_dir, item.get("subfolder", ""), item["filename"])


def execution_errors(entry: dict) -> list[dict]:
    return [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
