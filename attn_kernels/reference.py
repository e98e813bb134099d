"""Exact PyTorch reference of the attention family (CPU path and test oracle).

Computes block-sparse attention block row by block row in float32, so memory stays at one query
block times its listed key blocks, never Sq x Skv (short sequences, up to ``MASKED_PRODUCT_LIMIT`` score
entries, are one masked product instead; dense attention goes in query chunks of that size). Queries and
keys may differ in length (a query chunk against a key chunk). The quantized variants are reproduced
exactly as the Triton kernel quantizes (same scales, same rounding), so the kernel can be checked
against them.
"""

from __future__ import annotations

import math

import torch

from . import quantize as Qz
from .geometry import BlockLists, check_block_lists, token_mask


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask=None,
    scale: float | None = None,
    quant: str = "none",
    perm: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention: q ``[B, H, Sq, D]``, k and v ``[B, H, Skv, D]`` in, ``(out [B, H, Sq, D],
    lse [B, H, Sq] float32)`` out.

    ``block_mask``: a :class:`~fastattn.masks.BlockMask` (anything with ``validate`` and ``block_lists``),
    :class:`~fastattn.attn_kernels.geometry.BlockLists`, or ``None`` (dense). ``perm`` (``[S]`` or
    ``[H, S]`` gather index, ``Sq == Skv`` only) reorders tokens before attention (the mask is in the
    reordered space) and the output is returned in the original order. Rows with no key block get
    zeros and ``lse = -inf``.
    """
    b, h, s, _ = q.shape
    lists = block_mask
    if block_mask is not None and not isinstance(block_mask, BlockLists):
        block_mask.validate(b, h, s, k.shape[2])
        lists = block_mask.block_lists()
    elif block_mask is not None:
        check_block_lists(lists, b, h, s, k.shape[2])
    return reference_attention(q, k, v, lists, scale, quant, perm)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lists: BlockLists | None,
    scale: float | None = None,
    quant: str = "none",
    perm: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention_reference` on block lists already checked (``None``: dense)."""
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    # K smoothing shifts every score of a row equally; the kernel takes the vector from K's token order
    kmean = Qz.k_smoothing_mean(k) if quant != "none" else None
    if perm is not None:
        q, k, v = (gather_tokens(x, perm) for x in (q, k, v))
    qf, kf, vf = q.float(), k.float(), v.float()
    pv_fp8 = False
    if quant != "none":
        spec = Qz.QuantSpec.parse(quant)
        qi, qs = Qz.quantize_qk_reference(q, spec, granularity="token")
        ki, ks = Qz.quantize_qk_reference(k, spec, mean=kmean)
        qf, kf = qi.float() * qs[..., None], ki.float() * ks[..., None]
        pv_fp8 = spec.pv_fp8
        if pv_fp8:
            v8, vscale = Qz.quantize_v_fp8_reference(v)
            vf = v8.float()
    if lists is None:
        out, lse = _dense(qf, kf, vf, scale, pv_fp8)
    else:
        out, lse = _block_sparse(qf, kf, vf, lists, scale, pv_fp8)
    if pv_fp8:
        out = out * vscale[:, :, None, :]
    if quant != "none":
        lse = lse + torch.einsum("bhsd,bhd->bhs", q.float(), kmean) * scale  # unrounded q, as the kernel
    if perm is not None:
        out = scatter_tokens(out, perm)
        lse = scatter_tokens(lse[..., None], perm)[..., 0]
    return out.to(q.dtype), lse


