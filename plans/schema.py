"""The plan schema: what to run for every self-attention call of one transformer, written once.

:class:`AttentionPlan` is the one place a plan's fields are spelled. Everything else derives from it:
``enable(...)`` keywords, preset JSON, plan-file headers, the CLI and the ComfyUI widgets go through
:meth:`AttentionPlan.from_dict` / :meth:`AttentionPlan.to_dict`, which accept exactly the dataclass
fields plus the chosen method's own fields (:func:`known_keys`), and reject anything else with the list
of known names.

A plan has a default method for every head and, optionally, a :class:`~fastattn.plans.heads.HeadTable`
that says per (step group, layer, head) which method, axis order, bit-width and reuse action to use
(calibrated PARO / Sparse-vDiT / DiTFastAttn-v2 plans). Dense steps and dense layers are the knobs every
preset uses: early denoising steps fix the layout of the picture and first/last layers are the most
sensitive, so they stay exact.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field

from ..attn_kernels.quantize import MODES as QUANT_MODES
from ..caching.config import CacheConfig
from ..caching.store import STORAGES as CACHE_STORAGES
from .heads import HeadTable
from .methods import METHODS, BlockMapConfig, DenseConfig, MethodConfig, describe, method_from_name

_NOT_SETTINGS = ("method", "heads")  # structured fields: not plain keyword settings
# Caching settings at their defaults are left out of to_dict: plans without caching read and write as before.
_CACHE_DEFAULTS = dict(cache=CacheConfig(), cache_budget_gb=None, cache_storage="auto", cache_offload=False)


@dataclass(frozen=True)
class AttentionPlan:
    """What to run for every self-attention call of one transformer.

    Args:
        method: the method config every head runs unless ``heads`` says otherwise
            (``Window3DConfig(density=0.3)``, ``DynamicConfig()``...).
        quant: kernel bit-width: ``"none"``, ``"int8"``, ``"int8-fp8"``, ``"int4"``, ``"int4-fp8"``,
            ``"fp8"``.
        dense_steps: the first ``dense_steps`` denoising steps run exact dense attention. A float in
            ``(0, 1)`` is a fraction of the run's steps (``0.1`` of a 50-step run: 5 steps), so one
            plan serves 4-step distilled runs and 50-step runs alike.
        dense_layers: self-attention layer indices that always run dense; negative indices count from
            the last layer (``(0, -1)``: first and last).
        start_percent, end_percent: the method runs only while the denoising progress (step / steps)
            is in ``[start_percent, end_percent)``; outside it attention is dense. Needs the step count,
            known when enabled on a pipeline (else pass ``num_steps=``).
        block_size: mask block size in tokens (128 for the GPU kernel; smaller only on the CPU).
        residual: DiTFastAttn's residual sharing (WA-RS). At the last dense step before the method takes
            over, each layer computes both the dense and the sparse output and keeps
            ``R = dense - sparse``; later sparse calls return ``sparse + R``. Costs one ``[B, S, H, D]``
            tensor per layer and CFG pass.
        residual_refresh: with ``residual``, every ``residual_refresh``-th sparse step recomputes the
            dense output and refreshes ``R`` (0: capture once, never refresh).
        cache: what is reused across steps and CFG branches (:class:`~fastattn.caching.CacheConfig`): block
            skipping (``blocks="auto"`` trigger, ``"delta"`` schedule), attention output sharing across steps
            (``attn_share_interval``) and CFG branches (``cfg_share``). Takes a preset name (``"safe"``,
            ``"balanced"``, ``"fast"``, ``"delta"``, ``"off"``) or a dict of its fields.
        cache_budget_gb: most GiB of cached tensors per transformer (block residuals, shared attention
            outputs, WA-RS residuals, reused heads); over it the policies recompute instead of caching.
            ``None``: unbounded.
        cache_storage: how cached tensors are stored: ``"auto"`` (as computed), ``"bf16"`` or ``"int8"``.
        cache_offload: keep cached tensors in CPU memory.
        heads: optional per-(step group, layer, head) table; ``None``: every head runs ``method``.
    """

    method: MethodConfig = field(default_factory=DenseConfig)
    quant: str = "none"
    dense_steps: int | float = 0
    dense_layers: tuple[int, ...] = ()
    start_percent: float = 0.0
    end_percent: float = 1.0
    block_size: int = 128
    residual: bool = False
    residual_refresh: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    cache_budget_gb: float | None = None
    cache_storage: str = "auto"
    cache_offload: bool = False
    heads: HeadTable | None = None

    def __post_init__(self):
        if not isinstance(self.method, MethodConfig):
            raise TypeError(f"method must be a MethodConfig, got {type(self.method).__name__}")
        if self.quant not in QUANT_MODES:
            raise ValueError(f"unknown quant {self.quant!r}; valid: {list(QUANT_MODES)}")
        ds = self.dense_steps
        if isinstance(ds, bool) or not isinstance(ds, (int, float)) or ds < 0:
            raise ValueError(f"dense_steps must be a non-negative int (steps) or a fraction < 1, got {ds!r}")
        if isinstance(ds, float) and not (ds < 1.0 or ds.is_integer()):
            raise ValueError(f"dense_steps as a float is a fraction of the run in [0, 1), got {ds!r}")
        if isinstance(ds, float) and ds.is_integer():
            object.__setattr__(self, "dense_steps", int(ds))
        if isinstance(self.dense_layers, (str, bytes)) or not hasattr(self.dense_layers, "__iter__"):
            raise TypeError(f"dense_layers must be a list of layer indices, got {self.dense_layers!r}")
        for i in self.dense_layers:
            if isinstance(i, bool) or not isinstance(i, int):
                raise TypeError(f"dense_layers must hold ints (negative: from the end), got {i!r}")
        object.__setattr__(self, "dense_layers", tuple(int(i) for i in self.dense_layers))
        for name in ("start_percent", "end_percent"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{name} must be a number in [0, 1], got {v!r}")
        if not 0.0 <= self.start_percent <= self.end_percent <= 1.0:
            raise ValueError(
                f"need 0 <= start_percent <= end_percent <= 1, got {self.start_percent}, {self.end_percent}"
            )
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")
        if not isinstance(self.residual, bool):
            raise TypeError(f"residual must be True or False, got {self.residual!r}")
        rr = self.residual_refresh
        if isinstance(rr, bool) or not isinstance(rr, int) or rr < 0:
            raise ValueError(f"residual_refresh must be a non-negative int, got {rr!r}")
        if self.residual_refresh and not self.residual:
            raise ValueError("residual_refresh needs residual=True")
        object.__setattr__(self, "cache", CacheConfig.from_value(self.cache))
        gb = self.cache_budget_gb
        if gb is not None and (isinstance(gb, bool) or not isinstance(gb, (int, float)) or gb < 0):
            raise ValueError(f"cache_budget_gb must be a number of GiB >= 0 or None (unbounded), got {gb!r}")
        if self.cache_storage not in CACHE_STORAGES:
            raise ValueError(f"cache_storage must be one of {list(CACHE_STORAGES)}, got {self.cache_storage!r}")  # fmt: skip
        if not isinstance(self.cache_offload, bool):
            raise TypeError(f"cache_offload must be True or False, got {self.cache_offload!r}")
        if self.heads is not None and not isinstance(self.heads, HeadTable):
            raise TypeError(f"heads must be a HeadTable or None, got {type(self.heads).__name__}")
        if isinstance(self.method, BlockMapConfig):
            raise ValueError(
                "method 'blockmap' runs per-head block maps stored in a head table: it cannot be a plan's method "
                "(calibrate a plan, or load one that has block maps)"
            )

    # ------------------------------------------------------------------ derived views of the schema
    @classmethod
    def setting_names(cls) -> tuple[str, ...]:
        """The plain keyword settings (``quant``, ``dense_steps``...): every field but method and heads."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in _NOT_SETTINGS)

    @classmethod
    def from_dict(cls, data: dict, source: str = "plan") -> AttentionPlan:
        """A plan from flat settings: ``{"method": "window3d", "density": 0.2, "quant": "fp8", ...}``.

        Method parameters sit beside the plan settings. Unknown names are refused with the list of
        known ones (``source`` names the file or preset in the message).
        """
        if not isinstance(data, dict):
            raise TypeError(f"{source}: expected a JSON object of plan settings, got {type(data).__name__}")
        fields = dict(data)
        fields.pop("doc", None)
        method = fields.pop("method", None)
        if method is None:
            raise ValueError(f"{source}: no 'method' given; one of {sorted(METHODS)}")
        unknown = set(fields) - set(known_keys(method))
        if unknown:
            raise ValueError(
                f"{source}: unknown field(s) {sorted(unknown)}; known for method {_name(method)!r}: "
                f"{sorted(known_keys(method))}"
            )
        settings = {k: fields.pop(k) for k in cls.setting_names() if k in fields}
        if "dense_layers" in settings and isinstance(settings["dense_layers"], list):
            settings["dense_layers"] = tuple(settings["dense_layers"])
        density = fields.pop("density", None)
        try:
            cfg = method_from_name(method, density, **fields)
            return cls(method=cfg, **settings)
        except (TypeError, ValueError) as e:
            if source == "plan" or str(e).startswith(source):
                raise
            raise type(e)(f"{source}: {e}") from None

    def to_dict(self) -> dict:
        """Flat settings (JSON-able), the inverse of :meth:`from_dict`; ``heads`` is not included."""
        d = describe(self.method)
        for name in self.setting_names():
            v = getattr(self, name)
            if name in _CACHE_DEFAULTS and v == _CACHE_DEFAULTS[name]:
                continue
            d[name] = v.describe() if isinstance(v, CacheConfig) else list(v) if isinstance(v, tuple) else v
        return d

    def describe(self) -> dict:
        d = self.to_dict()
        if self.heads is not None:
            d["heads"] = self.heads.describe()
        return d

    def replace(self, **changes) -> AttentionPlan:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ decisions per call
    @property
    def is_exact(self) -> bool:
        """True when every call runs the model's own dense attention."""
        return isinstance(self.method, DenseConfig) and self.quant == "none" and self.heads is None

    def dense_steps_for(self, num_steps: int | None) -> int:
        """Dense steps in a run of ``num_steps`` (a fractional ``dense_steps`` needs the step count)."""
        ds = self.dense_steps
        if isinstance(ds, int):
            return ds
        return round(ds * num_steps) if num_steps else 0

    def dense_reason(self, layer: int, num_layers: int | None, step: int, num_steps: int | None) -> str | None:
        """Why this call runs dense by plan (``None``: run the method)."""
        if step < self.dense_steps_for(num_steps):
            return "dense_steps"
        if self.dense_layers:
            n = num_layers or 0
            wanted = {i if i >= 0 else n + i for i in self.dense_layers}
            if layer in wanted:
                return "dense_layers"
        if not self._in_window(step, num_steps):
            return "outside start_percent/end_percent"
        if self.is_exact:
            return "method dense"
        return None

    def _in_window(self, step: int, num_steps: int | None) -> bool:
        if (self.start_percent == 0.0 and self.end_percent == 1.0) or not num_steps:
            return True
        return self.start_percent <= step / num_steps < self.end_percent

    def step_settings(self) -> list[str]:
        """The settings that need the run's step count (``start_percent=0.5``...), as ``name=value``."""
        out = []
        if isinstance(self.dense_steps, float) and self.dense_steps > 0:
            out.append(f"dense_steps={self.dense_steps:g} (a fraction of the run)")
        if self.start_percent > 0.0:
            out.append(f"start_percent={self.start_percent:g}")
        if self.end_percent < 1.0:
            out.append(f"end_percent={self.end_percent:g}")
        if self.heads is not None and self.heads.num_groups > 1:
            out.append("heads.step_bounds (step groups)")
        return out

    def step_problem(self, num_steps: int | None) -> str | None:
        """Why the step settings cannot do what they say in a run of ``num_steps`` (``None``: fine).

        Two silent no-ops become a message: settings that need the step count when the run does not give
        it (they are then ignored), and step settings that leave the method no step of the run at all.
        """
        if self.is_exact:
            return None
        if not num_steps:
            needs = self.step_settings()
            if not needs:
                return None
            return (
                f"{', '.join(needs)} need the run's step count, which this run does not give: ignored, the "
                "method runs at every step. Pass num_steps= to enable() when enabling a bare transformer "
                "(a pipeline gives it itself)"
            )
        first = self.dense_steps_for(num_steps)
        if any(self._in_window(step, num_steps) for step in range(first, num_steps)):
            return None
        named = [f"dense_steps={self.dense_steps:g}"] if self.dense_steps else []
        named += [s for s in self.step_settings() if not s.startswith(("dense_steps", "heads"))]
        return (
            f"with {', '.join(named)}, no step of this {num_steps}-step run runs the method: every call is "
            "dense (a fractional dense_steps, e.g. 0.1, scales with the run's length)"
        )

    def residual_action(self, step: int, num_steps: int | None) -> str | None:
        """For a call the method serves, with residual sharing: ``"capture"`` (run dense, keep
        ``dense - sparse``), ``"apply"`` (``sparse + R``), else ``None`` (no residual sharing)."""
        if not self.residual:
            return None
        if self.residual_refresh:
            first = self.dense_steps_for(num_steps)
            if (step - first) % self.residual_refresh == 0 and step > first:
                return "capture"
        return "apply"

    def residual_refresh_missed(self, captured: int | None, step: int, num_steps: int | None) -> bool:
        """True when a refresh step of the WA-RS schedule lies strictly between the step of a layer's last
        capture and ``step``: that layer's call was skipped there (block caching), so it captures now instead
        of applying a residual older than the schedule promises."""
        if not (self.residual and self.residual_refresh) or captured is None:
            return False
        first = self.dense_steps_for(num_steps)
        every = self.residual_refresh
        nxt = first + every * max(1, (captured - first) // every + 1)  # the first refresh after the capture
        return captured < nxt < step

    def check_model(self, num_layers: int, num_heads: int | None = None) -> None:
        """Refuse a plan that names layers or heads the model does not have (before anything is patched)."""
        bad = [i for i in self.dense_layers if not -num_layers <= i < num_layers]
        if bad:
            raise ValueError(
                f"dense_layers {bad} out of range: the model has {num_layers} self-attention layers "
                f"(valid: {-num_layers}..{num_layers - 1})"
            )
        covered = {i % num_layers for i in self.dense_layers} if num_layers else set()
        if num_layers and not self.is_exact and len(covered) == num_layers:
            warnings.warn(
                f"fastattn: dense_layers {list(self.dense_layers)} cover all {num_layers} self-attention layers: "
                "no call runs the method",
                stacklevel=4,
            )
        if self.heads is not None:
            self.heads.check_model(num_layers, num_heads)

    # ------------------------------------------------------------------ plan files (plans/files.py, plans/hub.py)
    def save(self, directory, meta=None):
        """Write this plan as a plan directory (``plan.json`` + ``plan.safetensors``); returns its path."""
        from .files import save_plan

        return save_plan(self, directory, meta)

    @classmethod
    def load(cls, source, **kw) -> AttentionPlan:
        """The plan in a directory, its ``plan.json`` or ``hf://owner/repo[/subdir][@revision]``; ``kw`` as
        :func:`fastattn.plans.files.load_plan` (``fingerprint=``, ``layout=``, ``adapt=``), which also gives
        the file's meta."""
        from .files import load_plan

        return load_plan(source, **kw).plan

    def push_to_hub(self, repo_id: str, subdir: str | None = None, **kw) -> str:
        """Upload as a plan directory to a Hub model repo; returns ``hf://repo_id[/subdir]@<commit>``.
        ``kw`` as :func:`fastattn.plans.hub.push_plan` (``token=``, ``meta=``, ``private=``, ``revision=``)."""
        from .hub import push_plan

        return push_plan(self, repo_id, subdir, **kw)


def _name(method) -> str:
    return method.name if isinstance(method, MethodConfig) else str(method)


def known_keys(method) -> tuple[str, ...]:
    """Every name a flat plan dict may hold for ``method`` (plan settings + that method's fields)."""
    if isinstance(method, MethodConfig):
        cls = type(method)
    else:
        cls = METHODS.get(str(method).lower())
        if cls is None:
            raise ValueError(f"unknown method {method!r}; valid methods: {sorted(METHODS)}")
    names = set(AttentionPlan.setting_names()) | {"method", "density"}
    names |= {f.name for f in dataclasses.fields(cls)}
    return tuple(sorted(names))
