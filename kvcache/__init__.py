"""Quantized KV cache for LLM text encoders and prompt enhancers (PM-KVQ-style progressive quantization).

Public API:

* :class:`QuantizedKVCache` / :class:`QuantizedKVLayer`: transformers 5.x cache with packed INT8/4/2 storage.
* :mod:`.pack` / :mod:`.quant`: Triton/PyTorch pack-unpack kernels, group quantization, code shrinking.
* :mod:`.calibrate`: positional-interpolation key-scale calibration and sensitivity-based budgets.
* :class:`PrefixKVCache`: quantize a fixed prompt-template prefix once and reuse it across prompts.
* :func:`cache_prompt_prefix` / :class:`PromptPrefixCache`: the same inside a pipeline's LLM text encoder
  (HunyuanVideo's template found by itself), by patching the encoder instance (``disable()`` restores it).
* :mod:`.evaluate`: teacher-forced / free-running comparison against the full-precision cache.
"""

import importlib

# Names are loaded on first use: the quantizers (used by the ComfyUI text-encoder node) need only torch, while the
# transformers cache classes import transformers, which a host may have in another version.
_HOME = {
    "SUPPORTED_BITS": "..attn_kernels.kv_pack",
    "dequantize_packed": "..attn_kernels.kv_pack",
    "pack": "..attn_kernels.kv_pack",
    "unpack": "..attn_kernels.kv_pack",
    "QuantizedKVCache": ".cache",
    "kv_geometry": ".cache",
    "projected_layer_bytes": ".cache",
    "QuantizedKVLayer": ".layer",
    "PrefixKVCache": ".prefix",
    "QuantBlock": ".quant",
    "dequantize": ".quant",
    "quantize": ".quant",
    "shrink": ".quant",
    "shrink_codes": ".quant",
    "PromptPrefixCache": ".text_encoder",
    "cache_prompt_prefix": ".text_encoder",
    "template_prefix_ids": ".text_encoder",
}


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_HOME))


__all__ = [
    "SUPPORTED_BITS",
    "PrefixKVCache",
    "PromptPrefixCache",
    "QuantBlock",
    "QuantizedKVCache",
    "QuantizedKVLayer",
    "cache_prompt_prefix",
    "dequantize",
    "dequantize_packed",
    "kv_geometry",
    "pack",
    "projected_layer_bytes",
    "quantize",
    "shrink",
    "shrink_codes",
    "template_prefix_ids",
    "unpack",
]