def gather_tokens(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``x[:, h, perm[h]]`` for ``x [B, H, S, D]`` and ``perm [S]`` or ``[H, S]``."""
    idx = perm.long().to(x.device)
    if idx.dim() == 1:
        return x.index_select(2, idx)
    return torch.gather(x, 2, idx[None, :, :, None].expand(x.shape[0], -1, -1, x.shape[-1]))


def scatter_tokens(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`gather_tokens`."""
    idx = perm.long().to(x.device)
    out = torch.empty_like(x)
    if idx.dim() == 1:
        out[:, :, idx] = x
        return out
    return out.scatter_(2, idx[None, :, :, None].expand(x.shape[0], -1, -1, x.shape[-1]), x)


def _softmax_rows(scores: torch.Tensor, v: torch.Tensor, pv_fp8: bool):
    m = scores.amax(-1, keepdim=True)
    finite = torch.isfinite(m)
    p = torch.exp(scores - torch.where(finite, m, torch.zeros_like(m)))
    l = p.sum(-1, keepdim=True)
    if pv_fp8:
        # The kernel rounds P (scaled into e4m3's range) to FP8 before the P.V product.
        p = (p * Qz.P_FP8_SCALE).to(torch.float8_e4m3fn).float() / Qz.P_FP8_SCALE
    out = (p @ v) / torch.where(l > 0, l, torch.ones_like(l))
    lse = torch.where(l[..., 0] > 0, (m + torch.log(l))[..., 0], torch.full_like(l[..., 0], -math.inf))
    return out, lse


# Problems up to this many score entries (B * H * Sq * Skv) are computed as one (masked) product: the same
# float32 arithmetic per row as the block loop below, much faster on the CPU for short sequences.
MASKED_PRODUCT_LIMIT = 1 << 26


def _dense(q, k, v, scale, pv_fp8):
    b, h, s, _ = q.shape
    rows = max(1, MASKED_PRODUCT_LIMIT // (b * h * k.shape[2]))  # query rows per product
    parts = [
        _softmax_rows((q[:, :, i : i + rows] @ k.transpose(-1, -2)) * scale, v, pv_fp8)
        for i in range(0, s, rows)
    ]
    return torch.cat([o for o, _ in parts], 2), torch.cat([lse for _, lse in parts], 2)


def _block_sparse(q, k, v, lists: BlockLists, scale: float, pv_fp8: bool):
    b, h, s, d = q.shape
    geom = lists.geometry
    if b * h * s * k.shape[2] <= MASKED_PRODUCT_LIMIT:
        keep = token_mask(BlockLists(lists.counts.to(q.device), lists.indices.to(q.device), geom))
        scores = ((q @ k.transpose(-1, -2)) * scale).masked_fill(~keep, -math.inf)
        return _softmax_rows(scores, v, pv_fp8)
    starts, ends = geom.q_bounds()
    kv_starts, kv_ends = (x.to(q.device) for x in geom.kv_bounds())
    counts = lists.counts.to(q.device).long().expand(b, h, -1)
    indices = lists.indices.to(q.device).long().expand(b, h, -1, -1)
    max_k = indices.shape[-1]
    out = torch.zeros(b, h, s, v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.full((b, h, s), -math.inf, dtype=torch.float32, device=q.device)
    offs = torch.arange(geom.block_size, device=q.device)
    for i in range(counts.shape[-1]):
        q_lo, q_hi = int(starts[i]), int(ends[i])
        kb = indices[:, :, i]  # [b, h, maxK]
        valid_blk = torch.arange(max_k, device=q.device) < counts[:, :, i, None]
        kb = torch.where(valid_blk, kb, 0)  # padding slots may hold anything
        tok = kv_starts[kb][..., None] + offs  # [b, h, maxK, bs]
        valid = valid_blk[..., None] & (tok < kv_ends[kb][..., None])
        tok = torch.where(valid, tok, 0).reshape(b, h, -1)
        valid = valid.reshape(b, h, -1)
        kk = torch.gather(k, 2, tok[..., None].expand(-1, -1, -1, d))
        vv = torch.gather(v, 2, tok[..., None].expand(-1, -1, -1, v.shape[-1]))
        sc = (q[:, :, q_lo:q_hi] @ kk.transpose(-1, -2)) * scale
        sc = sc.masked_fill(~valid[:, :, None, :], -math.inf)
        o, l_ = _softmax_rows(sc, vv, pv_fp8)
        out[:, :, q_lo:q_hi] = o
        lse[:, :, q_lo:q_hi] = l_
    return out, lse
