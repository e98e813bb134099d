"""``enable`` / ``disable`` on a diffusers pipeline or transformer: plans built and checked first, then
every transformer patched (or none). ``fastattn.enable`` and ``pipe.enable_fast_attention`` both land here."""

from __future__ import annotations

from ..plans import AttentionPlan, make_plan
from .families import adapter_for
from .integration import enable_models, find_transformers, model_fingerprint


def enable(
    target,
    preset: str | None = None,
    *,
    method=None,
    density: float | None = None,
    plan: AttentionPlan | None = None,
    num_steps: int | None = None,
    **settings,
):
    """Run ``target``'s attention through fastattn; returns a :class:`~fastattn.pipelines.Handle`.

    Args:
        target: a diffusers pipeline (every supported transformer in it is enabled) or a transformer.
        preset: ``"safe"``, ``"balanced"`` or ``"fast"`` (for the model's family), ``"<family>/<level>"``,
            a path to a preset ``.json``, a plan directory, or ``"hf://owner/repo[/subdir][@revision]"``.
            Defaults to ``"balanced"`` when no ``method``/``plan`` is given.
        method: a method name (``"dense"``, ``"window3d"``, ``"radial"``, ``"band"``, ``"arrow"``,
            ``"dynamic"``, ``"multi_diagonal"``, ``"stripes"``, ``"skip"``) or a method config; ``density``
            its target block density.
        plan: an :class:`~fastattn.plans.AttentionPlan` (e.g. loaded with ``AttentionPlan.load``).
        num_steps: denoising steps, only needed for ``start_percent``/``end_percent`` and fractional
            ``dense_steps`` when enabling a bare transformer (a pipeline says it itself).
        **settings: the plan's settings and the method's parameters, as named by the plan schema
            (:meth:`AttentionPlan.setting_names`: ``quant``, ``dense_steps``, ``dense_layers``,
            ``start_percent``, ``end_percent``, ``block_size``, ``residual``, ``residual_refresh``; and e.g.
            ``window=``, ``factor=``, ``top_p=``). Unknown names are refused with the list of known ones.

    Everything is validated before any model is touched. Enabling an already enabled model replaces its
    plan cleanly (the old handle is disabled first).
    """
    from . import attach_pipeline_methods

    attach_pipeline_methods()
    models, pipe = find_transformers(target)
    if preset is None and method is None and plan is None:
        preset = "balanced"
    plans = [
        make_plan(adapter_for(m).family, preset, method, density, plan, fingerprint=model_fingerprint(m), **settings)
        for m in models
    ]
    _disable_existing(target, models)
    return enable_models(models, pipe, plans, num_steps)


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
