"""``enable`` / ``disable`` for diffusers models and pipelines, and the ``Handle`` they return.

Enabling on a transformer:
1. registers the ``fastattn_sparse`` backend with diffusers' dispatcher (once);
2. points the self-attention processors (the family adapter says which) at it, remembering each
   processor's previous backend — cross-attention keeps its own backend and never reaches the runtime;
   for families whose processors call SDPA directly (SD3, CogVideoX) installs our math-identical
   processors, remembering the originals;
3. registers the context hook (a diffusers ``ModelHook``) that hands the runtime layout, step, branch
   and sigma per forward, on a step clock shared by the pipeline's transformers.
``Handle.disable()`` undoes exactly these steps: the same processor objects with the same backends.
Enabling a model that is already enabled replaces the previous handle cleanly (disable, then enable).
"""

from __future__ import annotations

import warnings
import weakref

import torch

from ..attention.runtime import AttentionRuntime
from ..plans.schema import AttentionPlan
from .backend import dense_backend_fn, register_backend
from .block_cache import block_lists, install_block_cache
from .families import FamilyAdapter, adapter_for, supported_classes
from .hooks import ContextHook, StepClock, install_context_hook, pipeline_num_steps, wrap_pipeline_reset

_ATTR = "_fastattn_handle"
REPLACED_NOTE = "self-attention calls bypassed: layers got a new processor or backend after enable()"


