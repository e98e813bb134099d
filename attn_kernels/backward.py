"""Gradients of block-sparse attention: the autograd formula of the ``fastattn::sparse_attention`` op.

For ``out = softmax(scale * q kᵀ over the listed key blocks) v`` and ``lse`` (the row log-sum-exp), with
``P`` the row softmax, ``dP = dout vᵀ`` and ``D = rowsum(P * dP)``::

    dS = P * (dP - D + dlse)      dq = scale * dS k      dk = scale * dSᵀ q      dv = Pᵀ dout

Which forward ran does not matter: the backward recomputes ``P`` from q, k and v over the same block
lists and permutation, in float32 (float64 inputs stay float64), in PyTorch:

- the reference forward: exact, its own gradient;
- the Triton forward: there is no Triton backward kernel; its gradient is the reference math's
  (the forward is that math in 16 bits with float32 accumulation);
- quantized forwards (``int8``, ``fp8``, ...): straight-through, the gradient of the unquantized attention
  over the same blocks, as if rounding were the identity (rounding has no useful derivative).

Nothing but q, k and v is kept for the backward. Short problems (up to ``MASKED_PRODUCT_LIMIT`` score
entries) are one masked product; long ones go query block by query block, so memory stays at one
block row's scores. The computation is a custom op of its own (``fastattn::sparse_attention_backward``),
so ``torch.compile`` sees one node for it too.
"""

from __future__ import annotations

import math

import torch

from .geometry import BlockLists, KernelGeometry, token_mask

# B * H * Sq * Skv score entries up to which the backward is one masked product (the block loop's Python
# overhead dominates below it)
MASKED_PRODUCT_LIMIT = 1 << 24


def attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor | None,
    dlse: torch.Tensor | None,
    lists: BlockLists,
    scale: float,
    perm: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` in q's, k's and v's dtypes, for q ``[B, H, Sq, D]``, k and v ``[B, H, Skv, D]``,
    ``dout [B, H, Sq, Dv]`` and ``dlse [B, H, Sq]`` (either may be None: no gradient reaches it), over block
    lists already checked and the forward's ``perm`` (``[S]`` or ``[H, S]``, or None)."""
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, h, sq, _ = q.shape
    dout = torch.zeros(b, h, sq, v.shape[-1], dtype=work, device=q.device) if dout is None else dout
    dlse = torch.zeros(b, h, sq, dtype=work, device=q.device) if dlse is None else dlse
    # rows that read no key have lse -inf and P = 0: whatever reached their lse moves nothing
    dlse = torch.nan_to_num(dlse.to(work), nan=0.0, posinf=0.0, neginf=0.0)
    qw, kw, vw, dow = (x.to(work) for x in (q, k, v, dout))
    if perm is not None:
        qw, kw, vw, dow = (_gather(x, perm) for x in (qw, kw, vw, dow))
        dlse = _gather(dlse[..., None], perm)[..., 0]
    counts = lists.counts.to(q.device)
    indices = lists.indices.to(q.device)
    if b * h * sq * k.shape[2] <= MASKED_PRODUCT_LIMIT:
        dq, dk, dv = _masked_product(
            qw, kw, vw, dow, dlse, BlockLists(counts, indices, lists.geometry), scale
        )
    else:
        dq, dk, dv = _block_rows(qw, kw, vw, dow, dlse, BlockLists(counts, indices, lists.geometry), scale)
    if perm is not None:
        dq, dk, dv = (_scatter(x, perm) for x in (dq, dk, dv))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _probs(scores: torch.Tensor) -> torch.Tensor:
    """Row softmax of scores with ``-inf`` for unlisted keys; all-``-inf`` rows give zeros, not NaN."""
    m = scores.amax(-1, keepdim=True)
    p = torch.exp(scores - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    l = p.sum(-1, keepdim=True)
    return p / torch.where(l > 0, l, torch.ones_like(l))


def _score_grads(p, dp, dlse):
    """``dS = P * (dP - rowsum(P * dP) + dlse)``."""
    return p * (dp - (p * dp).sum(-1, keepdim=True) + dlse[..., None])


def _masked_product(q, k, v, dout, dlse, lists: BlockLists, scale: float):
    keep = token_mask(lists)  # [Bm, Hm, Sq, Skv]
    p = _probs(((q @ k.transpose(-1, -2)) * scale).masked_fill(~keep, -math.inf))
    ds = _score_grads(p, dout @ v.transpose(-1, -2), dlse)
    return (ds @ k) * scale, (ds.transpose(-1, -2) @ q) * scale, p.transpose(-1, -2) @ dout


def _block_rows(q, k, v, dout, dlse, lists: BlockLists, scale: float):
    """One query block at a time: its listed key tokens gathered (padding slots masked), the three
    products, and the key-side gradients added back to the tokens they came from."""
    b, h, _, d = q.shape
    dv_dim = v.shape[-1]
    geom = lists.geometry
    q_starts, q_ends = geom.q_bounds()
    kv_starts, kv_ends = (x.to(q.device) for x in geom.kv_bounds())
    counts = lists.counts.long().expand(b, h, -1)
    indices = lists.indices.long().expand(b, h, -1, -1)
    slots = torch.arange(indices.shape[-1], device=q.device)
    offs = torch.arange(geom.block_size, device=q.device)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for i in range(counts.shape[-1]):
        lo, hi = int(q_starts[i]), int(q_ends[i])
        listed = slots < counts[:, :, i, None]  # [b, h, maxK]
        blk = torch.where(listed, indices[:, :, i], 0)
        tok = kv_starts[blk][..., None] + offs  # [b, h, maxK, bs]
        valid = (listed[..., None] & (tok < kv_ends[blk][..., None])).reshape(b, h, -1)
        tok = torch.where(valid, tok.reshape(b, h, -1), 0)
        kk = torch.gather(k, 2, tok[..., None].expand(-1, -1, -1, d))
        vv = torch.gather(v, 2, tok[..., None].expand(-1, -1, -1, dv_dim))
        qi, doi = q[:, :, lo:hi], dout[:, :, lo:hi]
        scores = (qi @ kk.transpose(-1, -2)) * scale
        p = _probs(scores.masked_fill(~valid[:, :, None, :], -math.inf))
        ds = _score_grads(p, doi @ vv.transpose(-1, -2), dlse[:, :, lo:hi])
        dq[:, :, lo:hi] = (ds @ kk) * scale
        # masked slots carry p = ds = 0, so adding them to token 0 changes nothing
        dk.scatter_add_(2, tok[..., None].expand(-1, -1, -1, d), (ds.transpose(-1, -2) @ qi) * scale)
        dv.scatter_add_(2, tok[..., None].expand(-1, -1, -1, dv_dim), p.transpose(-1, -2) @ doi)
    return dq, dk, dv


def _gather(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``x[:, h, perm[h]]`` for ``x [B, H, S, D]`` and ``perm [S]`` or ``[H, S]``."""
    idx = perm.long().to(x.device).expand(x.shape[1], -1)
    return torch.gather(x, 2, idx[None, :, :, None].expand(x.shape[0], -1, -1, x.shape[-1]))


def _scatter(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_gather`: token ``perm[h][p]`` gets ``x[:, h, p]``."""
    idx = perm.long().to(x.device).expand(x.shape[1], -1)
    return torch.empty_like(x).scatter_(2, idx[None, :, :, None].expand(x.shape[0], -1, -1, x.shape[-1]), x)


# ----------------------------------------------------------------------------- custom op + autograd


@torch.library.custom_op("fastattn::sparse_attention_backward", mutates_args=())
def _backward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    dlse: torch.Tensor,
    kv_counts: torch.Tensor,
    kv_indices: torch.Tensor,
    perm: torch.Tensor | None,
    scale: float,
    block_size: int,
    q_split: int,
    kv_split: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    geometry = KernelGeometry(q.shape[2], k.shape[2], block_size, q_split, kv_split)
    lists = BlockLists(kv_counts, kv_indices, geometry)
    return attention_backward(q, k, v, dout, dlse, lists, scale, perm)


@_backward_op.register_fake
def _(q, k, v, dout, dlse, kv_counts, kv_indices, perm, scale, block_size, q_split, kv_split):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def setup_context(ctx, inputs, output) -> None:
    """For ``fastattn::sparse_attention(q, k, v, kv_counts, kv_indices, perm, scale, block_size, q_split,
    kv_split, quant, use_triton)``: keep the inputs; the outputs are not needed (see the module doc)."""
    q, k, v, counts, indices, perm, scale, block_size, q_split, kv_split, _quant, _use_triton = inputs
    ctx.save_for_backward(q, k, v, counts, indices, perm)
    ctx.geometry = (scale, block_size, q_split, kv_split)


def backward(ctx, dout, dlse):
    q, k, v, counts, indices, perm = ctx.saved_tensors
    if not any(ctx.needs_input_grad[:3]):
        return (None,) * 12
    # outputs the loss did not use arrive as None or zeros; the op wants tensors
    dout = torch.zeros_like(q[..., :1].expand(*q.shape[:3], v.shape[-1])) if dout is None else dout
    dlse = torch.zeros(q.shape[:3], dtype=torch.float32, device=q.device) if dlse is None else dlse
    dq, dk, dv = _backward_op(q, k, v, dout, dlse, counts, indices, perm, *ctx.geometry)
    return dq, dk, dv, *(None,) * 9
