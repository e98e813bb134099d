"""Multi-GPU on one patched MODEL: the ``DIFFUSION_MODEL`` wrapper that runs each forward on every rank, and
what it decides per forward.

Installed on a ``ModelPatcher.clone()`` (no ComfyUI module is patched), under the key ``"fastattn_multigpu"``:

- a ``DIFFUSION_MODEL`` wrapper (``add_wrapper_with_key``): the ordinary KSampler's forwards arrive here with
  the model's inputs; :meth:`MultiGPUPatch.forward` sends them to the workers and runs rank 0's share;
- a ``patches_replace["dit"]`` entry per transformer block (:class:`~.multigpu_shard.ShardedBlock`), which cuts
  the block's tokens during a parallel forward and passes everything through otherwise;
- ``ON_PRE_RUN`` / ``ON_CLEANUP`` callbacks (a sampling run's bookkeeping, a log line of what ran where) and
  ``ON_DETACH`` (ComfyUI unloaded the model: the workers drop their copies).

A forward that cannot run in parallel runs on the ComfyUI process alone, exactly as without the node, counted
with its reason (:meth:`MultiGPUPatch.single_reason`): tokens that do not split into equal shards, inputs that
add tokens the layout does not describe, another node's block replacements, ``patches`` or inner
diffusion-model wrappers (the workers could not run them), a model ComfyUI loaded only partly (low VRAM), or
gradients enabled. With a Fast Attention node on the same MODEL (before or after this one) every rank runs its
plan: the forward's context (step, CFG branch, layout) comes from that node's forward bracket and the plan is
sent to the workers once; its block caching is not supported under Multi-GPU yet (single process, counted).
"""

from __future__ import annotations

import inspect
import logging
from collections import Counter
from dataclasses import dataclass, field

import torch

from ...attention.context import ForwardContext
from ...parallel.config import ParallelConfig
from ...plans.schema import AttentionPlan, DenseConfig
from .families import ComfyFamily
from .install import AttentionOverride
from .multigpu_cluster import DeviceList, Job, cluster_for, current_cluster, register_user
from .multigpu_shard import ACTIVE, DIT, OVERRIDE, REPLACE, ShardedBlock, block_entries, contiguous_positions
from .multigpu_transport import TransportError, pack

logger = logging.getLogger("fastattn.multigpu")
KEY = "fastattn_multigpu"
DIFFUSION_MODEL, ON_PRE_RUN, ON_CLEANUP, ON_DETACH = (
    "diffusion_model",
    "on_pre_run",
    "on_cleanup",
    "on_detach_after",
)
DENSE_PLAN = AttentionPlan(DenseConfig())
# transformer_options entries that stay on rank 0: wrappers / callbacks run there, the workers put their own
# attention override and block entries
_RANK0_ONLY = ("wrappers", "callbacks", OVERRIDE, REPLACE)


@dataclass
class _Run:
    """One sampling run's bookkeeping."""

    index: int
    weights: tuple | None = None  # the patcher's weight identity at ON_PRE_RUN
    lowvram: bool = False
    parallel: int = 0
    single: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    started: bool = False  # a parallel forward of this run has run (the workers' runtimes were reset)


