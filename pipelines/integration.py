"""``enable`` / ``disable`` for diffusers models and pipelines, and the ``Handle`` they return.

Enabling on a transformer:
1. registers the ``fastattn_sparse`` backend with diffusers' dispatcher (once);
2. points every attention processor that uses the dispatcher at it, remembering each processor's previous
   backend; for families whose processors call SDPA directly (SD3, CogVideoX) installs our math-identical
   processors, remembering the originals;
3. adds the forward hooks that give the runtime layout, step and branch.
``Handle.disable()`` undoes exactly these steps: the same processor objects with the same backends.
Enabling a model that is already enabled replaces the previous handle cleanly (disable, then enable).
"""

from __future__ import annotations

import weakref

from ..attention.plan import AttentionPlan
from ..attention.runtime import AttentionRuntime
from ..attn_kernels import ops as kernel_ops
from .backend import dense_backend_fn, register_backend
from .families import FamilyAdapter, adapter_for, supported_classes
from .hooks import TransformerHooks, pipeline_num_steps, wrap_pipeline_reset

_ATTR = "_fastattn_handle"


class ModelHandle:
    """fastattn enabled on one transformer."""

    def __init__(self, model, adapter: FamilyAdapter, plan: AttentionPlan, pipe=None, num_steps=None):
        self.model_ref = weakref.ref(model)
        self.adapter = adapter
        self.plan = plan
        self.enabled = False
        member = register_backend()

        processors = model.attn_processors  # {path: processor}
        self.self_attention_paths = [p for p in processors if adapter.self_attention(p)]
        self._saved_processors = None
        self._saved_backends: list[tuple[object, object]] = []
        self.uncovered: dict[str, str] = {}

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
                new[path] = PROCESSORS[target]()
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
        # Point every dispatching processor at our backend (after replacement: ours dispatch too).
        seen = set()
        for proc in model.attn_processors.values():
            if hasattr(proc, "_attention_backend") and id(proc) not in seen:
                seen.add(id(proc))
                self._saved_backends.append((proc, proc._attention_backend))
                proc._attention_backend = member

        steps = (lambda: num_steps) if num_steps else (pipeline_num_steps(pipe) if pipe is not None else None)
        self.runtime = AttentionRuntime(
            plan,
            num_layers=len(self.self_attention_paths),
            dense_fn=dense_backend_fn(dense_backend),
            num_steps=steps,
        )
        self.hooks = TransformerHooks(model, adapter, self.runtime)
        setattr(model, _ATTR, self)
        self.enabled = True

    def disable(self) -> None:
        if not self.enabled:
            return
        model = self.model_ref()
        self.hooks.remove()
        for proc, backend in self._saved_backends:
            proc._attention_backend = backend
        if model is not None:
            if self._saved_processors is not None:
                model.set_attn_processor(self._saved_processors)
            if model.__dict__.get(_ATTR) is self:
                delattr(model, _ATTR)
        self.runtime.masks.clear()
        self.runtime.residuals.clear()
        self.runtime.selections.clear()
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
        }
        out.update(self.runtime.stats.as_dict())
        out["layers_per_forward"] = len(self.self_attention_paths)
        if self.uncovered:
            out["uncovered_processors"] = dict(self.uncovered)
        return out


class Handle:
    """What ``fastattn.enable`` returns: ``stats()``, ``disable()``; one entry per enabled transformer."""

    def __init__(self, models: list[ModelHandle], pipe=None):
        self.models = models
        self.pipe_ref = weakref.ref(pipe) if pipe is not None else None
        self._undo_pipe = None
        if pipe is not None:
            self._undo_pipe = wrap_pipeline_reset(pipe, self._reset_run)
            pipe._fastattn_handle = self

    def _reset_run(self) -> None:
        for m in self.models:
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
        """Per model: density achieved, calls, planned dense calls and fallbacks with their reasons.

        ``kernel_fallbacks`` are the kernel layer's process-wide dense fallbacks (e.g. head_dim not 64/128
        on the GPU); the per-model ones are in each model's ``fallbacks`` prefixed ``kernel:``.
        """
        per_model = [m.stats() for m in self.models]
        out = per_model[0] if len(per_model) == 1 else {"models": per_model}
        out["kernel_fallbacks"] = kernel_ops.fallback_counts()
        return out

    def reset_stats(self) -> None:
        for m in self.models:
            m.runtime.stats.reset()

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
    components = getattr(target, "components", None)
    if isinstance(components, dict) and not hasattr(target, "attn_processors"):
        models = [m for m in components.values() if m is not None and adapter_for(m) is not None]
        if not models:
            found = sorted(
                {
                    type(m).__name__
                    for m in components.values()
                    if m is not None and hasattr(m, "attn_processors")
                }
            )
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


def existing_handle(target):
    return getattr(target, "_fastattn_handle", None)
