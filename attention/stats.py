"""Counters the runtime keeps: what ran, how sparse, and every dense fallback with its reason."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch


@dataclass
class AttentionStats:
    """Per-handle counters. Attention work is counted in score-matrix entries ``B * H * S_q * S_kv``."""

    calls: int = 0
    sparse_calls: int = 0
    planned_dense: Counter = field(default_factory=Counter)  # dense because the plan says so
    fallbacks: Counter = field(default_factory=Counter)  # dense because the method could not serve it
    work_total: float = 0.0  # score entries of every self-attention call
    work_done: float = 0.0  # entries actually computed
    forwards: int = 0
    layers_per_forward: int | None = None
    pending_work: torch.Tensor | None = None  # device-side sum of dynamic masks' computed work
    selections: int = 0  # dynamic block selections computed
    selection_reuses: int = 0  # dynamic calls that reused an earlier step's selection (reuse_steps)
    head_reuses: int = 0  # heads that returned their cached output (head table reuse)
    reused_calls: int = 0  # calls that returned a cached output (plan.cache: AST / ASC)
    reuses: Counter = field(default_factory=Counter)  # cached outputs returned, by kind ("step", "cfg")
    notes: Counter = field(default_factory=Counter)  # what the runtime noticed (layer count mismatches...)
    # sequence parallelism: calls a rank served another way than its share of the plan (K/V all-gathered...)
    parallel_fallbacks: Counter = field(default_factory=Counter)
    kernel_backends: Counter = field(default_factory=Counter)  # kernel calls by the backend that served them

    def add_dense(self, reason: str, work: float, planned: bool) -> None:
        self.calls += 1
        (self.planned_dense if planned else self.fallbacks)[reason] += 1
        self.work_total += work
        self.work_done += work

    def add_reused(self, work: float, kind: str, call: bool = True) -> None:
        """``work`` served from a cached output (none of it computed); ``call=False``: part of a call already
        counted (the copied half of a batched CFG call)."""
        if call:
            self.calls += 1
            self.reused_calls += 1
        self.reuses[kind] += 1
        self.work_total += work

    def add_sparse(self, work: float, block_density) -> None:
        """``block_density`` is a float, or a 0-d device tensor (summed on the device, read in as_dict:
        no host sync per call)."""
        self.calls += 1
        self.sparse_calls += 1
        self.work_total += work
        if isinstance(block_density, torch.Tensor):
            part = block_density.detach().double() * work
            self.pending_work = part if self.pending_work is None else self.pending_work + part
        else:
            self.work_done += work * block_density

    def _resolve(self) -> None:
        if self.pending_work is not None:
            self.work_done += float(self.pending_work)
            self.pending_work = None

    def reset(self) -> None:
        self.__init__()

    def as_dict(self) -> dict:
        """``density``: computed / total attention work over all self-attention calls (1.0 = dense).

        ``est_attention_speedup`` is the upper bound work_total / work_done (attention only; the kernel's
        per-block efficiency and the non-attention share of the step decide the real end-to-end gain).
        """
        self._resolve()
        density = self.work_done / self.work_total if self.work_total else 1.0
        return {
            "calls": self.calls,
            "sparse_calls": self.sparse_calls,
            "dense_calls": self.calls - self.sparse_calls - self.reused_calls,
            "reused_calls": self.reused_calls,
            "reuses": dict(self.reuses),
            "density": density,
            "attention_work_saved": 1.0 - density,
            "est_attention_speedup": (1.0 / density) if density > 0 else float("inf"),
            "planned_dense": dict(self.planned_dense),
            "fallbacks": dict(self.fallbacks),
            "fallback_calls": sum(self.fallbacks.values()),
            "forwards": self.forwards,
            "layers_per_forward": self.layers_per_forward,
            "selections": self.selections,
            "selection_reuses": self.selection_reuses,
            "head_reuses": self.head_reuses,
            "notes": dict(self.notes),
            "parallel_fallbacks": dict(self.parallel_fallbacks),
            "kernel_backends": dict(self.kernel_backends),
        }
