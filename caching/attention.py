"""Attention-level caching (DiTFastAttn): reuse a layer's attention output across steps (AST) and across the
CFG branches of a step (ASC).

Host-neutral; the runtime asks it per self-attention call, after deciding the layer index and before running
the plan's method, so whatever a computed call runs (sparse, quantized, dense) is what later calls reuse:

- :meth:`AttentionCache.reuse`: a cached output for this call, or None;
- :meth:`AttentionCache.cfg_rows`: with batched CFG, which batch rows to compute and where to copy them;
- :meth:`AttentionCache.keep`: store a computed output when a later call may reuse it.

Outputs are ``[B, S, H, D]`` (the attention before the output projection: the projection of a reused
output equals the reused projection, and the attention is the part that costs). Entries are keyed by layer
and CFG branch (AST) or by layer (ASC) and tagged with the step, so a value is never reused across runs,
layers or shapes.
"""

from __future__ import annotations

from collections import Counter

import torch

from .config import CacheConfig, steps_for
from .store import CacheStore


class AttentionCache:
    """AST and ASC for one transformer's self-attention layers.

    Args:
        config: the plan's cache config (``attn_share_interval``, ``cfg_share``, their layers, the window).
        store: where outputs are kept (bounded by the plan's budget).
        num_layers: self-attention layers per forward (resolves negative layer indices).
    """

    def __init__(self, config: CacheConfig, store: CacheStore, num_layers: int | None):
        self.config = config
        self.store = store
        n = num_layers or 0
        self.ast_layers = {i if i >= 0 else n + i for i in config.attn_share_layers} or None
        self.asc_layers = {i if i >= 0 else n + i for i in config.cfg_share_layers} or None
        self.step_reuses = 0  # AST hits
        self.cfg_reuses = 0  # ASC hits (a two-pass branch, or the copied rows of a batched call)
        self.recomputes: Counter = Counter()  # wanted to reuse, computed: why
        self._rows: dict = {}  # (cfg chunks, batch, device) -> cfg_rows' index tensors on that device

    # ------------------------------------------------------------------ which calls
    def _ast(self, layer: int) -> bool:
        return self.config.attn_share_interval > 0 and (self.ast_layers is None or layer in self.ast_layers)

    def _asc(self, layer: int) -> bool:
        return self.config.cfg_share and (self.asc_layers is None or layer in self.asc_layers)

    def _reuse_step(self, step: int, num_steps: int | None) -> bool:
        """AST: a window step that is not one of the every-k-th computed ones."""
        cfg = self.config
        first = steps_for(cfg.first_steps, num_steps)
        return cfg.in_window(step, num_steps) and (step - first) % cfg.attn_share_interval != 0

    # ------------------------------------------------------------------ per call
    def reuse(self, layer: int, ctx, shape) -> tuple[torch.Tensor, str] | None:
        """``(output, "step" | "cfg")`` when this call returns a cached output, else None."""
        step, n = ctx.step, ctx.num_steps
        if self._ast(layer) and self._reuse_step(step, n):
            key = ("ast", layer, ctx.cfg_branch)
            tag = self.store.tag(key)
            out = self.store.get(key, shape=shape) if tag is not None and tag < step else None
            if out is not None:
                self.step_reuses += 1
                return out, "step"
            self.recomputes[self._why(key, shape, "AST")] += 1
        if self._asc(layer) and ctx.cfg_chunks is None and self.config.in_window(step, n):
            tag = self.store.tag(("asc", layer))
            if tag is not None and tag[:2] == (step, ctx.sigma) and tag[2] != ctx.cfg_branch:
                out = self.store.get(("asc", layer), shape=shape)
                if out is not None:
                    self.cfg_reuses += 1
                    return out, "cfg"
                self.recomputes["ASC: shape differs between the CFG passes"] += 1
        return None

    def cfg_rows(
        self, layer: int, ctx, batch: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Batched CFG with ASC: ``(rows to compute, for every row the computed row it takes)`` as int64 tensors
        on ``device``, or None.

        ``ctx.cfg_chunks`` names the branch of each equal batch chunk (0 positive, 1 negative); the positive
        chunk is computed and every negative chunk takes its rows. The index tensors are built once per
        (chunks, batch, device) and kept: a copy of host indices to a GPU per call would wait for the device."""
        chunks = ctx.cfg_chunks
        if not self._asc(layer) or not chunks or not self.config.in_window(ctx.step, ctx.num_steps):
            return None
        if 0 not in chunks or 1 not in chunks or batch % len(chunks):
            self.recomputes["ASC: batch does not split into the CFG chunks"] += 1
            return None
        self.cfg_reuses += sum(1 for c in chunks if c != 0)
        key = (chunks, batch, device)
        split = self._rows.get(key)
        if split is None:
            size = batch // len(chunks)
            cond = chunks.index(0)
            rows = torch.arange(cond * size, (cond + 1) * size)
            source = torch.arange(batch) % size  # row r of every chunk takes row r of the computed chunk
            split = self._rows[key] = (rows.to(device), source.to(device))
        return split

    def wants(self, layer: int, ctx) -> bool:
        """Whether a computed output of this call may be reused later (so :meth:`keep` it)."""
        step, n = ctx.step, ctx.num_steps
        if self._ast(layer) and self._reuse_step(step + 1, n):
            return True
        return self._asc(layer) and ctx.cfg_chunks is None and self.config.in_window(step, n)

    def keep(self, layer: int, ctx, out: torch.Tensor) -> None:
        step, n = ctx.step, ctx.num_steps
        if self._ast(layer) and self._reuse_step(step + 1, n):
            self.store.put(("ast", layer, ctx.cfg_branch), out, step)
        if self._asc(layer) and ctx.cfg_chunks is None and self.config.in_window(step, n):
            self.store.put(("asc", layer), out, (step, ctx.sigma, ctx.cfg_branch))

    def _why(self, key, shape, what: str) -> str:
        got = self.store.shape(key)
        if got is None:
            refused = self.store.refused.get(key[0], 0)
            return f"{what}: not cached (over cache_budget_gb)" if refused else f"{what}: nothing cached yet"
        if got != tuple(shape):
            return f"{what}: shape changed"
        return f"{what}: cached at this step"

    def reset_stats(self) -> None:
        self.step_reuses = self.cfg_reuses = 0
        self.recomputes.clear()

    def reset_run(self) -> None:
        for kind in ("ast", "asc"):
            for key in self.store.keys(kind):
                self.store.drop(key)

    def as_dict(self) -> dict:
        return {
            "step_reuses": self.step_reuses,
            "cfg_reuses": self.cfg_reuses,
            "recomputes": dict(self.recomputes),
        }
