"""Attention kernels: pure tensor functions (Triton on GPU, exact PyTorch reference elsewhere).

The kernels know nothing about models, plans or token layouts: they take q ``[B, H, Sq, D]``, k and v
``[B, H, Skv, D]``, block lists over a :class:`KernelGeometry` (lengths, block size, segment splits), an
optional token permutation and a quantization mode, and return an :class:`AttentionResult`
(``out``, ``lse``, ``fallback``) from :func:`run_attention`. :func:`sparse_attention` is the
self-attention wrapper taking a :class:`~fastattn.masks.BlockMask`.

Only :mod:`.geometry` loads with the package (``masks`` imports it); the entry points load on first use,
so importing ``masks`` neither registers the custom op nor pulls in Triton.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .geometry import BlockLists, KernelGeometry

if TYPE_CHECKING:
    from .ops import AttentionResult, run_attention, sparse_attention
    from .quantize import MODES as QUANT_MODES
    from .reference import attention_reference

_LAZY = {
    "AttentionResult": ("ops", "AttentionResult"),
    "run_attention": ("ops", "run_attention"),
    "sparse_attention": ("ops", "sparse_attention"),
    "QUANT_MODES": ("quantize", "MODES"),
    "attention_reference": ("reference", "attention_reference"),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = _LAZY[name]
    return getattr(importlib.import_module(f".{module}", __name__), attr)


__all__ = [
    "QUANT_MODES",
    "AttentionResult",
    "BlockLists",
    "KernelGeometry",
    "attention_reference",
    "run_attention",
    "sparse_attention",
]
