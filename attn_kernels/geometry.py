"""The only geometry the kernels know: sequence lengths, a block size, and where each sequence's
second segment starts.

Queries and keys are each at most two segments, ``[0, split)`` and ``[split, len)``, and every segment
is cut into ``block_size`` blocks of its own (the last block of a segment may be short: a ragged tail),
so no block straddles a segment boundary. Self-attention has the same geometry on both sides; a query
chunk attending to a key chunk (ring attention) has its own lengths and splits on each side.

What a kernel reads is :class:`BlockLists`: per (batch, head, query block) a count and a list of key
blocks (CSR, as :class:`fastattn.masks.BlockMask` stores them; batch and head dims may be 1 and
broadcast), plus the geometry that says which tokens each block index covers.
"""

from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass
from typing import NamedTuple

import torch


def check_int(name: str, value) -> int:
    """``value`` if it is an integer (Python or NumPy; not a bool, not a float), else a TypeError naming it.

    Lengths, block sizes, windows and grids count tokens or blocks: ``True`` meaning 1 or ``2.5`` truncated
    to 2 would build a different mask than the one asked for, silently."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return value if isinstance(value, (int, torch.SymInt)) else int(value)  # NumPy ints become ints


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def segment_bounds(length: int, split: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(starts, ends)`` int64 ``[num_blocks]``: blocks of ``[0, split)`` then blocks of ``[split, length)``."""
    first = torch.arange(_cdiv(split, block_size)) * block_size
    second = split + torch.arange(_cdiv(length - split, block_size)) * block_size
    ends = torch.cat(
        [torch.clamp(first + block_size, max=split), torch.clamp(second + block_size, max=length)]
    )
    return torch.cat([first, second]), ends


@dataclass(frozen=True)
class KernelGeometry:
    """Block geometry of one attention call: ``q_len`` queries against ``kv_len`` keys.

    Args:
        q_len, kv_len: tokens ``Sq`` of q ``[B, H, Sq, D]`` and ``Skv`` of k, v ``[B, H, Skv, D]``.
        block_size: tokens per block, on both sides.
        q_split, kv_split: token index where the second segment starts (0, or the length: one segment).
    """

    q_len: int
    kv_len: int
    block_size: int
    q_split: int = 0
    kv_split: int = 0

    def __post_init__(self):
        for name in ("q_len", "kv_len", "block_size", "q_split", "kv_split"):
            object.__setattr__(self, name, check_int(name, getattr(self, name)))
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        for side in ("q", "kv"):
            length, split = getattr(self, f"{side}_len"), getattr(self, f"{side}_split")
            if length <= 0:
                raise ValueError(f"{side}_len must be positive, got {length}")
            if not 0 <= split <= length:
                raise ValueError(f"{side}_split must be in [0, {side}_len={length}], got {split}")

    @classmethod
    def square(cls, seq_len: int, block_size: int, split: int = 0) -> KernelGeometry:
        """Self-attention: the same geometry for queries and keys."""
        return cls(seq_len, seq_len, block_size, split, split)

    @property
    def is_square(self) -> bool:
        return self.q_len == self.kv_len and self.q_split == self.kv_split

    @property
    def q_blocks_first(self) -> int:
        """Query blocks in the first segment ``[0, q_split)``."""
        return _cdiv(self.q_split, self.block_size)

    @property
    def kv_blocks_first(self) -> int:
        return _cdiv(self.kv_split, self.block_size)

    @property
    def q_blocks(self) -> int:
        return self.q_blocks_first + _cdiv(self.q_len - self.q_split, self.block_size)

    @property
    def kv_blocks(self) -> int:
        return self.kv_blocks_first + _cdiv(self.kv_len - self.kv_split, self.block_size)

    def q_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Query block ``i`` covers tokens ``[starts[i], ends[i])`` (int64 ``[q_blocks]``)."""
        return segment_bounds(self.q_len, self.q_split, self.block_size)

    def kv_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Key block ``j`` covers tokens ``[starts[j], ends[j])`` (int64 ``[kv_blocks]``)."""
        return segment_bounds(self.kv_len, self.kv_split, self.block_size)


class BlockLists(NamedTuple):
    """The block lists a kernel reads: query block ``i`` of (batch ``b``, head ``h``) computes key blocks
    ``indices[b, h, i, :counts[b, h, i]]`` (ascending; padding after them is ignored)."""

    counts: torch.Tensor  # int32 [Bm, Hm, q_blocks], Bm in (1, B), Hm in (1, H)
    indices: torch.Tensor  # int32 [Bm, Hm, q_blocks, maxK]
    geometry: KernelGeometry


