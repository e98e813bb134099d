"""Prompt enhancement with a local causal LM running on the quantized KV cache.

``enhance(prompt, model=...)`` rewrites a short text-to-image/video prompt into a detailed one, as Wan's prompt
extension or HunyuanImage's PromptEnhancer do, decoding with :class:`fastattn.kvcache.QuantizedKVCache` so long
rewrites keep a small KV footprint.
"""

from __future__ import annotations

import os

import torch

DEFAULT_INSTRUCTION = (
    "Rewrite the following image prompt into one detailed, vivid prompt of at most three sentences. "
    "Describe the subject, setting, lighting and style. Reply with the rewritten prompt only."
)

_LOADED: dict[str, tuple] = {}


def load_causal_lm(path: str, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` from a local directory (transformers layout, or one holding a ``.gguf``) or a
    ``.gguf`` file; loaded once per path and kept."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.path.abspath(os.path.expanduser(path))
    if path in _LOADED:
        return _LOADED[path]
    if not os.path.exists(path):
        raise FileNotFoundError(f"no local model at {path!r}: expected a model directory or a .gguf file")
    kwargs = {}
    directory = path
    if path.endswith(".gguf"):
        directory, kwargs["gguf_file"] = os.path.dirname(path), os.path.basename(path)
    elif not os.path.exists(os.path.join(path, "config.json")):
        ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if not ggufs:
            raise FileNotFoundError(f"{path!r} has neither config.json nor a .gguf file")
        kwargs["gguf_file"] = ggufs[0]
    tok = AutoTokenizer.from_pretrained(directory, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **kwargs).eval()
    _LOADED[path] = (model, tok)
    return model, tok


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
    from ..kvcache.cache import with_cache

    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt must be a non-empty string")
    if isinstance(model, (str, os.PathLike)):
        model, tokenizer = load_causal_lm(str(model))
    elif tokenizer is None:
        raise TypeError("pass tokenizer= together with a loaded model (or pass a model path)")
    ids = _chat_ids(tokenizer, instruction, prompt.strip()).to(model.device)
    cache = QuantizedKVCache.from_model(
        model, bits=bits, residual_length=residual_length, num_sinks=num_sinks
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


__all__ = ["DEFAULT_INSTRUCTION", "enhance", "load_causal_lm"]
