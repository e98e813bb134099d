"""Token layouts and the block geometry derived from them.

A sequence is at most two segments: text tokens and image (latent grid) tokens, text either first
(FLUX, CogVideoX, Qwen-Image) or last (HunyuanVideo, SD3). Blocks never straddle the boundary: each
segment is cut into ``block_size`` blocks of its own, so a 226-token text prefix costs two blocks, not
a block that is half text and half image. The last block of each segment may be short (ragged tail).

Image tokens are in raster order over the latent grid ``(F, H, W)`` as the model produced them. A
*reordered* layout (PARO) reads the same tokens in another axis order, e.g. ``"HWF"``: then position
``p`` of the image segment holds the token whose ``(h, w, f)`` is the raster index ``p`` of the grid
``(H, W, F)``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from ..attn_kernels.geometry import check_int

AXIS_ORDERS = tuple("".join(p) for p in itertools.permutations("FHW"))  # FHW, FWH, HFW, HWF, WFH, WHF


@dataclass(frozen=True)
class TokenLayout:
    """Where the text and image tokens of one attention call are.

    Args:
        seq_len: total tokens S of the call.
        text_len: text tokens T (0 for video-only self-attention such as Wan).
        text_first: True when text precedes the image tokens.
        grid: latent token grid ``(F, H, W)`` of the image tokens (``F = 1`` for images), raster order.
    """

    seq_len: int
    text_len: int = 0
    text_first: bool = True
    grid: tuple[int, int, int] | None = None

    def __post_init__(self):
        for name in ("seq_len", "text_len"):
            object.__setattr__(self, name, check_int(name, getattr(self, name)))
        if not isinstance(self.text_first, bool):
            raise TypeError(
                f"text_first must be True or False, got {type(self.text_first).__name__} {self.text_first!r}"
            )
        if self.grid is not None:
            if isinstance(self.grid, (str, bytes)) or not hasattr(self.grid, "__len__"):
                raise TypeError(f"grid must be three ints (F, H, W), got {self.grid!r}")
            object.__setattr__(self, "grid", tuple(check_int("grid entries (F, H, W)", g) for g in self.grid))
        if self.seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {self.seq_len}")
        if not 0 <= self.text_len <= self.seq_len:
            raise ValueError(f"text_len must be in [0, seq_len={self.seq_len}], got {self.text_len}")
        if self.grid is not None:
            if len(self.grid) != 3 or any(g <= 0 for g in self.grid):
                raise ValueError(f"grid must be three positive ints (F, H, W), got {self.grid}")
            f, h, w = self.grid
            if f * h * w != self.image_len:
                raise ValueError(
                    f"grid {self.grid} holds {f * h * w} tokens but the layout has "
                    f"{self.image_len} image tokens (seq_len {self.seq_len} - text_len {self.text_len})"
                )

    @property
    def image_len(self) -> int:
        return self.seq_len - self.text_len

    @property
    def image_start(self) -> int:
        return self.text_len if self.text_first else 0

    @property
    def split(self) -> int:
        """Token index where the second segment starts."""
        return self.text_len if self.text_first else self.image_len

    @classmethod
    def video(cls, frames: int, height: int, width: int, text_len: int = 0, text_first: bool = True):
        for name, n in (("frames", frames), ("height", height), ("width", width)):
            check_int(name, n)
        return cls(frames * height * width + text_len, text_len, text_first, (frames, height, width))


@dataclass(frozen=True)
class BlockGeometry:
    """Block boundaries of a layout: block ``j`` covers tokens ``[starts[j], ends[j])``."""

    layout: TokenLayout
    block_size: int

    def __post_init__(self):
        if not isinstance(self.layout, TokenLayout):
            raise TypeError(f"layout must be a TokenLayout, got {type(self.layout).__name__}")
        object.__setattr__(self, "block_size", check_int("block_size", self.block_size))
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")

    @property
    def blocks_in_first_segment(self) -> int:
        return -(-self.layout.split // self.block_size)

    @property
    def num_blocks(self) -> int:
        second = self.layout.seq_len - self.layout.split
        return self.blocks_in_first_segment + -(-second // self.block_size)

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(starts, ends)`` int64 tensors of length ``num_blocks``."""
        bs, split, seq = self.block_size, self.layout.split, self.layout.seq_len
        first = torch.arange(self.blocks_in_first_segment) * bs
        second = split + torch.arange(self.num_blocks - self.blocks_in_first_segment) * bs
        starts = torch.cat([first, second])
        ends = torch.cat([torch.clamp(first + bs, max=split), torch.clamp(second + bs, max=seq)])
        return starts, ends

    def is_text(self) -> torch.Tensor:
        """Bool per block: the block holds text tokens."""
        starts, _ = self.bounds()
        lay = self.layout
        if lay.text_len == 0:
            return torch.zeros(self.num_blocks, dtype=torch.bool)
        if lay.text_first:
            return starts < lay.text_len
        return starts >= lay.image_len

    def image_ranges(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per block, ``[lo, hi)`` in image-token index space (empty, lo == hi, for text blocks)."""
        starts, ends = self.bounds()
        off = self.layout.image_start
        text = self.is_text()
        lo = torch.where(text, torch.zeros_like(starts), starts - off)
        hi = torch.where(text, torch.zeros_like(ends), ends - off)
        return lo, hi
