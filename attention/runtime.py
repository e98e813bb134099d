"""The runtime: per attention call, decide dense or sparse, build and cache per-head work, call the kernels.

One :class:`AttentionRuntime` exists per enabled transformer. For every transformer forward the adapter
hands over a :class:`~fastattn.attention.context.ForwardContext` (step, step count, CFG branch, sigma,
token layout) and gets a :class:`~fastattn.attention.context.ForwardState` back; it passes that state
with every self-attention call of the forward to :meth:`AttentionRuntime.attend`. Nothing here is a
process global: two models, or two threads, each carry their own state.

The runtime knows no host. It reads the plan (:mod:`fastattn.plans`), builds per-head work once per
(method row, layout) — block masks, PARO permutations, bit-width groups, head reuse — and calls the
kernel layer, whose fallbacks come back as values and are counted with their reasons.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..attn_kernels import ops as kernel_ops
from ..attn_kernels.quantize import MODES as QUANT_MODES
from ..caching import RuntimeCache
from ..masks.block_mask import BlockMask
from ..masks.layout import AXIS_ORDERS, BlockGeometry, TokenLayout
from ..masks.permutations import head_permutations
from ..plans.methods import BlockMapConfig, DenseConfig, MethodConfig, build_mask, call_handler
from ..plans.schema import AttentionPlan
from . import dynamic  # noqa: F401  (registers the dynamic method's per-call handler)
from .context import ForwardContext, ForwardState
from .observe import ObservedCall
from .stats import AttentionStats

CPU_NOTE = "sparse calls on the CPU (PyTorch block loop, no GPU kernel: can be slower than dense attention)"


def sdpa_dense(query, key, value, attn_mask=None, scale=None):
    """Exact dense attention on ``[B, S, H, D]`` tensors, as diffusers' ``native`` backend computes it."""
    q, k, v = (x.permute(0, 2, 1, 3) for x in (query, key, value))
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=0.0, is_causal=False, scale=scale
    )
    return out.permute(0, 2, 1, 3)


def kernel_attention(q, k, v, mask, *, scale=None, quant="none", perm=None):
    """The kernel layer's block-sparse attention: ``(out, fallback reason or None, backend that served it)``."""
    result = kernel_ops.run_attention(q, k, v, mask, scale=scale, quant=quant, perm=perm, need_lse=False)
    return result.out, result.fallback, result.backend


class MaskCache:
    """Structural masks keyed by (method config, layout, block size): built once, reused by every layer,
    head and step with the same layout."""

    def __init__(self, max_entries: int = 64):
        self._masks: OrderedDict = OrderedDict()
        self.max_entries = max_entries
        self.builds = 0

    def get(self, method: MethodConfig, layout: TokenLayout, block_size: int) -> BlockMask:
        key = (method, layout, block_size)
        mask = self._masks.get(key)
        if mask is None:
            mask = build_mask(method, layout, block_size)
            self.builds += 1
            self._masks[key] = mask
            if len(self._masks) > self.max_entries:
                self._masks.popitem(last=False)
        else:
            self._masks.move_to_end(key)
        return mask

    def clear(self) -> None:
        self._masks.clear()


@dataclass(frozen=True)
class Shard:
    """What one sequence-parallel rank holds of a self-attention call (:mod:`fastattn.parallel` builds it).

    Args:
        heads: the global head indices of the call's head dim, in order (head table rows are sliced to them).
        seq_len: tokens of the whole sequence (the plan's layout is the whole sequence's).
        ring: None when q, k, v hold the whole sequence in order; else the executor of a query chunk
            (:class:`fastattn.parallel.ring.RingAttention`): q, k, v hold this rank's chunk, and the executor
            computes its rows against every ring rank's keys: ``sparse(q, k, v, mask, scale=, quant=, perm=,
            kernel=) -> (out, fallback, note)``, ``dense(query, key, value, attn_mask, scale, dense_fn) ->
            (out, note)``, ``full(x, dim)`` (the whole sequence gathered) and ``rows(x, dim)``.
    """

    heads: tuple[int, ...]
    seq_len: int
    ring: object = None


@dataclass(frozen=True)
class HeadGroup:
    """One kernel call of a head-table row: the heads that share a bit-width.

    Args:
        quant: the kernel's quant mode for these heads.
        heads: int64 ``[h]`` head indices of the call, or None for every head.
        mask: the row's block lists for these heads (on the host: the kernel layer checks a mask once and
            keeps its device copy).
        perm: int32 ``[h, S]`` token permutation of these heads (PARO axis orders) or None.
    """

    quant: str
    heads: torch.Tensor | None
    mask: BlockMask
    perm: torch.Tensor | None


