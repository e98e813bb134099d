"""Dynamic top-p block selection: no plan, blocks chosen per call from pooled Q/K scores.

SpargeAttn / Sparse-VideoGen-2 style. Per (batch, head), queries and keys are mean-pooled per block
(blocks follow the layout: text and image segments blocked separately), the pooled scores plus
``log(block size)`` estimate how much softmax mass each key block holds for each query block, and key
blocks are kept in decreasing mass until ``top_p`` is covered, then clamped to the density floor and
ceiling. Everything stays on q's device and nothing syncs with the host (the mask is valid by construction
and its density is accumulated as a device tensor).
"""

from __future__ import annotations

import math

import torch

from ..masks.block_mask import BlockMask
from ..masks.layout import BlockGeometry, TokenLayout
from ..plans.methods import DynamicConfig, register_call_handler

_GEOM_CACHE: dict = {}


def _geometry(layout: TokenLayout, block_size: int, device: torch.device):
    """Per (layout, block size, device), built once: block sizes, their logs, the text-block segment split,
    the block ranks ``0..n-1`` and the ``[n, n]`` blocks every selection keeps (the diagonal, text rows and
    columns)."""
    key = (layout, block_size, device)
    hit = _GEOM_CACHE.get(key)
    if hit is None:
        geom = BlockGeometry(layout, block_size)
        starts, ends = geom.bounds()
        sizes = (ends - starts).to(device=device, dtype=torch.float32)
        is_text = geom.is_text().to(device)
        n = sizes.numel()
        always = torch.eye(n, dtype=torch.bool, device=device) | is_text[None, :] | is_text[:, None]
        hit = (sizes, sizes.log(), int(geom.layout.split), torch.arange(n, device=device), always)
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


def _sample_plan(layout: TokenLayout, block_size: int, rows: int, group: int, device):
    """Sampled query rows per block ``[nQ * rows]``, the key-group id of every token ``[S]``, the tokens per
    group ``[G]`` (its clamped ``[G, 1]`` divisor and ``log`` score bias, -inf for empty groups), and groups
    per block (built once per layout and device)."""
    key = ("sample", layout, block_size, rows, group, device)
    hit = _GEOM_CACHE.get(key)
    if hit is None:
        starts, ends = BlockGeometry(layout, block_size).bounds()
        sizes = ends - starts
        # Evenly spaced rows inside each block (repeats in blocks shorter than ``rows``: harmless).
        pos = starts[:, None] + (torch.arange(rows)[None, :] * sizes[:, None]) // rows
        per_block = -(-block_size // group)
        owner = torch.repeat_interleave(torch.arange(len(starts)), sizes)
        offset = torch.arange(layout.seq_len) - starts[owner]
        gid = owner * per_block + offset // group
        counts = torch.bincount(gid, minlength=len(starts) * per_block).float().to(device)
        divisor = counts.clamp(min=1)[:, None]
        bias = torch.where(counts > 0, divisor[:, 0].log(), float("-inf"))
        hit = (pos.flatten().to(device), gid.to(device), counts, divisor, bias, per_block)
        if len(_GEOM_CACHE) > 64:
            _GEOM_CACHE.clear()
        _GEOM_CACHE[key] = hit
    return hit


def _sampled_block_mass(q, k, layout, block_size, scale, rows, group) -> torch.Tensor:
    """``[B, H, nQ, nK]`` softmax mass per key block, averaged over ``rows`` sampled queries per block.

    Keys are mean-pooled over groups of ``group`` neighbouring tokens within a block, and each group's
    score gets ``+ log(group size)``, so the softmax over groups approximates the softmax over tokens.
    Heads are processed in chunks to bound the score matrix's memory.
    """
    pos, gid, counts, divisor, bias, per_block = _sample_plan(layout, block_size, rows, group, q.device)
    b, h, s, d = k.shape
    n = len(counts) // per_block
    out = torch.empty(b, h, n, n, device=q.device, dtype=torch.float32)
    chunk = max(1, (1 << 27) // max(1, b * pos.numel() * len(counts)))
    for h0 in range(0, h, chunk):
        hs = slice(h0, min(h, h0 + chunk))
        kp = torch.zeros(b, hs.stop - h0, len(counts), d, device=q.device, dtype=torch.float32)
        kp.index_add_(2, gid, k[:, hs].float())
        kp /= divisor
        scores = (q[:, hs].index_select(2, pos).float() @ kp.transpose(-1, -2)) * scale + bias
        mass = scores.softmax(-1).view(b, hs.stop - h0, n, rows, n, per_block).sum(-1).mean(3)
        out[:, hs] = mass
    return out


@register_call_handler(DynamicConfig)
def _dynamic_handler(config: DynamicConfig, q, k, layout: TokenLayout, block_size: int, scale) -> BlockMask:
    return select_blocks(q, k, layout, config, block_size, scale)


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
    sizes, log_sizes, split, rank, always = _geometry(layout, block_size, q.device)
    n = sizes.numel()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if config.estimator == "sampled":
        probs = _sampled_block_mass(q, k, layout, block_size, scale, config.sample_rows, config.key_group)
    else:
        qp = _pool(q, split, block_size) / sizes[:, None]
        kp = _pool(k, split, block_size) / sizes[:, None]
        probs = ((qp @ kp.transpose(-1, -2)) * scale + log_sizes).softmax(-1)
    sorted_p, order = probs.sort(-1, descending=True)
    # Keep a block while the mass before it is below top_p (so the block crossing top_p is kept).
    keep = (sorted_p.cumsum(-1) - sorted_p) < config.top_p
    k_min = min(n, math.ceil(config.min_density * n))
    k_max = max(1, min(n, math.floor(config.max_density * n)), k_min)
    keep = (keep | (rank < k_min)) & (rank < k_max)
    block_map = torch.zeros_like(keep).scatter_(-1, order, keep)
    block_map |= always
    counts = block_map.sum(-1, dtype=torch.int32)
    # Stable sort of "not selected" lists the selected key blocks first, ascending.
    indices = torch.sort((~block_map).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    mask = BlockMask(counts.contiguous(), indices.contiguous(), layout, block_size)
    # In range by construction (sorted positions of an [n, n] map): skip validate()'s three device syncs.
    return mask.mark_valid(q.shape[0], q.shape[1], q.shape[2])
