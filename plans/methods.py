"""Attention methods as small config dataclasses, each turned into block masks by a registered handler.

torchao-style: a method is *data* (a frozen dataclass naming its parameters) plus a handler registered
for its type, so adding a method never grows an ``if`` chain in the runtime::

    @register_method_handler(MyConfig)
    def _my_mask(config: MyConfig, layout: TokenLayout, block_size: int) -> BlockMask: ...

Structural methods (``window3d``, ``radial``, ``band``, ``arrow``) take either their geometric parameter
(``window=``, ``factor=``) or a target ``density`` (fraction of block pairs computed, text rows and columns
included); a density is met by the smallest window whose mask reaches it. The ``dynamic`` method has no
structural handler: its blocks are chosen per call from pooled Q/K scores (see ``dynamic.py``).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..masks import patterns
from ..masks.block_mask import BlockMask
from ..masks.layout import AXIS_ORDERS, TokenLayout


class MethodConfig:
    """Base of every method config. ``name`` is what users pass as ``method=``."""

    name: ClassVar[str] = ""
    dynamic: ClassVar[bool] = False


def _ints(value, name: str, what: str, count: int | None, minimum: int) -> tuple[int, ...] | int:
    """``value`` as ``count`` ints >= ``minimum`` (one int when ``count`` is None), or a clear error."""
    items = [value] if count is None else value
    if count is not None and (isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple))):
        raise ValueError(f"{name}: {what} must be {count} ints, got {value!r}")
    if count is not None and len(items) != count:
        raise ValueError(f"{name}: {what} must be {count} ints, got {len(items)}: {value!r}")
    for x in items:
        if isinstance(x, bool) or not isinstance(x, int) or x < minimum:
            raise ValueError(f"{name}: {what} must hold ints >= {minimum}, got {value!r}")
    return items[0] if count is None else tuple(items)


def _check_density(density: float | None, name: str, clamp: bool = False) -> None:
    if not isinstance(clamp, bool):
        raise TypeError(f"{name}: clamp_density must be True or False, got {clamp!r}")
    if density is None:
        return
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < float(density) <= 1.0:
        raise ValueError(
            f"{name}: density must be a fraction in (0, 1] of the block pairs to compute, got {density!r}"
        )


@dataclass(frozen=True)
class DenseConfig(MethodConfig):
    """Exact dense attention (the model's own backend; or our kernel with a full mask when quantized)."""

    name: ClassVar[str] = "dense"


@dataclass(frozen=True)
class Window3DConfig(MethodConfig):
    """3-D local window over the latent grid F x H x W (sliding-tile style); text rows/columns dense.

    Args:
        window: half-widths ``(wf, wh, ww)`` in latent tokens; or give ``density``.
        density: target block density; the least dense window reaching it is used, among shapes whose
            temporal and spatial shares of the grid stay within a factor 2 (see ``_window_for_density``).
        order: raster order of the image tokens (always ``"FHW"`` for diffusers models).
        clamp_density: when ``density`` is below the smallest mask this layout allows (short sequences,
            where the dense text rows and columns alone exceed it), use that smallest mask instead of
            raising, with a one-time warning naming the density reached. Presets set it so one preset
            serves every resolution. The same switch exists on ``radial``, ``band`` and ``arrow``.
    """

    name: ClassVar[str] = "window3d"
    window: tuple[int, int, int] | None = None
    density: float | None = None
    order: str = "FHW"
    clamp_density: bool = False

    def __post_init__(self):
        _check_density(self.density, self.name, self.clamp_density)
        if (self.window is None) == (self.density is None):
            raise ValueError("window3d: give exactly one of window=(wf, wh, ww) or density=")
        if self.window is not None:
            object.__setattr__(self, "window", _ints(self.window, self.name, "window (wf, wh, ww)", 3, 0))
        if not isinstance(self.order, str) or self.order.upper() not in AXIS_ORDERS:
            raise ValueError(f"window3d: order must be one of {AXIS_ORDERS}, got {self.order!r}")


@dataclass(frozen=True)
class RadialConfig(MethodConfig):
    """Radial attention: the spatial window halves each time the frame distance doubles.

    Args:
        window: spatial half-widths ``(wh, ww)`` at frame distance 0; or give ``density``.
        temporal_window: largest frame distance attended (``None``: all frames).
        density: target block density.
    """

    name: ClassVar[str] = "radial"
    window: tuple[int, int] | None = None
    temporal_window: int | None = None
    density: float | None = None
    clamp_density: bool = False

    def __post_init__(self):
        _check_density(self.density, self.name, self.clamp_density)
        if (self.window is None) == (self.density is None):
            raise ValueError("radial: give exactly one of window=(wh, ww) or density=")
        if self.window is not None:
            win = _ints(self.window, self.name, "window (wh, ww)", 2, 0)
            object.__setattr__(self, "window", win)
        if self.temporal_window is not None:
            _ints(self.temporal_window, self.name, "temporal_window (frames)", None, 0)


@dataclass(frozen=True)
class BandConfig(MethodConfig):
    """1-D band over image tokens in raster order (``|i - j| <= window``); text rows/columns dense."""

    name: ClassVar[str] = "band"
    window: int | None = None
    density: float | None = None
    clamp_density: bool = False

    def __post_init__(self):
        _check_density(self.density, self.name, self.clamp_density)
        if (self.window is None) == (self.density is None):
            raise ValueError("band: give exactly one of window= (tokens) or density=")
        if self.window is not None:
            _ints(self.window, self.name, "window (tokens)", None, 0)


@dataclass(frozen=True)
class ArrowConfig(MethodConfig):
    """DiTFastAttn-v2 arrow attention for joint text+image models: an image band plus all text.

    ``factor`` sets the band to ``image_len / (2 * factor)`` tokens; or give ``density``.
    """

    name: ClassVar[str] = "arrow"
    factor: int | None = None
    density: float | None = None
    clamp_density: bool = False

    def __post_init__(self):
        _check_density(self.density, self.name, self.clamp_density)
        if (self.factor is None) == (self.density is None):
            raise ValueError("arrow: give exactly one of factor= or density=")
        if self.factor is not None:
            _ints(self.factor, self.name, "factor", None, 1)


@dataclass(frozen=True)
class DynamicConfig(MethodConfig):
    """Per-call top-p block selection from pooled Q/K scores (SpargeAttn / Sparse-VideoGen-2 style).

    For every query block, key blocks are taken in decreasing estimated probability mass until ``top_p``
    of it is covered, then the count is clamped to ``[min_density, max_density]`` of the key blocks. The
    query block's own block and all text blocks are always kept.

    ``estimator="sampled"`` (default) estimates each block's mass from ``sample_rows`` real query rows
    per query block against keys mean-pooled over groups of ``key_group`` neighbouring tokens: a few
    percent of attention's Q.K^T work. ``"pooled"`` scores block-mean queries against block-mean keys,
    ``block_size**2`` times cheaper than attention; on the learned testbed the two selected about equally
    well (within 0.7 dB, bench/results/quality-grid-nvidia_h200.json).

    ``reuse_steps``: a layer's selection (per CFG pass) is computed at one denoising step and reused for the
    next ``reuse_steps - 1`` steps (attention maps change slowly between neighbouring steps, as Sparse-VideoGen
    2 and DiTFastAttn exploit); 1 selects at every call. Reused selections are counted in the stats.
    """

    name: ClassVar[str] = "dynamic"
    dynamic: ClassVar[bool] = True
    top_p: float = 0.9
    min_density: float = 0.1
    max_density: float = 0.5
    estimator: str = "sampled"
    sample_rows: int = 8
    key_group: int = 16
    reuse_steps: int = 1

    def __post_init__(self):
        if self.estimator not in ("sampled", "pooled"):
            raise ValueError(f"dynamic: estimator must be 'sampled' or 'pooled', got {self.estimator!r}")
        for name in ("sample_rows", "reuse_steps", "key_group"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"dynamic: {name} must be a positive int, got {v!r}")
        for name in ("top_p", "min_density", "max_density"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"dynamic: {name} must be a number in [0, 1], got {v!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"dynamic: top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_density <= self.max_density <= 1.0 or self.max_density <= 0.0:
            raise ValueError(
                "dynamic: need 0 <= min_density <= max_density <= 1 and max_density > 0, got "
                f"min_density={self.min_density}, max_density={self.max_density}"
            )


@dataclass(frozen=True)
class MultiDiagonalConfig(MethodConfig):
    """Sparse-vDiT multi-diagonal: a band of ``window`` tokens around the same spatial position in the frames
    at ``frame_offsets`` (``(-1, 0, 1)``: this frame and its two neighbours); text rows/columns dense."""

    name: ClassVar[str] = "multi_diagonal"
    window: int = 0
    frame_offsets: tuple[int, ...] = (0,)

    def __post_init__(self):
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 0:
            raise ValueError(f"multi_diagonal: window must be a non-negative int (tokens), got {self.window!r}")
        offs = tuple(self.frame_offsets) if isinstance(self.frame_offsets, (list, tuple)) else None
        if not offs or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs):
            raise ValueError(f"multi_diagonal: frame_offsets must be a non-empty list of ints, got {self.frame_offsets!r}")
        object.__setattr__(self, "frame_offsets", offs)


@dataclass(frozen=True)
class StripesConfig(MethodConfig):
    """Sparse-vDiT vertical stripes: every query reads the image keys in ``key_ranges`` (image-token index
    ranges ``[a, b)``, as fractions of the image tokens when ``fractions`` is True); text dense."""

    name: ClassVar[str] = "stripes"
    key_ranges: tuple[tuple[float, float], ...] = ((0.0, 0.1),)
    fractions: bool = True

    def __post_init__(self):
        if not isinstance(self.fractions, bool):
            raise TypeError(f"stripes: fractions must be True or False, got {self.fractions!r}")
        try:
            if any(isinstance(x, bool) for pair in self.key_ranges for x in pair):
                raise TypeError("bool in key_ranges")
            ranges = tuple((float(a), float(b)) for a, b in self.key_ranges)
        except (TypeError, ValueError):
            raise ValueError(f"stripes: key_ranges must be a list of [start, end) pairs, got {self.key_ranges!r}") from None
        hi = 1.0 if self.fractions else float("inf")
        if not ranges or any(not (0.0 <= a < b <= hi) for a, b in ranges):
            raise ValueError(f"stripes: key_ranges must be non-empty pairs with 0 <= start < end <= {hi:g}, got {ranges}")
        if not self.fractions and any(not (a.is_integer() and b.is_integer()) for a, b in ranges):
            raise ValueError(f"stripes: token key_ranges must be whole numbers, got {ranges}")
        object.__setattr__(self, "key_ranges", ranges)


@dataclass(frozen=True)
class SkipConfig(MethodConfig):
    """A skipped head (Sparse-vDiT): it computes no block and its attention output is zero."""

    name: ClassVar[str] = "skip"

@dataclass(frozen=True)
class BlockMapConfig(MethodConfig):
    """PAROAttention's calibrated block mask: the head computes the key blocks listed in its own block map.

    The map is data, not a rule: a bool ``[nQ, nK]`` of the calibrated layout's blocks, in the head's axis
    order, stored in the plan's head table (``HeadTable.block_maps``, chosen per head by ``map_index``;
    calibration thresholds it from pooled attention). So only a head table can run this method.

    Args:
        density: the block density the map was thresholded at (informational; the map says which blocks).
    """

    name: ClassVar[str] = "blockmap"
    density: float | None = None

    def __post_init__(self):
        _check_density(self.density, self.name)


METHODS: dict[str, type[MethodConfig]] = {
    c.name: c
    for c in (
        DenseConfig, Window3DConfig, RadialConfig, BandConfig, ArrowConfig, DynamicConfig, MultiDiagonalConfig,
        StripesConfig, SkipConfig, BlockMapConfig,
    )  # fmt: skip
}

# ------------------------------------------------------------------------------------------ handlers

_HANDLERS: dict[type, Callable[[MethodConfig, TokenLayout, int], BlockMask]] = {}


def register_method_handler(config_type: type):
    """Decorator: ``fn(config, layout, block_size) -> BlockMask`` builds the mask of ``config_type``."""

    def deco(fn):
        _HANDLERS[config_type] = fn
        return fn

    return deco


def build_mask(config: MethodConfig, layout: TokenLayout, block_size: int) -> BlockMask:
    """The structural block mask of ``config`` on ``layout`` (head-shared, on the CPU)."""
    handler = _HANDLERS.get(type(config))
    if isinstance(config, BlockMapConfig):
        raise TypeError("method 'blockmap' has no rule: its blocks are data of a plan's head table (block_maps)")
    if handler is None:
        kind = "is chosen per call (see call_handler)" if type(config) in _CALL_HANDLERS else "has no handler"
        raise TypeError(f"method {config.name!r} ({type(config).__name__}) {kind}, not a structural mask")
    mask = handler(config, layout, block_size)
    if not isinstance(config, SkipConfig):
        # A query block with no key block would output zeros (and count as sparse work): refuse it.
        empty = int((mask.kv_counts == 0).sum())
        if empty:
            raise ValueError(
                f"{config.name}: {describe(config)} leaves {empty} query blocks with no key block on this layout "
                f"(seq_len {layout.seq_len}, text {layout.text_len}, grid {layout.grid}, block_size {block_size}); "
                "their attention output would be zeros. Choose parameters that cover every query "
                "(e.g. multi_diagonal frame_offsets including 0)"
            )
    return mask


# Methods whose blocks depend on the call's q and k (``dynamic``): ``fn(config, q, k, layout, block_size,
# scale) -> BlockMask`` with q, k ``[B, H, S, D]``. The runtime registers them (they run on the device).
_CALL_HANDLERS: dict[type, Callable] = {}


def register_call_handler(config_type: type):
    """Decorator: ``fn(config, q, k, layout, block_size, scale) -> BlockMask`` selects ``config_type``'s
    blocks for one call."""

    def deco(fn):
        _CALL_HANDLERS[config_type] = fn
        return fn

    return deco


def call_handler(config: MethodConfig) -> Callable | None:
    """The per-call handler of ``config``'s method, or None for structural methods."""
    return _CALL_HANDLERS.get(type(config))


def method_from_name(method: str, density: float | None = None, **params) -> MethodConfig:
    """``method="window3d", density=0.3`` -> ``Window3DConfig(density=0.3)``, with clear errors."""
    if isinstance(method, MethodConfig):
        return method
    cls = METHODS.get(str(method).lower())
    if cls is None:
        raise ValueError(f"unknown method {method!r}; valid methods: {sorted(METHODS)}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(params) - fields
    if unknown:
        raise ValueError(
            f"method {cls.name!r} takes {sorted(fields) or 'no parameters'}; got {sorted(unknown)}"
        )
    if density is not None:
        if "density" not in fields:
            if cls is DynamicConfig:
                raise ValueError("dynamic: use top_p=, min_density=, max_density= instead of density=")
            if cls is DenseConfig and density != 1.0:
                raise ValueError(f"method 'dense' computes every block (density 1.0); got density={density}")
        else:
            params["density"] = density
    for key in ("window", "frame_offsets"):
        if isinstance(params.get(key), list):
            params[key] = tuple(params[key])
    return cls(**params)


# -------------------------------------------------------------------------------- density search


_clamp_warned: set = set()


def _search(config: MethodConfig, layout: TokenLayout, block_size: int, build: Callable[[float], BlockMask]):
    """Smallest ``s`` in [0, 1] whose mask reaches ``config.density`` (masks grow with ``s``)."""
    floor_mask = _floor_mask(config, layout, block_size, build(0.0))
    if floor_mask is not None:
        return floor_mask
    target = float(config.density)
    lo, hi, best = 0.0, 1.0, None
    for _ in range(12):
        mid = (lo + hi) / 2
        m = build(mid)
        if m.block_density() >= target - 1e-9:
            hi, best = mid, m
        else:
            lo = mid
    return best if best is not None else build(1.0)


def _floor_mask(config: MethodConfig, layout: TokenLayout, block_size: int, lo_mask: BlockMask):
    """``lo_mask`` (the smallest mask) when it already reaches the target density, else None.

    A floor well above the target raises, or with ``clamp_density`` warns once and is used.
    """
    target = float(config.density)
    floor = lo_mask.block_density()
    if floor < target - 1e-9:
        return None
    if floor > target + 0.02:
        if not getattr(config, "clamp_density", False):
            raise ValueError(
                f"{config.name}: density {target:g} is impossible on this layout (seq_len "
                f"{layout.seq_len}, text {layout.text_len}, grid {layout.grid}, block_size {block_size}): "
                f"the smallest {config.name} mask already computes {floor:.3f} of the blocks. "
                f"Valid densities here: [{floor:.3f}, 1.0]"
            )
        key = (config.name, target, layout.seq_len, layout.text_len, layout.grid, block_size)
        if key not in _clamp_warned:
            _clamp_warned.add(key)
            warnings.warn(
                f"fastattn: {config.name} density {target:g} is below the smallest mask on this layout "
                f"(seq_len {layout.seq_len}, text {layout.text_len}, grid {layout.grid}); using that mask, "
                f"density {floor:.3f} (clamp_density=True, as presets set it)",
                stacklevel=3,
            )
    return lo_mask


def _grid(layout: TokenLayout, name: str) -> tuple[int, int, int]:
    if layout.grid is None:
        raise ValueError(f"{name} needs the latent grid (F, H, W) of the image tokens; this call has none")
    return layout.grid


@register_method_handler(DenseConfig)
def _dense_mask(config: DenseConfig, layout: TokenLayout, block_size: int) -> BlockMask:
    return patterns.dense(layout, block_size)


@register_method_handler(Window3DConfig)
def _window3d_mask(config: Window3DConfig, layout: TokenLayout, block_size: int) -> BlockMask:
    _grid(layout, "window3d")  # a clear error without one
    build_window = patterns.window3d_builder(layout, block_size, config.order)
    if config.window is not None:
        return build_window(tuple(config.window))
    floor_mask = _floor_mask(config, layout, block_size, build_window((0, 0, 0)))
    if floor_mask is not None:
        return floor_mask
    wf, wh, ww = _window_for_density(layout, float(config.density), block_size, config.order)
    return build_window((wf, wh, ww))


def _window_for_density(layout: TokenLayout, target: float, block_size: int, order: str):
    """The least dense 3-D window reaching ``target`` among balanced shapes.

    H and W grow together (scaled by one factor); F grows on its own, but neither F's share of its
    extent nor the spatial share may exceed twice the other (plus one step of the coarser axis as
    slack), so the search never trades a whole axis away for density. Scaling all three axes by one factor instead
    makes the density jump with the rounding: on Wan-14B 720p the first such window reaching 0.2
    computed 0.213 of the blocks; this search finds 0.206.
    """
    f, h, w = layout.grid
    spatial, frac_s = _spatial_windows(h, w)
    table = patterns.window3d_density_table(layout, spatial, block_size, order)  # [f, len(spatial)]
    frac_f = torch.arange(f, dtype=torch.float64)[:, None] / max(f - 1, 1)
    frac_s = torch.tensor(frac_s, dtype=torch.float64)[None, :]
    slack = 1 / max(min(f, max(h, w)) - 1, 1)  # one step of the coarser axis
    if f > 1 and max(h, w) > 1:
        balanced = (frac_f <= 2 * frac_s + slack) & (frac_s <= 2 * frac_f + slack)
    else:  # one free axis group only (an image, or one token per frame): nothing to balance
        balanced = torch.ones_like(table, dtype=torch.bool)
    ok = balanced & (table >= target - 1e-9)
    if not ok.any():
        return f - 1, h - 1, w - 1
    # least dense first; among equals, the most even shape
    least = table[ok].min()
    tied = ok & (table <= least + 1e-12)
    wf, j = divmod(int(torch.where(tied, (frac_f - frac_s).abs(), torch.inf).argmin()), len(spatial))
    return (wf, *spatial[j])


def _spatial_windows(h: int, w: int) -> tuple[list[tuple[int, int]], list[float]]:
    """Every spatial window ``(round(s (H-1)), round(s (W-1)))`` as ``s`` goes from 0 to 1, in order, and
    each one's share of the grid (the mean of ``wh / (H-1)`` and ``ww / (W-1)``)."""
    cuts = sorted({(k + 0.5) / (n - 1) for n in (h, w) if n > 1 for k in range(n - 1)})
    points = [0.0] + [(a + b) / 2 for a, b in zip(cuts, cuts[1:] + [1.0])]  # one s between each two cuts
    windows = []
    for s in points:
        win = (round(s * (h - 1)), round(s * (w - 1)))
        if not windows or win != windows[-1]:
            windows.append(win)
    # an axis of length 1 has no extent to share: the other one alone says how wide the window is
    extents = [(i, n - 1) for i, n in enumerate((h, w)) if n > 1]
    shares = [sum(win[i] / e for i, e in extents) / max(len(extents), 1) for win in windows]
    return windows, shares


@register_method_handler(RadialConfig)
def _radial_mask(config: RadialConfig, layout: TokenLayout, block_size: int) -> BlockMask:
    f, h, w = _grid(layout, "radial")
    if config.window is not None:
        return patterns.radial(layout, tuple(config.window), config.temporal_window, block_size)

    def build(s):
        # Radial halves the window per doubling of frame distance, so a full window needs 2 * (H, W).
        win = (round(s * 2 * h), round(s * 2 * w))
        return patterns.radial(layout, win, config.temporal_window, block_size)

    return _search(config, layout, block_size, build)


@register_method_handler(BandConfig)
def _band_mask(config: BandConfig, layout: TokenLayout, block_size: int) -> BlockMask:
    if config.window is not None:
        return patterns.band(layout, config.window, block_size)
    return _search(
        config, layout, block_size, lambda s: patterns.band(layout, round(s * layout.image_len), block_size)
    )


@register_method_handler(ArrowConfig)
def _arrow_mask(config: ArrowConfig, layout: TokenLayout, block_size: int) -> BlockMask:
    if config.factor is not None:
        return patterns.arrow(layout, config.factor, block_size)
    return _search(
        config, layout, block_size, lambda s: patterns.band(layout, round(s * layout.image_len), block_size)
    )


@register_method_handler(MultiDiagonalConfig)
def _multi_diagonal_mask(config: MultiDiagonalConfig, layout: TokenLayout, block_size: int) -> BlockMask:
    _grid(layout, "multi_diagonal")
    return patterns.multi_diagonal(layout, config.window, config.frame_offsets, block_size)


@register_method_handler(StripesConfig)
def _stripes_mask(config: StripesConfig, layout: TokenLayout, block_size: int) -> BlockMask:
    n = layout.image_len
    if config.fractions:
        ranges = [(min(int(a * n), n - 1), max(min(n, round(b * n)), min(int(a * n), n - 1) + 1)) for a, b in config.key_ranges]
    else:
        ranges = [(int(a), int(b)) for a, b in config.key_ranges]
    return patterns.vertical_stripes(layout, ranges, block_size)


@register_method_handler(SkipConfig)
def _skip_mask(config: SkipConfig, layout: TokenLayout, block_size: int) -> BlockMask:
    bm = patterns.dense(layout, block_size).to_block_map()
    return BlockMask.from_block_map(torch.zeros_like(bm), layout, block_size)


def describe(config: MethodConfig) -> dict:
    """JSON-able description of a method config (for stats, presets and plan files)."""
    out = {"method": config.name}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        out[f.name] = [list(x) if isinstance(x, tuple) else x for x in v] if isinstance(v, tuple) else v
    return out
