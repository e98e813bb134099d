"""What to cache across denoising steps and CFG branches: one frozen dataclass, plus named presets.

:class:`CacheConfig` is data (the plan's ``cache`` field, :class:`~fastattn.plans.AttentionPlan`); the
policies that act on it live beside it (``blocks.py``, ``attention.py``) and the memory they hold is
bounded by the plan's ``cache_budget_gb`` / ``cache_storage`` / ``cache_offload`` (``store.py``).

Two levels, usable together and with any sparse plan:

- **Blocks** (``blocks=``): skip a range of transformer blocks and add the residual that range produced
  the last time it ran.

  - ``"auto"`` (FBCache / TeaCache / MagCache family, calibration-free): the first ``probe_blocks`` blocks
    always run; the relative L1 change of their output residual from one step to the next is accumulated,
    and while the sum stays under ``threshold`` (at most ``max_skips`` steps in a row) the remaining blocks
    are skipped. No per-model coefficients.
  - ``"delta"`` (Delta-DiT): a fixed schedule; every ``interval``-th step runs every block, the steps in
    between skip a ``span`` fraction of the blocks: the rear blocks before ``boundary`` (progress of the
    run, when the outline forms), the front blocks after it (when details form).
  - ``"fixed"``: the blocks after the probe are skipped on a fixed ``skip_fraction`` of the steps, spread
    evenly (what benchmarks time on random weights, where a content trigger means nothing).

  What a skip adds back (``order=``): ``0`` the residual the range produced the last time it ran; ``1`` that
  residual extrapolated to the current step along the line through the last two it produced (a first-order
  Taylor step in the step index, as TaylorSeer does for features): one more residual held per range, and
  skips far from the last compute drift less.

- **Attention** (DiTFastAttn): ``attn_share_interval=k`` (AST) reuses each listed layer's attention output
  from the last step it computed on all but every k-th step; ``cfg_share=True`` (ASC) computes attention
  once for the CFG branches of a step and copies it to the other (batched CFG: the positive half is
  computed; CFG as two passes: the pass that runs second reuses the first one's output).

Every policy computes the first ``first_steps`` and the last ``last_steps`` steps of a run in full.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

BLOCK_MODES = ("off", "auto", "delta", "fixed")


def _steps_value(value, name: str):
    """A step count (int >= 0) or a fraction of the run in [0, 1) (float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"cache: {name} must be a step count (int >= 0) or a fraction of the run in [0, 1), "
                         f"got {value!r}")  # fmt: skip
    if isinstance(value, float):
        if value.is_integer() and value >= 1:
            return int(value)
        if value >= 1:
            raise ValueError(f"cache: {name} as a float is a fraction of the run in [0, 1), got {value!r}")
    return value


def steps_for(value: int | float, num_steps: int | None) -> int:
    """Steps meant by ``first_steps`` / ``last_steps`` in a run of ``num_steps`` (a fraction rounds, and a
    non-zero fraction is at least one step; unknown ``num_steps``: one step)."""
    if isinstance(value, int):
        return value
    if value == 0:
        return 0
    return max(1, round(value * num_steps)) if num_steps else 1


def _layers(value, name: str) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(
            f"cache: {name} must be a list of layer indices (negative: from the end), got {value!r}"
        )
    out = []
    for i in value:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"cache: {name} must hold ints (negative: from the end), got {i!r}")
        out.append(int(i))
    return tuple(out)


