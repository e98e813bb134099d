"""Ring attention: this rank's query chunk against every ring rank's key/value chunk, merged by log-sum-exp.

Each ring rank holds a chunk of the sequence (after the Ulysses all-to-all: the tokens of its Ulysses group,
in ascending global position) for the same heads. Keys and values travel around the ring: at step ``i`` rank
``r`` holds the chunk of rank ``(r - i) mod R``, sends it on to ``r + 1`` while it computes on it, and the
partial results (``out``, ``lse``) of the steps merge exactly.

Sparse steps need each chunk to be whole kernel blocks of the global layout (text and latent segments each cut
into ``block_size`` blocks, see :class:`~fastattn.masks.layout.BlockGeometry`): then a step runs
:func:`fastattn.attn_kernels.run_attention` on the plan's block lists restricted to (this rank's query blocks x
the peer's key blocks), a rectangular geometry with each chunk's own text/latent split. Where that cannot
serve a call the executor falls back, and says why (the runtime counts it under ``parallel_fallbacks``):

- chunks that are not whole blocks, reordered (PARO) heads: Q, K and V all-gathered in the ring group, the
  whole sequence computed by the runtime's kernel, this rank's rows kept (``R`` times the work of those calls);
- quantized modes: K and V all-gathered (K's smoothing mean, its block scales and V's FP8 scales span the
  whole sequence, so only the gathered keys quantize as one process does), this rank's rows computed;
- dynamic (top-p) selection: the runtime all-gathers Q and K to select blocks, then the ring runs as usual;
- a dense call with an ``attn_mask``: K and V all-gathered, the host's dense function on this rank's rows.
Dense calls without a mask run the same ring with every block listed.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..attn_kernels import run_attention
from ..attn_kernels.geometry import BlockLists, KernelGeometry, block_map, dense_lists
from ..masks.layout import BlockGeometry, TokenLayout
from .comm import RingShift, all_gather, global_ranks

DENSE_BLOCK = 128  # block size of the dense ring's lists (the GPU kernel's)


@dataclass(frozen=True)
class _Chunks:
    """How every ring rank's chunk sits in the global blocks of one (layout, block size)."""

    blocks: tuple[torch.Tensor, ...]  # per ring rank: global block ids of its chunk, ascending
    splits: tuple[int, ...]  # per ring rank: chunk tokens in the layout's first segment
    num_blocks: int
    block_size: int
    layout_split: int


def _lists_from_map(sub: torch.Tensor, geometry: KernelGeometry) -> BlockLists:
    """Block lists of a boolean ``[Bm, Hm, nQ, nK]`` map (on its device, no host sync)."""
    counts = sub.sum(-1, dtype=torch.int32).contiguous()
    # a stable sort of "not listed" puts the listed key blocks first, ascending
    indices = torch.sort((~sub).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32).contiguous()
    return BlockLists(counts, indices, geometry)