@dataclass(frozen=True)
class HeadWork:
    """What one self-attention call computes, per head (built once per table row and layout, on the host).

    Everything a call needs is here, so a call reads no tensor values back (no device sync on a GPU).

    Args:
        mask: ``[1, H, nQ, maxK]`` block lists (head-shared ``[.., 1, ..]`` for a uniform plan).
        perm: ``[H, S]`` token permutation (PARO axis orders) or None.
        groups: one :class:`HeadGroup` per bit-width, for the heads computed when the reused heads have a
            cached output.
        all_groups: the same for every head (when nothing is cached yet).
        reused: int64 head indices that return their cached output, or None.
        density: block density of the call when every head is computed; ``density_reusing`` when the reused
            heads come from the cache (they count as zero work).
        all_dense: every head runs the model's exact dense attention (no kernel needed).
        dense_heads: ``(reason, heads)`` for heads the plan gives a method that cannot serve this layout,
            computed with a full mask instead (counted per call in the stats' notes).
        residual_gate: float ``[H]``, 0 for the heads that compute exact attention (every block, no
            quantization) and 1 for the others; None when no head is exact. WA-RS adds its residual
            (captured at another step, with that step's row) only where the output is approximate.
    """

    mask: BlockMask
    perm: torch.Tensor | None
    groups: tuple[HeadGroup, ...]
    all_groups: tuple[HeadGroup, ...]
    reused: torch.Tensor | None
    density: float
    density_reusing: float
    all_dense: bool = False
    dense_heads: tuple[tuple[str, int], ...] = ()
    residual_gate: torch.Tensor | None = None

    def to(self, device: torch.device) -> HeadWork:
        """This work with its head indices on ``device``: copied on the first call there, then kept (a call
        copies nothing). Masks and permutations stay on the host: the kernel layer keeps their device
        copies."""
        if device.type == "cpu":
            return self
        copies = self.__dict__.setdefault("_device_copies", {})
        if device not in copies:

            def move(groups):
                return tuple(g if g.heads is None else replace(g, heads=g.heads.to(device)) for g in groups)

            reused = None if self.reused is None else self.reused.to(device)
            gate = None if self.residual_gate is None else self.residual_gate.to(device)
            groups, all_groups = move(self.groups), move(self.all_groups)
            copies[device] = replace(
                self, groups=groups, all_groups=all_groups, reused=reused, residual_gate=gate
            )
        return copies[device]