class MultiGPUPatch:
    """Multi-GPU on one MODEL (module docstring).

    Args:
        devices: the ranks' devices (rank 0 the ComfyUI process's).
        config: degrees, balance and failure timeout.
        family: the model's family (token layout, heads), from ``families.detect_family``.
        shard_family, blocks: ``multigpu_shard.family_blocks`` of the model.
    """

    def __init__(self, devices: DeviceList, config: ParallelConfig, family: ComfyFamily, shard_family: str,
                 blocks: list):  # fmt: skip
        self.devices = devices
        self.config = config
        self.family = family
        self.shard_family = shard_family
        self.blocks = list(blocks)
        self.runs = 0
        self.run: _Run | None = None
        self.last: dict | None = None
        register_user(self, devices, config.timeout_s)

    def __deepcopy__(self, memo):  # clones share the patch
        return self

    # ------------------------------------------------------------------ runs
    def begin_run(self, patcher=None) -> None:
        self.runs += 1
        run = self.run = _Run(self.runs)
        model = getattr(patcher, "model", None)
        if model is not None:
            run.weights = (id(model), getattr(model, "current_weight_patches_uuid", None))
            run.lowvram = bool(getattr(model, "model_lowvram", False))

    def end_run(self, patcher=None) -> None:
        if self.run is None:
            return
        self.last = self.report()
        run = self.run
        if run.parallel or run.single:
            single = ", ".join(f"{n} x {why}" for why, n in run.single.items()) or "none"
            logger.info("fastattn Multi-GPU: %d forwards on %d ranks; on the ComfyUI process alone: %s",
                        run.parallel, self.devices.world, single)  # fmt: skip
        self.run = None

    def detached(self, patcher=None, unpatch_all=True) -> None:
        cluster = current_cluster()
        if cluster is not None and cluster.devices == self.devices:
            cluster.release_model()

    def report(self) -> dict:
        run = self.run
        out = dict(devices=[self.devices.describe(r) for r in range(self.devices.world)],
                   config=self.config.to_dict(), family=self.shard_family)  # fmt: skip
        if run is None:
            return self.last or out
        out.update(parallel_forwards=run.parallel, single_forwards=dict(run.single), notes=dict(run.notes))
        cluster = current_cluster()
        if cluster is not None and cluster.devices == self.devices:
            out["rank0_notes"] = dict(cluster.rank.notes)
        return out

    # ------------------------------------------------------------------ forward
    def forward(self, executor, args: tuple, kwargs: dict):
        """The ``DIFFUSION_MODEL`` wrapper body: ``executor(*args, **kwargs)`` runs the host's forward."""
        if ACTIVE.get() is not None:  # a forward inside a parallel forward: already sharded by its blocks
            return executor(*args, **kwargs)
        if self.run is None:
            self.begin_run()
        run = self.run
        job = self.plan_forward(executor, args, kwargs)
        if isinstance(job, str):
            run.single[job] += 1
            return executor(*args, **kwargs)
        cluster = cluster_for(self.devices, self.config.timeout_s, mid_run=run.parallel > 0)
        run.parallel += 1
        return cluster.forward(job, executor.class_obj, lambda: executor(*args, **kwargs))

    def plan_forward(self, executor, args: tuple, kwargs: dict) -> Job | str:
        """The :class:`Job` for this forward, or why it runs on the ComfyUI process alone."""
        run = self.run
        dm = executor.class_obj
        if torch.is_grad_enabled():
            return "gradients are enabled (Multi-GPU runs inference only)"
        if run.lowvram:
            return "ComfyUI loaded the model only partly (low VRAM); the workers need every weight"
        inner = executor.wrappers[executor.idx + 1 :]
        if inner:
            return (
                f"{len(inner)} other diffusion-model wrapper(s) run inside Multi-GPU's (the workers cannot)"
            )
        try:
            named = inspect.signature(executor.original).bind(*args, **kwargs).arguments
        except TypeError as e:
            return f"unexpected forward arguments ({e})"
        to = named.get("transformer_options")
        if not isinstance(to, dict):
            return "no transformer_options"
        patches = {k: v for k, v in (to.get("patches") or {}).items() if v}
        if patches:
            return f"transformer_options patches {sorted(patches)} (the workers cannot run them)"
        fa = _fastattn_patch(to)
        if fa is not None and fa.plan is not None and fa.plan.cache.blocks != "off":
            return "Fast Attention's block caching does not run under Multi-GPU yet"
        dit = (to.get(REPLACE) or {}).get(DIT) or {}
        foreign = sorted({str(k[0]) for k, e in dit.items() if not isinstance(e, ShardedBlock) or e.previous})
        if foreign:
            return f"another node replaces {foreign} blocks (the workers cannot run it)"
        context = self._context(to, named, kwargs)
        if isinstance(context, str):
            return context
        ctx, plan, num_layers = context
        layout, world = ctx.layout, self.devices.world
        if layout.text_len and not layout.text_first:
            return "text after the image tokens (this family's blocks are not cut yet)"
        try:
            contiguous_positions(layout.seq_len, layout.text_len, world, world - 1)
        except ValueError as e:
            return str(e)
        sent, dropped = {}, []
        for k, v in to.items():
            if k in _RANK0_ONLY or k == "patches":
                continue
            try:
                pack(v)
                sent[k] = v
            except TransportError:
                dropped.append(k)
        for k in dropped:
            run.notes[f"transformer_options[{k!r}] stays on rank 0 (cannot be sent)"] += 1
        other = _foreign_override(to)
        if other is not None:
            run.notes[
                f"attention override {other} not used on the parallel path (the workers cannot run it)"
            ] += 1
        try:
            payload, tensors = pack((list(args), kwargs, sent, ctx), markers={id(to): "to"})
        except TransportError as e:
            return f"the forward's inputs {e}"
        weights = (id(dm), run.weights, _version(dm))
        reset = not run.started
        run.started = True
        return Job(self.family.num_heads, self.config.to_dict(), self.shard_family, self.blocks, weights,
                   (id(plan), num_layers), plan, num_layers, ctx, payload, tensors, reset)  # fmt: skip

    def _context(self, to: dict, named: dict, kwargs: dict):
        """``(ForwardContext, plan, num_layers)`` of this forward, or why it cannot run in parallel. From the Fast
        Attention node's forward in flight when one is on this MODEL; else a dense plan and this family's layout."""
        fa = _fastattn_patch(to)
        fwd = fa.current_forward() if fa is not None and fa.runtime is not None else None
        if fwd is not None:
            plan = fa.plan
            if fwd.layout is None:
                return f"token layout unknown: {fwd.layout_reason}"
            if fwd.window_reason is not None or fwd.layout_reason is not None:
                return fwd.state.ctx, DENSE_PLAN, fa.family.num_layers
            return fwd.state.ctx, plan, fa.family.num_layers
        conds = {k: v for k, v in kwargs.items() if k not in ("transformer_options",)}
        skip = ("x", "timestep", "context", "transformer_options", "kwargs")
        conds.update({k: v for k, v in named.items() if k not in skip})
        layout, reason = self.family.layout(named.get("x"), named.get("context"), conds)
        if layout is None:
            return f"token layout unknown: {reason}"
        return ForwardContext(layout), DENSE_PLAN, self.family.num_layers