def merge_partial(acc, part) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attention results over disjoint key sets: ``(out [.., S, D] float32, lse [.., S])``.
    Rows that read no key so far have ``lse = -inf`` and ``out = 0``."""
    if acc is None:
        return part[0].float(), part[1]
    (o1, l1), (o2, l2) = acc, part
    lse = torch.logaddexp(l1, l2)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    out = o1 * torch.exp(l1 - safe)[..., None] + o2.float() * torch.exp(l2 - safe)[..., None]
    return out, lse


class RingAttention:
    """Attention of this rank's query chunk against the ring group's key/value chunks.

    Args:
        group, rank, size: the ring process group, this rank's index in it and its size ``R``.
        chunks: per ring rank, the global token positions of its chunk (LongTensor ``[C]``, ascending: the token
            order of the tensors that rank passes in); together a permutation of ``range(seq_len)``.
        seq_len: tokens of the whole sequence.
        backend: the kernel backend of ring steps (``"auto"``, ``"triton"``, ``"reference"``).
        timeout_s: for error messages (the process group enforces it).
    """

    def __init__(
        self, group, rank: int, size: int, chunks, seq_len: int, backend: str = "auto", timeout_s=None
    ):
        self.group, self.rank, self.size = group, rank, size
        self.chunks = tuple(c.cpu().long() for c in chunks)
        self.seq_len = seq_len
        self.backend = backend
        self.timeout_s = timeout_s
        self.chunk_len = len(self.chunks[rank])
        ranks = global_ranks(group)
        self._send_to, self._recv_from = ranks[(rank + 1) % size], ranks[(rank - 1) % size]
        self._to_global = torch.argsort(torch.cat(self.chunks))  # gathered chunks -> global order
        self._chunk_cache: dict = {}
        self._lists: OrderedDict = OrderedDict()
        self._device_idx: dict = {}

    # ------------------------------------------------------------------ gathering (fallbacks)
    def _index(self, name: str, device) -> torch.Tensor:
        key = (name, device)
        if key not in self._device_idx:
            src = self._to_global if name == "global" else self.chunks[self.rank]
            self._device_idx[key] = src.to(device)
        return self._device_idx[key]

    def full(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """The whole sequence in global order along token dim ``dim`` (every ring rank's chunk gathered)."""
        parts = all_gather(x, self.group, self.size, "ring fallback", self.timeout_s)
        return torch.cat(parts, dim).index_select(dim, self._index("global", x.device))

    def rows(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's chunk of a whole-sequence tensor."""
        return x.index_select(dim, self._index("local", x.device))

    # ------------------------------------------------------------------ block geometry of the chunks
    def chunk_blocks(self, layout: TokenLayout, block_size: int) -> _Chunks | str:
        """How the chunks sit in the layout's blocks, or why they do not (the reason a sparse call falls back)."""
        key = (layout, block_size)
        hit = self._chunk_cache.get(key)
        if hit is None:
            hit = self._chunk_cache[key] = self._find_blocks(layout, block_size)
        return hit

    def _find_blocks(self, layout: TokenLayout, block_size: int) -> _Chunks | str:
        if layout.seq_len != self.seq_len:
            return f"layout of {layout.seq_len} tokens, the sequence has {self.seq_len}"
        geom = BlockGeometry(layout, block_size)
        starts, ends = geom.bounds()
        sizes = ends - starts
        blocks, splits = [], []
        for pos in self.chunks:
            owner = torch.searchsorted(starts, pos, right=True) - 1
            held = torch.bincount(owner, minlength=len(starts))
            present = held > 0
            if bool((held[present] != sizes[present]).any()):
                return "ring shards are not whole blocks of the global layout"
            ids = present.nonzero().flatten()
            split = int((pos < layout.split).sum())
            local = KernelGeometry.square(len(pos), block_size, split).q_bounds()
            if not torch.equal(local[1] - local[0], sizes[ids]):
                return "ring shards are not whole blocks of the global layout"
            blocks.append(ids)
            splits.append(split)
        return _Chunks(tuple(blocks), tuple(splits), len(starts), block_size, layout.split)

    def _geometry(self, ch: _Chunks, peer: int | None) -> KernelGeometry:
        """This rank's queries against ``peer``'s keys (None: against the whole sequence)."""
        me = self.rank
        if peer is None:
            return KernelGeometry(self.chunk_len, self.seq_len, ch.block_size, ch.splits[me], ch.layout_split)
        return KernelGeometry(
            self.chunk_len, len(self.chunks[peer]), ch.block_size, ch.splits[me], ch.splits[peer]
        )

    def _restricted(self, mask, ch: _Chunks, device) -> tuple[list, BlockLists]:
        """The mask's lists for (my query blocks x each peer's key blocks) with whether any block is listed, and
        for (my query blocks x all key blocks); cached per mask object while it lives."""
        key = (id(mask), device)
        hit = self._lists.get(key)
        if hit is not None and hit[0]() is mask:
            self._lists.move_to_end(key)
            return hit[1]
        bm = block_map(mask.kv_counts.to(device), mask.kv_indices.to(device), ch.num_blocks)
        rows = bm.index_select(2, ch.blocks[self.rank].to(device))
        peers = []
        for p in range(self.size):
            sub = rows.index_select(3, ch.blocks[p].to(device))
            peers.append((_lists_from_map(sub, self._geometry(ch, p)), bool(sub.any())))
        value = (peers, _lists_from_map(rows, self._geometry(ch, None)))
        self._lists[key] = (weakref.ref(mask), value)
        if len(self._lists) > 64:
            self._lists.popitem(last=False)
        return value

    # ------------------------------------------------------------------ calls (the runtime's shard protocol)
    def sparse(self, q, k, v, mask, *, scale=None, quant: str = "none", perm=None, kernel: Callable):
        """Block-sparse attention of this chunk's queries: q, k, v ``[B, h, C, D]``, ``mask`` over the global layout.

        Returns ``(out [B, h, C, D], kernel fallback reason or None, ring fallback note or None)``; ``kernel`` is
        the runtime's ``(q, k, v, mask, scale=, quant=, perm=) -> (out, fallback)`` for the gathered fallback.
        """
        ch = self.chunk_blocks(mask.layout, mask.block_size) if mask.kv_layout is None else "rectangular mask"
        reason = ch if isinstance(ch, str) else ("reordered (PARO) heads" if perm is not None else None)
        if reason is not None:
            qf, kf, vf = (self.full(x, 2) for x in (q, k, v))
            out, fallback, *_ = kernel(qf, kf, vf, mask, scale=scale, quant=quant, perm=perm)
            return self.rows(out, 2), fallback, f"ring: {reason}: Q/K/V all-gathered, every row computed"
        peers, to_all = self._restricted(mask, ch, q.device)
        if quant != "none":
            kf, vf = self.full(k, 2), self.full(v, 2)
            res = run_attention(
                q, kf, vf, *to_all, scale=scale, quant=quant, backend=self.backend, need_lse=False
            )
            note = "ring: quantized (scales span the whole sequence): K/V all-gathered, this rank's rows computed"
            return res.out, res.fallback, note
        out, fallback = self._ring(q, k, v, [lists if active else None for lists, active in peers], scale)
        return out, fallback, None

    def dense(self, query, key, value, attn_mask, scale, dense_fn: Callable):
        """Exact dense attention of this chunk's queries: ``[B, C, h, D]`` in and out. Returns ``(out, note)``."""
        if attn_mask is not None:
            kf, vf = self.full(key, 1), self.full(value, 1)
            return dense_fn(query, kf, vf, attn_mask, scale), "ring: attn_mask: K/V all-gathered, dense rows"
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        lists = [
            dense_lists(KernelGeometry(self.chunk_len, len(c), DENSE_BLOCK), q.device) for c in self.chunks
        ]
        out, _ = self._ring(q, k, v, lists, scale)  # a kernel "fallback" here is exact dense attention too
        return out.transpose(1, 2), None

    def _ring(self, q, k, v, lists: list, scale):
        """Ring steps over ``lists[peer]`` (None: nothing of that peer is read): ``(out, first fallback)``."""
        d = k.shape[-1]
        buf = torch.cat([k, v], dim=-1).contiguous()  # one message per step
        acc, fallback = None, None
        for step in range(self.size):
            src = (self.rank - step) % self.size
            shift = None
            if step < self.size - 1:  # the next chunk travels while this one is computed
                shift = RingShift(buf, self.group, self._send_to, self._recv_from, self.timeout_s)
            if lists[src] is not None:
                res = run_attention(
                    q,
                    buf[..., :d],
                    buf[..., d:],
                    *lists[src],
                    scale=scale,
                    backend=self.backend,
                    need_lse=True,
                )
                fallback = fallback or res.fallback
                acc = merge_partial(acc, (res.out, res.lse))
            if shift is not None:
                buf = shift.wait()
        if acc is None:
            return q.new_zeros(q.shape[:3] + v.shape[-1:]), fallback
        return acc[0].to(q.dtype), fallback