@dataclass(frozen=True)
class CacheConfig:
    """What is reused across steps and CFG branches (module docstring). The default caches nothing.

    Args:
        blocks: ``"off"``, ``"auto"`` (residual-difference trigger), ``"delta"`` (Delta-DiT schedule) or
            ``"fixed"`` (skip a fixed fraction of the steps).
        threshold: ``auto``: the accumulated relative L1 change of the probe residual up to which blocks are
            skipped (larger: more skips).
        probe_blocks: ``auto`` / ``fixed``: blocks at the start that always run (the trigger's probe); the
            rest are the ones skipped.
        max_skips: ``auto``: most steps in a row whose blocks are skipped (per CFG branch).
        first_steps, last_steps: steps at the start / end of a run that every policy computes in full (int:
            steps; float in [0, 1): fraction of the run, at least one step).
        interval: ``delta``: every ``interval``-th step runs every block and refreshes the cached residual.
        boundary: ``delta``: progress of the run in (0, 1] before which the rear blocks are cached, after
            which the front blocks are.
        span: ``delta``: fraction of the blocks in the cached range.
        skip_fraction: ``fixed``: fraction of the steps between ``first_steps`` and ``last_steps`` whose
            blocks after the probe are skipped, spread evenly.
        order: what a skipped range adds back: 0 its last residual, 1 its last residual extrapolated
            linearly from the last two (twice the cache memory; falls back to 0 until two are captured).
        attn_share_interval: AST: 0 off; ``k``: the listed layers compute attention on every k-th step of
            the window and reuse their last output on the steps in between.
        attn_share_layers: AST layers (self-attention layer indices, negative from the end); empty: all.
        cfg_share: ASC: attention is computed for one CFG branch and copied to the other.
        cfg_share_layers: ASC layers; empty: all.
    """

    blocks: str = "off"
    threshold: float = 0.1
    probe_blocks: int = 1
    max_skips: int = 2
    first_steps: int | float = 0.1
    last_steps: int | float = 1
    interval: int = 2
    boundary: float = 0.5
    span: float = 0.5
    skip_fraction: float = 0.5
    order: int = 0
    attn_share_interval: int = 0
    attn_share_layers: tuple[int, ...] = ()
    cfg_share: bool = False
    cfg_share_layers: tuple[int, ...] = ()

    def __post_init__(self):
        if self.blocks not in BLOCK_MODES:
            raise ValueError(f"cache: blocks must be one of {list(BLOCK_MODES)}, got {self.blocks!r}")
        for name in ("threshold", "boundary", "span", "skip_fraction"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"cache: {name} must be a number, got {v!r}")
            object.__setattr__(self, name, float(v))
        if self.threshold < 0:
            raise ValueError(f"cache: threshold must be >= 0, got {self.threshold}")
        if not 0.0 < self.boundary <= 1.0:
            raise ValueError(f"cache: boundary is a fraction of the run in (0, 1], got {self.boundary}")
        if not 0.0 < self.span <= 1.0:
            raise ValueError(f"cache: span is a fraction of the blocks in (0, 1], got {self.span}")
        if not 0.0 <= self.skip_fraction < 1.0:
            raise ValueError(
                f"cache: skip_fraction is a fraction of the steps in [0, 1), got {self.skip_fraction}"
            )
        if isinstance(self.order, bool) or not isinstance(self.order, int) or self.order not in (0, 1):
            raise ValueError(f"cache: order must be 0 (reuse the last residual) or 1 (extrapolate from the last "
                             f"two), got {self.order!r}")  # fmt: skip
        for name, low in (("probe_blocks", 0), ("max_skips", 1), ("interval", 1), ("attn_share_interval", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"cache: {name} must be an int >= {low}, got {v!r}")
        if self.blocks in ("auto", "fixed") and self.probe_blocks < 1:
            raise ValueError(
                f"cache: blocks={self.blocks!r} needs probe_blocks >= 1 (the blocks that always run)"
            )
        object.__setattr__(self, "first_steps", _steps_value(self.first_steps, "first_steps"))
        object.__setattr__(self, "last_steps", _steps_value(self.last_steps, "last_steps"))
        object.__setattr__(self, "attn_share_layers", _layers(self.attn_share_layers, "attn_share_layers"))
        object.__setattr__(self, "cfg_share_layers", _layers(self.cfg_share_layers, "cfg_share_layers"))
        if not isinstance(self.cfg_share, bool):
            raise TypeError(f"cache: cfg_share must be True or False, got {self.cfg_share!r}")

    # ------------------------------------------------------------------ what is on
    @property
    def enabled(self) -> bool:
        return self.blocks != "off" or self.attn_share_interval > 0 or self.cfg_share

    @property
    def attention_enabled(self) -> bool:
        return self.attn_share_interval > 0 or self.cfg_share

    def in_window(self, step: int, num_steps: int | None) -> bool:
        """Whether ``step`` lies between the always-computed first and last steps."""
        if step < steps_for(self.first_steps, num_steps):
            return False
        return not num_steps or step < num_steps - steps_for(self.last_steps, num_steps)

    # ------------------------------------------------------------------ data
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_value(cls, value, source: str = "cache") -> CacheConfig:
        """A config from ``None`` / ``"off"``, a preset name (:data:`CACHE_PRESETS`), a dict of fields
        (``{"preset": "balanced", "threshold": 0.2}`` starts from a preset) or a config."""
        if isinstance(value, CacheConfig):
            return value
        if value is None:
            return cls()
        if isinstance(value, str):
            if value not in CACHE_PRESETS:
                raise ValueError(f"{source}: unknown cache preset {value!r}; choose one of {sorted(CACHE_PRESETS)} "
                                 "or give a dict of cache fields")  # fmt: skip
            return CACHE_PRESETS[value]
        if not isinstance(value, dict):
            raise TypeError(f"{source}: cache must be a preset name, a dict of cache fields or a CacheConfig, "
                            f"got {type(value).__name__}")  # fmt: skip
        fields = dict(value)
        base = cls.from_value(fields.pop("preset", "off"), source)
        unknown = set(fields) - set(cls.field_names())
        if unknown:
            raise ValueError(f"{source}: unknown cache field(s) {sorted(unknown)}; known: "
                             f"{sorted(cls.field_names()) + ['preset']}")  # fmt: skip
        for name in ("attn_share_layers", "cfg_share_layers"):
            if isinstance(fields.get(name), list):
                fields[name] = tuple(fields[name])
        return dataclasses.replace(base, **fields)  # field errors say "cache: ..."

    def to_dict(self) -> dict:
        """Every field (JSON-able); :meth:`from_value` reads it back."""
        d = dataclasses.asdict(self)
        for name in ("attn_share_layers", "cfg_share_layers"):
            d[name] = list(d[name])
        return d

    def describe(self) -> dict:
        """The fields that differ from the defaults (what a report shows)."""
        default = CacheConfig()
        return {k: v for k, v in self.to_dict().items() if v != default.to_dict()[k]}


# Block-level presets need no calibration. Thresholds are on the accumulated relative L1 change of the first
# block's residual (TeaCache-style accumulation, FBCache-style probe). They extrapolate (order 1): on the learned
# testbed that is worth several dB at the same skipped work, and "fast" is the setting whose testbed schedule the
# whole-generation benchmark times (bench/results/caching-quality-*.json, caching-*.json).
CACHE_PRESETS: dict[str, CacheConfig] = {
    "off": CacheConfig(),
    # fmt: off
    "safe": CacheConfig(blocks="auto", threshold=0.05, max_skips=1, first_steps=0.15, last_steps=2, order=1),
    "balanced": CacheConfig(
        blocks="auto", threshold=0.1, max_skips=2, first_steps=0.1, last_steps=1, order=1
    ),
    "fast": CacheConfig(blocks="auto", threshold=0.5, max_skips=4, first_steps=0.1, last_steps=1, order=1),
    # fmt: on
    "delta": CacheConfig(blocks="delta", interval=2, boundary=0.5, span=0.5, first_steps=0.1, last_steps=1),
}
