"""Per-call cost of the sparse attention path on a GPU: device time vs host (launch) time, against dense SDPA.

For each shape, one attention call is timed three ways:

* ``gpu_ms``: CUDA-event time of the kernels (``triton.testing.do_bench``);
* ``host_us``: wall time per call of a burst of calls issued back to back without synchronizing (what the
  Python side, the checks and the launches cost; when it exceeds ``gpu_ms`` the call is host-bound);
* the same for ``torch.nn.functional.scaled_dot_product_attention`` (cuDNN on Hopper).

It also profiles one burst with cProfile and keeps the functions with the most own time, so a slow host path
says where its time goes.

    python bench/call_overhead.py      # GPU: bench/results/call-overhead-<gpu>.json (or $OUT/)
"""

from __future__ import annotations

import cProfile
import io
import json
import os
import platform
import pstats
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parents[1]]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from fastattn.attn_kernels import sparse_attention  # noqa: E402
from fastattn.masks import TokenLayout  # noqa: E402
from fastattn.masks import patterns as P  # noqa: E402

SHAPES = {  # name: (B, H, grid F x H x W, D)
    "testbed_4k": (1, 6, (16, 16, 16), 64),
    "wan1.3b_32k": (1, 12, (21, 30, 52), 128),
}


def host_us(fn, n: int = 200) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return host


def main() -> int:
    from triton.testing import do_bench

    if not torch.cuda.is_available():
        raise SystemExit("needs a GPU")
    records = []
    for name, (b, h, grid, d) in SHAPES.items():
        layout = TokenLayout.video(*grid)
        s = layout.seq_len
        q, k, v = (
            torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3)
        )
        mask = P.window3d_for_density(layout, 0.3).to("cuda")
        calls = {
            "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
            "fastattn_window3d_0.3": lambda: sparse_attention(q, k, v, mask),
        }
        for label, fn in calls.items():
            rec = {"shape": name, "B": b, "H": h, "S": s, "D": d, "call": label}
            rec["gpu_ms"] = do_bench(fn)
            rec["host_us"] = host_us(fn)
            rec["host_bound"] = rec["host_us"] / 1e3 > rec["gpu_ms"]
            if label != "sdpa":
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(100):
                    fn()
                prof.disable()
                torch.cuda.synchronize()
                buf = io.StringIO()
                pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(12)
                rec["host_profile_top"] = buf.getvalue().splitlines()[-16:]
            records.append(rec)
            print(json.dumps({k: v for k, v in rec.items() if k != "host_profile_top"}), flush=True)
    import triton

    result = {
        "bench": "call_overhead",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "platform": platform.platform(),
        "records": records,
    }
    slug = torch.cuda.get_device_name().lower().replace(" ", "_")
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results") / f"call-overhead-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    for r in records:
        print(f"{r['shape']:14s} {r['call']:24s} gpu {r['gpu_ms']:8.3f} ms  host {r['host_us']:8.1f} us")
    for r in records:
        if "host_profile_top" in r:
            print(f"--- {r['shape']} {r['call']}")
            print("\n".join(r["host_profile_top"]))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