class ModelHandle:
    """fastattn enabled on one transformer."""

    def __init__(self, model, adapter: FamilyAdapter, plan: AttentionPlan, clock: StepClock, parallel=None):
        self.model_ref = weakref.ref(model)
        self.adapter = adapter
        self.plan = plan
        self.enabled = False
        processors = model.attn_processors  # {path: processor}
        self.self_attention_paths = [p for p in processors if adapter.self_attention(p)]
        plan.check_model(len(self.self_attention_paths), model_num_heads(model))  # before patching anything
        if plan.cache.blocks != "off":
            block_lists(model, adapter.family)  # a model without known block lists is refused here
        member = register_backend()
        self._saved_processors = None
        self._saved_backends: list[tuple[object, object]] = []
        self.uncovered: dict[str, str] = {}
        self._installed: dict[str, object] = {}  # path -> the processor we put there (replacing families)

        if adapter.replace:
            from .processors import PROCESSORS

            self._saved_processors = dict(processors)
            new = {}
            for path, proc in processors.items():
                target = adapter.replace.get(type(proc).__name__)
                if target is None:
                    new[path] = proc
                    if not hasattr(proc, "_attention_backend"):
                        self.uncovered[path] = type(proc).__name__
                    continue
                new[path] = self._installed[path] = PROCESSORS[target]()
            model.set_attn_processor(new)
            dense_backend = None
        else:
            dense_backend = None
            for path, proc in processors.items():
                if not hasattr(proc, "_attention_backend"):
                    self.uncovered[path] = type(proc).__name__
                    continue
                if dense_backend is None and proc._attention_backend is not None:
                    dense_backend = proc._attention_backend
        # Point the self-attention processors at our backend (after replacement: ours dispatch too). A
        # processor object shared with a cross-attention path is routed too; the runtime then serves its
        # cross-attention calls dense by shape (S_q != S_kv), counted.
        procs = model.attn_processors
        cross_ids = {id(p) for path, p in procs.items() if not adapter.self_attention(path)}
        seen = set()
        self.shared_cross = []
        for path in self.self_attention_paths:
            proc = procs[path]
            if hasattr(proc, "_attention_backend") and id(proc) not in seen:
                seen.add(id(proc))
                if id(proc) in cross_ids:
                    self.shared_cross.append(path)
                self._saved_backends.append((proc, proc._attention_backend))
                proc._attention_backend = member
        self._member = member
        # (path, attention module, its processor) of every routed layer: a processor or backend the user
        # installs later (set_attn_processor, an IP-Adapter, set_attention_backend) bypasses us; the
        # context hook checks these identities at every forward (a few attribute reads) and says so.
        self._routes = [
            (path, model.get_submodule(path.rpartition(".")[0]), procs[path])
            for path in self.self_attention_paths
            if getattr(procs[path], "_attention_backend", None) is member
        ]
        self.replaced: list[str] = []
        self._warned_replaced = False
        self.owner: str | None = None  # the pipeline class that enabled this model (set by Handle)

        self.runtime = AttentionRuntime(
            plan, num_layers=len(self.self_attention_paths), dense_fn=dense_backend_fn(dense_backend)
        )
        self.clock = clock
        # parallel= (pipelines/parallel.py): the split/gather hooks go in first, so the context hook wraps them
        # and sees the whole input; its route then hands each rank's shard to SequenceParallel.
        self.parallel = parallel.attach(model, adapter, self.runtime) if parallel is not None else None
        if self.parallel is None:
            hook = ContextHook(adapter, self.runtime, clock, watch=self._check_routes)
        else:
            hook = self.parallel.context_hook(adapter, self.runtime, clock, watch=self._check_routes)
        try:
            self._remove_hook = install_context_hook(model, hook)
        except Exception:
            if self.parallel is not None:
                self.parallel.remove()
            raise
        self._remove_blocks = None
        if plan.cache.blocks != "off":  # block lists were checked before anything was patched
            self._remove_blocks = install_block_cache(model, adapter.family, self.runtime, self.self_attention_paths)
        setattr(model, _ATTR, self)
        self.enabled = True

    def _check_routes(self) -> None:
        """At every forward: count the routed layers whose processor or backend changed since enable."""
        member = self._member
        replaced = [
            p
            for p, mod, proc in self._routes
            if mod.processor is not proc or proc._attention_backend is not member
        ]
        if not replaced:
            return
        self.replaced = replaced
        model = self.model_ref()
        self.runtime.stats.notes[REPLACED_NOTE] += len(replaced)
        if not self._warned_replaced:
            self._warned_replaced = True
            warnings.warn(
                f"fastattn: {type(model).__name__}: {len(replaced)} of {len(self._routes)} self-attention layers "
                f"got a new processor or backend after enable() (set_attn_processor, an IP-Adapter, "
                f"set_attention_backend; first: {replaced[0]}): their calls bypass fastattn and run the new one. "
                "Call fastattn.enable(...) again after changing processors to route them",
                stacklevel=4,
            )

    def disable(self) -> None:
        """Undo what enable did, and only that: a processor or backend the user set since stays."""
        if not self.enabled:
            return
        model = self.model_ref()
        self._remove_hook()
        if self._remove_blocks is not None:
            self._remove_blocks()
        if self.parallel is not None:
            self.parallel.remove()  # after the context hook, which wraps them
        for proc, backend in self._saved_backends:
            if proc._attention_backend is self._member:
                proc._attention_backend = backend
        if model is not None:
            if self._saved_processors is not None:
                current = model.attn_processors
                restore = {
                    path: self._saved_processors[path]
                    if path in self._saved_processors and proc is self._installed.get(path, self._saved_processors[path])
                    else proc
                    for path, proc in current.items()
                }  # fmt: skip
                model.set_attn_processor(restore)
            if model.__dict__.get(_ATTR) is self:
                delattr(model, _ATTR)
        self.runtime.clear()
        self.enabled = False

    def stats(self) -> dict:
        model = self.model_ref()
        out = {
            "model": type(model).__name__ if model is not None else None,
            "family": self.adapter.family,
            "plan": self.plan.describe(),
            "layers_per_forward": len(self.self_attention_paths),
            "enabled": self.enabled,
            "mask_builds": self.runtime.masks.builds,
            "residual_bytes": self.runtime.residual_bytes(),
            "residual_peak_bytes": self.runtime.residual_peak_bytes,
            "cache_bytes": self.runtime.cache_bytes(),
            "device": _device_type(model),
        }
        out.update(self.runtime.stats.as_dict())
        if self.plan.cache.enabled or self.plan.cache_budget_gb is not None:
            out["cache"] = self.runtime.cache.as_dict()
        out["layers_per_forward"] = len(self.self_attention_paths)
        if self.uncovered:
            out["uncovered_processors"] = dict(self.uncovered)
        if self.shared_cross:
            out["shared_cross_attention_processors"] = list(self.shared_cross)
        if self.replaced:
            out["replaced_processors"] = list(self.replaced)
        if self.parallel is not None:  # this rank's view; parallel.gather_stats(handle) sums the ranks
            out["parallel"] = self.parallel.stats()
        return out


class Handle:
    """What ``fastattn.enable`` returns: ``stats()``, ``disable()``; one entry per enabled transformer."""

    def __init__(self, models: list[ModelHandle], pipe=None, clock: StepClock | None = None):
        self.models = models
        self.clock = clock
        self.pipe_ref = weakref.ref(pipe) if pipe is not None else None
        self._undo_pipe = None
        for m in models:
            m.owner = type(pipe).__name__ if pipe is not None else None
        if pipe is not None:
            self._undo_pipe = wrap_pipeline_reset(pipe, self.reset_run)
            pipe._fastattn_handle = self

    def reset_run(self) -> None:
        """End the current run: restart the step count and free what it cached (residuals, dynamic
        selections, reused head outputs). A pipeline does this after every call, and a bare transformer
        enabled with ``num_steps=`` after its last step; call it yourself between runs otherwise."""
        if self.clock is not None:
            self.clock.reset()
        for m in self.models:
            m.clock.reset()
            m.runtime.reset_run()

    @property
    def enabled(self) -> bool:
        return any(m.enabled for m in self.models)

    @property
    def plan(self) -> AttentionPlan:
        return self.models[0].plan

    @property
    def runtimes(self) -> list[AttentionRuntime]:
        return [m.runtime for m in self.models]

    def stats(self) -> dict:
        """Per model: density achieved, calls, planned dense calls and fallbacks with their reasons
        (the kernel's own fallbacks, e.g. head_dim not 64/128 on the GPU, prefixed ``kernel:``)."""
        per_model = [m.stats() for m in self.models]
        return per_model[0] if len(per_model) == 1 else {"models": per_model}

    def reset_stats(self) -> None:
        for m in self.models:
            m.runtime.reset_stats()

    def disable(self) -> None:
        """Restore the original processors, backends and forwards exactly."""
        for m in self.models:
            m.disable()
        if self._undo_pipe is not None:
            self._undo_pipe()
            self._undo_pipe = None
            pipe = self.pipe_ref()
            if pipe is not None and pipe.__dict__.get("_fastattn_handle") is self:
                del pipe.__dict__["_fastattn_handle"]

    def __repr__(self) -> str:
        names = [m.stats()["model"] for m in self.models]
        return f"fastattn.Handle(models={names}, plan={self.plan.describe()}, enabled={self.enabled})"


