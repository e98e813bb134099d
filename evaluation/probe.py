"""Per-step attention-output error of the fast path, measured beside a normal pipeline run.

:class:`AttentionErrorProbe` registers an observer with each runtime (``runtime.add_observer``): after every
call the plan's method serves through the sparse kernel the runtime hands it an
:class:`~fastattn.attention.observe.ObservedCall` (``q, k, v``, the kernel's ``out``, the call's
``ForwardContext`` and layer). For a sample of those calls the probe computes exact attention on the same
``q, k, v`` and records the relative L2 error keyed by the denoising step::

    probe = AttentionErrorProbe(handle.runtimes, layers=4, rows=1024)
    with probe:
        pipe(prompt)
    probe.summary()  # {"per_step": [{"step": 0, "mean": ..., "max": ..., "calls": n}, ...], ...}

Sampling keeps the cost small at video lengths: in each transformer forward every ``ceil(L / layers)``-th
served call is measured, and only ``rows`` evenly spaced query rows of it (all keys), in float32. Calls
the plan runs dense are never observed and are exact by construction. The probe only reads what the
runtime shows it: the model's output is the same with and without it.
"""

from __future__ import annotations

import math
from collections import OrderedDict, defaultdict

import torch
import torch.nn.functional as F

from .metrics import rel_l2


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
        self._removers: list = []

    # ------------------------------------------------------------------ install / remove
    def __enter__(self) -> AttentionErrorProbe:
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def install(self) -> None:
        """Register one observer per runtime (a second install while installed does nothing)."""
        if self._removers:
            return
        for index, rt in enumerate(self.runtimes):
            self._removers.append(rt.add_observer(self._observer(index, rt)))

    def remove(self) -> None:
        for remove in reversed(self._removers):
            remove()
        self._removers = []

    # ------------------------------------------------------------------ the observer
    def _stride(self, rt) -> int:
        if self.layers is None:
            return 1
        return max(1, math.ceil((rt.num_layers or self.layers) / self.layers))

    def _observer(self, index: int, rt):
        # Served calls counted per forward. A forward is one ForwardContext object (held here, so its id is
        # not reused while counted); the same object with another (step, cfg_branch) is a new forward too.
        # The last few forwards are kept, so forwards that interleave (two threads) keep their own counts.
        forwards: OrderedDict = OrderedDict()

        def observe(call) -> None:
            ctx = call.ctx
            key = (id(ctx), ctx.step, ctx.cfg_branch)
            entry = forwards.get(key)
            if entry is None:
                entry = forwards[key] = [ctx, 0]
                while len(forwards) > 8:
                    forwards.popitem(last=False)
            n = entry[1]
            entry[1] += 1
            if n % self._stride(rt):
                return
            self.records.append(self._measure(index, call))

        return observe

    def _measure(self, index: int, call) -> dict:
        q, k, v, out = call.q, call.k, call.v, call.out
        with torch.no_grad():
            s = q.shape[2]
            rows = None
            if self.rows is not None and self.rows < s:
                rows = torch.linspace(0, s - 1, self.rows, device=q.device).round().long().unique()
            ref = exact_rows(q, k, v, rows, call.scale)
            got = out if rows is None else out.index_select(2, rows)
            err = float(rel_l2(got.float()[None], ref[None]))
        return {
            "model": index,
            "step": call.ctx.step,
            "cfg_branch": call.ctx.cfg_branch,
            "layer": call.layer,
            "rel_l2": err,
            "block_density": float(call.block_density),
            "quant": call.quant,
        }

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
