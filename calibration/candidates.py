"""Candidate work per head: the methods calibration may choose, as block maps on one token layout.

A :class:`Candidate` is what one head could run: a method config of the plan vocabulary
(:mod:`fastattn.plans.methods`) in one axis order, or head-wise reuse. Every candidate a head may take is
known before the first observed call, so each call scores all of them on the same sampled query rows
(:mod:`fastattn.calibration.observe`). Families, after ``../shared/reference/methods.md``:

* ``paro`` (PAROAttention): 3-D windows in each of the six F x H x W axis orders. The window is in grid
  coordinates; reordering changes which tokens share a block, so the same window costs fewer blocks in the
  order that makes the head's neighbourhood contiguous (a temporal head in ``HWF``).
* ``sparse_vdit`` (Sparse-vDiT): diagonal bands, multi-diagonals (same position in nearby frames), vertical
  stripes (a strided subset of key blocks, for near-uniform heads) and skipped heads.
* ``ditfastattn`` (DiTFastAttn-v2): arrow windows (an image band plus all text) on joint text+image
  layouts, and head-wise reuse of the previous step's output.
* ``structural``: the unreordered 3-D window and radial masks the structural presets use.

``dense`` is always a candidate. Bit-widths are not candidates here: the observer measures each head's
quantization error once and selection adds it to any computed candidate.

Block maps are built straight from block geometry (the pattern builders), never from S x S token pairs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import torch

from ..masks import patterns
from ..masks.layout import AXIS_ORDERS, BlockGeometry, TokenLayout
from ..masks.permutations import axis_order_permutation
from ..plans.methods import (
    ArrowConfig,
    BandConfig,
    DenseConfig,
    MethodConfig,
    MultiDiagonalConfig,
    RadialConfig,
    SkipConfig,
    StripesConfig,
    Window3DConfig,
    build_mask,
    describe,
)

FAMILIES = ("paro", "sparse_vdit", "ditfastattn", "structural")
# what each family contributes; method names of the plan vocabulary plus "reuse"
FAMILY_METHODS = {
    "paro": ("window3d_reordered",),
    "sparse_vdit": ("band", "multi_diagonal", "stripes", "skip"),
    "ditfastattn": ("arrow", "reuse"),
    "structural": ("window3d", "radial"),
}
METHOD_NAMES = ("window3d", "window3d_reordered", "radial", "band", "multi_diagonal", "stripes", "skip",
                "arrow", "reuse")  # fmt: skip
DEFAULT_METHODS = FAMILIES


def resolve_methods(methods) -> tuple[str, ...]:
    """Family and method names -> the method names they stand for (sorted, deduplicated), clear errors."""
    if isinstance(methods, str):
        methods = (methods,)
    try:
        names = list(methods)
    except TypeError:
        raise TypeError(f"methods must be a list of names, got {methods!r}") from None
    if not names:
        raise ValueError(f"methods is empty; give some of {list(FAMILIES)} or {list(METHOD_NAMES)}")
    out = set()
    for n in names:
        if not isinstance(n, str):
            raise TypeError(f"methods must hold names, got {n!r}")
        key = n.lower().replace("-", "_")
        if key in FAMILY_METHODS:
            out.update(FAMILY_METHODS[key])
        elif key in METHOD_NAMES:
            out.add(key)
        elif key == "dense":
            continue  # always a candidate
        else:
            raise ValueError(
                f"unknown calibration method {n!r}; families: {list(FAMILIES)}, methods: {list(METHOD_NAMES)}"
            )
    return tuple(sorted(out))


@dataclass(frozen=True)
class Candidate:
    """One thing a head may run.

    Args:
        label: short human name (``"window3d (1,2,2) HWF"``).
        family: ``dense``, ``paro``, ``sparse_vdit``, ``ditfastattn`` or ``structural``.
        method: the plan method config (``None`` for reuse).
        order: axis order of the head's tokens (only ``window3d`` is ever reordered).
        reuse: the head returns its output of the latest computed step instead of attending.
    """

    label: str
    family: str
    method: MethodConfig | None
    order: str = "FHW"
    reuse: bool = False

    def key(self) -> dict:
        """JSON-able identity (checkpoints compare candidate lists by it)."""
        return {"method": describe(self.method) if self.method is not None else None, "order": self.order,
                "reuse": self.reuse}  # fmt: skip


def _half_widths(n: int) -> list[int]:
    """Half-widths tried along an axis of ``n`` tokens: small steps first, roughly doubling, and the whole axis."""
    vals = {0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, n - 1}
    return sorted(v for v in vals if 0 <= v <= n - 1)


def _spatial_pairs(h: int, w: int) -> list[tuple[int, int]]:
    """(wh, ww) windows growing together, scaled to the grid's aspect."""
    m = max(h, w)
    pairs = []
    for a in _half_widths(m):
        p = (round(a * (h - 1) / max(m - 1, 1)), round(a * (w - 1) / max(m - 1, 1)))
        if p not in pairs:
            pairs.append(p)
    return pairs


