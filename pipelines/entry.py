"""``enable`` / ``disable`` on a diffusers pipeline or transformer: plans built and checked first, then
every transformer patched (or none). ``fastattn.enable`` and ``pipe.enable_fast_attention`` both land here."""

from __future__ import annotations

from ..plans import AttentionPlan, make_plan
from .families import adapter_for
from .integration import enable_models, find_transformers, model_fingerprint, unwrap_compiled


def enable(
    target,
    preset: str | None = None,
    *,
    method=None,
    density: float | None = None,
    plan: AttentionPlan | None = None,
    num_steps: int | None = None,
    parallel=None,
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
            ``start_percent``, ``end_percent``, ``block_size``, ``residual``, ``residual_refresh``, ``cache``,
            ``cache_budget_gb``, ``cache_storage``, ``cache_offload``; and e.g. ``window=``, ``factor=``,
            ``top_p=``). Unknown names are refused with the list of known ones. ``cache=`` takes a cache preset
            (``"safe"``, ``"balanced"``, ``"fast"``, ``"delta"``) or a dict of
            :class:`~fastattn.caching.CacheConfig` fields, and mixes with any method:
            ``enable(pipe, "fast", cache="balanced", cache_budget_gb=4)``.
        parallel: sequence parallelism under torchrun, ``dict(ulysses=.., ring=.., balance="db-sp")`` or a
            :class:`~fastattn.parallel.ParallelConfig` (see :mod:`fastattn.pipelines.parallel`): every rank calls
            ``enable`` and runs the pipeline with the same inputs; each transformer's sequence is split across
            the ranks. Only rank 0 should write outputs (they are the same on every rank).

    Everything is validated before any model is touched. Enabling an already enabled pipeline or model
    again replaces its plan cleanly (the old handle is disabled first); a transformer enabled through its
    pipeline is changed through the pipeline, and one enabled directly is not taken over by a pipeline
    (both refused with what to do). A ``torch.compile``'d model (or pipeline component) is enabled on the
    module it wraps.
    """
    from . import attach_pipeline_methods

    attach_pipeline_methods()
    if num_steps is not None and (
        isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1
    ):
        raise ValueError(
            f"num_steps must be a positive int (the run's denoising steps) or None, got {num_steps!r}"
        )
    target = unwrap_compiled(target)
    models, pipe = find_transformers(target)
    if preset is None and method is None and plan is None:
        preset = "balanced"
    plans = [
        make_plan(adapter_for(m).family, preset, method, density, plan, fingerprint=model_fingerprint(m), **settings)
        for m in models
    ]
    session = None
    if parallel is not None:  # checked (and the process groups built) before anything is patched
        from .parallel import ParallelSession

        session = ParallelSession.create(parallel, models, plans, [adapter_for(m) for m in models])
    _check_owner(models, pipe)
    _disable_existing(target, models)
    return enable_models(models, pipe, plans, num_steps, parallel=session)


def _check_owner(models, pipe) -> None:
    """One owner per transformer: mixing a pipeline-level and a model-level enable left a model patched
    after ``pipe.disable_fast_attention()`` returned True."""
    owner = type(pipe).__name__ if pipe is not None else None
    for m in models:
        h = m.__dict__.get("_fastattn_handle")
        if h is None or not h.enabled or h.owner == owner:
            continue
        name = type(m).__name__
        if h.owner is None:
            raise ValueError(
                f"{name} is already enabled directly (fastattn.enable(transformer)); call "
                f"fastattn.disable(pipe.transformer) (or that handle's disable()) before enabling the pipeline"
            )
        raise ValueError(
            f"{name} is already enabled through {h.owner}: change its plan with pipe.enable_fast_attention(...) "
            f"(or fastattn.enable(pipe, ...)), or call pipe.disable_fast_attention() before enabling it "
            f"{'directly' if owner is None else 'through ' + owner}"
        )


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
    target = unwrap_compiled(target)
    h = target.__dict__.get("_fastattn_handle") if hasattr(target, "__dict__") else None
    if h is None:
        return False
    h.disable()
    return True
