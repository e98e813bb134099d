"""The plan the runtime follows: one method plus *when* to use it (steps, layers) and at what bit-width.

Structural plans need no calibration. Dense steps and dense layers are the knobs every preset uses:
early denoising steps fix the layout of the picture and first/last layers are the most sensitive, so
they stay exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..attn_kernels.quantize import MODES as QUANT_MODES
from .context import AttentionContext
from .methods import DenseConfig, MethodConfig, describe


@dataclass(frozen=True)
class AttentionPlan:
    """What to run for every self-attention call of one transformer.

    Args:
        method: the method config (``Window3DConfig(density=0.3)``, ``DynamicConfig()``...).
        quant: kernel bit-width: ``"none"``, ``"int8"``, ``"int8-fp8"``, ``"int4"``, ``"int4-fp8"``,
            ``"fp8"``.
        dense_steps: the first ``dense_steps`` denoising steps run exact dense attention.
        dense_layers: self-attention layer indices that always run dense; negative indices count from
            the last layer (``(0, -1)``: first and last).
        start_percent, end_percent: the method runs only while the denoising progress (step / steps)
            is in ``[start_percent, end_percent)``; outside it attention is dense. Needs the step count,
            known when enabled on a pipeline (else pass ``num_steps=``).
        block_size: mask block size in tokens (128 for the GPU kernel; smaller only on the CPU).
        residual: DiTFastAttn's residual sharing (WA-RS). At the last dense step before the method takes
            over, each layer computes both the dense and the sparse output and keeps
            ``R = dense - sparse``; later sparse calls return ``sparse + R``. What the sparse pattern
            misses (mostly slowly changing global context) is carried over from the last exact step.
            Costs one ``[B, S, H, D]`` tensor per layer and CFG pass.
        residual_refresh: with ``residual``, every ``residual_refresh``-th sparse step recomputes the
            dense output and refreshes ``R`` (0: capture once, never refresh).
    """

    method: MethodConfig = field(default_factory=DenseConfig)
    quant: str = "none"
    dense_steps: int = 0
    dense_layers: tuple[int, ...] = ()
    start_percent: float = 0.0
    end_percent: float = 1.0
    block_size: int = 128
    residual: bool = False
    residual_refresh: int = 0

    def __post_init__(self):
        if not isinstance(self.method, MethodConfig):
            raise TypeError(f"method must be a MethodConfig, got {type(self.method).__name__}")
        if self.quant not in QUANT_MODES:
            raise ValueError(f"unknown quant {self.quant!r}; valid: {list(QUANT_MODES)}")
        if not isinstance(self.dense_steps, int) or self.dense_steps < 0:
            raise ValueError(f"dense_steps must be a non-negative int, got {self.dense_steps!r}")
        if not 0.0 <= self.start_percent <= self.end_percent <= 1.0:
            raise ValueError(
                f"need 0 <= start_percent <= end_percent <= 1, got {self.start_percent}, {self.end_percent}"
            )
        if not isinstance(self.block_size, int) or self.block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")
        if not isinstance(self.residual, bool):
            raise TypeError(f"residual must be True or False, got {self.residual!r}")
        if not isinstance(self.residual_refresh, int) or self.residual_refresh < 0:
            raise ValueError(f"residual_refresh must be a non-negative int, got {self.residual_refresh!r}")
        if self.residual_refresh and not self.residual:
            raise ValueError("residual_refresh needs residual=True")
        object.__setattr__(self, "dense_layers", tuple(int(i) for i in self.dense_layers))

    @property
    def is_exact(self) -> bool:
        """True when every call runs the model's own dense attention."""
        return isinstance(self.method, DenseConfig) and self.quant == "none"

    def dense_reason(self, ctx: AttentionContext, num_layers: int | None) -> str | None:
        """Why this call runs dense by plan (``None``: run the method)."""
        if ctx.step < self.dense_steps:
            return "dense_steps"
        if self.dense_layers:
            n = num_layers or 0
            wanted = {i if i >= 0 else n + i for i in self.dense_layers}
            if ctx.layer in wanted:
                return "dense_layers"
        if self.start_percent > 0.0 or self.end_percent < 1.0:
            p = ctx.progress
            if p is not None and not (self.start_percent <= p < self.end_percent):
                return "outside start_percent/end_percent"
        if self.is_exact:
            return "method dense"
        return None

    def residual_action(self, ctx: AttentionContext) -> str | None:
        """For a call the method serves, with residual sharing: ``"capture"`` (run dense, keep
        ``dense - sparse``), ``"apply"`` (``sparse + R``), else ``None`` (no residual sharing)."""
        if not self.residual:
            return None
        if self.residual_refresh:
            first = max(self.dense_steps, 0)
            if (ctx.step - first) % self.residual_refresh == 0 and ctx.step > first:
                return "capture"
        return "apply"

    def describe(self) -> dict:
        d = describe(self.method)
        d.update(
            quant=self.quant,
            dense_steps=self.dense_steps,
            dense_layers=list(self.dense_layers),
            start_percent=self.start_percent,
            end_percent=self.end_percent,
            block_size=self.block_size,
            residual=self.residual,
            residual_refresh=self.residual_refresh,
        )
        return d
