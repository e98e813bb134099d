"""Contract tests of the Fast Attention Multi-GPU node against fakes of ComfyUI's runtime (``multigpu_fakes``):
device lists and degrees, and real worker processes on CPU ranks (gloo): a sampled latent on 2 ranks equals
the one-process latent (Ulysses, ring, with a Fast Attention plan), forwards that cannot be cut run on the
ComfyUI process alone (counted), a killed worker ends the run with a clear error and the next run starts new
workers, ComfyUI unloading the model releases the workers' copies, and the workers stop when the patched models
are gone.

A real ComfyUI runs the node in ``tests/test_comfyui_multigpu_host.py`` (where ``COMFYUI_DIR`` is set).
"""

from __future__ import annotations

import gc
import os
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # workers import multigpu_fakes by name

import multigpu_fakes as mf  # noqa: E402
from fastattn.caching.config import CacheConfig  # noqa: E402
from fastattn.nodes import fast_attention as fa  # noqa: E402
from fastattn.nodes import multigpu as mg  # noqa: E402
from fastattn.nodes.fast_attention import NodeError  # noqa: E402
from fastattn.nodes.host.multigpu import find_multigpu  # noqa: E402
from fastattn.nodes.host.multigpu_cluster import DeviceList, MultiGPUError, current_cluster, stop_all  # noqa: E402
from fastattn.plans import AttentionPlan, Window3DConfig  # noqa: E402

TIMEOUT = 60.0  # every test uses one cluster key (devices, timeout), so the workers are shared
TOL = 1e-5


# ================================================================================ devices and degrees (no processes)
@pytest.mark.parametrize(
    "text,main,count,expected",
    [
        ("", "cpu", 0, "devices is empty"),
        ("all", "cpu", 0, "no CUDA|0 CUDA device"),
        ("0,1", "cpu", 0, "asks for 2 GPUs but this machine has 0 CUDA device"),
        ("0,1,2,3", "cuda:0", 2, r"GPU \[2, 3\] does not exist"),
        ("0,0", "cuda:0", 2, "listed twice"),
        ("cpu", "cpu", 0, "one rank"),
        ("cpu,0", "cpu", 1, "not both"),
        ("cpu,cpu", "cuda:0", 1, "--cpu"),
        ("1,2", "cuda:0", 4, "must include cuda:0"),
        ("0", "cuda:0", 2, "one GPU"),
        ("gpu0,1", "cuda:0", 2, "'gpu0' is not a GPU index"),
    ],
)
def test_bad_device_lists_say_what_was_expected(text, main, count, expected):
    with pytest.raises(NodeError, match=expected):
        mg.parse_devices(text, main, count)


def test_device_lists():
    assert mg.parse_devices("cpu, cpu,cpu", "cpu", 0) == DeviceList("cpu", (None, None, None))
    # rank 0 is the GPU ComfyUI runs the model on; the others follow in the list's order
    assert mg.parse_devices("cuda:3,1,0", "cuda:1", 4) == DeviceList("cuda", (1, 3, 0))
    assert mg.parse_devices("all", "cuda:0", 3) == DeviceList("cuda", (0, 1, 2))


def test_node_refuses_models_and_degrees_it_cannot_serve():
    with pytest.raises(NodeError, match="does not support NextDiT.*Flux"):
        mg.apply_multigpu(mf.ModelPatcher(mf.BaseModel(mf.NextDiT())), "cpu,cpu")
    with pytest.raises(NodeError, match="ulysses 3 does not divide the 2 processes"):
        mg.apply_multigpu(mf.flux(), "cpu,cpu", ulysses="3")
    with pytest.raises(NodeError, match="ulysses 2 x ring 2 = 4 processes"):
        mg.apply_multigpu(mf.flux(), "cpu,cpu", ulysses="2", ring="2")
    with pytest.raises(NodeError, match="must divide the 3 attention heads"):
        mg.apply_multigpu(mf.flux(heads=3), "cpu,cpu", ulysses="2")
    with pytest.raises(NodeError, match="ulysses must be 'auto' or a positive integer"):
        mg.apply_multigpu(mf.flux(), "cpu,cpu", ulysses="two")
    with pytest.raises(NodeError, match="timeout_s"):
        mg.apply_multigpu(mf.flux(), "cpu,cpu", timeout_s=0)


def test_the_input_model_is_never_changed():
    base = mf.flux()
    patched = mg.apply_multigpu(base, "cpu,cpu", timeout_s=TIMEOUT)
    assert not base.wrappers and "patches_replace" not in base.model_options["transformer_options"]
    assert find_multigpu(patched) is not None and find_multigpu(base) is None
    dit = patched.model_options["transformer_options"]["patches_replace"]["dit"]
    assert sorted(dit) == [("double_block", 0), ("double_block", 1), ("single_block", 0), ("single_block", 1)]
    assert current_cluster() is None  # no worker starts before a forward needs one


