"""Where a transformer forward is: a diffusers hook on the transformer, and a step clock per pipeline.

- :class:`ContextHook` is a stateful diffusers ``ModelHook`` registered in the transformer's
  ``HookRegistry``. The pipeline's ``transformer.cache_context("cond", step_index=..., sigma=...,
  num_inference_steps=...)`` reaches it like any diffusers cache hook, and ``maybe_free_model_hooks``
  resets it at the end of every pipeline call. Around each forward it builds the
  :class:`~fastattn.attention.context.ForwardContext` (layout from the inputs; step, branch and sigma from
  the cache context; the timestep clock where the pipeline says nothing) and makes the forward active for
  the backend in this thread only (``backend.ACTIVE``).
- :class:`StepClock` is shared by every transformer of one pipeline (Wan 2.2's ``transformer`` and
  ``transformer_2``), so the step count continues across the switch instead of restarting at 0.
- ``wrap_pipeline_reset`` also resets on ``maybe_free_model_hooks`` for models without diffusers'
  ``CacheMixin`` (SD3): the pipeline class and its ``__call__`` are never touched.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import StateManager

from ..attention.context import ForwardContext, StepTracker
from .backend import ACTIVE

HOOK_NAME = "fastattn_context"
_BRANCHES = {"cond": 0, "uncond": 1, "cond_uncond": 0}


class StepClock:
    """Step and CFG branch of one pipeline's run, shared by its transformers.

    The pipeline's cache context wins where it says something (Wan passes ``step_index``, ``sigma`` and
    ``num_inference_steps``; most pipelines pass only ``"cond"`` / ``"uncond"``); otherwise the
    timesteps the transformers receive decide (:class:`StepTracker`).

    ``cfg_batched()`` says whether the pipeline runs CFG in one batch (``do_classifier_free_guidance``);
    then a forward under ``"cond_uncond"`` (or under no cache context: SD3) holds the negative half first, as
    diffusers' pipelines concatenate them, and the context says so (``cfg_chunks``).
    """

    def __init__(self, num_steps=None, cfg_batched=None):
        self.tracker = StepTracker()
        self.num_steps = num_steps or (lambda: None)
        self.cfg_batched = cfg_batched or (lambda: False)

    def reset(self) -> None:
        self.tracker.reset()

    def context(self, layout, timestep, cache_context) -> ForwardContext:
        step, branch = self.tracker.advance(timestep)
        num_steps = self.num_steps()
        sigma = None
        if cache_context is not None:
            if cache_context.step_index is not None:
                step = int(cache_context.step_index)
            if cache_context.num_inference_steps:
                num_steps = int(cache_context.num_inference_steps)
            if cache_context.sigma is not None:
                sigma = float(cache_context.sigma)
            branch = _BRANCHES.get(cache_context.name, branch)
        chunks = None
        if (cache_context is None or cache_context.name == "cond_uncond") and self.cfg_batched():
            chunks = (1, 0)
        return ForwardContext(layout, step, num_steps, branch, sigma, timestep, chunks)


class _NoState:
    def reset(self, *args, **kwargs) -> None:
        pass


class ContextHook(ModelHook):
    """Brackets every forward of one transformer: context in, active forward set, state handed back."""

    _is_stateful = True  # so diffusers' cache_context and reset reach it

    def __init__(self, adapter, runtime, clock: StepClock, watch=None):
        super().__init__()
        self.adapter = adapter
        self.runtime = runtime
        self.clock = clock
        self.watch = watch  # called at every forward (the handle checks its processors are still in place)
        self.state_manager = StateManager(_NoState)  # carries diffusers' CacheContext to us

    @torch.compiler.disable
    def _begin(self, module, args, kwargs):
        if self.watch is not None:
            self.watch()
        layout = self.adapter.layout(module, args, kwargs)
        timestep = self.adapter.timestep(module, args, kwargs)
        ctx = self.clock.context(layout, timestep, self.state_manager._context)
        if self.adapter.one_key_mask:
            ctx = dataclasses.replace(ctx, one_key_mask=True)
        state = self.runtime.begin_forward(ctx)
        return state, ACTIVE.set((self.runtime, state))

    @torch.compiler.disable
    def _end(self, state, token) -> None:
        ACTIVE.reset(token)
        self.runtime.end_forward(state)

    def new_forward(self, module, *args, **kwargs):
        state, token = self._begin(module, args, kwargs)
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            self._end(state, token)

    def reset_state(self, module):
        self.clock.reset()
        self.runtime.reset_run()
        return module


def install_context_hook(model, hook: ContextHook):
    """Register ``hook`` on ``model``; returns the function that removes it and leaves no trace."""
    return install_hook(model, hook, HOOK_NAME)


def install_hook(module, hook: ModelHook, name: str):
    """Register ``hook`` as ``name`` in ``module``'s diffusers hook registry; returns the function that removes
    it and leaves no trace (the registry and the forward it installed go when nothing else is registered)."""
    had_registry = "_diffusers_hook" in module.__dict__
    had_forward = "forward" in module.__dict__
    registry = HookRegistry.check_if_exists_or_initialize(module)
    registry.register_hook(hook, name)
    registry.invalidate_child_registries_cache()

    def remove():
        reg = module.__dict__.get("_diffusers_hook")
        if reg is None or reg.get_hook(name) is not hook:
            return
        reg.remove_hook(name, recurse=False)
        if not had_forward and not reg.hooks:
            module.__dict__.pop("forward", None)
        if not had_registry and not reg.hooks:
            del module.__dict__["_diffusers_hook"]
        elif "_diffusers_hook" in module.__dict__:
            reg.invalidate_child_registries_cache()

    return remove


def wrap_pipeline_reset(pipe, on_reset) -> callable:
    """Call ``on_reset()`` whenever ``pipe.maybe_free_model_hooks()`` runs; returns the undo function."""
    had_own = "maybe_free_model_hooks" in pipe.__dict__
    previous = pipe.maybe_free_model_hooks  # bound method (or an earlier instance wrapper)

    @functools.wraps(previous)
    def maybe_free_model_hooks(*args, **kwargs):
        try:
            return previous(*args, **kwargs)
        finally:
            on_reset()

    pipe.maybe_free_model_hooks = maybe_free_model_hooks

    def undo():
        if had_own:
            pipe.maybe_free_model_hooks = previous
        else:
            pipe.__dict__.pop("maybe_free_model_hooks", None)

    return undo


def pipeline_num_steps(pipe):
    """Denoising steps of the pipeline call in progress (None when unknown)."""

    def num_steps():
        n = getattr(pipe, "_num_timesteps", None)
        if n:
            return int(n)
        ts = getattr(getattr(pipe, "scheduler", None), "timesteps", None)
        return int(len(ts)) if ts is not None and len(ts) else None

    return num_steps
