"""Mask builders: structured patterns straight to block lists.

Each builder works on blocks, never on token pairs. An image block is a run of consecutive tokens in
raster order of the (possibly reordered) grid; it is described exactly as a few *row segments*, each a
box with one interval axis and two point axes in (F, H, W). Two blocks interact when some pair of their
segments is within the pattern's reach, which is a handful of comparisons per segment pair: building a
mask for HunyuanVideo 720p (118,800 tokens) touches ~3,000 segments, not 10^10 token pairs.

Text tokens follow ``text=``: ``"dense"`` (text queries see every key and every query sees the text
keys: arrow attention) or ``"self"`` (text attends only to text, image only per the pattern).

Arguments are checked before any work: windows and counts are ints (not bools or floats), and a layout
whose mask would be past :data:`MAX_BLOCK_PAIRS`, or whose segment pairs would be past
:data:`MAX_SEGMENT_PAIRS`, is refused with the numbers rather than built for minutes.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch

from ..attn_kernels.geometry import check_int
from .block_mask import MAX_BLOCK_PAIRS as MAX_BLOCK_PAIRS  # re-exported: the limit _geometry applies
from .block_mask import BlockMask, check_mask_size
from .layout import AXIS_ORDERS, BlockGeometry, TokenLayout

_AXIS = {"F": 0, "H": 1, "W": 2}
_CHUNK = 512  # query segments per step when pairing segments; bounds memory at ~100 MB
# Row-segment pairs (query block segments x key block segments) a window3d / radial mask or density table
# may compare: each is 3 int16 gaps, so this is ~6 GiB of gap arithmetic in bounded chunks, about a minute
# of CPU. HunyuanVideo 720p needs 1.4e7 in 64-token blocks (7.8e6 in 128-token blocks).
MAX_SEGMENT_PAIRS = 1 << 30


def _geometry(layout: TokenLayout, block_size: int) -> BlockGeometry:
    """The layout's blocks, refused up front when its square mask would be past :data:`MAX_BLOCK_PAIRS`."""
    geom = BlockGeometry(layout, block_size)
    check_mask_size(geom.num_blocks, geom.num_blocks, geom.block_size)
    return geom


def _check_text(text: str) -> str:
    if text not in ("dense", "self"):
        raise ValueError(f"text must be 'dense' or 'self', got {text!r}")
    return text


