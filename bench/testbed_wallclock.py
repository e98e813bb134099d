"""Wall-clock of the learned testbed at its full size (16 frames, 4,096 tokens, 16 steps) under dense and under
plans, per batch size, and where the host time of one sparse attention call goes.

The testbed is small (19.2M parameters): at batch 1 a forward is bound by the host (Python and kernel launches),
so an attention plan only pays when its call costs the host no more than dense SDPA's; at larger batches the GPU
work dominates and sparsity can pay. This bench measures both regimes on the same plans, so a wall-clock claim
says which regime it is in:

1. ``sampling``: whole 16-step generations (every step timed, dense steps and captures included) of one batch of
   labels, per batch size and plan, after one warm-up generation (compilation), median of ``--reps``.
2. ``host_breakdown`` (GPU only): host microseconds per call, issued back to back without synchronizing, for
   each layer of the call path at the testbed's shape: cuDNN SDPA, the Triton launch alone (arguments prebuilt),
   ``triton_attention``, the custom op, the public ``sparse_attention`` and the runtime's ``attend`` with each plan.
3. ``profile``: one forward per plan under ``torch.profiler``: kernels launched and the busiest host ops.

    python -m fastattn.bench.testbed_wallclock                  # GPU: testbed-wallclock-<gpu>.json
    python -m fastattn.bench.testbed_wallclock --tiny           # CPU: checks the script in seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

CALIBRATED = Path(__file__).resolve().parents[1] / "presets" / "plans" / "testbed-calibrated-0.3"
HELD_LABELS = (0, 3, 6, 9, 12, 15, 18, 21)


def default_plans(block: int) -> dict:
    """Name -> testbed ``enable()`` keywords; ``None`` is dense."""
    return {
        "dense": None,
        "window3d-0.3": {"method": "window3d", "density": 0.3, "clamp_density": True, "block_size": block},
        "balanced": {"preset": "balanced", "block_size": block},
        "calibrated-0.3": {"plan_path": str(CALIBRATED), "block_size": block},
    }


def _enable(model, kw: dict | None):
    from fastattn.plans import make_plan
    from fastattn.testbed.fast import enable

    if kw is None:
        return None
    kw = dict(kw)
    if "plan_path" in kw:
        return enable(model, plan=make_plan("testbed", kw.pop("plan_path"), **kw))
    return enable(model, kw.pop("preset", None), **kw)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_sampling(model, kw, batch: int, steps: int, reps: int, device: str) -> dict:
    """Median seconds of a whole ``steps``-step generation of ``batch`` clips under ``kw``'s plan."""
    from fastattn.testbed.sample import sample

    labels = [HELD_LABELS[i % len(HELD_LABELS)] for i in range(batch)]
    handle = _enable(model, kw)
    try:
        _sync(device)
        t0 = time.perf_counter()
        sample(model, labels, num_steps=steps, seed=0)  # warm-up: compiles, builds masks and plans
        _sync(device)
        warm_s = time.perf_counter() - t0
        times = []
        for rep in range(reps):
            _sync(device)
            t0 = time.perf_counter()
            sample(model, labels, num_steps=steps, seed=rep + 1)
            _sync(device)
            times.append(time.perf_counter() - t0)
        stats = handle.stats() if handle is not None else None
    finally:
        if handle is not None:
            handle.disable()
    out = {"batch": batch, "seconds": statistics.median(times), "all_seconds": times, "warmup_seconds": warm_s}
    if stats is not None:
        out["attention_density"] = stats["density"]
        out["fallbacks"] = stats["fallbacks"]
    return out


def _host_us(fn, n: int, device: str) -> float:
    fn()
    _sync(device)
    t = time.perf_counter()
    for _ in range(n):
        fn()
    us = (time.perf_counter() - t) / n * 1e6
    _sync(device)
    return us


