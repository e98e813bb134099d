"""The runtime: per attention call, decide dense or sparse, build/cached masks, call the kernels.

One :class:`AttentionRuntime` exists per enabled transformer. The adapter calls :meth:`begin_forward` at
the start of every transformer forward (layout, timestep) and :meth:`end_forward` at its end; in between,
every attention call of that model reaches :func:`runtime_attention` (a ``torch.library`` custom op, so a
compiled graph holds one opaque node per call and nothing per layer: no recompiles per layer, and the
Python decisions below always run eagerly, so stats stay right under ``torch.compile``).

The layer index is the order of self-attention calls within the forward. Cross-attention calls
(``S_q != S_kv``) are served dense and counted as fallbacks.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..attn_kernels import ops as kernel_ops
from ..masks.block_mask import BlockMask
from ..masks.layout import TokenLayout
from .context import AttentionContext, ForwardState, StepTracker
from .dynamic import select_blocks
from .methods import build_mask
from .plan import AttentionPlan
from .stats import AttentionStats

# Calls that reached the op with no enabled model running (e.g. the backend selected by hand).
ORPHAN_FALLBACKS: Counter = Counter()

_current: AttentionRuntime | None = None


def current_runtime() -> AttentionRuntime | None:
    return _current


def sdpa_dense(query, key, value, attn_mask=None, scale=None):
    """Exact dense attention on ``[B, S, H, D]`` tensors, as diffusers' ``native`` backend computes it."""
    q, k, v = (x.permute(0, 2, 1, 3) for x in (query, key, value))
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=0.0, is_causal=False, scale=scale
    )
    return out.permute(0, 2, 1, 3)


class MaskCache:
    """Structural masks keyed by (method config, layout, block size): built once, reused by every layer
    and step with the same layout."""

    def __init__(self, max_entries: int = 32):
        self._masks: OrderedDict = OrderedDict()
        self.max_entries = max_entries
        self.builds = 0

    def get(self, plan: AttentionPlan, layout: TokenLayout) -> BlockMask:
        key = (plan.method, layout, plan.block_size)
        mask = self._masks.get(key)
        if mask is None:
            mask = build_mask(plan.method, layout, plan.block_size)
            self.builds += 1
            self._masks[key] = mask
            if len(self._masks) > self.max_entries:
                self._masks.popitem(last=False)
        else:
            self._masks.move_to_end(key)
        return mask

    def clear(self) -> None:
        self._masks.clear()