class AttentionRuntime:
    """Runs one transformer's attention under an :class:`~fastattn.plans.AttentionPlan`.

    Args:
        plan: what to run.
        num_layers: self-attention calls per forward (resolves negative ``dense_layers``).
        dense_fn: exact dense attention ``(query, key, value, attn_mask, scale) -> out`` on ``[B, S, H, D]``
            (the host's own dense backend, so a dense plan reproduces the unpatched model bit for bit).
        sparse_fn: the block-sparse kernel ``(q, k, v, mask, scale=, quant=, perm=) -> (out, fallback)`` or
            ``(out, fallback, backend)`` (the backend that served the call is counted in ``stats()``);
            tests may swap in a masked-dense oracle.
    """

    def __init__(
        self,
        plan: AttentionPlan,
        num_layers: int | None = None,
        dense_fn: Callable = sdpa_dense,
        sparse_fn: Callable | None = None,
    ):
        self.plan = plan
        self.num_layers = num_layers
        self.dense_fn = dense_fn
        self.sparse_fn = sparse_fn or kernel_attention
        self.stats = AttentionStats()
        self.masks = MaskCache()
        self._head_work: OrderedDict = OrderedDict()
        self._perms: OrderedDict = OrderedDict()  # (layout, axis orders) -> [H, S] permutation
        # layers whose head-table rows reuse a head at some step: their outputs are kept for the next step
        table = plan.heads
        layers = range(table.num_layers) if table is not None else ()
        self._reuse_layers = frozenset(layer for layer in layers if table.reuses_anywhere(layer))
        # Residual sharing (WA-RS): (layer, CFG pass) -> dense - sparse output at the last exact step.
        self.residuals: dict[tuple[int, int], torch.Tensor] = {}
        self.residual_steps: dict[tuple[int, int], int] = {}  # (layer, CFG pass) -> step of its last capture
        self.residual_peak_bytes = 0  # the most residual memory held at once (freed at the end of each run)
        # Dynamic selections kept for reuse_steps: (layer, CFG pass) -> (step, layout, q shape, mask,
        # density).
        self.selections: dict[tuple[int, int], tuple] = {}
        # Head-wise reuse (plan.heads.reuse): (layer, CFG pass) -> the layer's last output [B, H, S, D].
        self.head_outputs: dict[tuple[int, int], torch.Tensor] = {}
        self._observers: list[Callable[[ObservedCall], None]] = []
        # Reuse across steps and CFG branches (plan.cache) within one memory budget, which also bounds the
        # residuals and head outputs above.
        self.cache = RuntimeCache(
            plan.cache, num_layers, plan.cache_budget_gb, plan.cache_storage, plan.cache_offload
        )
        self.cache.store.external_bytes = self._held_bytes
        self._last_step: int | None = None  # step of the last forward (a new run starts at step 0 after another)
        self._step_problems: dict = {}  # num_steps -> plan.step_problem(num_steps), checked once
        # a one_key_mask forward's masks differed: from then on every mask is read
        self._key_masks_differed = False
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ forward bracket (adapter side)
    def begin_forward(self, ctx: ForwardContext) -> ForwardState:
        """Start one transformer forward; pass the returned state with every attention call of it."""
        if not isinstance(ctx, ForwardContext):
            raise TypeError(f"begin_forward takes a ForwardContext, got {type(ctx).__name__}")
        if ctx.step == 0 and self._last_step != 0:
            # A new run (the first pass of step 0, whichever CFG branch runs first): caches of the last run
            # describe other latents.
            self.reset_run()
            self.cache.begin_run()
        self._last_step = ctx.step
        problem = self._step_problems.get(ctx.num_steps, ())
        if problem == ():
            problem = self._step_problems[ctx.num_steps] = self.plan.step_problem(ctx.num_steps)
        if problem is not None:  # a plan that silently does nothing (or ignores a setting) says so
            self.stats.notes[problem] += 1
            if problem not in self._warned:
                self._warned.add(problem)
                warnings.warn(f"fastattn: {problem}", stacklevel=2)
        state = ForwardState(ctx)
        state.blocks = self.cache.blocks.begin_forward(ctx.step, ctx.num_steps, ctx.cfg_branch,
                                                       lambda n: self._skip_layers(state, n))  # fmt: skip
        return state

    @staticmethod
    def _skip_layers(state: ForwardState, n: int) -> None:
        """A skipped block's self-attention calls keep their layer numbers (later layers stay aligned)."""
        state.layer_counter += n

    def end_forward(self, state: ForwardState) -> None:
        ctx = state.ctx
        if state.blocks is not None:
            state.blocks.end()
        if ctx.num_steps and ctx.step >= ctx.num_steps - 1:
            self._end_of_run(ctx.cfg_branch)
        self.stats.forwards += 1
        self.stats.layers_per_forward = state.layer_counter
        if self.num_layers and state.layer_counter not in (0, self.num_layers):
            self.stats.notes[
                f"forward served {state.layer_counter} self-attention calls, the model has {self.num_layers} "
                "layers (layer indices of dense_layers / head tables may be off)"
            ] += 1
        if state.key_masks_differ is not None and bool(state.key_masks_differ):  # one host read per forward
            self._key_masks_differed = True
            raise RuntimeError(
                "fastattn: the host said every self-attention call of this forward gets the same key-padding "
                "mask (ForwardContext.one_key_mask), but the masks differed; the calls after the first were "
                "served with the first call's mask, so this forward's output is wrong. This runtime now reads "
                "every call's mask (exact); run the forward again"
            )

    def _end_of_run(self, branch: int) -> None:
        """The last step of a run is done for this CFG pass: free what it kept for later steps (the other
        pass of the same step still needs its own entries)."""
        for cache in (self.residuals, self.residual_steps, self.selections, self.head_outputs):
            for slot in [s for s in cache if s[1] == branch]:
                del cache[slot]
        self.cache.end_run(branch)

    def reset_run(self) -> None:
        """A new denoising run: drop what the last one cached (residuals, selections, head outputs)."""
        self.residuals.clear()
        self.residual_steps.clear()
        self.selections.clear()
        self.head_outputs.clear()
        self.cache.reset_run()

    def clear(self) -> None:
        """Drop every cache (on disable)."""
        self.reset_run()
        self.masks.clear()
        self._head_work.clear()
        self._perms.clear()

    def residual_bytes(self) -> int:
        return sum(r.numel() * r.element_size() for r in self.residuals.values())

    def _held_bytes(self) -> int:
        """Bytes of residuals and reused heads (kept here, counted in the cache store's budget)."""
        return self.residual_bytes() + sum(t.numel() * t.element_size() for t in self.head_outputs.values())

    def cache_bytes(self) -> int:
        """Every cached tensor: residuals, reused heads, and the cache store (block residuals, shared outputs)."""
        return self.cache.store.total_bytes()

    def reset_stats(self) -> None:
        self.stats.reset()
        self.cache.reset_stats()

    def add_observer(self, fn: Callable[[ObservedCall], None]) -> Callable[[], None]:
        """Call ``fn(ObservedCall)`` after every call the method serves through the kernel; returns the
        function that removes it (the eval probe and calibration observe this way)."""
        self._observers.append(fn)

        def remove():
            if fn in self._observers:
                self._observers.remove(fn)

        return remove

    # ------------------------------------------------------------------ one attention call
    def _layout_for(self, layout: TokenLayout | None, seq_len: int) -> TokenLayout | None:
        if layout is None:
            return None
        if seq_len == layout.seq_len:
            return layout
        if seq_len == layout.image_len and layout.text_len:
            return TokenLayout(seq_len, 0, True, layout.grid)  # image-only attention (e.g. SD3.5 attn2)
        return None

    def call_layout(self, layout: TokenLayout | None, seq_len: int) -> TokenLayout | None:
        """The layout a self-attention call of ``seq_len`` tokens runs on (None: it does not fit, dense)."""
        return self._layout_for(layout, seq_len)

    def _dense(
        self, query, key, value, attn_mask, scale, reason: str, planned: bool, work: float, shard=None
    ):
        self.stats.add_dense(reason, work, planned)
        return self._dense_call(query, key, value, attn_mask, scale, shard)

    def _dense_call(self, query, key, value, attn_mask, scale, shard: Shard | None):
        """The host's dense attention; a ring shard's query rows against the keys of the whole ring."""
        if shard is None or shard.ring is None:
            return self.dense_fn(query, key, value, attn_mask, scale)
        out, note = shard.ring.dense(query, key, value, attn_mask, scale, self.dense_fn)
        if note is not None:
            self.stats.parallel_fallbacks[note] += 1
        return out

    def attend(
        self,
        state: ForwardState | None,
        query,
        key,
        value,
        attn_mask=None,
        scale=None,
        layer: int | None = None,
        shard: Shard | None = None,
    ) -> torch.Tensor:
        """Self-attention of one layer on ``[B, S, H, D]`` tensors; returns ``[B, S, H, D]``.

        ``layer``: the call's self-attention layer index when the adapter knows it; else the calls of this
        forward are numbered in order. Calls with ``S_q != S_kv`` run dense (counted): adapters route only
        self-attention here, this is the safety net.

        ``shard``: under sequence parallelism (:mod:`fastattn.parallel`), which heads of the whole call q, k, v
        hold and, with a ring, which of its query rows; the rank computes exactly those outputs. Observers are
        not called for sharded calls (they would see a part of the call).
        """
        b, s, h, _ = query.shape
        s_kv = key.shape[1]
        if shard is not None:
            if len(shard.heads) != h:
                raise ValueError(f"shard holds {len(shard.heads)} heads, the call's tensors have {h}")
            if shard.ring is not None:
                s_kv = shard.seq_len  # this rank's query rows read every key of the ring
        work = float(b * h * s * s_kv)
        if state is None:
            return self._dense(query, key, value, attn_mask, scale, "no forward context", False, work, shard)
        if shard is None and s_kv != s or shard is not None and key.shape[1] != s:
            reason = "cross-attention (S_q != S_kv)"
            return self._dense(query, key, value, attn_mask, scale, reason, False, work, shard)
        if layer is None:
            layer = state.layer_counter
        state.layer_counter += 1
        ctx = state.ctx
        layout = self._layout_for(ctx.layout, s if shard is None else shard.seq_len)
        if layout is None:
            known = ctx.layout.seq_len if ctx.layout is not None else None
            total = s if shard is None else shard.seq_len
            reason = f"sequence length {total} does not match the model's token layout ({known})"
            return self._dense(query, key, value, attn_mask, scale, reason, False, work, shard)
        if self.cache.attention is not None:
            return self._shared(state, query, key, value, attn_mask, scale, layer, layout, work, shard)
        return self._planned(state, query, key, value, attn_mask, scale, layer, layout, work, shard)

    def _shared(self, state, query, key, value, attn_mask, scale, layer, layout, work, shard=None):
        """Attention output sharing (``plan.cache``): a cached output of an earlier step (AST) or of the other
        CFG branch (ASC), or the planned call, kept when a later call may reuse it."""
        shared, ctx = self.cache.attention, state.ctx
        hit = shared.reuse(layer, ctx, query.shape[:3] + value.shape[-1:])
        if hit is not None:
            self.stats.add_reused(work, hit[1])
            return hit[0]
        split = shared.cfg_rows(layer, ctx, query.shape[0], query.device)
        if split is not None:  # batched CFG: attend for the positive chunk only, copy it to the negative one
            rows, source = split
            sub = [x.index_select(0, rows) for x in (query, key, value)]
            mask = attn_mask
            if mask is not None and mask.dim() and mask.shape[0] == query.shape[0] > 1:
                # one tensor for every call of the forward, so what is read from it is read once
                slot = ("cfg rows", ctx.cfg_chunks, rows.device)
                mask = _once(state, mask, slot, lambda: attn_mask.index_select(0, rows))
            share = len(rows) / query.shape[0]
            part = self._planned(state, *sub, mask, scale, layer, layout, work * share, shard)
            self.stats.add_reused(work * (1.0 - share), "cfg", call=False)
            return part.index_select(0, source)
        out = self._planned(state, query, key, value, attn_mask, scale, layer, layout, work, shard)
        if shared.wants(layer, ctx):
            shared.keep(layer, ctx, out)
        return out

    def _planned(self, state, query, key, value, attn_mask, scale, layer, layout, work, shard=None):
        """What the plan runs for one call: dense by plan, residual sharing, or the method."""
        plan, ctx = self.plan, state.ctx
        planned = plan.dense_reason(layer, self.num_layers, ctx.step, ctx.num_steps)
        capture_now = (
            plan.residual
            and planned == "dense_steps"
            and ctx.step == plan.dense_steps_for(ctx.num_steps) - 1
        )
        if planned is not None and not capture_now:
            return self._dense(query, key, value, attn_mask, scale, planned, True, work, shard)
        if query.dtype == torch.float32 and query.is_cuda:
            return self._dense(query, key, value, attn_mask, scale, "float32 on GPU", False, work, shard)
        call = _Call(ctx, layer, layout, scale, work, shard, state)
        if not plan.residual:
            return self._method(query, key, value, attn_mask, call)
        return self._with_residual(query, key, value, attn_mask, call, capture_now)

    def _with_residual(self, query, key, value, attn_mask, call, capture_now):
        """WA-RS: capture ``R = dense - sparse`` at exact steps, return ``sparse + R`` in between."""
        slot = (call.layer, call.ctx.cfg_branch)
        r = self.residuals.get(slot)
        action = "capture" if capture_now else self.plan.residual_action(call.ctx.step, call.ctx.num_steps)
        if action == "apply" and (r is None or r.shape != query.shape[:3] + value.shape[-1:]):
            action = "capture"  # nothing (or a stale shape) to apply: this call runs exact
        elif action == "apply" and self.plan.residual_refresh_missed(
            self.residual_steps.get(slot), call.ctx.step, call.ctx.num_steps
        ):
            action = "capture"  # a refresh step passed without this layer's call (its block was skipped)
        if action == "capture":
            sparse = self._method(query, key, value, attn_mask, call, count=False)
            dense = self._dense(
                query, key, value, attn_mask, call.scale, "residual capture (WA-RS)", True, call.work,
                call.shard,
            )  # fmt: skip
            # A cache, not part of this call's graph: kept with autograd attached, a later step's backward
            # would reach into this step's freed graph.
            residual = (dense - sparse).detach()
            self.residuals.pop(slot, None)  # the one it replaces does not count against the budget
            # Over cache_budget_gb the residual is not kept: later calls capture (run exact) again.
            if self.cache.store.admit(residual.numel() * residual.element_size(), kind="residual"):
                self.residuals[slot] = residual
                self.residual_steps[slot] = call.ctx.step
            self.residual_peak_bytes = max(self.residual_peak_bytes, self.residual_bytes())
            self.cache.store.note_peak()
            return dense
        out = self._method(query, key, value, attn_mask, call)
        work = self._work_for(call)
        if work is None or work.residual_gate is None:
            return out + r
        if work.all_dense:
            return out  # an exact row gets nothing added
        gate = work.to(r.device).residual_gate  # [H]: a head-table row with some exact heads
        return out + r * gate.to(r.dtype)[:, None]

    def _method(self, query, key, value, attn_mask, call, count: bool = True):
        """The plan's method on ``[B, S, H, D]`` tensors (exact dense where it cannot serve the call)."""
        b, s = query.shape[:2]
        padding = None
        ring = call.shard.ring if call.shard is not None else None
        if attn_mask is not None:
            s_mask = s if ring is None else call.shard.seq_len
            padding, why = self._padding_of(call, attn_mask, b, s_mask)
            if why is not None:
                if not count:
                    return self._dense_call(query, key, value, attn_mask, call.scale, call.shard)
                return self._dense(
                    query, key, value, attn_mask, call.scale, why, False, call.work, call.shard
                )
        work = self._work_for(call)
        if work is not None and work.all_dense:
            reason = "method dense (head table)"
            if not count:
                return self._dense_call(query, key, value, attn_mask, call.scale, call.shard)
            return self._dense(query, key, value, attn_mask, call.scale, reason, True, call.work, call.shard)
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # [B, H, S, D] views, no copy
        if padding is None:
            out = self._sparse(q, k, v, call, work, count)
        elif ring is not None:
            # the kept tokens form a layout of the whole sequence: gathered, computed whole, this rank's rows kept
            self.stats.parallel_fallbacks["ring: key padding: Q/K/V all-gathered, every row computed"] += 1
            whole = dataclasses.replace(call, shard=Shard(call.shard.heads, call.shard.seq_len))
            full = [ring.full(x, 2) for x in (q, k, v)]
            out = ring.rows(self._sparse_key_padding(*full, padding, whole, count), 2)
        else:
            out = self._sparse_key_padding(q, k, v, padding, call, count)
        return out.transpose(1, 2)

    # ------------------------------------------------------------------ per-head work
    def _work_for(self, call) -> HeadWork | None:
        """The call's per-head work from the plan's head table (None: one method for every head)."""
        table = self.plan.heads
        if table is None:
            return None
        group = table.group_of(call.ctx.step, call.ctx.num_steps)
        row = table.heads_at(group, call.layer)
        if call.shard is not None:
            row = tuple(row[h] for h in call.shard.heads)  # this rank's heads only
        return self._row_work(row, call.layout)

    def _row_work(self, row, layout: TokenLayout) -> HeadWork:
        key = (row, layout)
        work = self._head_work.get(key)
        if work is None:
            work = self._build_work(row, layout)
            self._head_work[key] = work
            if len(self._head_work) > 256:
                self._head_work.popitem(last=False)
        return work

    def layer_masks(
        self, layer: int, layout: TokenLayout | None, seq_len: int | None = None
    ) -> list[tuple[float, BlockMask, torch.Tensor | None]] | None:
        """What ``layer`` computes over a run: ``(share of the run, block mask, reused heads bool [H] or None)``
        per head-table step group, or one entry for a structural plan method. ``None`` when it is not known
        ahead of the call (dynamic selection) or the layout does not fit ``seq_len`` tokens.

        What :mod:`fastattn.parallel` balances by (db-SP): one assignment per layer for the whole run, so the
        per-layer caches (head reuse, residuals) always hold the same heads and tokens on a rank.
        """
        if layout is not None and seq_len is not None:
            layout = self._layout_for(layout, seq_len)
        if layout is None:
            return None
        table = self.plan.heads
        if table is None:
            if call_handler(self.plan.method) is not None:
                return None
            return [(1.0, self.masks.get(self.plan.method, layout, self.plan.block_size), None)]
        if not 0 <= layer < table.num_layers:
            return None
        out = []
        for g in range(table.num_groups):
            row = table.heads_at(g, layer)
            reused = torch.tensor([bool(r) for *_, r in row])
            share = table.step_bounds[g + 1] - table.step_bounds[g]
            out.append((share, self._row_work(row, layout).mask, reused if bool(reused.any()) else None))
        return out

    def head_loads(
        self, layer: int, layout: TokenLayout | None, seq_len: int | None = None
    ) -> torch.Tensor | None:
        """Key blocks each head computes in ``layer``: float64 ``[H]``, averaged over the head table's step
        groups by their share of the run (reused heads count zero, dense heads every block). ``None`` without a
        head table (every head does the same work) or when the layout does not fit ``seq_len`` tokens."""
        entries = self.layer_masks(layer, layout, seq_len) if self.plan.heads is not None else None
        if entries is None:
            return None
        heads = self.plan.heads.num_heads
        loads = torch.zeros(heads, dtype=torch.float64)
        for share, mask, reused in entries:
            counts = mask.kv_counts.double()
            per_head = counts.sum(dim=(0, 2)).expand(heads) / counts.shape[0]
            loads += share * (per_head if reused is None else torch.where(reused, 0.0, per_head))
        return loads

    def _build_work(self, row, layout: TokenLayout) -> HeadWork:
        table, bs = self.plan.heads, self.plan.block_size
        masks, orders, quants, reuse = [], [], [], []
        unfit = 0
        for method_i, order_i, quant_i, map_i, reuse_h in row:
            cfg = table.methods[method_i]
            order = AXIS_ORDERS[order_i]
            if order != "FHW" and "order" in {f.name for f in dataclasses.fields(cfg)}:
                cfg = dataclasses.replace(cfg, order=order)  # the window in grid coordinates, reordered
            if isinstance(cfg, BlockMapConfig):
                mask = self._map_mask(map_i, layout)
                unfit += mask is None
                masks.append(mask if mask is not None else self.masks.get(DenseConfig(), layout, bs))
            else:
                masks.append(self.masks.get(cfg, layout, bs))
            orders.append(order)
            quants.append(self.plan.quant if quant_i < 0 else QUANT_MODES[quant_i])
            reuse.append(bool(reuse_h))
        all_dense = all(isinstance(table.methods[m], DenseConfig) for m, *_ in row) and set(quants) == {"none"}
        mask = BlockMask.stack_heads(masks) if len(set(map(id, masks))) > 1 else masks[0]
        reordered = any(o != "FHW" for o in orders)
        perm = self._perm(layout, orders) if reordered else None

        def groups(skip: list[bool]) -> tuple[HeadGroup, ...]:
            """One kernel call per bit-width over the heads not skipped."""
            out = []
            for mode in dict.fromkeys(quants):
                idx = [i for i, m in enumerate(quants) if m == mode and not skip[i]]
                if len(idx) == len(quants):
                    out.append(HeadGroup(mode, None, mask, perm))
                elif idx:
                    sub_perm = self._perm(layout, [orders[i] for i in idx]) if reordered else None
                    heads = torch.tensor(idx)
                    out.append(HeadGroup(mode, heads, _select_heads(mask, heads), sub_perm))
            return tuple(out)

        heads = len(row)
        per_head = _head_densities(mask, heads)
        density = _computed_density(per_head, torch.ones(heads, dtype=torch.bool))
        exact = (per_head == 1.0) & torch.tensor([m == "none" for m in quants])  # every block, unquantized
        return HeadWork(
            mask,
            perm,
            groups(reuse),
            groups([False] * heads),
            torch.tensor(reuse).nonzero().flatten() if any(reuse) else None,
            density,
            _computed_density(per_head, ~torch.tensor(reuse)) if any(reuse) else density,
            all_dense and not any(reuse),
            ((f"blockmap heads on a layout of another block grid than calibrated ({table.map_blocks} blocks): "
              "computed with a full mask", unfit),) if unfit else (),
            (~exact).float() if bool(exact.any()) else None,
        )  # fmt: skip

    def _perm(self, layout: TokenLayout, orders: list[str]) -> torch.Tensor:
        """int32 ``[H, S]`` permutation of these axis orders: one tensor per (layout, orders), shared by every
        row and head group with them (the kernel layer checks a permutation and copies it to the device
        once)."""
        key = (layout, tuple(orders))
        perm = self._perms.get(key)
        if perm is None:
            perm = self._perms[key] = head_permutations(layout, orders)
            if len(self._perms) > 1024:
                self._perms.popitem(last=False)
        return perm

    def _map_mask(self, map_i: int, layout: TokenLayout) -> BlockMask | None:
        """A ``blockmap`` head's mask: its stored map (already in the head's axis order), or None when the
        map's block grid is not this layout's (another resolution, or text padding dropped)."""
        maps, bs = self.plan.heads.block_maps, self.plan.block_size
        if maps.shape[-1] != BlockGeometry(layout, bs).num_blocks:
            return None
        return BlockMask.from_block_map(maps[map_i], layout, bs)

    def _sparse(self, q, k, v, call, work: HeadWork | None, count: bool = True):
        plan = self.plan
        if work is None:
            select = call_handler(plan.method)
            if select is not None:
                qs, ks = q, k
                if call.shard is not None and call.shard.ring is not None:
                    # the selection pools every query and key block of the whole sequence
                    qs, ks = call.shard.ring.full(q, 2), call.shard.ring.full(k, 2)
                    self.stats.parallel_fallbacks["ring: dynamic selection: Q/K all-gathered to select"] += 1
                mask, density = self._selection(select, qs, ks, call)
            else:
                mask = self.masks.get(plan.method, call.layout, plan.block_size)
                density = mask.block_density()
            out, fallback = self._kernel(q, k, v, mask, call.scale, plan.quant, None, call.shard)
        else:
            out, fallback, density = self._per_head(q, k, v, call, work)
        if not count:
            return out  # the companion sparse call of a residual capture, which counts as one dense call
        if fallback is not None:
            self.stats.add_dense(f"kernel: {fallback}", call.work, False)
        else:
            self.stats.add_sparse(call.work, density)
            if not q.is_cuda:
                self.stats.notes[CPU_NOTE] += 1
            if self._observers and call.shard is None:
                seen = ObservedCall(call.ctx, call.layer, q, k, v, out, call.scale, density, plan.quant)
                for fn in list(self._observers):
                    fn(seen)
        return out

    def _kernel(self, q, k, v, mask, scale, quant, perm, shard: Shard | None = None):
        if quant != "none" and not q.is_cuda:
            # The CPU reference's quantizer views q/k as contiguous; the GPU kernel takes any strides.
            q, k, v = (x.contiguous() for x in (q, k, v))
        if shard is None or shard.ring is None:
            out, fallback, *served = self.sparse_fn(q, k, v, mask, scale=scale, quant=quant, perm=perm)
            if served:
                self.stats.kernel_backends[served[0]] += 1
            return out, fallback
        out, fallback, note = shard.ring.sparse(
            q, k, v, mask, scale=scale, quant=quant, perm=perm, kernel=self.sparse_fn
        )
        if note is not None:
            self.stats.parallel_fallbacks[note] += 1
        return out, fallback

    def _per_head(self, q, k, v, call, work: HeadWork):
        """Run a head table's row: one kernel call per bit-width group, reused heads from the cache."""
        slot = (call.layer, call.ctx.cfg_branch)
        work = work.to(q.device)
        reused, groups, density = work.reused, work.groups, work.density_reusing
        cached = self.head_outputs.get(slot) if reused is not None else None
        if reused is not None and (cached is None or cached.shape != q.shape[:3] + v.shape[-1:]):
            self.stats.notes["head reuse with nothing cached yet: computed"] += 1
            reused, groups, density = None, work.all_groups, work.density
        whole = len(groups) == 1 and groups[0].heads is None  # one kernel call returns the whole output
        out = None if whole else torch.empty(q.shape[:3] + v.shape[-1:], dtype=q.dtype, device=q.device)
        fallback = None
        for group in groups:
            mask, quant, perm = group.mask, group.quant, group.perm
            if group.heads is None:
                out, fallback = self._kernel(q, k, v, mask, call.scale, quant, perm, call.shard)
                continue
            sub = [x.index_select(1, group.heads) for x in (q, k, v)]
            part, why = self._kernel(*sub, mask, call.scale, quant, perm, call.shard)
            fallback = fallback or why
            out.index_copy_(1, group.heads, part)
        if reused is not None:
            out.index_copy_(1, reused, cached.index_select(1, reused))
            self.stats.head_reuses += reused.numel()
        if call.layer in self._reuse_layers:
            self.head_outputs.pop(slot, None)
            if self.cache.store.admit(out.numel() * out.element_size(), kind="heads"):
                self.head_outputs[slot] = out.detach()  # else over cache_budget_gb: the next step computes
                self.cache.store.note_peak()
        for reason, heads in work.dense_heads:
            self.stats.notes[reason] += heads
        return out, fallback, density

    def _selection(self, select, q, k, call) -> tuple[BlockMask, torch.Tensor]:
        """The per-call block selection of a dynamic method and its block density (a 0-d float64 tensor on the
        mask's device, summed there by the stats: no host sync per call): computed by its handler, or reused
        from an earlier step of the same layer and CFG pass (``reuse_steps``) when the layout and shapes are
        unchanged."""
        cfg = self.plan.method
        ctx = call.ctx
        reuse_steps = getattr(cfg, "reuse_steps", 1)
        slot = (call.layer, ctx.cfg_branch) if reuse_steps > 1 else None
        if slot is not None:
            hit = self.selections.get(slot)
            if hit is not None:
                step, lay, shape, mask, density = hit
                if lay == call.layout and shape == q.shape and 0 <= ctx.step - step < reuse_steps:
                    self.stats.selection_reuses += 1
                    return mask, density
        mask = select(cfg, q, k, call.layout, self.plan.block_size, call.scale)
        density = mask.block_density_tensor().double()  # float64, as the stats sum it
        self.stats.selections += 1
        if slot is not None:
            self.selections[slot] = (ctx.step, call.layout, q.shape, mask, density)
        return mask, density

    def _padding_of(self, call, attn_mask: torch.Tensor, b: int, s: int):
        """What ``attn_mask`` asks of the call (:func:`_key_padding`), read from its values once per forward:
        once per mask tensor, or once for every mask of the forward when the host says they are all alike
        (``ForwardContext.one_key_mask``: each later mask is compared with the first on the device)."""
        state = call.state
        layout = call.layout
        if state is None or not state.ctx.one_key_mask or self._key_masks_differed:
            slot = ("key padding", b, s, layout)
            return _once(state, attn_mask, slot, lambda: _key_padding(attn_mask, b, s, layout))
        slot = ("one key mask", tuple(attn_mask.shape), attn_mask.dtype, attn_mask.device, b, s, layout)
        first = state.masks.get(slot)
        if first is None:
            first = state.masks[slot] = (attn_mask, _key_padding(attn_mask, b, s, layout))
        elif first[0] is not attn_mask:
            differs = (attn_mask != first[0]).any()  # stays on the device: end_forward reads it once
            seen = state.key_masks_differ
            state.key_masks_differ = differs if seen is None else seen | differs
        return first[1]

    def _sparse_key_padding(self, q, k, v, padding: KeyPadding, call, count: bool = True):
        """Exact attention under a key-padding mask: sparse over the kept tokens, dense for dropped rows.

        Dropped tokens are text padding: the kept tokens form a shorter layout with fewer text tokens;
        query rows of dropped tokens read every kept key, as the masked dense model computes them.
        """
        layout = call.layout
        out = torch.empty_like(q)
        for sl, idx, dropped in padding.groups:
            n_keep = idx.numel()
            drop_text = layout.seq_len - n_keep
            sub = TokenLayout(n_keep, layout.text_len - drop_text, layout.text_first, layout.grid)
            qk, kk, vk = (x[sl].index_select(2, idx) for x in (q, k, v))
            sub_call = dataclasses.replace(call, layout=sub, work=call.work * n_keep**2 / layout.seq_len**2)
            out[sl].index_copy_(2, idx, self._sparse(qk, kk, vk, sub_call, self._work_for(sub_call), count))
            if drop_text:
                qd = q[sl].index_select(2, dropped)
                out[sl].index_copy_(2, dropped, F.scaled_dot_product_attention(qd, kk, vk, scale=call.scale))
        return out


