"""Block-sparse attention on the CPU that computes only the blocks its lists name.

The exact reference (:mod:`.reference`) is the oracle: short problems are one masked ``Sq x Skv`` product
and long ones a Python loop over query blocks, so on the CPU it is never faster than dense attention.
This path does the work the block lists ask for and nothing else:

1. q, k and v are viewed as blocks ``[B*H*nBlocks, block_size, D]`` (a free view when every block is
   full; otherwise ragged segment tails are padded, and padded keys masked out);
2. query blocks of all batches and heads are grouped by how many key blocks they list, so every group
   is one batched product: its query blocks ``[N, bs, D]`` against their gathered key blocks
   ``[N, count * bs, D]`` (groups are cut into chunks that stay cache-sized);
3. each row's softmax is taken with its log-sum-exp, as the reference and the Triton kernel return it.

Same semantics as :func:`~fastattn.attn_kernels.reference.reference_attention`: float32 arithmetic,
``perm`` (tokens reordered before attention, output in the original order), per-batch and per-head
block lists, ``Sq != Skv``, rows that read no key give zeros and ``lse = -inf``. Quantized modes go
through the reference, which reproduces the Triton kernel's rounding exactly (it is the quantization's
specification; speed on the CPU is not its purpose).
"""

from __future__ import annotations

import functools
import math

import torch

from .geometry import BlockLists, segment_bounds
from .reference import gather_tokens, reference_attention, scatter_tokens

# float32 elements of one chunk's gathered keys [N, count * bs, D] (as many again for the values): a few
# MiB, so a chunk's copies stay near the cache while its products still batch many query blocks
CHUNK_KEYS = 1 << 20


