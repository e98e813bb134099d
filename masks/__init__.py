"""Block masks and token layouts: what to compute, described per block, never per token pair."""

from . import patterns
from .block_mask import BlockMask
from .layout import AXIS_ORDERS, BlockGeometry, TokenLayout
from .permutations import axis_order_permutation, head_permutations, invert

__all__ = [
    "AXIS_ORDERS",
    "BlockGeometry",
    "BlockMask",
    "TokenLayout",
    "axis_order_permutation",
    "head_permutations",
    "invert",
    "patterns",
]
