"""Token permutations for reordered (PARO) attention.

A permutation is a gather index ``perm`` of length S: position ``p`` of the reordered sequence holds
token ``perm[p]``. Text tokens never move; image tokens are read in one of the six axis orders of the
latent grid. Per-head permutations stack to ``[H, S]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .layout import AXIS_ORDERS, TokenLayout


def axis_order_permutation(layout: TokenLayout, order: str) -> torch.Tensor:
    """int64 ``[S]`` gather index that stores the image tokens in ``order`` (e.g. ``"HWF"``)."""
    order = order.upper()
    if order not in AXIS_ORDERS:
        raise ValueError(f"order must be one of {AXIS_ORDERS}, got {order!r}")
    if layout.grid is None:
        raise ValueError("a reordering needs the latent grid (F, H, W) in the TokenLayout")
    f, h, w = layout.grid
    raster = torch.arange(f * h * w).view(f, h, w)
    img = raster.permute(*["FHW".index(a) for a in order]).reshape(-1) + layout.image_start
    ident = torch.arange(layout.seq_len)
    if layout.text_first:
        return torch.cat([ident[: layout.text_len], img])
    return torch.cat([img, ident[layout.image_len :]])


def head_permutations(layout: TokenLayout, orders: Sequence[str]) -> torch.Tensor:
    """int32 ``[H, S]``: one axis order per head."""
    return torch.stack([axis_order_permutation(layout, o) for o in orders]).to(torch.int32)


def invert(perm: torch.Tensor) -> torch.Tensor:
    """Inverse gather index: ``x[perm][invert(perm)] == x``."""
    return torch.argsort(perm, dim=-1).to(perm.dtype)