def check_block_lists(
    lists: BlockLists, batch: int, heads: int, q_len: int, kv_len: int, values: bool = True
) -> None:
    """Raise unless ``lists`` fit q ``[batch, heads, q_len, D]`` against k ``[batch, heads, kv_len, D]``.
    ``values``: also check that counts and indices are in range (reads them: a device sync on a GPU)."""
    counts, indices, geom = lists
    if not isinstance(geom, KernelGeometry):
        raise TypeError(f"geometry must be a KernelGeometry, got {type(geom).__name__}")
    if (geom.q_len, geom.kv_len) != (q_len, kv_len):
        raise ValueError(
            f"geometry is for q_len {geom.q_len} against kv_len {geom.kv_len}; q has {q_len} tokens and "
            f"k, v have {kv_len}"
        )
    if not (isinstance(counts, torch.Tensor) and isinstance(indices, torch.Tensor)):
        raise TypeError("counts and indices must be torch.Tensors [Bm, Hm, nQ] and [Bm, Hm, nQ, maxK]")
    if counts.dtype != torch.int32 or indices.dtype != torch.int32:
        raise TypeError(f"kv_counts and kv_indices must be int32, got {counts.dtype} and {indices.dtype}")
    if counts.dim() != 3 or indices.dim() != 4 or indices.shape[:3] != counts.shape:
        raise ValueError(
            f"kv_counts must be [Bm, Hm, nQ] and kv_indices [Bm, Hm, nQ, maxK]; got {tuple(counts.shape)} "
            f"and {tuple(indices.shape)}"
        )
    bm, hm, nq = counts.shape
    if bm not in (1, batch) or hm not in (1, heads):
        raise ValueError(
            f"block list batch/head dims ({bm}, {hm}) must be 1 or match the input ({batch}, {heads})"
        )
    if nq != geom.q_blocks:
        raise ValueError(
            f"block lists have {nq} query blocks; the geometry has {geom.q_blocks} (q_len {geom.q_len}, "
            f"q_split {geom.q_split}, block_size {geom.block_size})"
        )
    if not values:
        return
    if bool((counts < 0).any()) or bool((counts > indices.shape[-1]).any()):
        raise ValueError(f"kv_counts must be in [0, {indices.shape[-1]}]")
    valid = torch.arange(indices.shape[-1], device=counts.device) < counts[..., None]
    if bool((valid & ((indices < 0) | (indices >= geom.kv_blocks))).any()):
        raise ValueError(f"kv_indices hold block indices outside [0, {geom.kv_blocks})")


def block_map(counts: torch.Tensor, indices: torch.Tensor, kv_blocks: int) -> torch.Tensor:
    """Boolean ``[Bm, Hm, nQ, kv_blocks]`` from block lists (on their device)."""
    counts, indices = counts.long(), indices.long()
    valid = torch.arange(indices.shape[-1], device=counts.device) < counts[..., None]
    # Padding slots scatter into a spare column kv_blocks that is dropped afterwards.
    out = torch.zeros(*counts.shape, kv_blocks + 1, dtype=torch.bool, device=counts.device)
    out.scatter_(-1, torch.where(valid, indices, kv_blocks), True)
    return out[..., :kv_blocks]


def token_mask(lists: BlockLists) -> torch.Tensor:
    """Boolean ``[Bm, Hm, Sq, Skv]`` (quadratic: tests and short sequences only)."""
    geom = lists.geometry
    owners = []
    for starts, ends in (geom.q_bounds(), geom.kv_bounds()):
        owners.append(
            torch.repeat_interleave(torch.arange(len(starts)), ends - starts).to(lists.counts.device)
        )
    bm = block_map(lists.counts, lists.indices, geom.kv_blocks)
    return bm[..., owners[0], :][..., owners[1]]


@functools.lru_cache(maxsize=64)
def dense_lists(geometry: KernelGeometry, device: torch.device) -> BlockLists:
    """Every query block reads every key block (one row broadcast over batch and heads; cached per geometry)."""
    nq, nk = geometry.q_blocks, geometry.kv_blocks
    counts = torch.full((1, 1, nq), nk, dtype=torch.int32, device=device)
    indices = torch.arange(nk, dtype=torch.int32, device=device).expand(1, 1, nq, nk).contiguous()
    return BlockLists(counts, indices, geometry)
