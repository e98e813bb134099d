"""Real-host tests of the Fast Attention Multi-GPU node: a real ComfyUI (``main.py --cpu``) samples tiny
random-weight Wan 2.1 and Flux checkpoints with the node on two CPU ranks (the ComfyUI process and one worker
process, gloo) from the ordinary KSampler.

- The latents equal the one-process latents of the same graph without the node (float32 on the CPU; only the
  order of floating-point sums differs), and the log shows the forwards ran on 2 ranks with no fallback.
- A device list the machine cannot serve is refused with a message naming what it has.
- A worker killed in the middle of a run ends that run with an error naming the worker, its device and the
  signal; the server keeps serving, and the next run starts a new worker and samples correctly.
- ``POST /free`` (ComfyUI unloads the model) makes the worker let go of its copy; stopping the server stops the
  worker.

Runs only where ``COMFYUI_DIR`` points at a ComfyUI source checkout (see ``tests/comfy_host.py``); the host's
Python is ``COMFYUI_PYTHON``. ``FASTATTN_COMFY_CKPT_CACHE`` (optional) keeps the checkpoints between runs (the
Flux one is 1 GB).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import time
from pathlib import Path

import pytest

_HERE = Path(__file__).parent


def _load_helper(name: str):
    spec = importlib.util.spec_from_file_location(f"fastattn_test_{name}", _HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ch = _load_helper("comfy_host")
cc = _load_helper("comfy_checkpoints")

COMFYUI_DIR = ch.checkout_or_skip()

from safetensors.torch import load_file  # noqa: E402

NODE = "FastAttnMultiGPU"
WORKER_MARK = "multigpu_worker"  # in a worker's command line (its boot code imports the module by that name)
# Latents whose token counts split into 2 equal shards: Wan 3 x 8 x 8 = 192 video tokens; Flux 77 text tokens
# (CLIP-L context) + 9 x 9 = 81 image tokens = 158.
LATENTS = {
    "wan": ("EmptyHunyuanLatentVideo", {"width": 128, "height": 128, "length": 9, "batch_size": 1}),
    "flux": ("EmptySD3LatentImage", {"width": 144, "height": 144, "batch_size": 1}),
}
STEPS = {"wan": 4, "flux": 2}
TOL = 1e-4  # worst difference relative to the latent's largest value


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    h = ch.make_base(tmp_path_factory.mktemp("comfyui_multigpu"))
    cache = os.environ.get("FASTATTN_COMFY_CKPT_CACHE") or str(tmp_path_factory.getbasetemp() / "checkpoints")
    h["checkpoints"] = cc.install_into_comfy_base(h["base"], families=list(LATENTS), cache=cache)
    return h


@pytest.fixture(scope="module")
def server(host):
    srv = ch.ComfyServer(host)
    try:
        yield srv
    finally:
        srv.stop()


SPARSE = {"preset": "custom", "method": "window3d", "density": 0.3, "quant": "none", "start_percent": 0.0,
          "end_percent": 1.0, "dense_blocks": ""}  # fmt: skip


def graph(family: str, devices: str | None = None, *, seed: int = 1, steps: int | None = None,
          latent: dict | None = None, prefix: str = "latents/mg", fast: dict | None = None) -> dict:  # fmt: skip
    """UNETLoader [-> Fast Attention "fa" with ``fast``] [-> Fast Attention Multi-GPU "mg"] -> KSampler ->
    SaveLatent, random CLIP-L conditioning."""
    node, inputs = LATENTS[family]
    nodes = {
        "1": {"class_type": "UNETLoader",
              "inputs": {"unet_name": cc.FAMILIES[family]["file"], "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": cc.CLIP_FILE, "type": cc.CLIP_TYPE}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox in the snow", "clip": ["2", 0]}},
        "4": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["3", 0]}},
        "5": {"class_type": node, "inputs": dict(inputs, **(latent or {}))},
    }  # fmt: skip
    model = ["1", 0]
    if fast is not None:
        nodes["fa"] = {"class_type": "FastAttnApply", "inputs": dict(fast, model=model)}
        model = ["fa", 0]
    if devices is not None:
        nodes["mg"] = {"class_type": NODE, "inputs": {"model": model, "devices": devices, "ulysses": "auto",
                                                      "ring": "auto", "balance": True, "timeout_s": 120.0}}  # fmt: skip
        model = ["mg", 0]
    nodes["6"] = {"class_type": "KSampler",
                  "inputs": {"model": model, "seed": seed, "steps": steps or STEPS[family], "cfg": 2.0,
                             "sampler_name": "euler", "scheduler": "simple", "positive": ["3", 0],
                             "negative": ["4", 0], "latent_image": ["5", 0], "denoise": 1.0}}  # fmt: skip
    nodes["7"] = {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": prefix}}
    return nodes


def sample(server, g: dict, timeout: float = 600):
    entry = server.run(g, timeout=timeout)
    assert entry["status"]["status_str"] == "success", (entry["status"]["messages"], server.log_tail())
    return load_file(server.output_file(entry, "7"))["latent_tensor"]


def workers(server) -> list[int]:
    """Pids of the server's Multi-GPU worker processes (its children whose command line names the worker)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == server.proc.pid and WORKER_MARK.encode() in cmdline and running(int(entry)):
            found.append(int(entry))
    return found