def candidate_configs(layout: TokenLayout, block_size: int, methods) -> list[Candidate]:
    """Every candidate of ``methods`` (names, see :func:`resolve_methods`) for ``layout``, dense first.

    Candidates whose mask is the same block map as an earlier one of the same order are dropped later
    (:class:`CandidateSet`); here the list only depends on the grid, the text and the block size.
    """
    names = set(resolve_methods(methods))
    out = [Candidate("dense", "dense", DenseConfig())]
    grid = layout.grid
    if "skip" in names:
        out.append(Candidate("skip", "sparse_vdit", SkipConfig()))
    if "reuse" in names:
        out.append(Candidate("reuse", "ditfastattn", None, reuse=True))
    if grid is not None:
        f, h, w = grid
        windows = [(wf, *sp) for wf in _half_widths(f) for sp in _spatial_pairs(h, w)]
        orders = []
        if "window3d" in names:
            orders.append("FHW")
        if "window3d_reordered" in names:
            orders += [o for o in AXIS_ORDERS if o != "FHW"]
            if "window3d" not in names:
                orders.insert(0, "FHW")  # PARO picks the best of the six orders, the model's own included
        for order in orders:
            fam = "structural" if order == "FHW" and "window3d" in names else "paro"
            for win in windows:
                out.append(Candidate(f"window3d {win} {order}", fam, Window3DConfig(window=win), order))
        if "radial" in names:
            for a in _half_widths(max(h, w))[1:5]:
                win = (min(a, h - 1) * 2, min(a, w - 1) * 2)
                out.append(Candidate(f"radial {win}", "structural", RadialConfig(window=win)))
        if "multi_diagonal" in names and f > 1:
            spans = sorted({1, 2, 4, f - 1})
            for rows in (1, 3):
                for span in spans:
                    offs = tuple(range(-min(span, f - 1), min(span, f - 1) + 1))
                    cfg = MultiDiagonalConfig(window=rows * w, frame_offsets=offs)
                    out.append(Candidate(f"multi_diagonal rows={rows} frames=+-{span}", "sparse_vdit", cfg))
    n_img = layout.image_len
    if "band" in names:
        for blocks in (1, 2, 4, 8):
            win = blocks * block_size
            if win < n_img:
                out.append(Candidate(f"band {win}", "sparse_vdit", BandConfig(window=win)))
    if "arrow" in names and layout.text_len > 0:
        for factor in (8, 16, 32):
            out.append(Candidate(f"arrow f={factor}", "ditfastattn", ArrowConfig(factor=factor)))
    if "stripes" in names:
        n_blocks = -(-n_img // block_size)
        for stride in (2, 4, 8, 16):
            if n_blocks < 2 * stride:
                continue
            starts = range(0, n_blocks, stride)
            ranges = tuple((b * block_size / n_img, min((b + 1) * block_size, n_img) / n_img) for b in starts)
            out.append(Candidate(f"stripes 1/{stride}", "sparse_vdit", StripesConfig(key_ranges=ranges)))
    return out


def position_blocks(layout: TokenLayout, block_size: int) -> torch.Tensor:
    """int64 ``[S]``: the block each sequence position falls in."""
    starts, ends = BlockGeometry(layout, block_size).bounds()
    return torch.repeat_interleave(torch.arange(len(starts)), ends - starts)


@dataclass
class OrderMaps:
    """The candidates of one axis order on one layout.

    ``index``: candidate indices; ``maps``: bool ``[C_o, nQ, nK]`` block maps in that order's block space;
    ``perm``: the gather index of the order (``[S]``); ``pad``: ``[nK, block_size]`` positions of each key
    block, ``-1`` past a short block's end.
    """

    order: str
    index: torch.Tensor
    maps: torch.Tensor
    perm: torch.Tensor
    pad: torch.Tensor


@dataclass
class CandidateSet:
    """Candidates with their block maps and block densities on one layout (built once, reused by every call).

    ``density[c]``: fraction of block pairs candidate ``c`` computes (0 for skip and reuse).
    """

    layout: TokenLayout
    block_size: int
    candidates: list[Candidate]
    density: torch.Tensor
    by_order: list[OrderMaps] = field(default_factory=list)

    @classmethod
    def build(cls, layout: TokenLayout, block_size: int, methods, configs: list[Candidate] | None = None):
        """Masks of ``configs`` (default :func:`candidate_configs`) on ``layout``. When ``configs`` is not
        given, candidates repeating an earlier block map of the same order are dropped."""
        dedupe = configs is None
        configs = candidate_configs(layout, block_size, methods) if configs is None else list(configs)
        geom = BlockGeometry(layout, block_size)
        n = geom.num_blocks
        kept, maps_of, seen = [], {}, {}
        windows = _window_maps(configs, layout, block_size)
        for cand in configs:
            if cand.reuse:
                kept.append(cand)
                continue
            bm = windows.get((cand.order, cand.method)) if isinstance(cand.method, Window3DConfig) else None
            if bm is None:
                bm = build_mask(cand.method, layout, block_size).to_block_map()[0, 0]
            key = (cand.order, bm.numpy().tobytes())
            if dedupe and key in seen:
                continue
            seen[key] = len(kept)
            maps_of.setdefault(cand.order, []).append((len(kept), bm))
            kept.append(cand)
        density = torch.zeros(len(kept), dtype=torch.float64)
        pos_block = position_blocks(layout, block_size)
        by_order = []
        for order in sorted(maps_of, key=AXIS_ORDERS.index):
            idx = torch.tensor([i for i, _ in maps_of[order]])
            maps = torch.stack([m for _, m in maps_of[order]])
            density[idx] = maps.double().sum((-1, -2)) / (n * n)
            perm = (
                axis_order_permutation(layout, order)
                if layout.grid is not None
                else torch.arange(layout.seq_len)
            )
            by_order.append(OrderMaps(order, idx, maps, perm, _padded_blocks(pos_block, block_size)))
        return cls(layout, block_size, kept, density, by_order)

    def keys(self) -> list[dict]:
        return [c.key() for c in self.candidates]

    def fingerprint(self) -> str:
        """A short hash of the candidate list (what a checkpoint was observed with)."""
        return hashlib.sha256(json.dumps(self.keys(), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def reordered(self) -> torch.Tensor:
        return torch.tensor([c.order != "FHW" for c in self.candidates])


def _window_maps(configs: list[Candidate], layout: TokenLayout, block_size: int) -> dict:
    """``{(order, Window3DConfig): [nQ, nK] bool}`` for every 3-D window candidate, one pass per order.

    Building each window's mask on its own repeats the same segment comparisons dozens of times (seconds
    per order at video lengths). Here, per order, one sweep over the segment gaps finds for every block pair
    and every temporal half-width the smallest spatial window that admits the pair; each window's map is
    then a comparison. Spatial windows must grow in both half-widths (``_spatial_pairs`` does).
    """
    wins: dict[str, set] = {}
    for c in configs:
        if isinstance(c.method, Window3DConfig):
            wins.setdefault(c.order, set()).add(tuple(c.method.window))
    out = {}
    if not wins:
        return out
    geom = BlockGeometry(layout, block_size)
    n = geom.num_blocks
    text = geom.is_text()
    grid = layout.grid
    for order, ws in wins.items():
        ws = sorted(ws)
        spatial = sorted({w[1:] for w in ws})
        sp = torch.tensor(spatial, dtype=torch.long)
        if (sp[1:] < sp[:-1]).any():
            raise ValueError(f"spatial windows must grow in both half-widths, got {spatial}")
        big = max(grid) + 1
        need_h = torch.searchsorted(sp[:, 0].contiguous(), torch.arange(big + 1)).int()
        need_w = torch.searchsorted(sp[:, 1].contiguous(), torch.arange(big + 1)).int()
        pairs = patterns.SegmentPairs(geom, order)
        f_len = grid[0]
        # first[pair, df]: the smallest spatial index admitting the pair with temporal half-width df
        first = torch.full((n * n, f_len + 1), len(spatial), dtype=torch.int32)
        step = max(1, 4_000_000 // max(1, pairs.k * pairs.k * n))
        for s in range(0, n, step):
            rows = slice(s, min(n, s + step))
            gap = pairs.gaps(rows)  # [c, k, n, k, 3] int16
            g = gap[..., 1:].clamp(max=big).long()
            need = torch.maximum(need_h[g[..., 0]], need_w[g[..., 1]])  # [c, k, n, k]
            gap_f = gap[..., 0].clamp(max=f_len).long()
            c = gap.shape[0]
            pair = torch.arange(s, s + c)[:, None, None, None] * n + torch.arange(n)[None, None, :, None]
            slot = (pair * (f_len + 1) + gap_f).flatten()
            first.view(-1).scatter_reduce_(0, slot, need.flatten(), "amin")
        first = torch.cummin(first, dim=1).values  # a wider temporal window admits every smaller gap
        for w in ws:
            bm = (first[:, w[0]] <= spatial.index(w[1:])).view(n, n)
            bm[text, :] = True
            bm[:, text] = True
            out[(order, Window3DConfig(window=w))] = bm
    return out


def _padded_blocks(pos_block: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[nK, block_size]`` positions of every block (blocks are contiguous position ranges), ``-1`` padding."""
    n = int(pos_block.max()) + 1
    counts = torch.bincount(pos_block, minlength=n)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(block_size)
    pad = starts[:, None] + slot[None, :]
    return torch.where(slot[None, :] < counts[:, None], pad, torch.full_like(pad, -1))