def _fastattn_patch(to: dict):
    """The Fast Attention node's patch in this forward's override chain, or None."""
    node = to.get(OVERRIDE)
    while node is not None:
        if isinstance(node, AttentionOverride):
            return node.patch
        node = getattr(node, "previous", None)
    return None


def _foreign_override(to: dict) -> str | None:
    node = to.get(OVERRIDE)
    while node is not None:
        if not isinstance(node, AttentionOverride):
            return type(node).__name__
        node = node.previous
    return None


def _version(dm) -> int:
    """Changes when a weight of ``dm`` is replaced or changed in place (LoRA patched / unpatched)."""
    h = 0
    for t in list(dm.parameters()) + list(dm.buffers()):
        try:
            v = t._version
        except RuntimeError:  # inference tensors have no version counter
            v = 0
        h = hash((h, id(t), t.data_ptr(), v))
    return h


class DiffusionWrapper:
    """The ``DIFFUSION_MODEL`` wrapper: ``wrapper(executor, *args, **kwargs)``."""

    def __init__(self, patch: MultiGPUPatch):
        self.patch = patch

    def __deepcopy__(self, memo):
        return self

    @torch.compiler.disable  # processes, pipes and collectives: under TorchCompileModel the forward runs eagerly
    def __call__(self, executor, *args, **kwargs):
        return self.patch.forward(executor, args, kwargs)


def install(model, patch: MultiGPUPatch) -> None:
    """Install ``patch`` on ``model`` (a ``ModelPatcher`` clone): wrapper, callbacks, block entries."""
    model.remove_wrappers_with_key(DIFFUSION_MODEL, KEY)
    for kind in (ON_PRE_RUN, ON_CLEANUP, ON_DETACH):
        model.remove_callbacks_with_key(kind, KEY)
    model.add_wrapper_with_key(DIFFUSION_MODEL, KEY, DiffusionWrapper(patch))
    model.add_callback_with_key(ON_PRE_RUN, KEY, lambda *a, **k: patch.begin_run(a[0] if a else None))
    model.add_callback_with_key(ON_CLEANUP, KEY, lambda *a, **k: patch.end_run(a[0] if a else None))
    model.add_callback_with_key(ON_DETACH, KEY, lambda *a, **k: patch.detached(*a, **k))
    to = model.model_options.setdefault("transformer_options", {})
    replace = dict(to.get(REPLACE) or {})  # copied, never changed in place: other clones may share it
    replace[DIT] = block_entries(patch.blocks, replace.get(DIT))
    to[REPLACE] = replace


def find_multigpu(model) -> MultiGPUPatch | None:
    """The Multi-GPU patch installed on ``model`` (a ModelPatcher), or None."""
    wrappers = getattr(model, "wrappers", None) or {}
    for w in wrappers.get(DIFFUSION_MODEL, {}).get(KEY, []):
        if isinstance(w, DiffusionWrapper):
            return w.patch
    return None
