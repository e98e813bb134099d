"""fastattn on one patched MODEL: per-run state, the forward bracket's body, and one attention call's
decision (served by the runtime, or the host's own attention, counted).

- **Forward bracket.** :meth:`FastAttentionPatch.run_forward` is the body of an ``APPLY_MODEL`` wrapper: it
  reads the step from the sigma schedule, the CFG branch from ``cond_or_uncond`` and the token layout from
  the latent, hands them to ``runtime.begin_forward`` and makes the forward current for the override (a
  context variable). ``APPLY_MODEL`` wraps ``BaseModel.apply_model`` of every family, runs outside a
  compiled ``diffusion_model`` and exists wherever the override hook does, so new forwards are never
  guessed per call. A call that arrives outside any bracket runs the host's attention and is counted
  ("no forward context").
- **Runs.** ``ON_PRE_RUN`` starts a sampling run (stats, step times and caches reset), ``ON_CLEANUP`` ends it
  (its report is kept for the Report node). A new ``sample_sigmas`` without those callbacks also starts one.
- **Calls.** :meth:`FastAttentionPatch.handle` serves the model's self-attention through the runtime;
  cross-attention, masks, GQA, ``low_precision_attention=False``, unknown head_dim or layout, and sigmas
  outside the node's window run the host's attention, counted with the reason. The runtime's ``dense_fn``
  is the host's attention for the call in flight (the previous override or ``func``): dense steps, dense
  layers and a dense plan reproduce the host bit for bit.

How it is installed on a clone: ``install.py``.
"""

from __future__ import annotations

import sys
from collections import Counter
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

from ...attention.context import ForwardContext, ForwardState
from ...attention.runtime import AttentionRuntime, sdpa_dense
from ...masks.layout import TokenLayout
from ...plans.schema import AttentionPlan
from .calls import HostCall
from .families import ComfyFamily
from .schedule import SCHEDULES, RunSchedule, ScheduleBook, cfg_branch, current_sigma
from .timing import StepTimer

NO_CONTEXT = "no forward context (the APPLY_MODEL wrapper did not run for this call)"


@dataclass
class _Forward:
    """One diffusion-model forward in flight."""

    state: ForwardState
    layout: TokenLayout | None
    layout_reason: str | None
    window_reason: str | None
    step: int


@dataclass
class _Run:
    """One sampling run (one sampler call)."""

    schedule_key: object = None  # the sampler's sample_sigmas tensor (identity marks the call)
    schedule: RunSchedule | None = None
    forwards: int = 0
    steps: set = field(default_factory=set)
    sparse_steps: set = field(default_factory=set)
    timer: StepTimer = field(default_factory=StepTimer)
    rearmed: bool = False


