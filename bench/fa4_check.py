"""FlashAttention-4 behind our op, on a GPU: accuracy and speed against cuDNN SDPA and our Triton kernel.

``python -m fastattn.bench.fa4_check [--out PATH] [--shapes wan1.3b,flux2048,small] [--reps 20]``

Per shape (Wan-1.3B 480p x 81 frames: 12 heads, 32,760 tokens; FLUX 2048^2: 24 heads, 16,384 image tokens;
a small video shape with a 128-token text prefix and head_dim 64, i.e. two segments on FA4's block grid):

- cuDNN SDPA dense (the speed baseline), FA4 dense called directly (``flash_attn_func``) and through our op
  (``run_attention(..., backend="fa4")`` on dense lists), our Triton kernel dense;
- block-sparse: our 3-D window at density 0.2 and band at 0.1, through our op with ``backend="fa4"``,
  ``"triton"`` and ``"auto"`` (which records the backend that served it);
- small shape only: random per-head lists with an empty row (FA4 must give out 0 and lse -inf there) and a
  ragged 77-token text prefix FA4 cannot take (``auto`` must serve it with Triton and say why; forced
  ``fa4`` must raise).

Accuracy on sampled query blocks (first, a third, half, last: the ragged tail included), in float32:
``rel_dense`` against exact dense attention, ``rel_sparse`` against our reference on the same listed blocks
(the sparse semantics: FA4 must match it as well as Triton does), ``lse_err`` the largest |lse - reference|
on rows that read keys. Two kinds of inputs: ``structured`` (smooth fields + 3-D RoPE, as
``bench/kernel_speed.py``; timed) and ``random`` (normal; where sparse and dense differ, so ``rel_sparse``
tells the semantics apart). Times: CUDA events, median of ``--reps`` after warm-up; the first call (FA4's JIT
compile, Triton's) is timed on its own. Every variant runs in try/except: a failure is recorded with its
error and the run goes on. JSON to ``--out`` (default ``$OUT/fa4-check-<gpu>.json`` or
``bench/results/``), with device and versions; a table last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
import traceback
from pathlib import Path

import torch
from fastattn.attn_kernels import ops, run_attention
from fastattn.attn_kernels.geometry import BlockLists, KernelGeometry, dense_lists
from fastattn.bench.kernel_speed import make_inputs
from fastattn.masks import TokenLayout, patterns

SHAPES = {
    # name: (heads, head_dim, layout)
    "wan1.3b": (12, 128, TokenLayout.video(21, 30, 52)),
    "flux2048": (24, 128, TokenLayout.video(1, 128, 128)),
    "small": (4, 64, TokenLayout.video(4, 16, 24, text_len=128)),
}
RAGGED_SMALL = TokenLayout.video(4, 16, 24, text_len=77)  # text segment off FA4's block grid


# ----------------------------------------------------------------------------- helpers


def versions() -> dict:
    from importlib import metadata

    out = {"torch": torch.__version__, "python": platform.python_version()}
    for name in (
        "triton",
        "flash-attn-4",
        "nvidia-cutlass-dsl",
        "nvidia-cutlass-dsl-libs-core",
        "quack-kernels",
    ):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def time_ms(fn, reps: int, warmup: int = 3) -> tuple[float, float]:
    """(first call in ms, median of ``reps`` CUDA-event timings after ``warmup`` more calls)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = (time.perf_counter() - t0) * 1e3
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return first, statistics.median(times)


def sampled_reference(q, k, v, lists: BlockLists | None, geom: KernelGeometry, blocks, scale):
    """float32 ``(out, lse)`` of the query blocks ``blocks`` of ``geom`` over the keys their lists name (all
    keys when ``lists`` is None), per head; rows of empty lists get out 0 and lse -inf."""
    q_st, q_en = geom.q_bounds()
    k_st, k_en = geom.kv_bounds()
    b, h = q.shape[:2]
    outs, lses = [], []
    for i in blocks:
        rows = slice(int(q_st[i]), int(q_en[i]))
        o = torch.zeros(b, h, rows.stop - rows.start, v.shape[-1], device=q.device)
        lse = torch.full((b, h, rows.stop - rows.start), -math.inf, device=q.device)
        for bi in range(b):
            for hi in range(h):
                if lists is None:
                    keys = torch.arange(k.shape[2], device=q.device)
                else:
                    c = lists.counts[min(bi, lists.counts.shape[0] - 1), min(hi, lists.counts.shape[1] - 1)]
                    ix = lists.indices[
                        min(bi, lists.indices.shape[0] - 1), min(hi, lists.indices.shape[1] - 1)
                    ]
                    kb = ix[i, : int(c[i])].tolist()
                    if not kb:
                        continue
                    keys = torch.cat([torch.arange(int(k_st[j]), int(k_en[j])) for j in kb]).to(q.device)
                s = q[bi, hi, rows].float() @ k[bi, hi, keys].float().T * scale
                lse[bi, hi] = torch.logsumexp(s, -1)
                o[bi, hi] = torch.softmax(s, -1) @ v[bi, hi, keys].float()
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2)


