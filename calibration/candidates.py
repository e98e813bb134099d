"""Candidate work per head: the methods calibration may choose, as block maps on one token layout.

A :class:`Candidate` is what one head could run: a method config of the plan vocabulary
(:mod:`fastattn.plans.methods`) in one axis order, or head-wise reuse. Every candidate a head may take is
known before the first observed call, so each call scores all of them on the same sampled query rows
(:mod:`fastattn.calibration.observe`). Families, after ``../shared/reference/methods.md``:

* ``paro`` (PAROAttention): 3-D windows in each of the six F x H x W axis orders. The window is in grid
  coordinates; reordering changes which tokens share a block, so the same window costs fewer blocks in the
  order that makes the head's neighbourhood contiguous (a temporal head in ``HWF``). And PARO as published:
  per head and axis order, a *block map* thresholded from the head's own pooled attention at a few
  densities (``blockmap``): the key blocks carrying the most of each query block's attention mass, the
  diagonal and text blocks always kept. Its blocks differ per head, so its maps are built from the
  observations (:func:`threshold_maps`), not here.
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
    BlockMapConfig,
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
    "paro": ("window3d_reordered", "blockmap"),
    "sparse_vdit": ("band", "multi_diagonal", "stripes", "skip"),
    "ditfastattn": ("arrow", "reuse"),
    "structural": ("window3d", "radial"),
}
METHOD_NAMES = ("window3d", "window3d_reordered", "blockmap", "radial", "band", "multi_diagonal", "stripes",
                "skip", "arrow", "reuse")  # fmt: skip
BLOCKMAP_DENSITIES = (0.1, 0.2, 0.3, 0.5)  # the block densities each head's maps are thresholded at
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
        order: axis order of the head's tokens (only ``window3d`` and ``blockmap`` are ever reordered).
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
        if "blockmap" in names:
            for order in AXIS_ORDERS:
                for d in BLOCKMAP_DENSITIES:
                    out.append(Candidate(f"blockmap {d:g} {order}", "paro", BlockMapConfig(density=d), order))
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
    if "blockmap" in names and grid is None:  # no grid, no reordering: the model's own order
        for d in BLOCKMAP_DENSITIES:
            out.append(Candidate(f"blockmap {d:g}", "paro", BlockMapConfig(density=d)))
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

    Block-map candidates of the order (their maps differ per head, see :func:`threshold_maps`):
    ``map_index`` their candidate indices, ``map_counts`` the blocks each keeps, ``forced`` bool ``[nQ, nK]``
    the blocks every map keeps, ``map_slot`` the order's index in the observations' block mass (``-1``: none).
    """

    order: str
    index: torch.Tensor
    maps: torch.Tensor
    perm: torch.Tensor
    pad: torch.Tensor
    map_index: torch.Tensor | None = None
    map_counts: torch.Tensor | None = None
    forced: torch.Tensor | None = None
    map_slot: int = -1


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
    def build(cls, layout: TokenLayout, block_size: int, methods, configs: list[Candidate] | None = None,
              rows: torch.Tensor | None = None):  # fmt: skip
        """Masks of ``configs`` (default :func:`candidate_configs`) on ``layout``. When ``configs`` is not
        given, candidates repeating an earlier block map of the same order are dropped.

        ``rows``: the sampled query positions the observer scores; a block-map row no sampled query falls in
        (in that order) has no observed mass, so its maps keep the whole row (:func:`forced_blocks`)."""
        dedupe = configs is None
        configs = candidate_configs(layout, block_size, methods) if configs is None else list(configs)
        geom = BlockGeometry(layout, block_size)
        n = geom.num_blocks
        kept, maps_of, seen = [], {}, {}
        blockmaps: dict[str, list[tuple[int, int]]] = {}  # order -> [(candidate index, blocks kept)]
        forced: dict[str, torch.Tensor] = {}
        windows = _window_maps(configs, layout, block_size)
        for cand in configs:
            if cand.reuse:
                kept.append(cand)
                continue
            if isinstance(cand.method, BlockMapConfig):
                if cand.order not in forced:
                    forced[cand.order] = forced_blocks(layout, block_size, cand.order, rows)
                floor = int(forced[cand.order].sum())
                count = max(floor, min(n * n, round(cand.method.density * n * n)))
                key = (cand.order, "blockmap", count)
                if dedupe and key in seen:
                    continue
                seen[key] = len(kept)
                blockmaps.setdefault(cand.order, []).append((len(kept), count))
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
        slots = 0
        for order in sorted(set(maps_of) | set(blockmaps), key=AXIS_ORDERS.index):
            fixed = maps_of.get(order, [])
            idx = torch.tensor([i for i, _ in fixed], dtype=torch.long)
            maps = torch.stack([m for _, m in fixed]) if fixed else torch.zeros(0, n, n, dtype=torch.bool)
            density[idx] = maps.double().sum((-1, -2)) / (n * n)
            perm = (
                axis_order_permutation(layout, order)
                if layout.grid is not None
                else torch.arange(layout.seq_len)
            )
            om = OrderMaps(order, idx, maps, perm, _padded_blocks(pos_block, block_size))
            if order in blockmaps:
                om.map_index = torch.tensor([i for i, _ in blockmaps[order]], dtype=torch.long)
                om.map_counts = torch.tensor([c for _, c in blockmaps[order]], dtype=torch.long)
                om.forced, om.map_slot = forced[order], slots
                density[om.map_index] = om.map_counts.double() / (n * n)
                slots += 1
            by_order.append(om)
        return cls(layout, block_size, kept, density, by_order)

    @property
    def map_orders(self) -> list[OrderMaps]:
        """The orders with block-map candidates, by their slot in the observations' block mass."""
        return [om for om in self.by_order if om.map_slot >= 0]

    def block_map(self, index: int, mass: torch.Tensor) -> torch.Tensor:
        """The map block-map candidate ``index`` keeps for a head whose pooled mass per block-map order is
        ``mass`` (``[O, 2, nQ, nK]``, the observations' ``block_mass[g, l, h]``: both halves of the sampled
        rows are summed): bool ``[nQ, nK]``."""
        for om in self.map_orders:
            hit = (om.map_index == index).nonzero()
            if hit.numel():
                j = int(hit[0, 0])
                return threshold_maps(mass[om.map_slot].sum(0), om.forced, om.map_counts[j : j + 1])[0]
        raise ValueError(f"candidate {index} ({self.candidates[index].label}) is not a block-map candidate")

    def keys(self) -> list[dict]:
        return [c.key() for c in self.candidates]

    def fingerprint(self) -> str:
        """A short hash of the candidate list (what a checkpoint was observed with)."""
        return hashlib.sha256(json.dumps(self.keys(), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def reordered(self) -> torch.Tensor:
        return torch.tensor([c.order != "FHW" for c in self.candidates])


def forced_blocks(layout: TokenLayout, block_size: int, order: str, rows: torch.Tensor | None) -> torch.Tensor:
    """bool ``[n, n]``: the blocks every block map of ``order`` keeps, as PARO keeps them: the diagonal, text
    rows and columns, and the whole row of a query block none of the sampled ``rows`` falls in (nothing was
    observed there)."""
    geom = BlockGeometry(layout, block_size)
    n = geom.num_blocks
    text = geom.is_text()
    keep = torch.eye(n, dtype=torch.bool)
    keep[text, :] = True
    keep[:, text] = True
    if rows is not None:
        perm = axis_order_permutation(layout, order) if layout.grid is not None else torch.arange(layout.seq_len)
        seen = torch.zeros(n, dtype=torch.bool)
        seen[position_blocks(layout, block_size)[torch.argsort(perm)[rows]]] = True
        keep[~seen, :] = True
    return keep


def threshold_maps(mass: torch.Tensor, forced: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """PARO's thresholding: for each entry of ``counts``, the ``count`` blocks covering the most attention.

    ``mass``: ``[..., nQ, nK]`` pooled attention mass per block (summed over sampled rows and calls); each
    query block's row is normalised to its share of that row's attention, so the kept blocks are those that
    leave the least mass out over all rows (the error of block-sparse attention grows with the mass it drops).
    ``forced`` blocks come first. Returns bool ``[..., C, nQ, nK]``; ties go to the lower block index.
    """
    nq, nk = mass.shape[-2:]
    share = mass / mass.sum(-1, keepdim=True).clamp_min(1e-30)
    score = torch.where(forced.to(mass.device), torch.full_like(share, 2.0), share).flatten(-2)
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    keep = rank.unsqueeze(-2) < counts.to(rank.device)[:, None]  # [..., C, nQ * nK]
    return keep.view(*mass.shape[:-2], counts.numel(), nq, nk)


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
