"""BlockMask: for every (batch, head, query block) the list of key blocks to compute.

CSR-like, as FlexAttention's BlockMask: ``kv_counts[b, h, i]`` key blocks are listed in
``kv_indices[b, h, i, :kv_counts]`` (ascending; the padding after them is ignored). The batch and head
dimensions may be 1 and broadcast (stored with stride 0), so a pattern shared by all heads costs one
row. Blocks follow :class:`BlockGeometry`: text and image segments are blocked separately.

Queries and keys share one layout (self-attention) unless ``kv_layout`` is given: then the mask is
rectangular, ``nQ`` query blocks of ``layout`` against the key blocks of ``kv_layout`` (a query chunk
against a key chunk, as ring attention needs). The kernels see neither layout, only
:meth:`BlockMask.block_lists` (counts, indices and a :class:`~fastattn.attn_kernels.geometry.KernelGeometry`).

Nothing here materialises an S x S mask; ``to_token_mask`` exists for tests on small sequences.

Sizes are checked before anything is allocated: a mask holds at most :data:`MAX_BLOCK_PAIRS` (batch x head x
query block x key block) entries, a token mask at most :data:`MAX_TOKEN_MASK` (see :func:`check_mask_size`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..attn_kernels.geometry import BlockLists, KernelGeometry, block_map, check_block_lists, check_int
from .layout import BlockGeometry, TokenLayout

# Block pairs (summed over the mask's batch and head rows) one mask may hold: its int32 index table is then
# at most 1 GiB, and building it from a block map sorts the map (about 16 bytes per pair while it runs).
# A single-head mask at this limit has 16,384 blocks a side: 2M tokens in 128-token blocks.
MAX_BLOCK_PAIRS = 1 << 28
MAX_TOKEN_MASK = 1 << 30  # bool entries of to_token_mask (1 GiB)


def check_mask_size(q_blocks: int, kv_blocks: int, block_size: int, rows: int = 1) -> None:
    """Raise before allocating when a mask of ``rows`` (batch x head) rows of ``q_blocks x kv_blocks`` block
    pairs is past :data:`MAX_BLOCK_PAIRS`."""
    pairs = rows * q_blocks * kv_blocks
    if pairs > MAX_BLOCK_PAIRS:
        per_row = f" x {rows} (batch x head) rows" if rows > 1 else ""
        raise ValueError(
            f"a block mask of {q_blocks} x {kv_blocks} blocks{per_row} ({pairs:.3g} block pairs, about "
            f"{pairs * 16 / 2**30:,.0f} GiB to build) is past fastattn's limit of {MAX_BLOCK_PAIRS:,} block "
            f"pairs per mask: use a larger block_size (this one is {block_size}) or a shorter sequence"
        )


@dataclass(frozen=True)
class BlockMask:
    kv_counts: torch.Tensor  # int32 [Bm, Hm, nQ]
    kv_indices: torch.Tensor  # int32 [Bm, Hm, nQ, maxK]
    layout: TokenLayout  # the queries' layout (and the keys', unless kv_layout is given)
    block_size: int
    kv_layout: TokenLayout | None = None  # the keys' layout when it differs (rectangular mask)

    def __post_init__(self):
        # shapes and types only (no device sync): masks are also built per call (dynamic selection)
        for name in ("layout", "kv_layout"):
            lay = getattr(self, name)
            if not (isinstance(lay, TokenLayout) or (name == "kv_layout" and lay is None)):
                raise TypeError(f"{name} must be a TokenLayout, got {type(lay).__name__}")
        object.__setattr__(self, "block_size", check_int("block_size", self.block_size))
        counts, indices = self.kv_counts, self.kv_indices
        if not (isinstance(counts, torch.Tensor) and isinstance(indices, torch.Tensor)):
            raise TypeError(
                "kv_counts and kv_indices must be torch.Tensors [Bm, Hm, nQ] and [Bm, Hm, nQ, maxK]"
            )
        if counts.dtype != torch.int32 or indices.dtype != torch.int32:
            raise TypeError(f"kv_counts and kv_indices must be int32, got {counts.dtype} and {indices.dtype}")
        if counts.dim() != 3 or indices.dim() != 4 or indices.shape[:3] != counts.shape:
            raise ValueError(
                f"kv_counts must be [Bm, Hm, nQ] and kv_indices [Bm, Hm, nQ, maxK]; got {tuple(counts.shape)} "
                f"and {tuple(indices.shape)}"
            )
        nq = BlockGeometry(self.layout, self.block_size).num_blocks
        if counts.shape[-1] != nq:
            raise ValueError(
                f"kv_counts lists {counts.shape[-1]} query blocks; seq_len {self.layout.seq_len} (text "
                f"{self.layout.text_len}) in blocks of {self.block_size} has {nq}"
            )
        if self.kv_layout == self.layout:  # one spelling of a square mask
            object.__setattr__(self, "kv_layout", None)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_block_map(
        cls,
        block_map: torch.Tensor,
        layout: TokenLayout,
        block_size: int,
        kv_layout: TokenLayout | None = None,
    ) -> BlockMask:
        """Build from a boolean ``[nQ, nK]``, ``[H, nQ, nK]`` or ``[B, H, nQ, nK]`` block map (``nK``: blocks of
        ``kv_layout``, default ``layout``)."""
        n = BlockGeometry(layout, block_size).num_blocks
        nk = BlockGeometry(kv_layout or layout, block_size).num_blocks
        if not isinstance(block_map, torch.Tensor) or block_map.dtype != torch.bool:
            got = block_map.dtype if isinstance(block_map, torch.Tensor) else type(block_map).__name__
            raise TypeError(f"block_map must be a torch.bool tensor, got {got}")
        while block_map.dim() < 4:
            block_map = block_map.unsqueeze(0)
        if block_map.dim() != 4 or block_map.shape[-2:] != (n, nk):
            keys = f" against kv_len {kv_layout.seq_len} (text {kv_layout.text_len})" if kv_layout else ""
            raise ValueError(
                f"block_map must be [..., {n}, {nk}] for seq_len {layout.seq_len} (text {layout.text_len})"
                f"{keys} with block_size {block_size}; got {tuple(block_map.shape)}"
            )
        check_mask_size(n, nk, block_size, rows=block_map.shape[0] * block_map.shape[1])
        block_map = block_map.cpu()
        counts = block_map.sum(-1, dtype=torch.int32)
        max_k = max(int(counts.max()), 1)
        # Stable sort puts the selected block indices first, in ascending order.
        order = torch.sort((~block_map).to(torch.int8), dim=-1, stable=True).indices
        indices = order[..., :max_k].to(torch.int32).contiguous()
        return cls(counts.contiguous(), indices, layout, block_size, kv_layout)

    @classmethod
    def dense(
        cls, layout: TokenLayout, block_size: int = 128, kv_layout: TokenLayout | None = None
    ) -> BlockMask:
        n = BlockGeometry(layout, block_size).num_blocks
        nk = BlockGeometry(kv_layout or layout, block_size).num_blocks
        check_mask_size(n, nk, block_size)
        return cls.from_block_map(torch.ones(n, nk, dtype=torch.bool), layout, block_size, kv_layout)

    # ----------------------------------------------------------------- views
    @property
    def geometry(self) -> BlockGeometry:
        """The query blocks' geometry (also the keys' for a square mask)."""
        return BlockGeometry(self.layout, self.block_size)

    @property
    def key_layout(self) -> TokenLayout:
        return self.kv_layout or self.layout

    @property
    def kv_geometry(self) -> BlockGeometry:
        return BlockGeometry(self.key_layout, self.block_size)

    @property
    def num_blocks(self) -> int:
        """Query blocks."""
        return self.kv_counts.shape[-1]

    @property
    def num_kv_blocks(self) -> int:
        return self.kv_geometry.num_blocks

    @property
    def seq_len(self) -> int:
        return self.layout.seq_len

    @property
    def kv_len(self) -> int:
        return self.key_layout.seq_len

    def kernel_geometry(self) -> KernelGeometry:
        """Lengths, block size and segment splits of queries and keys: all the kernels learn of the layouts."""
        return KernelGeometry(
            self.seq_len, self.kv_len, self.block_size, self.layout.split, self.key_layout.split
        )

    def block_lists(self) -> BlockLists:
        """``(kv_counts, kv_indices, kernel_geometry())``: what the kernels read (cached on the mask)."""
        lists = self.__dict__.get("_block_lists")
        if lists is None:
            lists = self.__dict__["_block_lists"] = BlockLists(
                self.kv_counts, self.kv_indices, self.kernel_geometry()
            )
        return lists

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
        """Boolean ``[Bm, Hm, nQ, nK]`` (on the CPU)."""
        return block_map(self.kv_counts.cpu(), self.kv_indices.cpu(), self.num_kv_blocks)

    def to_token_mask(self) -> torch.Tensor:
        """Boolean ``[Bm, Hm, S, Skv]`` (quadratic: tests and short CPU sequences only)."""
        entries = self.kv_counts.shape[0] * self.kv_counts.shape[1] * self.seq_len * self.kv_len
        if entries > MAX_TOKEN_MASK:
            raise ValueError(
                f"to_token_mask would hold {entries:.3g} entries ({self.seq_len} x {self.kv_len} tokens per "
                f"row), past the limit of {MAX_TOKEN_MASK:,}: it is for tests on short sequences; use "
                "to_block_map or block_lists"
            )
        owners = []
        for starts, ends in (self.geometry.bounds(), self.kv_geometry.bounds()):
            owners.append(torch.repeat_interleave(torch.arange(len(starts)), ends - starts))
        return self.to_block_map()[..., owners[0], :][..., owners[1]]

    def density(self) -> float:
        """Fraction of computed token pairs (ragged blocks weighted by their sizes)."""
        q_sizes, kv_sizes = ((e - s).double() for s, e in (self.geometry.bounds(), self.kv_geometry.bounds()))
        bm = self.to_block_map().double()
        pairs = torch.einsum("bhqk,q,k->", bm, q_sizes, kv_sizes)
        return float(pairs / (bm.shape[0] * bm.shape[1] * self.seq_len * self.kv_len))

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
        return self.kv_counts.float().mean() / self.num_kv_blocks

    def mark_valid(self, batch: int, heads: int, seq_len: int, kv_len: int | None = None) -> BlockMask:
        """Record that this mask fits ``[batch, heads, seq_len]`` queries (against ``kv_len`` keys, default
        ``seq_len``) without :meth:`validate`'s device sync.

        Only for masks that fastattn's own selectors build in range by construction (shapes are still
        checked here; the index range is what is trusted)."""
        kv_len = seq_len if kv_len is None else kv_len
        bm, hm, nq = self.kv_counts.shape
        if (
            (seq_len, kv_len) != (self.seq_len, self.kv_len)
            or bm not in (1, batch)
            or hm not in (1, heads)
            or nq != self.geometry.num_blocks
        ):
            raise ValueError(
                f"mask of shape {tuple(self.kv_counts.shape)} (seq_len {self.seq_len}, kv_len {self.kv_len}) "
                f"does not fit {(batch, heads, seq_len)} against {kv_len} keys"
            )
        self.__dict__.setdefault("_validated", set()).add((batch, heads, seq_len, kv_len))
        return self

    # ----------------------------------------------------------------- checks
    def validate(self, batch: int, heads: int, seq_len: int, kv_len: int | None = None) -> None:
        """Raise unless this mask fits q ``[batch, heads, seq_len, D]`` and k ``[batch, heads, kv_len, D]``
        (``kv_len`` default: ``seq_len``, self-attention).

        The index check reads the tensors (a device sync), so a passed check is remembered.
        """
        kv_len = seq_len if kv_len is None else kv_len
        done = self.__dict__.setdefault("_validated", set())
        if (batch, heads, seq_len, kv_len) in done:
            return
        if seq_len != self.seq_len:
            raise ValueError(f"BlockMask was built for seq_len {self.seq_len}, attention has {seq_len}")
        if kv_len != self.kv_len:
            raise ValueError(f"BlockMask was built for kv_len {self.kv_len} keys, attention has {kv_len}")
        check_block_lists(self.block_lists(), batch, heads, seq_len, kv_len)
        done.add((batch, heads, seq_len, kv_len))

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
        return BlockMask.from_block_map(a | b, self.layout, self.block_size, self.kv_layout)

    def skip_heads(self, heads) -> BlockMask:
        """Heads that compute nothing (output zeros), as Sparse-vDiT's head skip."""
        bm = self.to_block_map()
        if bm.shape[1] == 1:
            raise ValueError("skip_heads needs a per-head mask: build it with num_heads=H first")
        bm = bm.clone()
        bm[:, list(heads)] = False
        return BlockMask.from_block_map(bm, self.layout, self.block_size, self.kv_layout)

    @staticmethod
    def stack_heads(masks: list[BlockMask]) -> BlockMask:
        """One mask per head, each with head dim 1, into a ``[1, H, ...]`` mask."""
        first = masks[0]
        for m in masks[1:]:
            first._check_compatible(m)
        maps = [m.to_block_map() for m in masks]
        if any(x.shape[:2] != (1, 1) for x in maps):
            raise ValueError("stack_heads takes single-head, single-batch masks")
        return BlockMask.from_block_map(
            torch.cat(maps, dim=1), first.layout, first.block_size, first.kv_layout
        )

    def _check_compatible(self, other: BlockMask) -> None:
        if (other.layout, other.kv_layout) != (
            self.layout,
            self.kv_layout,
        ) or other.block_size != self.block_size:
            raise ValueError("masks differ in layout or block size")

    def __repr__(self) -> str:
        bm, hm, nq = self.kv_counts.shape
        keys = "" if self.kv_layout is None else f"kv_len={self.kv_len}, kv_blocks={self.num_kv_blocks}, "
        return (
            f"BlockMask(seq_len={self.seq_len}, {keys}block_size={self.block_size}, blocks={nq}, "
            f"batch={bm}, heads={hm}, block_density={self.block_density():.3f})"
        )
