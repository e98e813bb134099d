"""Attention kernels: pure tensor functions (Triton on GPU, exact PyTorch reference elsewhere).

The kernels know nothing about models or plans: they take q/k/v ``[B, H, S, D]``, a
:class:`~fastattn.masks.BlockMask`, an optional token permutation and a quantization mode.
"""

from .ops import fallback_counts, reset_fallback_counts, sparse_attention
from .quantize import MODES as QUANT_MODES
from .reference import attention_reference

__all__ = [
    "QUANT_MODES",
    "attention_reference",
    "fallback_counts",
    "reset_fallback_counts",
    "sparse_attention",
]