@dataclass(frozen=True)
class _Call:
    """One self-attention call as the runtime sees it."""

    ctx: ForwardContext
    layer: int
    layout: TokenLayout
    scale: float | None
    work: float  # score entries B * H * S_q * S_kv
    shard: Shard | None = None  # what a sequence-parallel rank holds of the call
    state: ForwardState | None = None  # the forward it belongs to (what its masks ask is kept there)


def _select_heads(mask: BlockMask, idx: torch.Tensor) -> BlockMask:
    """The mask's rows for heads ``idx`` (a head-shared mask serves any subset as is)."""
    counts, indices = mask.kv_counts, mask.kv_indices
    if counts.dim() < 3 or counts.shape[-2] == 1:
        return mask
    i = idx.to(counts.device)
    return BlockMask(
        counts.index_select(-2, i).contiguous(), indices.index_select(-3, i).contiguous(), mask.layout, mask.block_size
    )


def _head_densities(mask: BlockMask, heads: int) -> torch.Tensor:
    """float64 ``[heads]``: each head's block density (reads the mask: once per piece of work, on the host)."""
    counts = mask.kv_counts.double()
    n = mask.num_blocks
    if counts.dim() >= 3 and counts.shape[-2] == heads:
        return counts.mean(dim=tuple(d for d in range(counts.dim()) if d != counts.dim() - 2)).cpu() / n
    return torch.full((heads,), float(counts.mean()) / n, dtype=torch.float64)