# ================================================================================ worker processes
@pytest.fixture(scope="module")
def keep():
    """Patched models kept alive for the module, so the tests share one set of workers; stopped at the end."""
    kept: list = []
    yield kept
    kept.clear()
    stop_all()


def parallel(keep, patcher, **kw):
    patched = mg.apply_multigpu(patcher, "cpu,cpu", timeout_s=TIMEOUT, **kw)
    keep.append(patched)
    return patched


@pytest.mark.parametrize("family", ["flux", "wan"])
@pytest.mark.parametrize("degrees", [("auto", "auto"), ("1", "2")], ids=["ulysses2", "ring2"])
def test_two_cpu_ranks_sample_what_one_process_samples(keep, family, degrees):
    patcher = getattr(mf, family)()
    x, ctx = getattr(mf, f"{family}_inputs")()
    ref = mf.sample(patcher, x, ctx)
    patched = parallel(keep, patcher, ulysses=degrees[0], ring=degrees[1])
    out = mf.sample(patched, x, ctx)
    assert mf.max_rel(out, ref) < TOL
    report = find_multigpu(patched).report()
    assert report["parallel_forwards"] == 3 and report["single_forwards"] == {}, report
    mesh = current_cluster().rank.mesh
    assert (mesh.ulysses, mesh.ring) == ((2, 1) if degrees[0] == "auto" else (1, 2))
    assert mesh.world_size == 2 and current_cluster().procs[0].poll() is None


def test_masks_and_controlnet_inputs_reach_every_rank(keep):
    """An attention mask over the whole sequence and ControlNet-like per-token additions between blocks."""
    patcher = mf.flux(seed=3)
    x, ctx = mf.flux_inputs()
    mask = torch.ones(2, 1, 1, 6 + 16, dtype=torch.bool)
    mask[..., 4:6] = False  # the last two text tokens are padding
    g = torch.Generator().manual_seed(8)
    control = {
        "input": [torch.randn(2, 16, 32, generator=g) * 0.1, torch.randn(2, 16, 32, generator=g) * 0.1]
    }
    ref = mf.sample(patcher, x, ctx, attention_mask=mask, control=control)
    assert mf.max_rel(ref, mf.sample(patcher, x, ctx)) > 1e-3  # both inputs change the result
    patched = parallel(keep, patcher)
    out = mf.sample(patched, x, ctx, attention_mask=mask, control=control)
    assert mf.max_rel(out, ref) < TOL and find_multigpu(patched).report()["parallel_forwards"] == 3


def test_fast_attention_plan_runs_on_every_rank(keep):
    """Fast Attention (a sparse plan) then Multi-GPU equals Fast Attention alone; and in the other order."""
    plan = fa.PlanChoice("test", AttentionPlan(Window3DConfig(window=(0, 1, 1)), block_size=8))
    patcher = mf.wan()
    x, ctx = mf.wan_inputs(frames=2, side=8)  # 2 x 4 x 4 = 32 video tokens: 4 blocks of 8
    sparse = fa.apply_fast_attention(patcher, plan=plan)
    ref = mf.sample(sparse, x, ctx)
    dense = mf.sample(patcher, x, ctx)
    assert mf.max_rel(ref, dense) > 1e-3  # the plan changes the result: the comparison below means something
    for patched in (parallel(keep, sparse), fa.apply_fast_attention(parallel(keep, patcher), plan=plan)):
        keep.append(patched)
        out = mf.sample(patched, x, ctx)
        assert mf.max_rel(out, ref) < TOL
        assert find_multigpu(patched).report()["parallel_forwards"] == 3
    stats = current_cluster().rank.plans
    assert any(sp.runtime.stats.sparse_calls for sp in stats.values())  # rank 0 ran the plan's kernel


def test_forwards_that_cannot_be_cut_run_on_the_comfyui_process_alone(keep):
    patcher = mf.flux()
    x, ctx = mf.flux_inputs(text=5)  # 5 text + 16 image tokens: 21 do not split into 2 equal shards
    patched = parallel(keep, patcher)
    assert torch.equal(mf.sample(patched, x, ctx), mf.sample(patcher, x, ctx))
    report = find_multigpu(patched).report()
    assert report["parallel_forwards"] == 0
    assert report["single_forwards"] == {"21 tokens (5 text) do not cut into 2 equal shards": 3}


def _worker_pid() -> int:
    cluster = current_cluster()
    assert cluster is not None and cluster.alive()
    return cluster.procs[0].pid


