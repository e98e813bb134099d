"""The text-encoder template cache inside ComfyUI's own LLM text encoders at real size (GPU): encode time per
prompt without and with the cache, the cached K/V's memory against bf16, and how far the conditioning moves.

Encoders, built with ComfyUI's own classes at their real sizes straight on the GPU in bf16 (random weights,
normal(0, 0.02), norm scales 1), run as ComfyUI runs them: ``SDClipModel.encode_token_weights`` (fp32 embeddings,
weights cast per layer by ``comfy.ops.manual_cast``):

- HunyuanVideo's llava-llama3 (``comfy.text_encoders.hunyuan_video.LLAMAModel``: Llama-3-8B, hidden layer -3).
  Its template is 95 tokens (ComfyUI's count); ComfyUI 0.3.64's checkout has no Llama-3 ``tokenizer.json``, so
  the ids are stand-ins (BOS, 94 fixed ids, the prompt, ``<|eot_id|>``): token ids do not change the cost.
- Qwen-Image's Qwen2.5-VL-7B text model (``comfy.text_encoders.qwen_image.Qwen25_7BVLIModel``), tokenized by the
  host's own Qwen tokenizer and template (34 tokens before the prompt).

Per encoder and prompt length: ms per encode (median of ``--reps`` after warm-up; CUDA synchronised) without the
cache and with it at 8 and 4 bits, the prefix build time, the cached K/V bytes vs bf16, and the relative L2
difference of the conditioning from the uncached encode, also with the template unquantized (random weights:
this measures speed, not quality; ``FASTATTN_BENCH_LENGTHS`` picks the prompt lengths). The
cache is installed as the node installs it, as the core's ``forward`` (here directly on the module: no CLIP).

    COMFYUI_DIR=/path/to/ComfyUI python bench/comfyui_text_encoder.py          # GPU -> $OUT or bench/results/
    COMFYUI_DIR=/path/to/ComfyUI python bench/comfyui_text_encoder.py --tiny   # CPU logic check, small configs
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: the repository root is the package; keep it off sys.path
    sys.path = [
        p for p in sys.path if Path(p or ".").resolve() not in (ROOT, Path(__file__).resolve().parent)
    ]

HV_TEMPLATE_TOKENS = 95  # ComfyUI's HunyuanVideo template (hunyuan_video.py says 95 tokens)
PROMPT_WORDS = (
    "a red fox trotting through fresh snow at sunrise soft golden light cinematic wide shot".split()
)
LENGTHS = tuple(int(n) for n in os.environ.get("FASTATTN_BENCH_LENGTHS", "16,64,192").split(","))
TINY = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 2,
        "num_key_value_heads": 1}  # fmt: skip


def import_fastattn():
    try:
        import fastattn  # noqa: F401
    except ImportError:
        spec = importlib.util.spec_from_file_location(
            "fastattn", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["fastattn"] = module
        spec.loader.exec_module(module)
    from fastattn.kvcache.frozen_prefix import FrozenPrefixKV
    from fastattn.nodes.host.llm_prefix import PrefixCachedForward

    return PrefixCachedForward, FrozenPrefixKV


def import_comfy(comfy_dir: str, cpu: bool):
    if not comfy_dir or not os.path.isfile(os.path.join(comfy_dir, "comfy", "sd1_clip.py")):
        raise SystemExit(f"COMFYUI_DIR={comfy_dir!r} is not a ComfyUI source checkout; set COMFYUI_DIR")
    sys.path.insert(0, os.path.abspath(comfy_dir))
    import comfy.options  # noqa: F401  (argument parsing stays off: main.py's defaults)
    from comfy.cli_args import args

    args.cpu = bool(cpu)
    import comfy.text_encoders.hunyuan_video as hunyuan_video
    import comfy.text_encoders.qwen_image as qwen_image

    return hunyuan_video, qwen_image


def randomize(model: torch.nn.Module, seed: int) -> None:
    """ComfyUI builds its weights uninitialized: normal(0, 0.02), norm scales 1 (the decoder only: a vision
    tower the text path never runs stays as built)."""
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            if "norm" in name:
                p.fill_(1.0)
            else:  # drawn where the weight lives (an 8B model drawn on the host takes minutes)
                gen = torch.Generator(device=p.device).manual_seed(seed * 100003 + i)
                p.copy_((torch.randn(p.shape, generator=gen, device=p.device) * 0.02).to(p.dtype))


def encoders(hv, qi, device, dtype, tiny: bool):
    """(name, SDClipModel, core, template ids, make_tokens(n_prompt_tokens))."""
    opts = {"llama_model_config": TINY} if tiny else {}
    llama = hv.LLAMAModel(device=device, dtype=dtype, model_options=opts)
    randomize(llama.transformer.model, 0)
    template = [128000] + [1000 + 37 * i for i in range(HV_TEMPLATE_TOKENS - 1)]

    def llama_tokens(n):
        prompt = [5000 + 11 * i for i in range(n)]
        return [[(t, 1.0) for t in template + prompt + [128009]]]

    yield "HunyuanVideo llava-llama3-8B", llama, llama.transformer.model, template, llama_tokens
    del llama
    # model_name as ComfyUI's QwenImageTEModel passes it (its per-encoder config option is keyed by it)
    opts = {"model_name": "qwen25_7b", **({"qwen25_7b_model_config": TINY} if tiny else {})}
    qwen = qi.Qwen25_7BVLIModel(device=device, dtype=dtype, model_options=opts)
    randomize(qwen.transformer.model, 1)
    tok = qi.QwenImageTokenizer()

    def qwen_tokens(n):
        words = " ".join(PROMPT_WORDS[i % len(PROMPT_WORDS)] for i in range(n))
        return tok.tokenize_with_weights(words)["qwen25_7b"]

    # the template: what two prompts with different first words share in front
    a, b = (tok.tokenize_with_weights(p)["qwen25_7b"][0] for p in ("a cat", "Zebra on a beach"))
    n = 0
    while a[n][0] == b[n][0]:
        n += 1
    yield "Qwen-Image Qwen2.5-VL-7B", qwen, qwen.transformer.model, [t for t, *_ in a[:n]], qwen_tokens


def timed(fn, device, warmup: int, reps: int):
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    return out, statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU, tiny configs: checks the logic")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    cpu = args.tiny or not torch.cuda.is_available()
    device = torch.device("cpu" if cpu else "cuda")
    hv, qi = import_comfy(os.environ.get("COMFYUI_DIR", ""), cpu)
    PrefixCachedForward, FrozenPrefixKV = import_fastattn()
    gpu = "cpu" if cpu else torch.cuda.get_device_name().lower().replace(" ", "_")
    records = []
    for name, encoder, core, template, make_tokens in encoders(hv, qi, device, torch.bfloat16, args.tiny):
        for n in LENGTHS if not args.tiny else (16,):
            tokens = make_tokens(n)
            encode = lambda enc=encoder, toks=tokens: enc.encode_token_weights(toks)  # noqa: E731
            core.__dict__.pop("forward", None)
            ref, ms_off = timed(encode, device, 2, args.reps)
            rec = {"encoder": name, "template_tokens": len(template), "prompt_tokens": len(tokens[0]) - len(template),
                   "ms_uncached": round(ms_off, 3), "gpu": gpu, "torch": torch.__version__}  # fmt: skip
            # the template kept unquantized: how far the cache's own computation is from the encoder's
            adapter = PrefixCachedForward(core, template, 8, FrozenPrefixKV)
            adapter.mode = "exact"
            core.forward = adapter
            exact = encode()
            core.__dict__.pop("forward", None)
            rec["rel_l2_unquantized"] = float(
                (exact[0].float() - ref[0].float()).norm() / ref[0].float().norm()
            )
            for bits in (8, 4):
                adapter = PrefixCachedForward(core, template, bits, FrozenPrefixKV)
                core.forward = adapter
                out, ms = timed(encode, device, 2, args.reps)
                core.__dict__.pop("forward", None)
                mem = adapter.memory()
                diff = (out[0].float() - ref[0].float()).norm() / ref[0].float().norm()
                rec[f"ms_cached_{bits}bit"] = round(ms, 3)
                rec[f"speedup_{bits}bit"] = round(ms_off / ms, 3)
                rec[f"kv_bytes_{bits}bit"] = mem["total_bytes"]
                rec["kv_bytes_bf16"] = mem["bf16_bytes"]
                rec[f"rel_l2_{bits}bit"] = float(diff)
                rec[f"prefix_build_ms_{bits}bit"] = round(adapter.stats["build_ms"], 3)
                rec[f"rows_cached_{bits}bit"] = adapter.stats["rows_cached"]
            records.append(rec)
            print(json.dumps(rec), flush=True)
        encoder = core = None  # the next encoder is built while this one is freed
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out_path = args.out or str(
        Path(os.environ.get("OUT") or ROOT / "bench" / "results") / f"comfyui-text-encoder-{gpu}.json"
    )
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(json.dumps(records, indent=1))
    print(
        f"\n{'encoder':30s} {'template':>8s} {'prompt':>6s} {'uncached':>9s} {'8-bit':>9s} {'4-bit':>9s}  K/V 8-bit vs bf16"
    )
    for r in records:
        print(f"{r['encoder']:30s} {r['template_tokens']:8d} {r['prompt_tokens']:6d} {r['ms_uncached']:7.1f}ms "
              f"{r['ms_cached_8bit']:7.1f}ms {r['ms_cached_4bit']:7.1f}ms  "
              f"{r['kv_bytes_8bit'] / 2**20:.2f} / {r['kv_bytes_bf16'] / 2**20:.2f} MiB")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