class FastAttentionPatch:
    """fastattn on one patched MODEL: its plan, runtime, per-run state and report.

    Args:
        family: the model's family, or None for a model that passes through (``reason`` says why).
        plan: what to run (ignored when ``family`` is None).
        sigma_start, sigma_end: the method runs while ``sigma_end <= sigma <= sigma_start`` (the node's
            ``start_percent`` / ``end_percent`` through ``model_sampling.percent_to_sigma``); None: always.
        settings: what the node was asked for (shown in the report).
        book: where sampler schedules are remembered (two samplers on one schedule).
        sparse_fn: the runtime's block-sparse kernel (tests swap in an oracle).
        default_attention: the host's default attention for container calls, which come without ``func``
            (default: ComfyUI's ``comfy.ldm.modules.attention.optimized_attention``).
    """

    def __init__(self, family: ComfyFamily | None, plan: AttentionPlan | None = None, *, sigma_start=None,
                 sigma_end=None, settings: dict | None = None, reason: str | None = None,
                 book: ScheduleBook = SCHEDULES, sparse_fn=None, default_attention=None):  # fmt: skip
        self.family = family
        self.plan = plan
        self.reason = reason
        self.sigma_start, self.sigma_end = sigma_start, sigma_end
        self.settings = dict(settings or {})
        self.book = book
        self.default_attention = default_attention
        self.runtime = None
        if family is not None:
            self.runtime = AttentionRuntime(
                plan, family.num_layers, dense_fn=self._host_dense, sparse_fn=sparse_fn
            )
        self.host_calls: Counter = Counter()  # calls that are not the model's self-attention, by reason
        self.run: _Run | None = None
        self.last: dict | None = None  # report of the last finished run
        self._forward: ContextVar = ContextVar(f"fastattn_forward_{id(self)}", default=None)
        self._call: ContextVar = ContextVar(f"fastattn_call_{id(self)}", default=None)

    def __deepcopy__(self, memo):  # ModelPatcher.clone() deep-copies model_options: clones share the patch
        return self

    # ------------------------------------------------------------------ runs
    def begin_run(self) -> None:
        self.run = _Run()
        self.host_calls.clear()
        if self.runtime is not None:
            self.runtime.reset_stats()
            self.runtime.reset_run()

    def end_run(self) -> None:
        if self.run is not None and self.run.forwards:
            from .report import build_report

            self.last = build_report(self)
        self.run = None
        if self.runtime is not None:
            self.runtime.reset_run()  # frees residual / selection / head caches of this run

    def report(self) -> dict | None:
        """The run in progress (or ended without ``ON_CLEANUP``) if it ran anything, else the last one."""
        if self.run is not None and self.run.forwards:
            from .report import build_report

            return build_report(self)
        return self.last

    # ------------------------------------------------------------------ forward bracket
    def run_forward(self, executor, args: tuple, kwargs: dict):
        """The ``APPLY_MODEL`` wrapper body: ``executor(x, t, c_concat, c_crossattn, control,
        transformer_options, **conds)`` between begin and end of one forward."""
        fwd = self._begin(args, kwargs)
        if fwd is None:
            return executor(*args, **kwargs)
        token = self._forward.set(fwd)
        started = self.run.timer.start(getattr(args[0], "device", None) if args else None)
        try:
            return executor(*args, **kwargs)
        finally:
            self._forward.reset(token)
            self._end(fwd, started, args[0] if args else None)

    @torch.compiler.disable
    def _begin(self, args: tuple, kwargs: dict) -> _Forward | None:
        named = dict(zip(("x", "t", "c_concat", "c_crossattn", "control", "transformer_options"), args))
        named.update({k: v for k, v in kwargs.items() if k in ("c_crossattn", "transformer_options")})
        to = named.get("transformer_options") or {}
        key = to.get("sample_sigmas")
        if self.run is None:
            self.begin_run()
        elif key is not None and self.run.schedule_key is not None and key is not self.run.schedule_key:
            self.end_run()  # a new sampler call without ON_PRE_RUN / ON_CLEANUP
            self.begin_run()
        run = self.run
        run.forwards += 1
        if self.runtime is None:
            return None
        if run.schedule_key is None and key is not None:
            values = key.flatten().tolist() if hasattr(key, "flatten") else list(key)
            run.schedule_key, run.schedule = key, self.book.place(values)
        sigma = current_sigma(to, named.get("t"))
        step = (
            run.schedule.step_of(sigma)
            if run.schedule is not None and sigma is not None
            else run.forwards - 1
        )
        total = run.schedule.total if run.schedule is not None else None
        conds = {k: v for k, v in kwargs.items() if k not in ("c_crossattn", "transformer_options")}
        layout, layout_reason = self.family.layout(named.get("x"), named.get("c_crossattn"), conds)
        window = None
        if (
            sigma is not None
            and self.sigma_start is not None
            and not (self.sigma_end - 1e-9 <= sigma <= self.sigma_start + 1e-9)
        ):
            window = "outside start_percent/end_percent"
        cou = to.get("cond_or_uncond")
        chunks = tuple(int(c) for c in cou) if cou is not None and len(cou) > 1 else None  # batched CFG
        ctx = ForwardContext(layout, step, total, cfg_branch(cou), sigma, None, chunks)
        run.steps.add(step)
        return _Forward(self.runtime.begin_forward(ctx), layout, layout_reason, window, step)

    def current_forward(self) -> _Forward | None:
        """The forward in flight in this thread (block patches read its block decisions), or None."""
        return self._forward.get()

    @torch.compiler.disable
    def _end(self, fwd: _Forward, started, x) -> None:
        self.runtime.end_forward(fwd.state)
        if self.run is not None:
            self.run.timer.stop(fwd.step, started, getattr(x, "device", None))

    # ------------------------------------------------------------------ one attention call
    @torch.compiler.disable
    def handle(self, call: HostCall, decline, claim=None):
        """Serve ``call`` through the runtime, or run the host's attention (``decline()``), counted.
        ``claim()``, when given, is called just before serving and returns the call to serve (the
        container path takes its tensors there)."""
        if (
            self._call.get() is not None
        ):  # our own override again, below another that wrapped it: once is enough
            return decline()
        fwd: _Forward | None = self._forward.get()
        if fwd is None:
            self.host_calls[NO_CONTEXT] += 1
            return self._inside(decline, (call, None))
        shape = call.shape_problem()
        if shape is not None:
            self.host_calls[shape] += 1
            return self._inside(decline, (call, None))
        if call.q_len != call.k_len:
            self.host_calls["cross-attention (q and k lengths differ)"] += 1
            return self._inside(decline, (call, None))
        lay = fwd.layout
        if lay is not None and call.q_len not in (lay.seq_len, lay.image_len if lay.text_len else -1):
            self.host_calls[f"{call.q_len}-token attention outside the model's token sequence"] += 1
            return self._inside(decline, (call, None))
        state = fwd.state
        layer = self._layer(fwd, call)
        if fwd.window_reason is not None:
            reason, planned = fwd.window_reason, True
        else:
            reason, planned = fwd.layout_reason or call.unsupported(), False
        if reason is not None:
            state.layer_counter += 1
            self.runtime.stats.add_dense(reason, call.work, planned)
            return self._inside(decline, (call, None))
        if claim is not None:
            call = claim()
        q, k, v = call.bshd()
        token = self._call.set((call, q))
        sparse_before = self.runtime.stats.sparse_calls
        try:
            out = self.runtime.attend(state, q, k, v, None, call.scale, layer=layer)
        finally:
            self._call.reset(token)
        if self.runtime.stats.sparse_calls != sparse_before and self.run is not None:
            self.run.sparse_steps.add(fwd.step)
        return call.to_host(out)

    def _inside(self, fn, current):
        """Run ``fn()`` with ``current`` as the call in flight (a re-entry of this patch then passes through)."""
        token = self._call.set(current)
        try:
            return fn()
        finally:
            self._call.reset(token)

    def _layer(self, fwd: _Forward, call: HostCall) -> int:
        """The host's block index where it numbers every self-attention block of the model (``total_blocks``
        equal to the model's self-attention layers), else the count of this forward's self-attention calls."""
        to = call.kwargs.get("transformer_options") or {}
        bi, tb = to.get("block_index"), to.get("total_blocks")
        n = self.family.num_layers
        if isinstance(bi, int) and n and tb == n and 0 <= bi < n:
            return bi
        return fwd.state.layer_counter

    def _host_dense(self, query, key, value, attn_mask=None, scale=None):
        """The runtime's exact dense attention: the host's own for the call in flight."""
        current = self._call.get()
        if current is not None and query is current[1]:
            return current[0].host_bshd()
        return sdpa_dense(query, key, value, attn_mask, scale)

    def host_default_attention(self):
        if self.default_attention is not None:
            return self.default_attention
        mod = sys.modules.get("comfy.ldm.modules.attention")
        fn = getattr(mod, "optimized_attention", None)
        if fn is None:
            raise RuntimeError("fastattn: a container attention call arrived but ComfyUI's optimized_attention "
                               "is not importable")  # fmt: skip
        return fn