class AttentionRuntime:
    """Runs one transformer's attention under an :class:`AttentionPlan`.

    Args:
        plan: what to run.
        num_layers: self-attention calls per forward (resolves negative ``dense_layers``).
        dense_fn: exact dense attention ``(query, key, value, attn_mask, scale) -> out`` on ``[B, S, H, D]``
            (the host's own dense backend, so a dense plan reproduces the unpatched model bit for bit).
        num_steps: callable returning the denoising step count of the running pipeline call, or None.
    """

    def __init__(
        self,
        plan: AttentionPlan,
        num_layers: int | None = None,
        dense_fn: Callable = sdpa_dense,
        num_steps: Callable[[], int | None] | None = None,
        sparse_fn: Callable | None = None,
    ):
        self.plan = plan
        self.num_layers = num_layers
        self.dense_fn = dense_fn
        self.num_steps = num_steps or (lambda: None)
        # The block-sparse kernel; tests may swap in a masked-dense oracle.
        self.sparse_fn = sparse_fn or kernel_ops.sparse_attention
        self.tracker = StepTracker()
        self.stats = AttentionStats()
        self.masks = MaskCache()
        self.state: ForwardState | None = None
        # Residual sharing (WA-RS): (layer, CFG pass) -> dense - sparse output at the last exact step.
        self.residuals: dict[tuple[int, int], torch.Tensor] = {}
        self.residual_peak_bytes = 0  # the most residual memory held at once (freed at the end of each run)
        # Dynamic selections kept for reuse_steps: (layer, CFG pass) -> (step, layout, q shape, mask).
        self.selections: dict[tuple[int, int], tuple] = {}
        self._outer: AttentionRuntime | None = None

    # ------------------------------------------------------------------ forward bracket (adapter side)
    def begin_forward(self, layout: TokenLayout | None, timestep: float | None) -> None:
        global _current
        step, branch = self.tracker.advance(timestep)
        self.state = ForwardState(layout, step, self.num_steps(), branch, timestep)
        if step == 0 and branch == 0:
            self.residuals.clear()  # a new run: residuals of the last one describe other latents
            self.selections.clear()
        self._outer, _current = _current, self

    def end_forward(self) -> None:
        global _current
        if self.state is not None:
            self.stats.forwards += 1
            self.stats.layers_per_forward = self.state.layer_counter
        self.state = None
        _current, self._outer = self._outer, None

    def reset_run(self) -> None:
        """End of a pipeline call: the next forward is step 0 of a new run."""
        self.tracker.reset()
        self.residuals.clear()
        self.selections.clear()

    def residual_bytes(self) -> int:
        return sum(r.numel() * r.element_size() for r in self.residuals.values())

    # ------------------------------------------------------------------ one attention call
    def _layout_for(self, seq_len: int) -> TokenLayout | None:
        lay = self.state.layout if self.state is not None else None
        if lay is None:
            return None
        if seq_len == lay.seq_len:
            return lay
        if seq_len == lay.image_len and lay.text_len:
            return TokenLayout(seq_len, 0, True, lay.grid)  # image-only attention (e.g. SD3.5 attn2)
        return None

    def _dense(self, query, key, value, attn_mask, scale, reason: str, planned: bool, work: float):
        self.stats.add_dense(reason, work, planned)
        return self.dense_fn(query, key, value, attn_mask, scale)

    def attend(self, query, key, value, attn_mask=None, scale=None) -> torch.Tensor:
        """Attention on diffusers-layout tensors ``[B, S, H, D]``; returns ``[B, S, H, D]``."""
        b, s, h, _ = query.shape
        s_kv = key.shape[1]
        work = float(b * h * s * s_kv)
        if s_kv != s:
            return self._dense(
                query, key, value, attn_mask, scale, "cross-attention (S_q != S_kv)", False, work
            )
        if self.state is None:
            return self._dense(query, key, value, attn_mask, scale, "no forward context", False, work)
        layer = self.state.layer_counter
        self.state.layer_counter += 1
        layout = self._layout_for(s)
        if layout is None:
            known = self.state.layout.seq_len if self.state.layout is not None else None
            reason = f"sequence length {s} does not match the model's token layout ({known})"
            return self._dense(query, key, value, attn_mask, scale, reason, False, work)
        st = self.state
        ctx = AttentionContext(layer, st.step, st.num_steps, st.cfg_branch, layout, st.timestep)
        plan = self.plan
        planned = plan.dense_reason(ctx, self.num_layers)
        capture_now = plan.residual and planned == "dense_steps" and ctx.step == plan.dense_steps - 1
        if planned is not None and not capture_now:
            return self._dense(query, key, value, attn_mask, scale, planned, True, work)
        if query.dtype == torch.float32 and query.is_cuda:
            return self._dense(query, key, value, attn_mask, scale, "float32 on GPU", False, work)
        if not plan.residual:
            return self._method(query, key, value, attn_mask, scale, layout, work, ctx=ctx)
        return self._with_residual(query, key, value, attn_mask, scale, layout, work, ctx, capture_now)

    def _with_residual(self, query, key, value, attn_mask, scale, layout, work, ctx, capture_now):
        """WA-RS: capture ``R = dense - sparse`` at exact steps, return ``sparse + R`` in between."""
        slot = (ctx.layer, ctx.cfg_branch)
        r = self.residuals.get(slot)
        action = "capture" if capture_now else self.plan.residual_action(ctx)
        if action == "apply" and (r is None or r.shape != query.shape[:3] + value.shape[-1:]):
            action = "capture"  # nothing (or a stale shape) to apply: this call runs exact
        if action == "capture":
            sparse = self._method(query, key, value, attn_mask, scale, layout, work, count=False, ctx=ctx)
            dense = self._dense(query, key, value, attn_mask, scale, "residual capture (WA-RS)", True, work)
            self.residuals[slot] = dense - sparse
            self.residual_peak_bytes = max(self.residual_peak_bytes, self.residual_bytes())
            return dense
        return self._method(query, key, value, attn_mask, scale, layout, work, ctx=ctx) + r

    def _method(self, query, key, value, attn_mask, scale, layout, work, count: bool = True, ctx=None):
        """The plan's method on ``[B, S, H, D]`` tensors (exact dense where it cannot serve the call)."""
        b, s = query.shape[:2]
        keep = None
        if attn_mask is not None:
            keep, why = _key_padding(attn_mask, b, s, layout)
            if why is not None:
                if not count:
                    return self.dense_fn(query, key, value, attn_mask, scale)
                return self._dense(query, key, value, attn_mask, scale, why, False, work)
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # [B, H, S, D] views, no copy
        if keep is None:
            out = self._sparse(q, k, v, layout, scale, work, count, ctx)
        else:
            out = self._sparse_key_padding(q, k, v, keep, layout, scale, work, count)
        return out.transpose(1, 2)

    def _sparse(self, q, k, v, layout, scale, work, count: bool = True, ctx=None):
        plan = self.plan
        if plan.method.dynamic:
            mask = self._selection(q, k, layout, scale, ctx)
        else:
            mask = self.masks.get(plan, layout)
        if plan.quant != "none" and not q.is_cuda:
            # The CPU reference's quantizer views q/k as contiguous (kernels/quantize.py); the GPU kernel
            # takes any strides. Copy only on the CPU path.
            q, k, v = (x.contiguous() for x in (q, k, v))
        before = kernel_ops.fallback_counts()
        out = self.sparse_fn(q, k, v, mask, scale=scale, quant=plan.quant)
        after = kernel_ops.fallback_counts()
        kernel = {r: n - before.get(r, 0) for r, n in after.items() if n != before.get(r, 0)}
        if not count:
            return out  # the companion sparse call of a residual capture, which counts as one dense call
        if kernel:
            for reason, n in kernel.items():
                self.stats.add_dense(f"kernel: {reason}", work / max(1, sum(kernel.values())) * n, False)
        else:
            density = mask.block_density_tensor() if plan.method.dynamic else mask.block_density()
            self.stats.add_sparse(work, density)
        return out

    def _selection(self, q, k, layout, scale, ctx) -> BlockMask:
        """The dynamic block selection for this call: computed, or reused from an earlier step of the same layer
        and CFG pass (``reuse_steps``) when the layout and shapes are unchanged."""
        cfg = self.plan.method
        slot = (ctx.layer, ctx.cfg_branch) if ctx is not None and cfg.reuse_steps > 1 else None
        if slot is not None:
            hit = self.selections.get(slot)
            if hit is not None:
                step, lay, shape, mask = hit
                if lay == layout and shape == q.shape and 0 <= ctx.step - step < cfg.reuse_steps:
                    self.stats.selection_reuses += 1
                    return mask
        mask = select_blocks(q, k, layout, cfg, self.plan.block_size, scale)
        self.stats.selections += 1
        if slot is not None:
            self.selections[slot] = (ctx.step, layout, q.shape, mask)
        return mask

    def _sparse_key_padding(self, q, k, v, keep, layout, scale, work, count: bool = True):
        """Exact attention under a key-padding mask: sparse over the kept tokens, dense for dropped rows.

        Dropped tokens are text padding: the kept tokens form a shorter layout with fewer text tokens;
        query rows of dropped tokens read every kept key, as the masked dense model computes them.
        """
        out = torch.empty_like(q)
        rows = (
            [slice(0, q.shape[0])]
            if bool((keep == keep[:1]).all())
            else [slice(i, i + 1) for i in range(q.shape[0])]
        )
        for sl in rows:
            idx = keep[sl.start].nonzero().flatten()
            n_keep = idx.numel()
            drop_text = layout.seq_len - n_keep
            sub = TokenLayout(n_keep, layout.text_len - drop_text, layout.text_first, layout.grid)
            qk, kk, vk = (x[sl].index_select(2, idx) for x in (q, k, v))
            out[sl].index_copy_(
                2, idx, self._sparse(qk, kk, vk, sub, scale, work * n_keep**2 / layout.seq_len**2, count)
            )
            if drop_text:
                dropped = (~keep[sl.start]).nonzero().flatten()
                qd = q[sl].index_select(2, dropped)
                out[sl].index_copy_(2, dropped, F.scaled_dot_product_attention(qd, kk, vk, scale=scale))
        return out


def _key_padding(attn_mask: torch.Tensor, b: int, s: int, layout: TokenLayout):
    """``(keep [B, S] bool, None)`` when ``attn_mask`` only removes text keys, else ``(None, reason)``."""
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
    img = slice(layout.image_start, layout.image_start + layout.image_len)
    if not bool(keep[:, img].all()):
        return None, "attn_mask masks image tokens (only text padding is served sparse)"
    if bool(keep.all()):
        return None, None  # nothing masked: plain sparse call
    return keep, None


# ---------------------------------------------------------------------------------------- custom op


@torch.library.custom_op("fastattn::runtime_attention", mutates_args=())
def runtime_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float | None,
) -> torch.Tensor:
    """Attention of the running fastattn model on ``[B, S, H, D]`` tensors (opaque to torch.compile)."""
    rt = _current
    if rt is None:
        ORPHAN_FALLBACKS["no enabled model is running"] += 1
        out = sdpa_dense(query, key, value, attn_mask, scale)
    else:
        out = rt.attend(query, key, value, attn_mask, scale)
    return out.contiguous()


@runtime_attention.register_fake
def _(query, key, value, attn_mask, scale):
    b, s, h, _ = query.shape
    return query.new_empty((b, s, h, value.shape[-1]))