def running(pid: int) -> bool:
    """The process exists and is not a zombie (an exited child its parent has not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def log(server) -> str:
    with open(server.log, errors="replace") as f:
        return f.read()


def wait_for(predicate, timeout: float, what: str, server):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}:\n{server.log_tail()}")


def max_rel(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def test_the_node_is_registered(server):
    status, info = server.get(f"/object_info/{NODE}")
    assert status == 200, info
    node = info[NODE]
    assert node["display_name"] == "Fast Attention Multi-GPU" and node["output"] == ["MODEL"]
    required = node["input"]["required"]
    assert {"model", "devices", "ulysses", "ring", "balance", "timeout_s"} <= set(required)
    assert "auto" in required["ulysses"][1]["options"]


@pytest.mark.parametrize("family", ["wan", "flux"])
def test_two_cpu_ranks_sample_what_comfyui_samples_alone(server, family):
    base = sample(server, graph(family, prefix=f"latents/{family}_base"))
    before = log(server)
    out = sample(server, graph(family, "cpu,cpu", prefix=f"latents/{family}_mg"))
    assert out.shape == base.shape and out.isfinite().all()
    rel = max_rel(out, base)
    assert rel < TOL, f"{family}: 2 ranks differ from 1 by {rel:.2e}"
    new = log(server)[len(before) :]
    steps = STEPS[family]
    assert f"{steps} forwards on 2 ranks; on the ComfyUI process alone: none" in new, new[-3000:]
    assert workers(server), "no worker process is running between runs"


def test_a_fast_attention_plan_runs_on_both_ranks(server):
    """Fast Attention (a sparse window3d plan) then Multi-GPU samples what Fast Attention alone samples."""
    kw = {"latent": {"width": 256, "height": 256, "length": 17}, "steps": 3}  # 5 x 16 x 16 = 1280 tokens
    dense = sample(server, graph("wan", prefix="latents/fa_dense", **kw))
    alone = sample(server, graph("wan", fast=SPARSE, prefix="latents/fa_alone", **kw))
    changed = max_rel(alone, dense)
    before = log(server)
    both = sample(server, graph("wan", "cpu,cpu", fast=SPARSE, prefix="latents/fa_mg", **kw))
    # the plan changes the tiny model's latent a little (random weights); two ranks must be far closer to it
    assert changed > 1e-4 and max_rel(both, alone) < changed / 50, (max_rel(both, alone), changed)
    assert "3 forwards on 2 ranks; on the ComfyUI process alone: none" in log(server)[len(before) :]


def test_a_device_list_the_machine_cannot_serve_is_refused(server):
    entry = server.run(graph("wan", "0,1", prefix="latents/bad"))
    assert entry["status"]["status_str"] == "error"
    errors = ch.execution_errors(entry)
    assert errors and errors[0]["node_id"] == "mg", errors
    message = errors[0]["exception_message"]
    assert "asks for 2 GPUs but this machine has 0 CUDA device(s)" in message, message


def test_a_killed_worker_ends_the_run_with_a_clear_error_and_the_server_goes_on(server):
    sample(server, graph("wan", "cpu,cpu", prefix="latents/warm"))  # workers up, the model sent
    pid = wait_for(lambda: workers(server), 60, "a worker", server)[0]
    # a long run (many steps of a larger latent); the worker is killed while it runs
    long_run = graph("wan", "cpu,cpu", seed=7, steps=400, latent={"width": 256, "height": 256},
                     prefix="latents/killed")  # fmt: skip
    status, resp = server.post_prompt(long_run)
    assert status == 200, resp
    with open(f"/proc/{pid}/stat") as f:
        start_ticks = sum(int(v) for v in f.read().rsplit(")", 1)[1].split()[11:13])

    def busy():  # the worker has computed for a while in this run
        with open(f"/proc/{pid}/stat") as f:
            return sum(int(v) for v in f.read().rsplit(")", 1)[1].split()[11:13]) - start_ticks > 100

    wait_for(busy, 300, "the worker to compute", server)
    os.kill(pid, signal.SIGKILL)
    started = time.monotonic()
    entry = server.wait(resp["prompt_id"], timeout=300)
    assert time.monotonic() - started < 60, "the run did not stop promptly"
    assert entry["status"]["status_str"] == "error"
    message = ch.execution_errors(entry)[0]["exception_message"]
    assert f"worker rank 1 (cpu, pid {pid}) exited with signal SIGKILL (killed)" in message, message
    assert "next run starts new workers" in message, message
    # the server goes on: the next run starts a new worker and samples what ComfyUI samples alone
    status, _ = server.get("/object_info/KSampler")
    assert status == 200
    base = sample(server, graph("wan", seed=3, prefix="latents/after_base"))
    out = sample(server, graph("wan", "cpu,cpu", seed=3, prefix="latents/after_mg"))
    assert max_rel(out, base) < TOL
    assert pid not in workers(server) and workers(server)


def test_free_releases_the_workers_copy_and_stopping_the_server_stops_the_workers(server):
    sample(server, graph("wan", "cpu,cpu", seed=11, prefix="latents/free"))
    before = log(server)
    status, _ = ch.http(f"{server.url}/free", {"unload_models": True, "free_memory": True})
    assert status == 200
    wait_for(
        lambda: "model released" in log(server)[len(before) :], 60, "the worker to release its model", server
    )
    pids = workers(server)
    assert pids
    server.stop()
    deadline = time.monotonic() + 15
    while any(running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = [p for p in pids if running(p)]
    assert not alive, f"workers {alive} outlived the server"
