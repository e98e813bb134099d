"""Dynamic top-p block selection: no plan, blocks chosen per call from pooled Q/K scores.

SpargeAttn / Sparse-VideoGen-2 style. Per (batch, head), queries and keys are mean-pooled per block
(blocks follow the layout: text and image segments blocked separately), the pooled scores plus
``log(block size)`` estimate how much softmax mass each key block holds for each query block, and key
blocks are kept in decreasing mass until ``top_p`` is covered, then clamped to the density floor and
ceiling. Cost: one ``[nQ, nK]`` score matrix per head, i.e. ``block_size**2`` times cheaper than
attention. Everything stays on q's device; no host sync except the kernel's mask check.
"""

from __future__ import annotations

import math

import torch

from ..masks.block_mask import BlockMask
from ..masks.layout import BlockGeometry, TokenLayout
from .methods import DynamicConfig

_GEOM_CACHE: dict = {}


def _geometry(layout: TokenLayout, block_size: int, device: torch.device):
    key = (layout, block_size, device)
    hit = _GEOM_CACHE.get(key)
    if hit is None:
        geom = BlockGeometry(layout, block_size)
        starts, ends = geom.bounds()
        hit = (
            (ends - starts).to(device=device, dtype=torch.float32),
            geom.is_text().to(device),
            int(geom.layout.split),
        )
        if len(_GEOM_CACHE) > 64:
            _GEOM_CACHE.clear()
        _GEOM_CACHE[key] = hit
    return hit


def _pool(x: torch.Tensor, split: int, block_size: int) -> torch.Tensor:
    """Per-block sums of ``x`` ``[B, H, S, D]`` -> ``[B, H, nBlocks, D]`` float32 (segments blocked apart)."""
    parts = []
    for seg in (x[:, :, :split], x[:, :, split:]):
        n = seg.shape[2]
        if n == 0:
            continue
        full = n // block_size * block_size
        if full:
            b, h, _, d = seg.shape
            parts.append(
                seg[:, :, :full].reshape(b, h, full // block_size, block_size, d).sum(3, dtype=torch.float32)
            )
        if full < n:
            parts.append(seg[:, :, full:].sum(2, keepdim=True, dtype=torch.float32))
    return torch.cat(parts, dim=2)


def select_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: TokenLayout,
    config: DynamicConfig,
    block_size: int,
    scale: float | None = None,
) -> BlockMask:
    """Top-p key blocks per query block, per batch and head.

    Args:
        q, k: ``[B, H, S, D]``.
        layout: token layout of the call (text blocks are always computed, as rows and columns).
    Returns:
        A ``[B, H, nQ, nK]``-shaped :class:`BlockMask` on q's device.
    """
    sizes, is_text, split = _geometry(layout, block_size, q.device)
    n = sizes.numel()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qp = _pool(q, split, block_size) / sizes[:, None]
    kp = _pool(k, split, block_size) / sizes[:, None]
    scores = (qp @ kp.transpose(-1, -2)) * scale + sizes.log()
    probs = scores.softmax(-1)
    sorted_p, order = probs.sort(-1, descending=True)
    # Keep a block while the mass before it is below top_p (so the block crossing top_p is kept).
    keep = (sorted_p.cumsum(-1) - sorted_p) < config.top_p
    rank = torch.arange(n, device=q.device)
    k_min = min(n, math.ceil(config.min_density * n))
    k_max = max(1, min(n, math.floor(config.max_density * n)), k_min)
    keep = (keep | (rank < k_min)) & (rank < k_max)
    block_map = torch.zeros_like(keep).scatter_(-1, order, keep)
    block_map |= torch.eye(n, dtype=torch.bool, device=q.device)
    block_map |= is_text[None, :] | is_text[:, None]
    counts = block_map.sum(-1, dtype=torch.int32)
    # Stable sort of "not selected" lists the selected key blocks first, ascending.
    indices = torch.sort((~block_map).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    return BlockMask(counts.contiguous(), indices.contiguous(), layout, block_size)
