"""Launch-shape sweep of the sparse attention kernel at the shapes of the e2e models (GPU).

For each shape and each mask (dense, and the structural masks the presets build there), every tile
variant is timed against cuDNN and FA2 SDPA in the same run and checked against an fp32 reference on a
few query blocks. Variants are ``Tiles(block_n, warps, stages, rows, warp_spec)`` with TMA on or off and
any quantization: what `default_tiles` should pick comes from here.

    python -m fastattn.bench.tile_sweep                       # writes $OUT or bench/results/tile-sweep-<gpu>.json
    python -m fastattn.bench.tile_sweep --shapes wan1.3b --quants none
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parents[1]]

import torch  # noqa: E402
from fastattn.bench.kernel_speed import bench_ms, env_info, rel_l2, sampled_reference, sdpa_ms  # noqa: E402
from fastattn.masks import TokenLayout  # noqa: E402
from fastattn.plans.methods import build_mask, method_from_name  # noqa: E402

SHAPES = {  # name: (batch, heads, layout) as diffusers' attention sees them (Wan-1.3B: CFG batch 2)
    "wan1.3b": (2, 12, TokenLayout.video(21, 30, 52)),
    "flux2048": (1, 24, TokenLayout.video(1, 128, 128, text_len=512, text_first=True)),
    "wan14b": (1, 40, TokenLayout.video(21, 45, 80)),
}
MASKS = {  # shape: masks to time, as (method, density)
    "wan1.3b": [("dense", None), ("window3d", 0.3), ("window3d", 0.2), ("radial", 0.15)],
    "flux2048": [("dense", None), ("window3d", 0.4), ("window3d", 0.3)],
    "wan14b": [("window3d", 0.3), ("window3d", 0.2)],
}
# (block_n, warps, stages, rows, warp_spec)
TILES = [
    (128, 8, 3, None, False),  # the default since the H100 sweep
    (128, 8, 2, None, False),
    (64, 4, 3, 64, False),
    (128, 4, 3, 64, False),
    (64, 4, 2, 64, False),
    (128, 8, 3, None, True),
    (128, 8, 2, None, True),
    (128, 4, 2, 64, True),
    (64, 4, 3, 64, True),
    (128, 8, 4, None, True),
]


def parse_tiles(text: str | None):
    if not text:
        return TILES
    out = []
    for item in text.split(";"):
        bn, w, st, rows, ws = item.split(",")
        out.append((int(bn), int(w), int(st), int(rows) or None, ws.strip() in ("1", "true", "True")))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--quants", default="none,int8-fp8,fp8")
    ap.add_argument(
        "--tiles", default=None, help='"bn,warps,stages,rows(0=block),ws;..." (default: a built-in list)'
    )
    ap.add_argument("--tma", default="1", help="comma list of 0/1")
    ap.add_argument(
        "--quant-tiles", type=int, default=4, help="time quantized variants on the first N tiles only"
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the tile sweep needs a CUDA GPU")
    from fastattn.attn_kernels import triton_attention as TA

    tiles = parse_tiles(args.tiles)
    info = env_info()
    records = []
    t0 = time.perf_counter()
    for shape in args.shapes.split(","):
        b, h, layout = SHAPES[shape]
        s, d = layout.seq_len, 128
        g = torch.Generator(device="cuda").manual_seed(0)
        # [B, S, H, D] storage viewed as [B, H, S, D]: the strides diffusers' backends receive
        qkv = [torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3)]
        q, k, v = (x.transpose(1, 2) for x in qkv)
        cudnn, fa2 = sdpa_ms(q, k, v, "cudnn"), sdpa_ms(q, k, v, "fa2")
        print(f"{shape}: B={b} H={h} S={s}  cudnn {cudnn:.3f} ms  fa2 {fa2:.3f} ms", flush=True)
        for method, density in MASKS[shape]:
            cfg = method_from_name(method, density) if density else method_from_name("dense")
            mask = build_mask(cfg, layout, 128).to("cuda")
            bd = mask.block_density()
            st, en = mask.geometry.bounds()
            check = [0, mask.num_blocks // 2, mask.num_blocks - 1]
            ref = sampled_reference(q, k, v, mask, None, check, 1 / math.sqrt(d))
            for quant in args.quants.split(","):
                quant_tiles = tiles if quant == "none" else tiles[: args.quant_tiles]
                for tile in quant_tiles:
                    for tma in (bool(int(x)) for x in args.tma.split(",")):
                        rec = dict(info, bench="tile-sweep", shape=shape, B=b, H=h, S=s, D=d, method=method,
                                   density=density, block_density=bd, quant=quant, tiles=list(tile), tma=tma,
                                   cudnn_ms=cudnn, fa2_ms=fa2)  # fmt: skip
                        try:
                            fn = functools.partial(
                                TA.triton_attention, q, k, v, mask, None, quant, None, tile, False, tma
                            )
                            out, _ = fn()
                            rec["ms"] = bench_ms(fn, 100)
                        except Exception as e:  # a config the compiler rejects (shared memory, WS)
                            rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                            print(
                                f"  {method} {density} {quant} {tile} tma={tma}: {rec['error']}", flush=True
                            )
                            records.append(rec)
                            continue
                        got = torch.cat([out[:, :, int(st[i]) : int(en[i])] for i in check], 2)
                        rec["rel_l2"] = rel_l2(got, ref)
                        rec["speedup_vs_cudnn"] = cudnn / rec["ms"]
                        # per computed block, against cuDNN's dense rate
                        rec["block_efficiency"] = cudnn * bd / rec["ms"]
                        records.append(rec)
                        print(
                            f"  {method:8s} {str(density):5s} bd={bd:.3f} {quant:8s} {str(tile):28s} tma={int(tma)} "
                            f"{rec['ms']:8.3f} ms  x{rec['speedup_vs_cudnn']:.2f}  eff {rec['block_efficiency']:.2f}"
                            f"  err {rec['rel_l2']:.4f}",
                            flush=True,
                        )
        del q, k, v, qkv
        torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name().replace(" ", "_").lower()
    out = Path(args.out or Path(os.environ.get("OUT", "bench/results")) / f"tile-sweep-{gpu}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"bench": "tile-sweep", **info, "elapsed_s": time.perf_counter() - t0,
                               "records": records}, indent=1))  # fmt: skip
    best = {}
    for r in records:
        if "ms" in r:
            key = (r["shape"], r["method"], r["density"], r["quant"])
            if key not in best or r["ms"] < best[key]["ms"]:
                best[key] = r
    print("\nbest per shape / mask / quant:")
    for (shape, method, density, quant), r in best.items():
        print(f"  {shape:9s} {method:8s} {str(density):5s} {quant:8s} {str(r['tiles']):28s} tma={int(r['tma'])} "
              f"{r['ms']:8.3f} ms  x{r['speedup_vs_cudnn']:.2f} eff {r['block_efficiency']:.2f}")  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
