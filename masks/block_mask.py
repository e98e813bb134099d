"""BlockMask: for every (batch, head, query block) the list of key blocks to compute.

CSR-like, as FlexAttention's BlockMask: ``kv_counts[b, h, i]`` key blocks are listed in
``kv_indices[b, h, i, :kv_counts]`` (ascending; the padding after them is ignored). The batch and head
dimensions may be 1 and broadcast (stored with stride 0), so a pattern shared by all heads costs one
row. Blocks follow :class:`BlockGeometry`: text and image segments are blocked separately.

Nothing here materialises an S x S mask; ``to_token_mask`` exists for tests on small sequences.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .layout import BlockGeometry, TokenLayout


@dataclass(frozen=True)
class BlockMask:
    kv_counts: torch.Tensor  # int32 [Bm, Hm, nQ]
    kv_indices: torch.Tensor  # int32 [Bm, Hm, nQ, maxK]
    layout: TokenLayout
    block_size: int

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_block_map(cls, block_map: torch.Tensor, layout: TokenLayout, block_size: int) -> BlockMask:
        """Build from a boolean ``[nQ, nK]``, ``[H, nQ, nK]`` or ``[B, H, nQ, nK]`` block map."""
        geom = BlockGeometry(layout, block_size)
        n = geom.num_blocks
        if block_map.dtype != torch.bool:
            raise TypeError(f"block_map must be torch.bool, got {block_map.dtype}")
        while block_map.dim() < 4:
            block_map = block_map.unsqueeze(0)
        if block_map.dim() != 4 or block_map.shape[-2:] != (n, n):
            raise ValueError(
                f"block_map must be [..., {n}, {n}] for seq_len {layout.seq_len} with block_size "
                f"{block_size} (text {layout.text_len}); got {tuple(block_map.shape)}"
            )
        block_map = block_map.cpu()
        counts = block_map.sum(-1, dtype=torch.int32)
        max_k = max(int(counts.max()), 1)
        # Stable sort puts the selected block indices first, in ascending order.
        order = torch.sort((~block_map).to(torch.int8), dim=-1, stable=True).indices
        indices = order[..., :max_k].to(torch.int32).contiguous()
        return cls(counts.contiguous(), indices, layout, block_size)

    @classmethod
    def dense(cls, layout: TokenLayout, block_size: int = 128) -> BlockMask:
        n = BlockGeometry(layout, block_size).num_blocks
        return cls.from_block_map(torch.ones(n, n, dtype=torch.bool), layout, block_size)

    # ----------------------------------------------------------------- views
    @property
    def geometry(self) -> BlockGeometry:
        return BlockGeometry(self.layout, self.block_size)

    @property
    def num_blocks(self) -> int:
        return self.kv_counts.shape[-1]

    @property
    def seq_len(self) -> int:
        return self.layout.seq_len

    def to(self, device) -> BlockMask:
        """Copy to ``device``; copies are cached on the mask so per-call use costs nothing."""
        device = torch.device(device)
        if self.kv_counts.device == device:
            return self
        cache = self.__dict__.setdefault("_device_copies", {})
        if device not in cache:
            cache[device] = replace(
                self, kv_counts=self.kv_counts.to(device), kv_indices=self.kv_indices.to(device)
            )
        return cache[device]

    def to_block_map(self) -> torch.Tensor:
        """Boolean ``[Bm, Hm, nQ, nK]``."""
        n = self.num_blocks
        counts = self.kv_counts.cpu().long()
        idx = self.kv_indices.cpu().long()
        valid = torch.arange(idx.shape[-1]) < counts[..., None]
        # Padding slots scatter into a spare column n that is dropped afterwards.
        out = torch.zeros(*counts.shape, n + 1, dtype=torch.bool)
        out.scatter_(-1, torch.where(valid, idx, n), True)
        return out[..., :n]

    def to_token_mask(self) -> torch.Tensor:
        """Boolean ``[Bm, Hm, S, S]`` (quadratic: tests and short CPU sequences only)."""
        starts, ends = self.geometry.bounds()
        owner = torch.repeat_interleave(torch.arange(len(starts)), ends - starts)
        bm = self.to_block_map()
        return bm[..., owner, :][..., owner]

    def density(self) -> float:
        """Fraction of computed token pairs (ragged blocks weighted by their sizes)."""
        starts, ends = self.geometry.bounds()
        sizes = (ends - starts).double()
        bm = self.to_block_map().double()
        pairs = torch.einsum("bhqk,q,k->", bm, sizes, sizes)
        return float(pairs / (bm.shape[0] * bm.shape[1] * self.seq_len**2))

    def block_density(self) -> float:
        """Fraction of computed block pairs (what the kernel's cost follows). Computed once per mask: on a
        GPU mask it reads the counts back (a device sync), so reused masks pay it only the first time."""
        cached = self.__dict__.get("_block_density")
        if cached is None:
            cached = self.__dict__["_block_density"] = float(self.block_density_tensor())
        return cached

    def block_density_tensor(self) -> torch.Tensor:
        """:meth:`block_density` as a 0-d float32 tensor on the mask's device, without a host sync (for
        masks built per call, e.g. dynamic selection)."""
        return self.kv_counts.float().mean() / self.num_blocks

    def mark_valid(self, batch: int, heads: int, seq_len: int) -> BlockMask:
        """Record that this mask fits ``[batch, heads, seq_len]`` without :meth:`validate`'s device sync.

        Only for masks that fastattn's own selectors build in range by construction (shapes are still
        checked here; the index range is what is trusted)."""
        bm, hm, nq = self.kv_counts.shape
        if seq_len != self.seq_len or bm not in (1, batch) or hm not in (1, heads) or nq != self.num_blocks:
            raise ValueError(
                f"mask of shape {tuple(self.kv_counts.shape)} does not fit {(batch, heads, seq_len)}"
            )
        self.__dict__.setdefault("_validated", set()).add((batch, heads, seq_len))
        return self

    # ----------------------------------------------------------------- checks
    def validate(self, batch: int, heads: int, seq_len: int) -> None:
        """Raise ValueError unless this mask fits q of shape [batch, heads, seq_len, D].

        The index check reads the tensors (a device sync), so a passed check is remembered.
        """
        done = self.__dict__.setdefault("_validated", set())
        if (batch, heads, seq_len) in done:
            return
        if seq_len != self.seq_len:
            raise ValueError(f"BlockMask was built for seq_len {self.seq_len}, attention has {seq_len}")
        bm, hm, nq = self.kv_counts.shape
        if bm not in (1, batch) or hm not in (1, heads):
            raise ValueError(
                f"BlockMask batch/head dims ({bm}, {hm}) must be 1 or match the input ({batch}, {heads})"
            )
        if nq != self.geometry.num_blocks or self.kv_indices.shape[:3] != self.kv_counts.shape:
            raise ValueError("BlockMask kv_counts/kv_indices shapes disagree with its layout")
        if self.kv_counts.dtype != torch.int32 or self.kv_indices.dtype != torch.int32:
            raise TypeError("BlockMask kv_counts and kv_indices must be int32")
        counts = self.kv_counts
        if bool((counts < 0).any()) or bool((counts > self.kv_indices.shape[-1]).any()):
            raise ValueError(f"kv_counts must be in [0, {self.kv_indices.shape[-1]}]")
        valid = torch.arange(self.kv_indices.shape[-1], device=counts.device) < counts[..., None]
        bad = valid & ((self.kv_indices < 0) | (self.kv_indices >= nq))
        if bool(bad.any()):
            raise ValueError(f"kv_indices hold block indices outside [0, {nq})")
        done.add((batch, heads, seq_len))

    # ----------------------------------------------------------------- composition
    def expand_heads(self, heads: int) -> BlockMask:
        if self.kv_counts.shape[1] == heads:
            return self
        if self.kv_counts.shape[1] != 1:
            raise ValueError(f"cannot expand a {self.kv_counts.shape[1]}-head mask to {heads} heads")
        b, _, n = self.kv_counts.shape
        return replace(
            self,
            kv_counts=self.kv_counts.expand(b, heads, n),
            kv_indices=self.kv_indices.expand(b, heads, n, self.kv_indices.shape[-1]),
        )

    def union(self, other: BlockMask) -> BlockMask:
        """Blocks computed by either mask."""
        self._check_compatible(other)
        a, b = self.to_block_map(), other.to_block_map()
        return BlockMask.from_block_map(a | b, self.layout, self.block_size)

    def skip_heads(self, heads) -> BlockMask:
        """Heads that compute nothing (output zeros), as Sparse-vDiT's head skip."""
        bm = self.to_block_map()
        if bm.shape[1] == 1:
            raise ValueError("skip_heads needs a per-head mask: build it with num_heads=H first")
        bm = bm.clone()
        bm[:, list(heads)] = False
        return BlockMask.from_block_map(bm, self.layout, self.block_size)

    @staticmethod
    def stack_heads(masks: list[BlockMask]) -> BlockMask:
        """One mask per head, each with head dim 1, into a ``[1, H, ...]`` mask."""
        first = masks[0]
        for m in masks[1:]:
            first._check_compatible(m)
        maps = [m.to_block_map() for m in masks]
        if any(x.shape[:2] != (1, 1) for x in maps):
            raise ValueError("stack_heads takes single-head, single-batch masks")
        return BlockMask.from_block_map(torch.cat(maps, dim=1), first.layout, first.block_size)

    def _check_compatible(self, other: BlockMask) -> None:
        if other.layout != self.layout or other.block_size != self.block_size:
            raise ValueError("masks differ in layout or block size")

    def __repr__(self) -> str:
        bm, hm, nq = self.kv_counts.shape
        return (
            f"BlockMask(seq_len={self.seq_len}, block_size={self.block_size}, blocks={nq}, "
            f"batch={bm}, heads={hm}, block_density={self.block_density():.3f})"
        )