def _non_negative(name: str, value) -> int:
    value = check_int(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _int_tuple(name: str, value, length: int, what: str) -> tuple[int, ...]:
    """``length`` non-negative ints (a tuple, list or array; not a string)."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise TypeError(f"{name} must be {length} non-negative ints {what}, got {value!r}")
    if len(value) != length:
        raise ValueError(f"{name} must be {length} non-negative ints {what}, got {value!r}")
    return tuple(_non_negative(f"{name} entries {what}", x) for x in value)


def _need_grid(layout: TokenLayout) -> tuple[int, int, int]:
    if layout.grid is None:
        raise ValueError("this pattern needs the latent grid (F, H, W): build the TokenLayout with grid=")
    return layout.grid


def _check_order(order: str) -> str:
    order = order.upper()
    if order not in AXIS_ORDERS:
        raise ValueError(f"order must be one of {AXIS_ORDERS}, got {order!r}")
    return order


def image_segments(geom: BlockGeometry, order: str = "FHW"):
    """Row segments of every image block.

    Returns ``(block, lo, hi)``: block index ``[M]`` and inclusive per-axis bounds ``[M, 3]`` in
    (F, H, W) coordinates.
    """
    grid = _need_grid(geom.layout)
    order = _check_order(order)
    dims = [grid[_AXIS[a]] for a in order]  # grid dims in storage order (A, B, C)
    c_len = dims[2]
    lo_img, hi_img = geom.image_ranges()
    blocks, los, his = [], [], []
    for j in range(geom.num_blocks):
        lo, hi = int(lo_img[j]), int(hi_img[j])
        if lo == hi:
            continue
        rows = torch.arange(lo // c_len, (hi - 1) // c_len + 1)
        c_lo = torch.clamp(lo - rows * c_len, min=0)
        c_hi = torch.clamp(hi - rows * c_len, max=c_len) - 1
        a, b = rows // dims[1], rows % dims[1]
        seg_lo = torch.stack([a, b, c_lo], 1)
        seg_hi = torch.stack([a, b, c_hi], 1)
        # back to (F, H, W) axis positions
        perm = [order.index(x) for x in "FHW"]
        los.append(seg_lo[:, perm])
        his.append(seg_hi[:, perm])
        blocks.append(torch.full((len(rows),), j))
    return torch.cat(blocks), torch.cat(los), torch.cat(his)


class SegmentPairs:
    """Per-axis gaps between the row segments of every pair of image blocks of one layout.

    A block has at most ``k`` segments; they are padded to ``[num_blocks, k]`` so that a block pair is
    allowed when *any* of its ``k x k`` segment pairs is (an ``any`` over two axes, no scatter). Padding
    slots sit far outside the grid, so no pattern allows them. The gaps are computed once and cached
    when they fit in ``CACHE_ELEMENTS``: a density search builds dozens of masks of one layout.
    """

    CACHE_ELEMENTS = 48_000_000  # int16 gaps: ~100 MB
    _FAR = 30_000  # padding coordinate; int16 holds the gaps after clamping

    def __init__(self, geom: BlockGeometry, order: str = "FHW"):
        n = geom.num_blocks
        check_mask_size(n, n, geom.block_size)  # image_segments walks the blocks in Python
        blk, lo, hi = image_segments(geom, order)
        counts = torch.bincount(blk, minlength=n)
        self.k = max(int(counts.max()) if len(blk) else 1, 1)
        check_segment_pairs(n, self.k, geom)
        slot = torch.arange(len(blk)) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        self.lo = torch.full((n, self.k, 3), self._FAR, dtype=torch.int32)
        self.hi = torch.full((n, self.k, 3), -self._FAR, dtype=torch.int32)
        self.lo[blk, slot] = lo.int()
        self.hi[blk, slot] = hi.int()
        self.n = n
        self._chunk = max(1, self.CACHE_ELEMENTS // max(1, 3 * self.k * self.k * n))
        self._gaps = self._all_gaps() if 3 * (n * self.k) ** 2 <= self.CACHE_ELEMENTS else None

    def _gaps_of(self, rows: slice) -> torch.Tensor:
        qlo, qhi = self.lo[rows, :, None, None], self.hi[rows, :, None, None]  # [c, k, 1, 1, 3]
        klo, khi = self.lo[None, None], self.hi[None, None]  # [1, 1, n, k, 3]
        gap = torch.clamp(torch.maximum(klo - qhi, qlo - khi), min=0, max=2 * self._FAR)
        return gap.clamp_(max=32_767).to(torch.int16)  # [c, k, n, k, 3]

    def gaps(self, rows: slice) -> torch.Tensor:
        """Gaps ``[c, k, n, k, 3]`` (int16) of the query blocks in ``rows``: cached, or computed now."""
        return self._gaps[rows] if self._gaps is not None else self._gaps_of(rows)

    def _all_gaps(self) -> torch.Tensor:
        return torch.cat([self._gaps_of(slice(s, s + self._chunk)) for s in range(0, self.n, self._chunk)])

    def block_map(self, allowed: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``[n, n]`` bool: ``allowed(gap)`` takes per-axis gaps ``[..., 3]`` (int16) and returns bools."""
        out = torch.zeros(self.n, self.n, dtype=torch.bool)
        for s in range(0, self.n, self._chunk):
            rows = slice(s, s + self._chunk)
            gap = self.gaps(rows)
            out[rows] = allowed(gap).any(3).any(1)
        return out


def check_segment_pairs(n: int, k: int, geom: BlockGeometry, per_pair: int = 1) -> None:
    """Raise when ``n`` blocks of up to ``k`` row segments each (``per_pair`` comparisons per block pair and
    segment pair) are past :data:`MAX_SEGMENT_PAIRS`."""
    work = (n * k) ** 2 * per_pair
    if work > MAX_SEGMENT_PAIRS:
        grid = geom.layout.grid
        times = f" x {per_pair} temporal gaps" if per_pair > 1 else ""
        raise ValueError(
            f"{n} blocks of {geom.block_size} tokens, each up to {k} row segments of the grid {grid}, make "
            f"{work:.3g} segment pairs{times} to compare, past fastattn's limit of {MAX_SEGMENT_PAIRS:,}: use a larger "
            "block_size, a shorter sequence, or a grid with longer rows (the last axis of the token order)"
        )


def _interval_pairs(geom: BlockGeometry, allowed: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """Block map of image blocks from their 1-D image-index ranges (``allowed(dlo, dhi)``).

    ``dlo``/``dhi`` are the smallest and largest values of ``k - q`` over token pairs of the two blocks.
    """
    lo, hi = geom.image_ranges()
    img = hi > lo
    q_lo, q_hi = lo[:, None], hi[:, None] - 1
    k_lo, k_hi = lo[None, :], hi[None, :] - 1
    ok = allowed(k_lo - q_hi, k_hi - q_lo)
    return ok & img[:, None] & img[None, :]


def _finish(image_map: torch.Tensor, geom: BlockGeometry, text: str) -> BlockMask:
    _check_text(text)
    is_text = geom.is_text()
    bm = image_map.clone()
    if text == "dense":
        bm[is_text, :] = True
        bm[:, is_text] = True
    else:
        bm |= is_text[:, None] & is_text[None, :]
    return BlockMask.from_block_map(bm, geom.layout, geom.block_size)


# --------------------------------------------------------------------------- builders


def dense(layout: TokenLayout, block_size: int = 128) -> BlockMask:
    """Every block pair: exact attention."""
    return BlockMask.dense(layout, block_size)


def band(layout: TokenLayout, window: int, block_size: int = 128, text: str = "dense") -> BlockMask:
    """1-D band over image tokens: ``|i - j| <= window`` in token order (DiTFastAttn window)."""
    window = _non_negative("window (tokens)", window)
    _check_text(text)
    geom = _geometry(layout, block_size)
    img = _interval_pairs(geom, lambda dlo, dhi: (dlo <= window) & (dhi >= -window))
    return _finish(img, geom, text)


def arrow(layout: TokenLayout, factor: int, block_size: int = 128) -> BlockMask:
    """DiTFastAttnV2 arrow: image band of ``image_len / (2 * factor)`` tokens plus all text."""
    if check_int("factor", factor) <= 0:
        raise ValueError(f"factor must be positive, got {factor}")
    return band(layout, layout.image_len // (2 * factor), block_size, text="dense")


def multi_diagonal(
    layout: TokenLayout,
    window: int,
    frame_offsets: Sequence[int],
    block_size: int = 128,
    text: str = "dense",
) -> BlockMask:
    """Sparse-vDiT multi-diagonal: bands of ``window`` tokens at offsets of whole frames.

    ``frame_offsets=(-2, -1, 0, 1, 2)`` lets a token see its neighbourhood at the same spatial position
    in the two frames before and after.
    """
    window = _non_negative("window (tokens)", window)
    offsets = [check_int("frame_offsets entries", off) for off in frame_offsets]
    _check_text(text)
    f, h, w = _need_grid(layout)
    stride = h * w
    geom = _geometry(layout, block_size)
    img = torch.zeros(geom.num_blocks, geom.num_blocks, dtype=torch.bool)
    for off in offsets:
        c = off * stride
        img |= _interval_pairs(geom, lambda dlo, dhi, c=c: (dlo <= c + window) & (dhi >= c - window))
    return _finish(img, geom, text)


def vertical_stripes(
    layout: TokenLayout,
    key_ranges: Sequence[tuple[int, int]],
    block_size: int = 128,
    text: str = "dense",
) -> BlockMask:
    """Every query reads the image keys in ``key_ranges`` (image-token index ranges ``[a, b)``)."""
    ranges = [(check_int("key_ranges entries", a), check_int("key_ranges entries", b)) for a, b in key_ranges]
    _check_text(text)
    geom = _geometry(layout, block_size)
    lo, hi = geom.image_ranges()
    cols = torch.zeros(geom.num_blocks, dtype=torch.bool)
    for a, b in ranges:
        if not 0 <= a < b <= layout.image_len:
            raise ValueError(f"key range {(a, b)} outside the {layout.image_len} image tokens")
        cols |= (lo < b) & (hi > a)
    img_rows = hi > lo
    return _finish(img_rows[:, None] & cols[None, :], geom, text)


def window3d(
    layout: TokenLayout,
    window: tuple[int, int, int],
    block_size: int = 128,
    order: str = "FHW",
    text: str = "dense",
) -> BlockMask:
    """3-D local window: tokens within ``(wf, wh, ww)`` of each other along F, H and W.

    ``order`` is the raster order the image tokens are stored in (a PARO reordering); the window is
    always in grid coordinates, so the same window under another order gives other blocks.
    """
    _int_tuple("window", window, 3, "(wf, wh, ww)")  # before the segment work
    return window3d_builder(layout, block_size, order, text)(window)


def window3d_builder(
    layout: TokenLayout, block_size: int = 128, order: str = "FHW", text: str = "dense"
) -> Callable[[tuple[int, int, int]], BlockMask]:
    """``window -> window3d mask`` on one layout, sharing the segment gaps across calls (density search)."""
    grid = _need_grid(layout)
    _check_text(text)
    geom = _geometry(layout, block_size)
    pairs = SegmentPairs(geom, order)

    def build(window: tuple[int, int, int]) -> BlockMask:
        window = _int_tuple("window", window, 3, "(wf, wh, ww)")
        # a half-width past the grid's extent is the extent (and keeps the int16 gaps' padding unreachable)
        lim = torch.tensor([min(x, n - 1) for x, n in zip(window, grid)], dtype=torch.int16)
        return _finish(pairs.block_map(lambda gap: (gap <= lim).all(-1)), geom, text)

    return build


_TABLE_ELEMENTS = 8_000_000  # bounds window3d_density_table's working set (~200 MB)


def window3d_density_table(
    layout: TokenLayout, spatial: Sequence[tuple[int, int]], block_size: int = 128, order: str = "FHW"
) -> torch.Tensor:
    """Block density of ``window3d(layout, (wf, *spatial[j]))`` for every ``wf`` in ``[0, F)`` and every
    ``j``: ``[F, len(spatial)]`` (text dense). ``spatial`` must grow in both half-widths.

    One pass over the segment gaps instead of one mask per window, so a density search can look at
    every window shape: each segment pair needs ``gap_f <= wf`` and a spatial index at least
    ``max(first j covering gap_h, first j covering gap_w)``.
    """
    f = _need_grid(layout)[0]
    geom = _geometry(layout, block_size)
    spatial = [_int_tuple("spatial entries", x, 2, "(wh, ww)") for x in spatial]
    # per block pair and temporal gap one table entry, besides the segment pairs SegmentPairs checks
    check_segment_pairs(geom.num_blocks, 1, geom, per_pair=f + 1)
    pairs = SegmentPairs(geom, order)
    sp = torch.tensor(list(spatial), dtype=torch.long).reshape(-1, 2)
    n_j = len(sp)
    if n_j == 0 or (sp[1:] < sp[:-1]).any():
        raise ValueError("spatial must be a non-empty list of (wh, ww) growing in both")
    big = int(sp.max()) + 1  # gaps past every half-width: never covered (index n_j)
    need_h = torch.searchsorted(sp[:, 0].contiguous(), torch.arange(big + 1))
    need_w = torch.searchsorted(sp[:, 1].contiguous(), torch.arange(big + 1))
    image = ~geom.is_text()
    both_image = image[:, None] & image[None, :]
    n, m = geom.num_blocks, int(image.sum())
    counts = torch.zeros(f * (n_j + 1), dtype=torch.long)
    offsets = torch.arange(f) * (n_j + 1)
    # rows per step: the per-(pair, temporal gap) table below is c * n * (f + 1) entries
    chunk = max(1, min(pairs._chunk, _TABLE_ELEMENTS // (n * (f + 1))))
    for s in range(0, pairs.n, chunk):
        rows = slice(s, s + chunk)
        gap = pairs.gaps(rows).long()
        spatial_gap = gap[..., 1:].clamp(max=big)  # past every half-width; the temporal gap is kept
        c = gap.shape[0]
        need_j = torch.maximum(need_h[spatial_gap[..., 0]], need_w[spatial_gap[..., 1]]).int()  # [c, k, n, k]
        gap_f = gap[..., 0].clamp(max=f)  # f: no temporal half-width covers it
        del gap, spatial_gap
        # per block pair and temporal gap, the smallest spatial index any segment pair needs
        pair = (torch.arange(c)[:, None, None, None] * n + torch.arange(n)[None, None, :, None]).expand_as(
            gap_f
        )
        first_j = torch.full((c * n * (f + 1),), n_j, dtype=torch.int32)
        first_j.scatter_reduce_(0, (pair * (f + 1) + gap_f).flatten(), need_j.flatten(), "amin")
        del pair, gap_f, need_j
        first_j = first_j.view(c * n, f + 1)
        for wf in range(1, f):  # a temporal half-width wf admits every temporal gap <= wf
            torch.minimum(first_j[:, wf], first_j[:, wf - 1], out=first_j[:, wf])
        first_j = first_j[both_image[rows].flatten(), :f]  # [P, f]
        counts += torch.bincount((first_j + offsets).flatten(), minlength=f * (n_j + 1))
    counts = counts.view(f, n_j + 1)[:, :n_j].cumsum(1)
    return (n * n - m * m + counts).double() / (n * n)


def radial(
    layout: TokenLayout,
    window: tuple[int, int],
    temporal_window: int | None = None,
    block_size: int = 128,
    order: str = "FHW",
    text: str = "dense",
) -> BlockMask:
    """Radial attention: the spatial window halves each time the frame distance doubles.

    Tokens ``df`` frames apart interact when ``|dh| <= wh >> floor(log2(1 + df))`` (likewise W), and
    ``df <= temporal_window`` if given. Density decays exponentially with temporal distance.
    """
    wh, ww = _int_tuple("window", window, 2, "(wh, ww)")
    if temporal_window is not None:
        temporal_window = _non_negative("temporal_window (frames)", temporal_window)
    _check_text(text)
    f_max = _need_grid(layout)[0]
    geom = _geometry(layout, block_size)
    tw = f_max if temporal_window is None else min(temporal_window, f_max)  # beyond the grid: all frames

    def allowed(gap):
        df = gap[..., 0].long()
        shift = torch.floor(torch.log2(1.0 + df.float())).long()
        return (df <= tw) & (gap[..., 1] <= (wh >> shift)) & (gap[..., 2] <= (ww >> shift))

    img = SegmentPairs(geom, order).block_map(allowed)
    return _finish(img, geom, text)


def from_block_map(block_map: torch.Tensor, layout: TokenLayout, block_size: int = 128) -> BlockMask:
    """Explicit boolean block map (e.g. from calibration)."""
    return BlockMask.from_block_map(block_map, layout, block_size)


def band_for_density(layout: TokenLayout, density: float, block_size: int = 128) -> BlockMask:
    """Diagonal band of key blocks whose block density is closest to ``density`` (benchmarks)."""
    _check_density(density)
    n = _geometry(layout, block_size).num_blocks
    k = max(1, min(n, round(density * n)))
    i = torch.arange(n)
    start = torch.clamp(i - k // 2, 0, n - k)
    bm = (i[None, :] >= start[:, None]) & (i[None, :] < start[:, None] + k)
    return BlockMask.from_block_map(bm, layout, block_size)


def _check_density(density) -> float:
    if isinstance(density, bool) or not isinstance(density, numbers.Real):
        raise TypeError(f"density must be a float in (0, 1], got {type(density).__name__} {density!r}")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return float(density)


def window3d_for_density(layout: TokenLayout, density: float, block_size: int = 128, order="FHW"):
    """Smallest cubic-ish 3-D window whose block density reaches ``density``."""
    _check_density(density)
    f, h, w = _need_grid(layout)
    build = window3d_builder(layout, block_size, order)  # one segment-gap table for every window tried
    best = None
    for scale in torch.linspace(0.02, 1.0, 50).tolist():
        win = (math.ceil(scale * f), math.ceil(scale * h), math.ceil(scale * w))
        m = build(win)
        best = m
        if m.block_density() >= density:
            break
    return best
