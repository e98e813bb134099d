"""Per-step attention-output error of the fast path, measured beside a normal pipeline run.

:class:`AttentionErrorProbe` wraps each runtime's ``sparse_fn`` (the block-sparse kernel the runtime calls
for every call its plan serves) with a function that returns the kernel's output unchanged and, for a
sample of calls, also computes exact attention on the same ``q, k, v`` and records the relative L2 error
keyed by the denoising step (``runtime.state.step``)::

    probe = AttentionErrorProbe(handle.runtimes, layers=4, rows=1024)
    with probe:
        pipe(prompt)
    probe.summary()  # {"per_step": [{"step": 0, "mean": ..., "max": ..., "calls": n}, ...], ...}

Sampling keeps the cost small at video lengths: in each transformer forward every ``ceil(L / layers)``-th
sparse call is measured, and only ``rows`` evenly spaced query rows of it (all keys), in float32. Calls
the plan runs dense never reach ``sparse_fn`` and are exact by construction. The runtime is not modified:
``sparse_fn`` is an attribute of the runtime instance, restored on exit.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn.functional as F

from ..testbed.metrics import rel_l2


def exact_rows(q, k, v, rows: torch.Tensor | None, scale: float | None, chunk: int = 256) -> torch.Tensor:
    """Exact float32 attention of the query rows ``rows`` (``None``: all) of ``q [B, H, S, D]``.

    Returns ``[B, H, R, Dv]``; computed ``chunk`` rows at a time, so the CPU's math path never holds more
    than ``[B, H, chunk, S]`` scores.
    """
    qs = q if rows is None else q.index_select(2, rows)
    kf, vf = k.float(), v.float()
    outs = [
        F.scaled_dot_product_attention(qs[:, :, i : i + chunk].float(), kf, vf, scale=scale)
        for i in range(0, qs.shape[2], chunk)
    ]
    return torch.cat(outs, dim=2)


class AttentionErrorProbe:
    """Records ``rel-L2(fast, exact)`` of sampled sparse attention calls, per denoising step.

    Args:
        runtimes: the :class:`~fastattn.attention.runtime.AttentionRuntime` objects (``handle.runtimes``).
        layers: sparse calls measured per transformer forward (evenly spaced; ``None``: every call).
        rows: query rows measured per call (evenly spaced over the sequence; ``None``: all rows).
    """

    def __init__(self, runtimes, layers: int | None = 4, rows: int | None = 1024):
        if layers is not None and layers < 1:
            raise ValueError(f"layers must be a positive number of calls per forward or None, got {layers}")
        if rows is not None and rows < 1:
            raise ValueError(f"rows must be a positive number of query rows or None, got {rows}")
        self.runtimes = list(runtimes)
        self.layers = layers
        self.rows = rows
        self.records: list[dict] = []
        self._saved: list[tuple[object, bool, object]] = []

    # ------------------------------------------------------------------ install / restore
    def __enter__(self) -> AttentionErrorProbe:
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def install(self) -> None:
        if self._saved:
            return
        for index, rt in enumerate(self.runtimes):
            self._saved.append((rt, "sparse_fn" in rt.__dict__, rt.sparse_fn))
            rt.sparse_fn = self._wrap(index, rt, rt.sparse_fn)

    def remove(self) -> None:
        for rt, had_own, original in reversed(self._saved):
            if had_own:
                rt.sparse_fn = original
            else:
                rt.__dict__.pop("sparse_fn", None)
        self._saved = []

    # ------------------------------------------------------------------ the wrapper
    def _stride(self, rt) -> int:
        if self.layers is None:
            return 1
        return max(1, math.ceil((rt.num_layers or self.layers) / self.layers))

    def _wrap(self, index: int, rt, original):
        seen = {"state": None, "n": 0}

        def probed_sparse_fn(q, k, v, block_mask, *args, **kwargs):
            out = original(q, k, v, block_mask, *args, **kwargs)
            state = rt.state
            if state is not seen["state"]:
                seen["state"], seen["n"] = state, 0
            n = seen["n"]
            seen["n"] += 1
            if n % self._stride(rt):
                return out
            fast = out[0] if isinstance(out, tuple) else out
            with torch.no_grad():
                s = q.shape[2]
                rows = None
                if self.rows is not None and self.rows < s:
                    rows = torch.linspace(0, s - 1, self.rows, device=q.device).round().long().unique()
                ref = exact_rows(q, k, v, rows, kwargs.get("scale"))
                got = fast if rows is None else fast.index_select(2, rows)
                err = float(rel_l2(got.float()[None], ref[None]))
            self.records.append(
                {
                    "model": index,
                    "step": state.step if state is not None else None,
                    "cfg_branch": state.cfg_branch if state is not None else None,
                    "layer": state.layer_counter - 1 if state is not None else None,
                    "rel_l2": err,
                    "block_density": float(block_mask.block_density()) if block_mask is not None else 1.0,
                }
            )
            return out

        probed_sparse_fn.__wrapped__ = original
        return probed_sparse_fn

    # ------------------------------------------------------------------ results
    def summary(self) -> dict:
        """``per_step`` (mean / max rel-L2 and calls measured per step), overall mean and max."""
        by_step: dict = defaultdict(list)
        for r in self.records:
            by_step[r["step"]].append(r["rel_l2"])
        per_step = [
            {"step": step, "mean": sum(v) / len(v), "max": max(v), "calls": len(v)}
            for step, v in sorted(by_step.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))
        ]
        errs = [r["rel_l2"] for r in self.records]
        residual = any(getattr(rt.plan, "residual", False) for rt in self.runtimes)
        return {
            "per_step": per_step,
            "mean": sum(errs) / len(errs) if errs else None,
            "max": max(errs) if errs else None,
            "sampled_calls": len(errs),
            "layers_per_forward_sampled": self.layers,
            "rows_per_call": self.rows,
            "reference": "exact float32 SDPA on the same q, k, v",
            # With residual sharing the model gets sparse + R; measured here is the sparse kernel alone.
            "before_residual": residual,
        }