def _computed_density(per_head: torch.Tensor, computed: torch.Tensor) -> float:
    """Block density over all heads, counting heads that were not computed (reused) as zero work."""
    return float((per_head * computed.double()).sum() / per_head.numel())


@dataclass(frozen=True)
class KeyPadding:
    """What a key-padding mask that drops only text keys asks of a call (read from its values once).

    Args:
        groups: per group of batch rows that keep the same keys, ``(rows, kept, dropped)``: a slice of the
            batch, the kept token indices and the dropped ones (int64, in token order, on the mask's device;
            ``dropped`` is None when the group keeps every token).
    """

    groups: tuple[tuple[slice, torch.Tensor, torch.Tensor | None], ...]


def _once(state: ForwardState | None, mask: torch.Tensor, key: tuple, compute: Callable):
    """``compute()``, once per forward for this mask tensor and ``key``.

    Hosts pass every self-attention call of a forward the same mask tensor (HunyuanVideo builds one per
    forward), so what one call reads from its values (on a GPU each read waits for the device) holds for the
    others. The entry keeps the tensor (so its id stays its own while the forward runs) and its version (an
    in-place edit computes again; inference tensors have no version: their id decides alone).
    """
    if state is None:
        return compute()
    version = None if mask.is_inference() else mask._version
    slot = (id(mask), *key)
    hit = state.masks.get(slot)
    if hit is None or hit[1] != version:
        hit = state.masks[slot] = (mask, version, compute())
    return hit[2]


