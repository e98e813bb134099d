"""Host cost of one attention call through the runtime (CPU): Python work and host<->device syncs per call.

On a GPU the testbed is host-bound: a kernel call takes 0.08-0.34 ms, so what the runtime does around it in
Python, and every read of a device tensor (``.item()``, ``.cpu()``, ``.tolist()``, ``bool(t)``,
``torch.nonzero``...) or blocking copy of host data to it (``t.to(device)``), which stalls the host until the
GPU drains, decides the step time. This bench measures
that host side on the CPU, with the attention math taken out: q, k, v are small (the testbed's 10 layers x 6
heads x 64 on a ``16 x 4 x 4`` grid of 256 tokens, cut into 32 blocks of 8 tokens as the testbed's 4,096
tokens are into 32 blocks of 128, so the calibrated plan's block maps fit) and the kernel op and the dense
function return ``torch.empty_like(q)``: what is left per call is the runtime's Python, the kernel layer's
checks and the torch calls that build the call's inputs (a launch each on a GPU).

For each plan it runs one 16-step run to build the caches, then times further runs (steady state) and
profiles one of them with cProfile. Reported per attention call: ``host_us`` (wall time; on the CPU it
includes what torch computes, e.g. the dynamic selection's scores, which a GPU runs asynchronously),
``tensor_ops`` (torch calls returning tensors: dispatches, most of them a kernel launch on a GPU), the calls
that read tensor values back to the host or copy to a named device
(:class:`~fastattn.attention.host_sync.HostSyncs`: a device sync each on a GPU), and the functions with the
most own time.

    python bench/runtime_overhead.py            # prints a table; --json PATH writes the records
    python bench/runtime_overhead.py --profile 15   # with the 15 most expensive functions per plan

No GPU numbers: a CPU measurement of host work, not of a GPU's step time.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import platform
import pstats
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parents[1]]

import torch  # noqa: E402
from fastattn.attention import AttentionRuntime, ForwardContext  # noqa: E402
from fastattn.attention.host_sync import HostSyncs  # noqa: E402
from fastattn.attn_kernels import ops  # noqa: E402
from fastattn.masks import TokenLayout  # noqa: E402
from fastattn.plans import make_plan  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

CALIBRATED = str(Path(__file__).resolve().parents[1] / "presets" / "plans" / "testbed-calibrated-0.3")
GRID = (16, 4, 4)  # 256 tokens in 32 blocks of 8: the testbed's 32 x 32 block grid, small tensors
BLOCK_SIZE = 8
LAYERS, HEADS, HEAD_DIM, STEPS = 10, 6, 64, 16


def plans() -> dict:
    """The plans compared (block size 8 so the layout has the testbed's 32 blocks a side)."""
    return {
        "dense": make_plan("testbed", method="dense", block_size=BLOCK_SIZE),
        "window3d-0.3": make_plan("testbed", method="window3d", density=0.3, block_size=BLOCK_SIZE),
        "balanced": make_plan("testbed", "balanced", block_size=BLOCK_SIZE),
        "calibrated-0.3": make_plan("testbed", CALIBRATED, block_size=BLOCK_SIZE),
    }


def _no_math_op(q, k, v, kv_counts, kv_indices, perm, scale, block_size, q_split, kv_split, quant, kernel):
    """The kernel op without its math: the output and log-sum-exp it would allocate."""
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


def _no_math_dense(query, key, value, attn_mask=None, scale=None):
    return torch.empty_like(query)


class TensorOps(TorchFunctionMode):
    """Counts torch calls that return tensors (each a dispatch, most a kernel launch on a GPU)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.count += isinstance(out, torch.Tensor) or (
            isinstance(out, (tuple, list)) and any(isinstance(o, torch.Tensor) for o in out)
        )
        return out


def run(runtime: AttentionRuntime, layout: TokenLayout, qkv, runs: int) -> int:
    """``runs`` runs of STEPS steps through every layer; returns the attention calls made."""
    calls = 0
    for _ in range(runs):
        for step in range(STEPS):
            state = runtime.begin_forward(ForwardContext(layout, step, STEPS))
            for layer in range(LAYERS):
                runtime.attend(state, *qkv, layer=layer)
                calls += 1
            runtime.end_forward(state)
    return calls


def measure(name: str, plan, runs: int, top: int) -> dict:
    layout = TokenLayout.video(*GRID)
    gen = torch.Generator().manual_seed(0)
    shape = (1, layout.seq_len, HEADS, HEAD_DIM)
    qkv = [torch.randn(shape, generator=gen, dtype=torch.bfloat16) for _ in "qkv"]
    runtime = AttentionRuntime(plan, num_layers=LAYERS, dense_fn=_no_math_dense)
    run(runtime, layout, qkv, 1)  # builds masks, per-head work, selections
    start = time.perf_counter()
    calls = run(runtime, layout, qkv, runs)
    host_us = (time.perf_counter() - start) / calls * 1e6
    prof = cProfile.Profile()
    prof.enable()
    calls = run(runtime, layout, qkv, 1)
    prof.disable()
    with HostSyncs() as syncs:
        run(runtime, layout, qkv, 1)
    with TensorOps() as tensor_ops:
        run(runtime, layout, qkv, 1)
    st = pstats.Stats(prof)
    rows = sorted(st.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    profile = [
        f"{tt / calls * 1e6:7.1f} us/call own  {nc / calls:6.2f} calls/call  {Path(f).name}:{line}({fn})"
        for (f, line, fn), (_, nc, tt, _, _) in rows
    ]
    stats = runtime.stats.as_dict()
    return {
        "plan": name,
        "host_us": host_us,
        "tensor_ops_per_call": tensor_ops.count / calls,
        "syncs_per_call": {k: v / calls for k, v in sorted(syncs.calls.items())},
        "sync_sites": syncs.report().splitlines(),
        "sparse_share": stats["sparse_calls"] / stats["calls"],
        "density": stats["density"],
        "profile_top": profile,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="timed 16-step runs per plan (after one warm-up run)")
    ap.add_argument("--profile", type=int, default=0, help="print the N functions with the most own time")
    ap.add_argument("--only", nargs="*", help="plan names to run (default: all)")
    ap.add_argument("--json", help="write the records here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    saved = ops._sparse_attention_op
    ops._sparse_attention_op = _no_math_op  # the checks and dispatch of ops.run_attention still run
    try:
        records = [
            measure(name, plan, args.runs, max(args.profile, 12))
            for name, plan in plans().items()
            if not args.only or name in args.only
        ]
    finally:
        ops._sparse_attention_op = saved
    for r in records:
        syncs = ", ".join(f"{k} {v:.2f}" for k, v in r["syncs_per_call"].items()) or "none"
        ops_per_call = r["tensor_ops_per_call"]
        print(
            f"{r['plan']:15s} host {r['host_us']:7.1f} us/call  torch ops {ops_per_call:5.1f}/call  "
            f"sparse {r['sparse_share']:.2f}  host syncs: {syncs}"
        )
    if args.profile:
        for r in records:
            print(f"--- {r['plan']}")
            print("\n".join(r["profile_top"][: args.profile]))
            print("\n".join(f"  sync: {line}" for line in r["sync_sites"]))
    if args.json:
        meta = {"bench": "runtime_overhead", "device": "cpu", "torch": torch.__version__,
                "platform": platform.platform(), "grid": GRID, "block_size": BLOCK_SIZE}  # fmt: skip
        Path(args.json).write_text(json.dumps({**meta, "records": records}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