def test_a_killed_worker_ends_the_run_with_a_clear_error_and_the_next_run_starts_new_workers(keep):
    patcher = mf.wan()
    x, ctx = mf.wan_inputs()
    ref = mf.sample(patcher, x, ctx)
    patched = parallel(keep, patcher)
    mf.sample(patched, x, ctx, steps=1)  # workers up, model sent
    pid = _worker_pid()
    patcher_model = patched.model.diffusion_model
    calls = {"n": 0}
    original = type(patcher_model).forward

    def forward_then_kill(self, *args, **kwargs):  # rank 0's forward; the worker dies after the first one
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:
            os.kill(pid, 9)
            time.sleep(0.5)
        return out

    type(patcher_model).forward = forward_then_kill
    start = time.monotonic()
    try:
        with pytest.raises(MultiGPUError) as err:
            mf.sample(patched, x, ctx, steps=3)
    finally:
        type(patcher_model).forward = original
    message = str(err.value)
    assert f"worker rank 1 (cpu, pid {pid}) exited with signal SIGKILL (killed)" in message, message
    assert "the run stopped" in message and "next run starts new workers" in message
    assert time.monotonic() - start < TIMEOUT / 2  # not a timeout: the closed sockets end it at once
    assert not current_cluster().alive()
    out = mf.sample(patched, x, ctx)  # new workers
    assert mf.max_rel(out, ref) < TOL and _worker_pid() != pid


def test_a_worker_that_raises_ends_the_run_with_its_message(keep):
    patcher = mf.wan(seed=9)
    patcher.model.diffusion_model.fail_elsewhere = True
    patched = parallel(keep, patcher)
    start = time.monotonic()
    with pytest.raises(MultiGPUError, match=r"worker rank 1 \(cpu, pid \d+\) raised RuntimeError: out of memory "
                                            r"\(a failure on this worker only\)"):  # fmt: skip
        mf.sample(patched, *mf.wan_inputs(), steps=2)
    assert time.monotonic() - start < TIMEOUT / 2
    assert find_multigpu(patched).report()["parallel_forwards"] == 1  # the first forward stopped the run


def test_what_the_workers_cannot_run_stays_on_the_comfyui_process(keep):
    """Another node's block replacement, ``patches``, or Fast Attention's block caching: one process, counted."""
    x, ctx = mf.wan_inputs()
    patcher = mf.wan(seed=4)
    ref = mf.sample(patcher, x, ctx)
    other = patcher.clone()
    calls = []

    def theirs(args, extra):
        calls.append(1)
        return extra["original_block"](args)

    other.model_options["transformer_options"]["patches_replace"] = {"dit": {("double_block", 0): theirs}}
    patched = parallel(keep, other)
    assert torch.equal(mf.sample(patched, x, ctx), ref) and len(calls) == 3
    assert find_multigpu(patched).report()["single_forwards"] == {
        "another node replaces ['double_block'] blocks (the workers cannot run it)": 3
    }
    patches = parallel(keep, patcher).clone()
    patches.model_options["transformer_options"]["patches"] = {"post_input": [lambda d: d]}
    assert torch.equal(mf.sample(patches, x, ctx), ref)
    assert list(find_multigpu(patches).report()["single_forwards"]) == [
        "transformer_options patches ['post_input'] (the workers cannot run them)"
    ]
    cache_plan = AttentionPlan(cache=CacheConfig(blocks="fixed"))
    cached = fa.apply_fast_attention(parallel(keep, patcher), plan=fa.PlanChoice("cached", cache_plan))
    mf.sample(cached, x, ctx)
    assert find_multigpu(cached).report()["single_forwards"] == {
        "Fast Attention's block caching does not run under Multi-GPU yet": 3
    }


def test_unloading_the_model_releases_the_workers_copy(keep):
    patcher = mf.wan(seed=5)
    x, ctx = mf.wan_inputs()
    patched = parallel(keep, patcher)
    mf.sample(patched, x, ctx, steps=1)
    cluster = current_cluster()
    assert cluster.weights_key is not None
    patched.detach()  # ComfyUI's ON_DETACH (the model unloaded)
    assert cluster.weights_key is None
    ref = mf.sample(patcher, x, ctx)
    assert mf.max_rel(mf.sample(patched, x, ctx), ref) < TOL  # sent again
    # weights changed in place (a LoRA patched in): sent again, not the stale copy
    with torch.no_grad():
        patcher.model.diffusion_model.head.bias.add_(0.5)
    ref = mf.sample(patcher, x, ctx)
    assert mf.max_rel(mf.sample(patched, x, ctx), ref) < TOL


def test_workers_stop_when_no_patched_model_is_left(keep):
    patched = parallel(keep, mf.wan())
    mf.sample(patched, *mf.wan_inputs(), steps=1)
    procs = list(current_cluster().procs)
    keep.clear()
    del patched
    gc.collect()
    deadline = time.monotonic() + 15
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert current_cluster() is None and all(p.poll() is not None for p in procs)
