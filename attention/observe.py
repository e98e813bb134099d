"""What the runtime shows its observers: one record per attention call the plan's method served.

Observers (the eval probe, calibration) register with ``runtime.add_observer(fn)`` and receive an
:class:`ObservedCall` after the kernel ran; they never patch the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .context import ForwardContext


@dataclass(frozen=True)
class ObservedCall:
    """One served call. ``q, k, v, out`` are ``[B, H, S, D]`` views (``out`` before any residual is added);
    ``block_density`` is a float or a 0-d device tensor (dynamic masks); ``quant`` the plan's bit-width."""

    ctx: ForwardContext
    layer: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    scale: float | None
    block_density: float | torch.Tensor
    quant: str