def listed_blocks_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lists: BlockLists,
    scale: float | None = None,
    quant: str = "none",
    perm: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q ``[B, H, Sq, D]``, k and v ``[B, H, Skv, D]``, block lists already checked ->
    ``(out [B, H, Sq, Dv] in q's dtype, lse [B, H, Sq] float32)``."""
    if quant != "none":
        return reference_attention(q, k, v, lists, scale, quant, perm)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    dtype = q.dtype
    if perm is not None:
        q, k, v = (gather_tokens(x, perm) for x in (q, k, v))
    out, lse = _attend_blocks(q, k, v, lists, scale)
    if perm is not None:
        out = scatter_tokens(out, perm)
        lse = scatter_tokens(lse[..., None], perm)[..., 0]
    return out.to(dtype), lse


@functools.lru_cache(maxsize=64)
def _padding(length: int, split: int, block_size: int):
    """How a side's tokens sit in full blocks, or None when every block is already full.

    Returns ``(source [n*bs], valid [n*bs], position [length])``: the token each padded slot copies
    (any real token for a pad slot), whether the slot is a real token, and each token's slot."""
    if split % block_size == 0 and (length - split) % block_size == 0:
        return None
    starts, ends = segment_bounds(length, split, block_size)
    slots = starts[:, None] + torch.arange(block_size)  # [n, bs]
    valid = (slots < ends[:, None]).flatten()
    source = torch.where(valid, slots.flatten(), 0)
    return source, valid, valid.nonzero().flatten()


def _blocked(x: torch.Tensor, pad, block_size: int) -> torch.Tensor:
    """``[B, H, S, D]`` -> float32 ``[B*H*nBlocks, block_size, D]`` (contiguous; tail slots padded)."""
    if pad is not None:
        x = x.index_select(2, pad[0].to(x.device))
    return x.float().contiguous().view(-1, block_size, x.shape[-1])


def _attend_blocks(q, k, v, lists: BlockLists, scale: float):
    b, h, sq, d = q.shape
    dv = v.shape[-1]
    geom = lists.geometry
    bs, nq, nk = geom.block_size, geom.q_blocks, geom.kv_blocks
    q_pad = _padding(geom.q_len, geom.q_split, bs)
    kv_pad = _padding(geom.kv_len, geom.kv_split, bs)
    qb = _blocked(q, q_pad, bs)  # [B*H*nQ, bs, D]
    kb = _blocked(k, kv_pad, bs)  # [B*H*nK, bs, D]
    vb = _blocked(v, kv_pad, bs)
    # padded key slots get -inf scores; a listed block always holds at least one real key
    key_bias = None
    if kv_pad is not None:
        key_bias = torch.zeros(nk * bs, device=q.device).masked_fill_(~kv_pad[1].to(q.device), -math.inf)
        key_bias = key_bias.view(nk, bs)

    counts = lists.counts.to(q.device).expand(b, h, nq).reshape(-1)
    indices = lists.indices.to(q.device).expand(b, h, nq, -1).reshape(b * h * nq, -1)
    out = torch.zeros(b * h * nq, bs, dv, device=q.device)
    lse = torch.full((b * h * nq, bs), -math.inf, device=q.device)

    # query blocks with the same count (over all batches and heads) share one batched product
    chunks = []  # (count, query blocks), cut so a chunk's gathered keys stay near CHUNK_KEYS elements
    by_count, order = torch.sort(counts, stable=True)
    values, sizes = torch.unique_consecutive(by_count, return_counts=True)
    first = 0
    for count, size in zip(values.tolist(), sizes.tolist()):
        group, first = order[first : first + size], first + size
        if count == 0:
            continue  # rows that read no key: zeros and -inf, as initialised
        per_chunk = max(1, CHUNK_KEYS // (bs * count * max(d, dv)))
        chunks += [(count, group[lo : lo + per_chunk]) for lo in range(0, size, per_chunk)]
    if not chunks:
        return _unpad(out, lse, b, h, q_pad)
    # gathers write into buffers reused by every chunk: a fresh multi-MiB tensor per chunk costs the CPU
    # page faults that take longer than the copy itself
    most_rows = max(rows.numel() for _, rows in chunks)
    most_blocks = max(rows.numel() * count for count, rows in chunks)
    q_buf = qb.new_empty(most_rows, bs, d)
    k_buf, v_buf = kb.new_empty(most_blocks, bs, d), vb.new_empty(most_blocks, bs, dv)
    for count, rows in chunks:
        n = rows.numel()
        local = indices.index_select(0, rows)[:, :count].long()  # [N, count] key blocks of the head
        blocks = (local + (rows // nq * nk)[:, None]).flatten()  # the same blocks in kb / vb
        keys = torch.index_select(kb, 0, blocks, out=k_buf[: n * count]).view(n, count * bs, d)
        vals = torch.index_select(vb, 0, blocks, out=v_buf[: n * count]).view(n, count * bs, dv)
        queries = torch.index_select(qb, 0, rows, out=q_buf[:n])
        bias = None
        if key_bias is not None:
            bias = key_bias.index_select(0, local.flatten()).view(n, 1, 1, count * bs)
        o, l = _softmax_attention(queries, keys, vals, bias, scale)
        out.index_copy_(0, rows, o)
        lse.index_copy_(0, rows, l)
    return _unpad(out, lse, b, h, q_pad)


def _unpad(out, lse, b: int, h: int, q_pad):
    """Blocked ``[B*H*nQ, bs, Dv]`` / ``[B*H*nQ, bs]`` -> ``[B, H, Sq, Dv]`` / ``[B, H, Sq]``."""
    out, lse = out.view(b, h, -1, out.shape[-1]), lse.view(b, h, -1)
    if q_pad is not None:
        position = q_pad[2].to(out.device)
        out, lse = out.index_select(2, position), lse.index_select(2, position)
    return out, lse


def _softmax_attention(q, k, v, bias, scale: float):
    """``softmax(q kᵀ * scale + bias) v`` and its log-sum-exp for q ``[N, bs, D]``, k, v ``[N, L, D]``,
    bias ``[N, 1, 1, L]`` or None: ``(out [N, bs, Dv], lse [N, bs])``. Every row reads a real key."""
    if _FLASH_CPU is not None:
        # PyTorch's fused CPU attention returns the log-sum-exp and never holds the score tile
        out, lse = _FLASH_CPU(q[:, None], k[:, None], v[:, None], attn_mask=bias, scale=scale)
        return out[:, 0], lse[:, 0]
    scores = torch.bmm(q, k.transpose(1, 2)).mul_(scale)
    if bias is not None:
        scores += bias[:, 0]
    row_max = scores.amax(-1, keepdim=True)
    probs = scores.sub_(row_max).exp_()
    total = probs.sum(-1, keepdim=True)
    return torch.bmm(probs, v).div_(total), (row_max + total.log()).squeeze(-1)


# aten's fused CPU attention (out, lse), in every torch this package supports; the plain products otherwise
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