def host_breakdown(batch: int, plans: dict, block: int, device: str, n: int = 300) -> list[dict]:
    """Host µs per call of each layer of the sparse call path at the testbed's shape (on a CPU: the SDPA and
    runtime rows only, as a check of the script)."""
    import torch.nn.functional as F
    from fastattn.attention import AttentionRuntime, ForwardContext
    from fastattn.masks import TokenLayout
    from fastattn.plans import make_plan

    gpu = device == "cuda"
    layout = TokenLayout.video(16, 16, 16) if gpu else TokenLayout.video(2, 4, 4)
    h, d = 6, 64
    dtype = torch.bfloat16 if gpu else torch.float32
    q, k, v = (torch.randn(batch, layout.seq_len, h, d, device=device, dtype=dtype) for _ in range(3))
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    rows = []

    def add(name, fn):
        if gpu:
            from triton.testing import do_bench

            gpu_ms = do_bench(fn)
        else:
            gpu_ms = None
        rows.append({"batch": batch, "call": name, "host_us": _host_us(fn, n, device), "gpu_ms": gpu_ms})

    add("sdpa (cuDNN)" if gpu else "sdpa", lambda: F.scaled_dot_product_attention(qt, kt, vt))
    if gpu:
        rows.extend(_kernel_layers(batch, layout, block, qt, kt, vt, add))
    for name, kwargs in plans.items():
        if kwargs is None:
            continue
        kwargs = dict(kwargs)
        path = kwargs.pop("plan_path", None)
        plan = make_plan("testbed", path or kwargs.pop("preset", None), **kwargs)
        runtime = AttentionRuntime(plan, num_layers=10)
        state = runtime.begin_forward(ForwardContext(layout, 8, 16))

        def call(runtime=runtime, state=state):
            return runtime.attend(state, q, k, v, layer=3)

        add(f"runtime.attend {name} (step 8 of 16)", call)
    return rows


def _kernel_layers(batch, layout, block, qt, kt, vt, add) -> list:
    """The kernel layers' rows (GPU): Triton launch alone, ``triton_attention``, custom op, ``sparse_attention``."""
    from fastattn.attn_kernels import ops, sparse_attention
    from fastattn.attn_kernels import triton_attention as ta
    from fastattn.masks import patterns as P

    mask = P.window3d_for_density(layout, 0.3, block_size=block).to("cuda")
    lists = mask.block_lists()
    launches = []
    real = ta._attn_fwd

    class Recorder:  # catches the launch's grid and arguments once
        def __getitem__(self, grid):
            return lambda *a, **kw: launches.append((grid, a, kw)) or real[grid](*a, **kw)

    ta._attn_fwd = Recorder()
    try:
        ta.triton_attention(qt, kt, vt, lists)
    finally:
        ta._attn_fwd = real
    grid, a, kw = launches[0]
    add("triton launch only", lambda: real[grid](*a, **kw))
    add("triton_attention", lambda: ta.triton_attention(qt, kt, vt, lists))
    cnt, idx, geom = lists
    op_args = (cnt, idx, None, 1.0 / 8, geom.block_size, geom.q_split, geom.kv_split, "none", "triton")
    add("custom op", lambda: ops._sparse_attention_op(qt, kt, vt, *op_args))
    add("sparse_attention", lambda: sparse_attention(qt, kt, vt, mask))
    return []