def find_transformers(target) -> tuple[list, object | None]:
    """``(transformers, pipe)``: the supported models in a pipeline (``transformer``, ``transformer_2``...)
    or the model itself."""
    target = unwrap_compiled(target)
    components = getattr(target, "components", None)
    if isinstance(components, dict) and not hasattr(target, "attn_processors"):
        candidates = [unwrap_compiled(m) for m in components.values() if m is not None]
        models = [m for m in candidates if adapter_for(m) is not None]
        if not models:
            found = sorted({type(m).__name__ for m in candidates if hasattr(m, "attn_processors")})
            raise ValueError(
                f"{type(target).__name__} has no transformer fastattn supports (found {found or 'none'}); "
                f"supported: {supported_classes()}"
            )
        return models, target
    if adapter_for(target) is None:
        raise ValueError(
            f"fastattn does not support {type(target).__name__}; pass a diffusers pipeline or one of: "
            f"{supported_classes()}"
        )
    return [target], None


def unwrap_compiled(obj):
    """The module ``torch.compile`` wrapped (an ``OptimizedModule`` keeps it as ``_orig_mod`` and calls it),
    else ``obj``: enabling patches the original module, which the compiled wrapper runs."""
    while isinstance(obj, torch.nn.Module) and isinstance(obj._modules.get("_orig_mod"), torch.nn.Module):
        obj = obj._modules["_orig_mod"]
    return obj


def _device_type(model) -> str | None:
    if model is None:
        return None
    p = next(iter(model.parameters()), None)
    return p.device.type if p is not None else None


def model_fingerprint(model):
    """What a plan file is checked against: family, class, self-attention layers, heads, head_dim."""
    from ..plans.meta import ModelFingerprint

    adapter = adapter_for(model)
    cfg = getattr(model, "config", None)
    head_dim = getattr(cfg, "attention_head_dim", None) if cfg is not None else None
    return ModelFingerprint(
        family=adapter.family,
        model_class=type(model).__name__,
        num_layers=sum(1 for p in model.attn_processors if adapter.self_attention(p)),
        num_heads=model_num_heads(model),
        head_dim=int(head_dim) if isinstance(head_dim, int) else None,
    )


def model_num_heads(model) -> int | None:
    """Attention heads per layer from the model's config (None when it does not say)."""
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "num_attention_heads", None) if cfg is not None else None
    return int(n) if isinstance(n, int) else None


def enable_models(models, pipe, plans, num_steps=None, parallel=None) -> Handle:
    """Enable each model with its plan on one step clock; nothing stays patched if one fails. ``parallel``: a
    :class:`~fastattn.pipelines.parallel.ParallelSession` (sequence parallelism) or None."""
    steps = (lambda: num_steps) if num_steps else (pipeline_num_steps(pipe) if pipe is not None else None)
    cfg_batched = (lambda: bool(getattr(pipe, "do_classifier_free_guidance", False))) if pipe is not None else None
    clock = StepClock(steps, cfg_batched)  # one per pipeline: Wan 2.2's two transformers count steps together
    handles = []
    try:
        for m, p in zip(models, plans):
            handles.append(ModelHandle(m, adapter_for(m), p, clock, parallel))
    except Exception:
        for h in handles:
            h.disable()
        raise
    on_cpu = [type(m).__name__ for m, p in zip(models, plans) if not p.is_exact and _device_type(m) == "cpu"]
    if on_cpu:
        warnings.warn(
            f"fastattn: {', '.join(on_cpu)} is on the CPU: there block-sparse attention computes only the listed "
            "blocks in PyTorch (it pays at low density on long sequences, and can be slower than dense attention "
            "on short ones), and quantized attention runs reference code, slower than dense attention. fastattn's "
            "kernels are for CUDA GPUs; move the model to one (before or after enabling). stats() counts the "
            "calls served on the CPU",
            stacklevel=3,
        )
    return Handle(handles, pipe, clock)


def existing_handle(target):
    return getattr(target, "_fastattn_handle", None)
