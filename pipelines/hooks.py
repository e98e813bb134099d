"""Hooks that tell the runtime where it is: one pair on the transformer, one wrapper on the pipeline.

- A forward pre-hook on the transformer computes the token layout from the forward's inputs and the
  (step, CFG branch) from its timestep, and activates the model's runtime; a forward hook deactivates it
  (``always_call``: also when the forward raises). Both run eagerly under ``torch.compile``
  (``torch.compiler.disable``): they graph-break once at the top of the forward, never per layer.
- The pipeline instance's ``maybe_free_model_hooks`` (diffusers calls it at the end of every ``__call__``)
  is wrapped *on the instance* to reset step tracking. The pipeline class and its ``__call__`` are never
  touched.
"""

from __future__ import annotations

import functools

import torch


class TransformerHooks:
    """Pre/post forward hooks of one transformer; ``remove()`` leaves the module as it was."""

    def __init__(self, model, adapter, runtime):
        self.adapter = adapter
        self.runtime = runtime
        self._handles = [
            model.register_forward_pre_hook(self._pre, with_kwargs=True),
            model.register_forward_hook(self._post, always_call=True),
        ]

    @torch.compiler.disable
    def _pre(self, module, args, kwargs):
        layout = self.adapter.layout(module, args, kwargs)
        self.runtime.begin_forward(layout, self.adapter.timestep(module, args, kwargs))

    @torch.compiler.disable
    def _post(self, module, args, output):
        self.runtime.end_forward()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


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