def profile_forward(model, kw, batch: int, device: str, top: int = 12) -> dict:
    """One testbed forward (step 8 of 16) under ``torch.profiler``: kernel launches and the busiest host ops."""
    from torch.profiler import ProfilerActivity, profile

    cfg = model.cfg
    dtype = next(model.parameters()).dtype
    x = torch.randn(batch, cfg.frames, cfg.in_channels, cfg.size, cfg.size, device=device, dtype=dtype)
    t = torch.full((batch,), 0.5, device=device)
    y = torch.tensor([HELD_LABELS[i % 8] for i in range(batch)], device=device)
    handle = _enable(model, kw)
    try:
        with torch.no_grad():
            for i in range(16):  # a whole run first: per-step state (captures, reuse) as in sampling
                model(x, t, y, step_index=i, num_steps=16, timestep=0.5)
            _sync(device)
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
            with profile(activities=acts) as prof:
                model(x, t, y, step_index=8, num_steps=16, timestep=0.5)
                _sync(device)
    finally:
        if handle is not None:
            handle.disable()
    events = prof.key_averages()
    kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    busiest = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {
        "kernels": kernels,
        "device_ms": sum(e.self_device_time_total for e in events) / 1e3,
        "host_top": [f"{e.key}: {e.count} calls, {e.self_cpu_time_total:.0f} us self" for e in busiest],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny random model on the CPU (checks the script)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--plans", default=None, help="JSON object name -> enable() keywords (adds to the defaults)")
    ap.add_argument("--out", default=None, help="output folder (default $OUT or bench/results)")
    args = ap.parse_args(argv)

    from fastattn.bench.quality import _versions
    from fastattn.testbed.model import TestbedConfig, TestbedDiT
    from fastattn.testbed.sample import load_testbed

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if device == "cpu" and not args.tiny:
        raise SystemExit("the wall-clock bench needs a GPU; use --tiny to check the script on the CPU")
    if args.tiny:
        torch.manual_seed(0)
        model = TestbedDiT(TestbedConfig.tiny()).eval()
        block, steps, batches, reps = 16, 2, [1], 1
    else:
        model = load_testbed(device=device, dtype=torch.bfloat16)
        block, steps, batches, reps = 128, 16, args.batches, args.reps
    plans = default_plans(block)
    plans.update(json.loads(args.plans) if args.plans else {})
    if args.tiny:
        plans.pop("calibrated-0.3")  # its block maps are for the full-size grid
    base = Path(args.out or os.environ.get("OUT") or Path(__file__).parent / "results")
    base.mkdir(parents=True, exist_ok=True)
    tag = "tiny" if args.tiny else _versions()["device"].lower().replace(" ", "_")
    path = base / f"testbed-wallclock-{tag}.json"
    record = {"bench": "testbed_wallclock", **_versions(), "steps": steps, "block_size": block, "plans": plans,
              "notes": "seconds: whole generations (every step), median of reps after one warm-up generation; "
                       "speedup = dense seconds / plan seconds at the same batch, same run"}  # fmt: skip
    sampling = []
    for batch in batches:
        dense_s = None
        for name, kw in list(plans.items()):
            try:
                row = {"plan": name, **time_sampling(model, kw, batch, steps, reps, device)}
            except (OSError, ValueError) as e:  # a plan folder missing or refused: recorded, the others still run
                sampling.append({"plan": name, "batch": batch, "error": f"{type(e).__name__}: {e}"})
                print(f"batch {batch:2d} {name:18s} {e}", flush=True)
                del plans[name]
                continue
            dense_s = row["seconds"] if kw is None else dense_s
            row["speedup_vs_dense"] = dense_s / row["seconds"] if dense_s else None
            sampling.append(row)
            record["sampling"] = sampling
            path.write_text(json.dumps(record, indent=1))
            print(f"batch {batch:2d} {name:18s} {row['seconds'] * 1e3:8.1f} ms  "
                  f"{row['speedup_vs_dense'] or 0:.2f}x dense", flush=True)  # fmt: skip
    record["host_breakdown"] = [r for b in batches for r in host_breakdown(b, plans, block, device)]
    path.write_text(json.dumps(record, indent=1))
    record["profile"] = {name: profile_forward(model, kw, batches[0], device) for name, kw in plans.items()}
    path.write_text(json.dumps(record, indent=1))
    for r in record.get("host_breakdown", []):
        print(f"batch {r['batch']:2d} {r['call']:44s} host {r['host_us']:7.1f} us  gpu {r['gpu_ms'] or 0:.3f} ms")
    for name, p in record["profile"].items():
        print(f"{name}: {p['kernels']} kernels, {p['device_ms']:.2f} ms device per forward")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