def rows_of(x, geom: KernelGeometry, blocks):
    st, en = geom.q_bounds()
    return torch.cat([x[:, :, int(st[i]) : int(en[i])] for i in blocks], 2)


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def check_blocks(geom: KernelGeometry) -> list[int]:
    n = geom.q_blocks
    return sorted({0, n // 3, n // 2, n - 1})


def empty_row_lists(geom: KernelGeometry, heads: int, device) -> BlockLists:
    """Random per-head lists (about 40% of key blocks), every row non-empty except head 0's block 1."""
    g = torch.Generator().manual_seed(7)
    bm = torch.rand(1, heads, geom.q_blocks, geom.kv_blocks, generator=g) < 0.4
    bm[..., 0] = True
    bm[0, 0, 1] = False
    counts = bm.sum(-1, dtype=torch.int32)
    indices = torch.sort((~bm).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    return BlockLists(counts.to(device), indices.to(device), geom)


# ----------------------------------------------------------------------------- variants


class Run:
    """Collects records; every variant is isolated (its error recorded, the run continues)."""

    def __init__(self, info: dict, reps: int):
        self.info, self.reps, self.records = info, reps, []

    def variant(self, base: dict, name: str, fn, inputs: dict | None = None, expect_error: bool = False):
        """Time ``fn(q, k, v) -> AttentionResult | Tensor`` on the structured inputs and score it on each kind of
        ``inputs`` (``{kind: (q, k, v, references)}``)."""
        rec = {**base, "variant": name}
        try:
            q, k, v = base["_timing"]
            res = fn(q, k, v)
            rec["backend"] = getattr(res, "backend", None)
            if expect_error:
                rec["error"] = None
                rec["note"] = "expected an error, got none"
            else:
                first, ms = time_ms(lambda: fn(q, k, v), self.reps)
                rec.update(first_call_ms=first, ms=ms)
                for kind, (qq, kk, vv, refs) in (inputs or {}).items():
                    rec.update(score(fn(qq, kk, vv), refs, kind))
        except Exception as e:
            rec["error"] = f"{type(e).__name__}: {str(e)[:800]}"
            if not expect_error:
                rec["traceback"] = traceback.format_exc()[-3000:]
        rec.pop("_timing", None)
        self.records.append(rec)
        ms = rec.get("ms")
        line = f"{rec['shape']:9s} {rec['mask']:12s} {name:18s} "
        line += f"{ms:9.3f} ms" if ms is not None else f"{'':12s}"
        line += f"  backend={rec.get('backend')}"
        if "error" in rec:
            line += f"  error={rec['error'][:160]}"
        print(line, flush=True)
        return rec


def score(res, refs: dict, kind: str) -> dict:
    out = res.out if hasattr(res, "out") else res
    lse = getattr(res, "lse", None)
    geom, blocks = refs["geom"], refs["blocks"]
    got = rows_of(out, geom, blocks)
    rec = {f"rel_dense_{kind}": rel(got, refs["dense"][0])}
    if refs.get("sparse") is not None:
        ref_out, ref_lse = refs["sparse"]
        rec[f"rel_sparse_{kind}"] = rel(got, ref_out)
        if lse is not None:
            got_lse = rows_of(lse[..., None], geom, blocks)[..., 0]
            empty = torch.isinf(ref_lse)
            rec[f"lse_err_{kind}"] = float((got_lse[~empty] - ref_lse[~empty]).abs().max())
            if bool(empty.any()):
                rec[f"empty_rows_ok_{kind}"] = bool(
                    torch.isinf(got_lse[empty]).all()
                    and (got_lse[empty] < 0).all()
                    and (got[empty] == 0).all()
                )
    return rec


def sdpa_cudnn(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def fa4_direct(q, k, v):
    from flash_attn.cute import flash_attn_func

    out, _ = flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)), return_lse=True)
    return out.transpose(1, 2)


def run_shape(run: Run, name: str, heads: int, d: int, layout: TokenLayout, dev: str = "cuda"):
    scale = 1.0 / math.sqrt(d)
    kinds = {
        kind: make_inputs(kind, 1, heads, layout, d, torch.bfloat16, dev, seed=seed)
        for kind, seed in (("structured", 1), ("random", 0))
    }
    every = dense_lists(KernelGeometry.square(layout.seq_len, 128, layout.split), torch.device(dev))
    geom = every.geometry
    blocks = check_blocks(geom)
    dense_ref = {kind: sampled_reference(*qkv, None, geom, blocks, scale) for kind, qkv in kinds.items()}
    masks: dict[str, BlockLists] = {"dense": every}
    try:
        if layout.grid is not None:
            masks["window3d_0.2"] = patterns.window3d_for_density(layout, 0.2).to(dev).block_lists()
        masks["band_0.1"] = patterns.band_for_density(layout, 0.1).to(dev).block_lists()
        if name == "small":
            masks["empty_rows"] = empty_row_lists(geom, heads, dev)
    except Exception as e:
        print(f"{name}: mask construction failed: {type(e).__name__}: {e}")
    for mask_name, lists in masks.items():
        density = float(lists.counts.float().sum() / (lists.counts.numel() * geom.kv_blocks))
        base = {
            "shape": name, "H": heads, "S": layout.seq_len, "D": d, "mask": mask_name, "density": density,
            "_timing": kinds["structured"],
        }  # fmt: skip
        inputs = {}
        for kind, qkv in kinds.items():
            sparse = None if mask_name == "dense" else sampled_reference(*qkv, lists, geom, blocks, scale)
            inputs[kind] = (
                *qkv,
                {"geom": geom, "blocks": blocks, "dense": dense_ref[kind], "sparse": sparse},
            )
        if mask_name == "dense":
            run.variant(base, "sdpa_cudnn", sdpa_cudnn, inputs)
            run.variant(base, "fa4_direct", fa4_direct, inputs)
        for backend in ("fa4", "triton", "auto"):
            fn = lambda q, k, v, b=backend, li=lists: run_attention(q, k, v, *li, backend=b)  # noqa: E731
            run.variant(base, f"op_{backend}", fn, inputs)
    if name == "small":  # a text prefix off FA4's grid: auto -> Triton with the reason, forced fa4 -> error
        qkv = make_inputs("random", 1, heads, RAGGED_SMALL, d, torch.bfloat16, dev)
        lists = patterns.band_for_density(RAGGED_SMALL, 0.3).to(dev).block_lists()
        base = {"shape": "small_ragged", "H": heads, "S": RAGGED_SMALL.seq_len, "D": d, "mask": "band_0.3",
                "density": None, "_timing": qkv}  # fmt: skip
        rg = lists.geometry
        rb = check_blocks(rg)
        refs = {"geom": rg, "blocks": rb, "dense": sampled_reference(*qkv, None, rg, rb, scale),
                "sparse": sampled_reference(*qkv, lists, rg, rb, scale)}  # fmt: skip
        inputs = {"random": (*qkv, refs)}
        run.variant(base, "op_auto", lambda q, k, v: run_attention(q, k, v, *lists), inputs)
        run.variant(
            base,
            "op_fa4_refused",
            lambda q, k, v: run_attention(q, k, v, *lists, backend="fa4"),
            expect_error=True,
        )
    del kinds
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- table


def summarize(records: list[dict]) -> None:
    base = {r["shape"]: r["ms"] for r in records if r.get("variant") == "sdpa_cudnn" and r.get("ms")}
    print(
        f"\n{'shape':12s} {'mask':12s} {'variant':16s} {'backend':8s} {'ms':>9s} {'vs cuDNN':>8s} "
        f"{'rel_dense':>9s} {'rel_sparse':>10s} {'lse_err':>8s}  error"
    )
    for r in records:
        ms = r.get("ms")
        speed = f"{base[r['shape']] / ms:8.2f}" if ms and r["shape"] in base else f"{'':8s}"
        kind = "structured" if "rel_dense_structured" in r else "random"
        fmt = lambda x: f"{x:.4g}" if isinstance(x, float) else ""  # noqa: E731
        print(
            f"{r['shape']:12s} {r['mask']:12s} {r['variant']:16s} {str(r.get('backend')):8s} "
            f"{(f'{ms:9.3f}' if ms else ''):>9s} {speed} {fmt(r.get(f'rel_dense_{kind}')):>9s} "
            f"{fmt(r.get('rel_sparse_random')):>10s} {fmt(r.get('lse_err_random')):>8s}  "
            f"{(r.get('error') or '')[:80]}"
        )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("fa4_check needs a CUDA GPU (FlashAttention-4 runs on sm90/sm100)")
    gpu = torch.cuda.get_device_name().replace(" ", "_").lower()
    out = Path(args.out or Path(os.environ.get("OUT", "bench/results")) / f"fa4-check-{gpu}.json")
    from fastattn.attn_kernels import fa4

    info = {
        "bench": "fa4_check",
        "device": torch.cuda.get_device_name(),
        "capability": list(torch.cuda.get_device_capability()),
        **versions(),
        "fa4_import_error": fa4.import_error(),
    }
    print(json.dumps(info))
    run = Run(info, args.reps)
    ops.reset_backend_stats()
    for name in args.shapes.split(","):
        heads, d, layout = SHAPES[name]
        try:
            run_shape(run, name, heads, d, layout)
        except Exception as e:  # a shape's setup failing (inputs, references) must not end the run
            run.records.append({"shape": name, "mask": "-", "variant": "setup", "error": f"{type(e).__name__}: {e}",
                                "traceback": traceback.format_exc()[-3000:]})  # fmt: skip
            print(f"{name}: setup failed: {type(e).__name__}: {e}", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)  # written after every shape: a crash keeps the rest
        out.write_text(
            json.dumps({**info, "backend_stats": ops.backend_stats(), "records": run.records}, indent=1)
        )
    summarize(run.records)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
