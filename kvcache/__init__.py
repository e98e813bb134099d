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

from ..attn_kernels.kv_pack import SUPPORTED_BITS, dequantize_packed, pack, unpack
from .cache import QuantizedKVCache, kv_geometry, projected_layer_bytes
from .layer import QuantizedKVLayer
from .prefix import PrefixKVCache
from .quant import QuantBlock, dequantize, quantize, shrink, shrink_codes
from .text_encoder import PromptPrefixCache, cache_prompt_prefix, template_prefix_ids

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
