"""Prompt enhancement with a local causal LM running on the quantized KV cache.

``enhance(prompt, model=...)`` rewrites a short text-to-image/video prompt into a detailed one, as Wan's prompt
extension or HunyuanImage's PromptEnhancer do, decoding with :class:`fastattn.kvcache.QuantizedKVCache` so long
rewrites keep a small KV footprint.
"""

from __future__ import annotations

import gc
import os
from collections import OrderedDict

import torch

DEFAULT_INSTRUCTION = (
    "Rewrite the following image prompt into one detailed, vivid prompt of at most three sentences. "
    "Describe the subject, setting, lighting and style. Reply with the rewritten prompt only."
)

# (path, dtype) -> (model, tokenizer), least recently used first. Bounded: a node that is pointed at one model
# after another must not keep them all (each a full float32 copy).
_LOADED: OrderedDict[tuple[str, torch.dtype], tuple] = OrderedDict()


def _local_path(path: str) -> str:
    return os.path.abspath(os.path.expanduser(str(path)))


def _locate(path: str) -> tuple[str, dict]:
    """The directory to read ``path`` from and the ``from_pretrained`` keywords (``gguf_file``) it needs."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no local model at {path!r}: expected a model directory or a .gguf file")
    if path.endswith(".gguf"):
        return os.path.dirname(path), {"gguf_file": os.path.basename(path)}
    if os.path.exists(os.path.join(path, "config.json")):
        return path, {}
    ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
    if not ggufs:
        raise FileNotFoundError(f"{path!r} has neither config.json nor a .gguf file")
    return path, {"gguf_file": ggufs[0]}


def _read(directory: str, kwargs: dict, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **kwargs).eval()
    return model, tok


def read_causal_lm(path: str, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` read from ``path`` as :func:`load_causal_lm` reads it, but not kept: the caller owns
    it (the ComfyUI node hands it to ComfyUI's memory management)."""
    return _read(*_locate(_local_path(path)), dtype)


def load_causal_lm(path: str, dtype: torch.dtype = torch.float32, max_loaded: int = 1):
    """``(model, tokenizer)`` from a local directory (transformers layout, or one holding a ``.gguf``) or a
    ``.gguf`` file. Loaded models are kept for the next call, at most ``max_loaded`` of them (the least recently
    used goes first); :func:`unload_causal_lm` frees them."""
    if isinstance(max_loaded, bool) or not isinstance(max_loaded, int) or max_loaded < 1:
        raise ValueError(f"max_loaded must be a positive int (models kept loaded), got {max_loaded!r}")
    path = _local_path(path)
    key = (path, dtype)
    if key in _LOADED:
        _LOADED.move_to_end(key)
        return _LOADED[key]
    located = _locate(path)
    # Make room first: the old models go before the new one is read, so peak memory is one model, not two.
    if len(_LOADED) >= max_loaded:
        while len(_LOADED) >= max_loaded:
            _LOADED.popitem(last=False)
        gc.collect()
    _LOADED[key] = _read(*located, dtype)
    return _LOADED[key]


def loaded_causal_lms() -> list[str]:
    """Paths of the models :func:`load_causal_lm` keeps, least recently used first."""
    return [path for path, _ in _LOADED]


def unload_causal_lm(path: str | None = None) -> int:
    """Drop the kept model(s) loaded from ``path`` (every dtype), or all of them; returns how many. Their memory
    is freed once nothing else refers to them."""
    keys = [k for k in _LOADED if path is None or k[0] == _local_path(path)]
    for k in keys:
        del _LOADED[k]
    if keys:
        gc.collect()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    return len(keys)


def _chat_ids(tok, instruction: str, prompt: str) -> torch.Tensor:
    if getattr(tok, "chat_template", None):
        msgs = [{"role": "system", "content": instruction}, {"role": "user", "content": prompt}]
        out = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        return out["input_ids"]
    return tok(f"{instruction}\n\nPrompt: {prompt}\nRewritten prompt:", return_tensors="pt").input_ids


@torch.no_grad()
def enhance(
    prompt: str,
    model,
    tokenizer=None,
    instruction: str = DEFAULT_INSTRUCTION,
    max_new_tokens: int = 120,
    bits: int = 4,
    residual_length: int = 32,
    num_sinks: int = 4,
    return_stats: bool = False,
):
    """Rewrite ``prompt`` with a causal LM (greedy) on a ``bits``-bit quantized KV cache.

    ``model`` is a path (see :func:`load_causal_lm`) or a loaded transformers causal LM (then pass
    ``tokenizer``). Returns the rewritten prompt (the original if the model produced nothing), or
    ``(text, stats)`` with the cache's memory report when ``return_stats``.
    """
    from ..kvcache import QuantizedKVCache
    from ..kvcache.cache import kv_geometry, with_cache

    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt must be a non-empty string")
    if isinstance(model, (str, os.PathLike)):
        model, tokenizer = load_causal_lm(str(model))
    elif tokenizer is None:
        raise TypeError("pass tokenizer= together with a loaded model (or pass a model path)")
    ids = _chat_ids(tokenizer, instruction, prompt.strip()).to(model.device)
    # Values are grouped along channels: 64 per group, or the largest group that fits a smaller head_dim.
    head_dim = kv_geometry(model.config)[2] if getattr(model, "config", None) is not None else 64
    value_group = max(g for g in range(1, min(64, head_dim) + 1) if head_dim % g == 0)
    cache = QuantizedKVCache.from_model(
        model, bits=bits, value_group=value_group, residual_length=residual_length, num_sinks=num_sinks
    )
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        **with_cache(model, cache),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip() or prompt
    if return_stats:
        return text, {
            "prompt_tokens": int(ids.shape[1]),
            "new_tokens": int(out.shape[1] - ids.shape[1]),
            **cache.memory(),
        }
    return text


__all__ = [
    "DEFAULT_INSTRUCTION", "enhance", "load_causal_lm", "loaded_causal_lms", "read_causal_lm", "unload_causal_lm",
]  # fmt: skip
