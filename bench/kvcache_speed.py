"""GPU decode speed: bf16 ``DynamicCache`` vs fastattn's ``QuantizedKVCache`` (random-weight 7B-class Llama).

A Llama-2-7B-shaped model with GQA (32 layers, hidden 4096, 32 query / 8 KV heads, head_dim 128, MLP 11008,
~6.7B params) is built from ``LlamaConfig`` with random bf16 weights on the GPU (no downloads). Both caches are
filled with the same random 8,192-token K/V per layer (decode speed does not depend on the values), then
``--steps`` greedy decode steps are timed at batch 1 and at large, memory-bound batches. The quantized cache runs
in both attention modes: ``fused`` (default on CUDA: transformers' SDPA call attends over the packed codes with
:mod:`fastattn.attn_kernels.kv_decode`) and ``dequantize`` (the body is dequantized into a bf16 buffer every step, then
SDPA). Each fused record carries the cache's attention stats (fused vs dense calls) and a correctness check of
the fused kernel against SDPA on the dequantized keys/values of the same filled cache.

    python bench/kvcache_speed.py            # one H100/H200, a few minutes: bench/results/kvcache-speed-<gpu>.json (or $OUT/)
    python bench/kvcache_speed.py --tiny     # CPU: tiny config, checks the logic in seconds

A run that does not fit (out of GPU memory, e.g. bf16 at a large batch on a smaller GPU) is recorded with an
``error`` and the benchmark goes on; runs left when ``--max-seconds`` is reached are recorded as skipped. The
JSON is always written; the exit status is 1 only if a run failed for another reason than memory.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import sys
import time
import traceback
from pathlib import Path

import torch  # noqa: E402
import transformers  # noqa: E402
from fastattn.kvcache import QuantizedKVCache  # noqa: E402
from fastattn.kvcache.cache import with_cache  # noqa: E402
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

try:
    import triton  # noqa: E402

    TRITON_VERSION = triton.__version__
except ImportError:  # pragma: no cover - Triton is a Linux dependency
    TRITON_VERSION = None


def model_config(tiny: bool) -> LlamaConfig:
    if tiny:
        return LlamaConfig(
            vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
        )  # fmt: skip
    return LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=16384,
    )  # fmt: skip


def build_model(cfg: LlamaConfig, device: str, dtype: torch.dtype) -> LlamaForCausalLM:
    # Build on the meta device, cast there (free), then materialize on the GPU in `dtype`: no fp32 copy of the
    # 6.7B weights (27 GB), no CPU init, no host round trip.
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to(dtype).to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    # inv_freq is a buffer, left uninitialized by to_empty: rebuild the rotary module (fp32 frequencies).
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg).to(device)
    return model.eval()


def fill(cache, cfg, batch: int, context: int, device: str, dtype: torch.dtype, seed: int = 0) -> None:
    """Put ``context`` random tokens of K/V into every layer of ``cache`` (as a prefill would)."""
    heads, hd = cfg.num_key_value_heads, cfg.head_dim
    g = torch.Generator(device=device).manual_seed(seed)
    for li in range(cfg.num_hidden_layers):
        k = torch.randn(batch, heads, context, hd, device=device, dtype=dtype, generator=g)
        v = torch.randn(batch, heads, context, hd, device=device, dtype=dtype, generator=g)
        cache.update(k, v, li)
        del k, v


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def decode_tps(model, cache, batch: int, steps: int, warmup: int, device: str) -> float:
    tok = torch.zeros(batch, 1, dtype=torch.long, device=device)
    cache_kw = with_cache(model, cache)  # outside the timed loop: it inspects the forward's signature
    for _ in range(warmup):
        model(input_ids=tok, use_cache=True, **cache_kw)
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        logits = model(input_ids=tok, use_cache=True, **cache_kw).logits
        tok = logits[:, -1:].argmax(-1)
    sync(device)
    return batch * steps / (time.perf_counter() - t)


@torch.no_grad()
def attention_bench(cfg, batches, context: int, bits_list, device: str, dtype: torch.dtype) -> list[dict]:
    """One layer's decode attention alone: bf16 SDPA over dense K/V, the dequantize-then-SDPA path, and the fused
    kernel in a few tile/launch settings; milliseconds (``triton.testing.do_bench``) and bytes read per ms."""
    from fastattn.attn_kernels.kv_decode import fused_decode_attention
    from fastattn.kvcache import QuantizedKVLayer
    from triton.testing import do_bench

    sdpa = torch.nn.functional.scaled_dot_product_attention
    hkv, hq, hd = cfg.num_key_value_heads, cfg.num_attention_heads, cfg.head_dim
    out = []
    for batch in batches:
        g = torch.Generator(device=device).manual_seed(0)
        k = torch.randn(batch, hkv, context, hd, device=device, dtype=dtype, generator=g)
        v = torch.randn(batch, hkv, context, hd, device=device, dtype=dtype, generator=g)
        q = torch.randn(batch, hq, 1, hd, device=device, dtype=dtype, generator=g)
        k1, v1 = k[:, :, -1:].contiguous(), v[:, :, -1:].contiguous()
        dense_ms = do_bench(lambda: sdpa(q, k, v, enable_gqa=True))
        rec = {"bench": "attention", "batch": batch, "context": context, "sdpa_bf16_ms": round(dense_ms, 4),
               "bf16_bytes": 2 * k.numel() * k.element_size()}  # fmt: skip
        for bits in bits_list:
            layer = QuantizedKVLayer(bits=bits, residual_length=32, num_sinks=4, attention="fused")
            layer.update(k[:, :, :-1], v[:, :, :-1])
            view = layer._packed_view(k1, v1, None)[0].view
            ref = sdpa(q, *view.dense("benchmark reference"), enable_gqa=True)
            rec[f"int{bits}_dequantize_sdpa_ms"] = round(
                do_bench(lambda: sdpa(q, *layer._visible(k1, v1), enable_gqa=True)), 4
            )
            packed = layer.memory()["total_bytes"]
            rows = q.reshape(batch, hkv, hq // hkv, hd)
            best = None
            variants = ((32, 4, 8, 2, True), (64, 4, 8, 2, True), (64, 4, 8, 3, True), (64, 4, 8, 2, False),
                        (64, 8, 8, 2, True), (128, 8, 8, 2, True), (128, 4, 8, 1, True))  # fmt: skip
            for block_n, warps, per_sm, stages, vec in variants:

                def run():
                    return fused_decode_attention(
                        rows, view.fp_k, view.fp_v, view.q_k, view.q_v, num_sinks=view.num_sinks,
                        block_n=block_n, num_warps=warps, programs_per_sm=per_sm, num_stages=stages,
                        vectorized=vec,
                    )  # fmt: skip

                key = f"int{bits}_fused_n{block_n}_w{warps}_p{per_sm}_s{stages}{'_vec' if vec else ''}"
                try:
                    err = float((run().reshape(ref.shape).float() - ref.float()).abs().max())
                    ms = do_bench(run)
                except Exception as e:  # e.g. a tile that needs more shared memory than the GPU has
                    rec[key + "_error"] = f"{type(e).__name__}: {str(e)[:120]}"
                    continue
                rec[key + "_ms"], rec[key + "_max_abs_err"] = round(ms, 4), err
                if best is None or ms < best[1]:
                    best = (key, ms)
            rec[f"int{bits}_best"] = best[0]
            rec[f"int{bits}_best_vs_sdpa_bf16"] = round(dense_ms / best[1], 3)
            rec[f"int{bits}_best_gbps"] = round(packed / best[1] / 1e6, 1)
            layer = view = None  # free this width's cache before the next
        out.append(rec)
        print(json.dumps(rec), flush=True)
        k = v = None
        torch.cuda.empty_cache()
    return out


@torch.no_grad()
def fused_check(cache, cfg, batch: int, device: str, dtype: torch.dtype) -> float:
    """Max abs difference between the fused kernel and SDPA over the dequantized keys/values of layer 0."""
    layer = cache.layers[0]
    g = torch.Generator(device=device).manual_seed(1)
    shape = (batch, cfg.num_key_value_heads, 1, cfg.head_dim)
    k_new = torch.randn(shape, device=device, dtype=dtype, generator=g)
    v_new = torch.randn(shape, device=device, dtype=dtype, generator=g)
    keys, values = layer._packed_view(k_new, v_new, None)
    q = torch.randn(batch, cfg.num_attention_heads, 1, cfg.head_dim, device=device, dtype=dtype, generator=g)
    fused = torch.nn.functional.scaled_dot_product_attention(q, keys, values, enable_gqa=True)
    dk, dv = keys.view.dense("benchmark check")
    ref = torch.nn.functional.scaled_dot_product_attention(q, dk, dv, enable_gqa=True)
    return float((fused.float() - ref.float()).abs().max())


def is_oom(e: BaseException) -> bool:
    """Out of GPU memory, whichever layer noticed it (allocator, cuBLAS, a Triton launch)."""
    if isinstance(e, torch.OutOfMemoryError):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "alloc_failed" in msg)


def cache_bytes(cache) -> tuple[int, int]:
    """(bytes held, bf16 bytes for the same tokens)."""
    if isinstance(cache, QuantizedKVCache):
        m = cache.memory()
        return m["total_bytes"], m["bf16_bytes"]
    n = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers) * 2
    return n, n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny config on CPU (logic check)")
    ap.add_argument("--context", type=int, default=None, help="tokens in the cache (default 8192; tiny 256)")
    ap.add_argument("--batches", default=None, help="comma list (default 1,32,96; tiny 1,4)")
    ap.add_argument("--bits", default="4,2", help="quantized widths to time")
    ap.add_argument("--modes", default="fused,dequantize", help="attention modes of the quantized cache")
    ap.add_argument("--steps", type=int, default=None, help="timed decode steps (default 64; tiny 8)")
    ap.add_argument(
        "--max-seconds",
        type=float,
        default=420.0,
        help="skip the runs left once this much time has passed (default 420)",
    )
    ap.add_argument("--attention-only", action="store_true", help="only the one-layer attention timings")
    ap.add_argument("--no-attention-bench", action="store_true", help="skip the one-layer attention timings")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    tiny = args.tiny or not torch.cuda.is_available()
    if not args.tiny and tiny:
        print("no CUDA device: running the --tiny configuration")
    if tiny:  # a logic check: one thread keeps its timings from collapsing on a shared, busy CPU
        torch.set_num_threads(1)
    device = "cpu" if tiny else "cuda"
    dtype = torch.float32 if tiny else torch.bfloat16
    context = args.context or (256 if tiny else 8192)
    batches = [int(b) for b in (args.batches or ("1,4" if tiny else "1,32,96")).split(",")]
    steps = args.steps or (8 if tiny else 64)  # 64 steps include one window flush (residual 32 + group 64)
    warmup = 2 if tiny else 4
    cfg = model_config(tiny)
    gpu = "cpu" if tiny else torch.cuda.get_device_name()
    t0 = time.time()
    attention = []
    if not tiny and not args.no_attention_bench:
        attention = attention_bench(
            cfg, batches, context, [int(b) for b in args.bits.split(",")], device, dtype
        )
    if args.attention_only:
        batches = []
    model = build_model(cfg, device, dtype)
    build_s = time.time() - t0
    print(f"{gpu}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params built in {build_s:.0f}s")

    kinds = [("bf16-DynamicCache", None, None)] + [
        (f"fastattn-int{b}" + ("" if mode == "fused" else f"-{mode}"), int(b), mode)
        for b in args.bits.split(",")
        for mode in args.modes.split(",")
    ]
    records = []
    failed = False
    for batch in batches:
        base = None
        for name, bits, mode in kinds:
            rec = {"cache": name, "batch": batch, "context": context, "steps": steps}
            if mode:
                rec["attention"] = mode
            if time.time() - t0 > args.max_seconds:
                rec["error"] = f"skipped: --max-seconds {args.max_seconds:.0f} reached"
                records.append(rec)
                print(json.dumps(rec), flush=True)
                continue
            cache = None
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            t_run = time.time()
            try:
                if bits is None:
                    cache = DynamicCache(config=cfg)
                else:
                    att_mode = mode if device == "cuda" else "dequantize"  # tiny CPU run: no kernel
                    cache = QuantizedKVCache(
                        cfg, bits=bits, residual_length=32, num_sinks=4, attention=att_mode
                    )
                fill(cache, cfg, batch, context, device, dtype)
                held, bf16 = cache_bytes(cache)
                tps = decode_tps(model, cache, batch, steps, warmup, device)
                rec.update(tokens_per_s=round(tps, 2), kv_bytes=held, kv_ratio=round(held / bf16, 4))
                if bits is not None:
                    rec["attention_stats"] = cache.attention_stats()
                    if mode == "fused" and device == "cuda":
                        rec["fused_check_max_abs_err"] = fused_check(cache, cfg, batch, device, dtype)
                if device == "cuda":
                    rec["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                if bits is None:
                    base = tps
                elif base:
                    rec["speed_vs_bf16"] = round(tps / base, 3)
            except Exception as e:  # record and go on: one failed run must not lose the others
                if is_oom(e):
                    rec["error"] = f"OOM: {str(e).splitlines()[0][:200]}"
                else:
                    failed = True
                    rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    traceback.print_exc()
                if device == "cuda":
                    rec["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            finally:
                cache = None
            rec["run_s"] = round(time.time() - t_run, 1)
            records.append(rec)
            print(json.dumps(rec), flush=True)

    result = {
        "benchmark": "kvcache_speed",
        "device": gpu,
        "model": "random-weight Llama, 7B-class (32 layers, 4096 hidden, 32/8 heads, head_dim 128)"
        if not tiny
        else "tiny random Llama (2 layers, 128 hidden, 4/2 heads, head_dim 64)",
        "dtype": str(dtype),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": TRITON_VERSION,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "settings": {
            "bits": args.bits,
            "residual_length": 32,
            "num_sinks": 4,
            "key_group": 64,
            "value_group": 64,
            "warmup_steps": warmup,
        },
        "build_s": round(build_s, 1),
        "elapsed_s": round(time.time() - t0, 1),
        "records": records,
        "attention": attention,
    }
    slug = re.sub(r"[^a-z0-9]+", "_", gpu.lower()).strip("_")
    out = args.out or os.path.join(
        os.environ.get("OUT") or str(Path(__file__).parent / "results"), f"kvcache-speed-{slug}.json"
    )
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out} ({result['elapsed_s']:.0f}s)")
    nan = float("nan")
    print(
        f"\n{gpu}, context {context}, torch {torch.__version__}, triton {TRITON_VERSION}, "
        f"transformers {transformers.__version__}"
    )
    print(f"{'cache':24s} {'batch':>5s} {'tok/s':>9s} {'vs bf16':>8s} {'KV ratio':>8s} {'peak GiB':>8s}")
    for r in records:
        vs = r.get("speed_vs_bf16", 1.0 if r["cache"].startswith("bf16") and "error" not in r else nan)
        print(
            f"{r['cache']:24s} {r['batch']:5d} {r.get('tokens_per_s', nan):9.1f} {vs:8.3f} "
            f"{r.get('kv_ratio', nan):8.3f} {r.get('peak_gib', nan):8.2f} {r.get('error', '')}"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