def _key_padding(attn_mask: torch.Tensor, b: int, s: int, layout: TokenLayout):
    """``(KeyPadding, None)`` when ``attn_mask`` only removes text keys, ``(None, None)`` when it removes
    nothing, else ``(None, reason)``. Reads the mask's values once (a device sync on a GPU)."""
    m = attn_mask
    if m.dtype != torch.bool:
        return None, f"attn_mask of dtype {m.dtype} (only boolean key-padding masks are served sparse)"
    if m.dim() == 4 and m.shape[1] == 1 and m.shape[2] == 1:
        m = m[:, 0, 0]
    elif m.dim() != 2:
        return None, f"attn_mask of shape {tuple(attn_mask.shape)} is not a key-padding mask [B, 1, 1, S]"
    if m.shape[-1] != s:
        return None, f"attn_mask covers {m.shape[-1]} keys, attention has {s}"
    keep = m.expand(b, s)
    img = keep[:, layout.image_start : layout.image_start + layout.image_len]
    # Everything needed from the values in one read: image tokens all kept, batch rows alike, kept per row.
    facts = torch.cat([img.all().reshape(1), (keep == keep[:1]).all().reshape(1), keep.sum(dim=1)])
    image_kept, alike, *kept = facts.tolist()
    if not image_kept:
        return None, "attn_mask masks image tokens (only text padding is served sparse)"
    if min(kept) == s:
        return None, None  # nothing masked: plain sparse call
    groups = []
    for rows in [slice(0, b)] if alike else [slice(i, i + 1) for i in range(b)]:
        n = kept[rows.start]
        # kept tokens first, then dropped ones, each in token order (a stable sort: nonzero would read again)
        order = torch.argsort(keep[rows.start].logical_not().to(torch.uint8), stable=True)
        groups.append((rows, order[:n], order[n:] if n < s else None))
    return KeyPadding(tuple(groups)), None
