"""Public entry points: ``fastattn.enable(pipe_or_transformer, ...) -> Handle`` and ``fastattn.disable``.

Example::

    import fastattn
    pipe = WanPipeline.from_pretrained(...)
    handle = fastattn.enable(pipe, preset="balanced")            # or method="window3d", density=0.3
    video = pipe(prompt).frames
    print(handle.stats())
    handle.disable()                                               # model exactly as before
"""

from __future__ import annotations

from .attention.methods import METHODS, method_from_name
from .attention.plan import AttentionPlan

_PLAN_KNOBS = (
    "quant", "dense_steps", "dense_layers", "start_percent", "end_percent", "block_size", "residual",
    "residual_refresh",
)  # fmt: skip


def make_plan(
    family: str,
    preset: str | None = None,
    method=None,
    density: float | None = None,
    plan: AttentionPlan | None = None,
    **knobs,
) -> AttentionPlan:
    """Build the :class:`AttentionPlan` for ``family`` from a preset or a method plus knobs.

    Explicit knobs override the preset's fields (``preset="balanced", quant="none"``).
    """
    if plan is not None:
        if preset is not None or method is not None:
            raise ValueError("give one of plan=, preset= or method=")
        if not isinstance(plan, AttentionPlan):
            raise TypeError(f"plan must be an AttentionPlan, got {type(plan).__name__}")
        return plan
    if preset is not None and method is not None:
        raise ValueError(f"give preset= or method=, not both (got preset={preset!r}, method={method!r})")
    fields: dict = {}
    if preset is not None:
        from .presets import resolve_preset

        fields = resolve_preset(preset, family)
    elif method is None:
        raise ValueError(f"give preset= ('safe', 'balanced', 'fast') or method= (one of {sorted(METHODS)})")
    if method is not None:
        fields["method"] = method
    if density is not None:
        fields["density"] = density
        if "clamp_density" not in knobs:
            fields.pop("clamp_density", None)  # a density the user asks for is checked, not clamped
    for k, v in knobs.items():
        if v is not None:
            fields[k] = v
    plan_kwargs = {k: fields.pop(k) for k in _PLAN_KNOBS if k in fields}
    method_name = fields.pop("method")
    dens = fields.pop("density", None)
    cfg = method_from_name(method_name, dens, **fields)
    if "dense_layers" in plan_kwargs:
        plan_kwargs["dense_layers"] = tuple(plan_kwargs["dense_layers"])
    return AttentionPlan(method=cfg, **plan_kwargs)


def enable(
    target,
    preset: str | None = None,
    *,
    method=None,
    density: float | None = None,
    quant: str | None = None,
    plan: AttentionPlan | None = None,
    dense_steps: int | None = None,
    dense_layers=None,
    start_percent: float | None = None,
    end_percent: float | None = None,
    block_size: int | None = None,
    residual: bool | None = None,
    residual_refresh: int | None = None,
    num_steps: int | None = None,
    **method_params,
):
    """Run ``target``'s attention through fastattn; returns a :class:`~fastattn.pipelines.Handle`.

    Args:
        target: a diffusers pipeline (every supported transformer in it is enabled) or a transformer.
        preset: ``"safe"``, ``"balanced"`` or ``"fast"`` (for the model's family), ``"<family>/<level>"``,
            or a path to a preset ``.json``. Defaults to ``"balanced"`` when no ``method``/``plan`` is given.
        method: ``"dense"``, ``"window3d"``, ``"radial"``, ``"band"``, ``"arrow"`` or ``"dynamic"`` (or a
            method config object); ``density`` its target block density; other method parameters
            (``window=``, ``factor=``, ``top_p=``...) as keywords.
        quant: ``"none"``, ``"int8"``, ``"int8-fp8"``, ``"int4"``, ``"int4-fp8"``, ``"fp8"``.
        dense_steps, dense_layers, start_percent, end_percent: where attention stays exact.
        block_size: mask block size (128 for the GPU kernel; smaller only for CPU tests).
        residual, residual_refresh: DiTFastAttn residual sharing (see :class:`AttentionPlan`).
        num_steps: denoising steps (only needed for start/end_percent when enabling a bare transformer).

    Enabling an already enabled model replaces its plan cleanly (the old handle is disabled first).
    """
    from .pipelines import attach_pipeline_methods
    from .pipelines.families import adapter_for
    from .pipelines.integration import Handle, ModelHandle, find_transformers

    attach_pipeline_methods()
    models, pipe = find_transformers(target)
    if preset is None and method is None and plan is None:
        preset = "balanced"
    knobs = dict(
        quant=quant,
        dense_steps=dense_steps,
        dense_layers=dense_layers,
        start_percent=start_percent,
        end_percent=end_percent,
        block_size=block_size,
        residual=residual,
        residual_refresh=residual_refresh,
    )
    # Validate everything before touching any model.
    plans = [
        make_plan(adapter_for(m).family, preset, method, density, plan, **knobs, **method_params)
        for m in models
    ]
    _disable_existing(target, models)
    handles = []
    try:
        for m, p in zip(models, plans):
            handles.append(ModelHandle(m, adapter_for(m), p, pipe=pipe, num_steps=num_steps))
    except Exception:
        for h in handles:
            h.disable()
        raise
    return Handle(handles, pipe)


def _disable_existing(target, models) -> None:
    old = target.__dict__.get("_fastattn_handle") if hasattr(target, "__dict__") else None
    if old is not None:
        old.disable()
    for m in models:
        h = m.__dict__.get("_fastattn_handle")
        if h is not None:
            h.disable()


def disable(target) -> bool:
    """Undo ``enable`` on a pipeline or transformer; returns False when it was not enabled."""
    h = target.__dict__.get("_fastattn_handle") if hasattr(target, "__dict__") else None
    if h is None:
        return False
    h.disable()
    return True
