"""Quantization of Q, K (INT8/INT4) and V (FP8) for quantized attention.

Q·Kᵀ in integers (or, in ``"fp8"`` mode, FP8 e4m3, which Hopper's tensor cores run at twice the
bf16 rate while Triton's INT8 products do not), symmetric:

- Q per token, inside the attention kernel itself: each program loads its Q tile once, so quantizing
  there costs nothing, where a separate pass would read Q and write its codes once more.
- K with scales per block of ``QUANT_BLOCK`` consecutive tokens (INT8), per token (INT4) or one per head
  (FP8: e4m3 keeps its relative precision over its whole range, and a scale per head folds into Q's
  row scale, so the kernel does not multiply every score by a key scale), after
  subtracting a smoothing vector: softmax is invariant to adding ``q·m`` to a whole row for *any* ``m``
  (the kernel adds it back to the log-sum-exp), and subtracting K's mean over tokens shrinks K's range
  (SageAttention's smoothing). :func:`k_smoothing_mean` estimates that mean from a strided sample of
  at most ``SMOOTH_SAMPLES`` tokens, so long sequences are not read once more for it. Token and block
  scales are stored per token ``[B, H, S]`` (one code path in the kernel); head scales as ``[B, H]``.

P·V in FP8 (e4m3): V gets one scale per channel; P (in [0, 1] after the running-max shift) is scaled
by ``P_FP8_SCALE`` so small probabilities stay out of e4m3's subnormals. FP8 V is stored transposed,
``[B, H, D, S_pad]``, because Hopper's FP8 tensor-core product wants the reduction axis contiguous.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QUANT_BLOCK = 64
P_FP8_SCALE = 256.0  # a power of two: exact to apply and undo
FP8_MAX = 448.0
MODES = ("none", "int8", "int8-fp8", "int4", "int4-fp8", "fp8")
SMOOTH_SAMPLES = 4096


@dataclass(frozen=True)
class QuantSpec:
    qk_bits: int  # 8 or 4 (0 = not quantized)
    pv_fp8: bool
    per_token: bool
    qk_fp8: bool = False  # Q and K as FP8 e4m3 instead of integers ("fp8" mode)

    @property
    def k_granularity(self) -> str:
        """What one K scale covers: ``"token"``, ``"block"`` (``QUANT_BLOCK`` tokens) or ``"head"``."""
        return "token" if self.per_token else ("head" if self.qk_fp8 else "block")

    @property
    def qmax(self) -> float:
        if self.qk_fp8:
            return FP8_MAX
        return 127 if self.qk_bits == 8 else 7

    @classmethod
    def parse(cls, mode: str) -> QuantSpec:
        if mode not in MODES:
            raise ValueError(f"quant must be one of {MODES}, got {mode!r}")
        if mode == "none":
            return cls(0, False, False)
        if mode == "fp8":
            return cls(8, True, per_token=False, qk_fp8=True)
        bits = 8 if mode.startswith("int8") else 4
        return cls(bits, mode.endswith("fp8"), per_token=bits == 4)


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    # Same rounding as the Triton kernel (floor(|x| + 0.5) with the sign), not torch's half-to-even.
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def k_smoothing_mean(k: torch.Tensor) -> torch.Tensor:
    """``[B, H, D]`` fp32: K's mean over tokens from every ``S // SMOOTH_SAMPLES``-th token (all tokens
    for sequences up to ``2 * SMOOTH_SAMPLES``). Exactness does not depend on it, only the code range."""
    stride = max(1, k.shape[2] // SMOOTH_SAMPLES)
    return k[:, :, ::stride].mean(dim=2, dtype=torch.float32)


def k_head_scale(k: torch.Tensor, mean: torch.Tensor, qmax: float) -> torch.Tensor:
    """``[B, H]`` fp32: one scale per head for ``k - mean``, from K's per-channel extremes (one read of K,
    no smoothed copy): ``max |k - m| = max(k_max - m, m - k_min)`` channel by channel."""
    k_min, k_max = torch.aminmax(k, dim=2)
    amax = torch.maximum(k_max.float() - mean, mean - k_min.float()).amax(-1)
    return torch.clamp(amax, min=1e-12) / qmax


def quantize_qk_reference(
    x: torch.Tensor,
    spec: QuantSpec,
    block: int = QUANT_BLOCK,
    mean: torch.Tensor | None = None,
    granularity: str | None = None,
):
    """``x [B, H, S, D]`` -> (int8 (or fp8) codes ``[B, H, S, D]``, fp32 scales ``[B, H, S]``).

    ``mean [B, H, D]``: subtracted first (K smoothing). ``granularity``: ``"token"`` (Q always),
    ``"block"`` or ``"head"``; K's comes from ``spec.k_granularity``."""
    xf = x.float()
    if mean is not None:
        xf = xf - mean[:, :, None, :]
    b, h, s, d = xf.shape
    granularity = granularity or spec.k_granularity
    if granularity == "token":
        amax = xf.abs().amax(-1)
    elif granularity == "head":
        amax = xf.abs().amax(dim=(2, 3))[:, :, None].expand(b, h, s)
    else:
        nb = -(-s // block)
        pad = torch.nn.functional.pad(xf.abs(), (0, 0, 0, nb * block - s))
        amax = pad.reshape(b, h, nb, block * d).amax(-1)
        amax = amax.repeat_interleave(block, dim=2)[:, :, :s]
    scale = torch.clamp(amax, min=1e-12) / spec.qmax
    if spec.qk_fp8:
        return (xf / scale[..., None]).to(torch.float8_e4m3fn), scale
    codes = torch.clamp(_round_half_away(xf / scale[..., None]), -spec.qmax, spec.qmax)
    return codes.to(torch.int8), scale


def v_fp8_scale(v: torch.Tensor) -> torch.Tensor:
    """Per-channel FP8 scale ``[B, H, D]`` (fp32)."""
    # abs and max are exact in 16-bit, so no fp32 copy of V is made
    return torch.clamp(v.abs().amax(dim=2).float(), min=1e-12) / FP8_MAX


def quantize_v_fp8_reference(v: torch.Tensor):
    """``v [B, H, S, D]`` -> (fp8 e4m3 ``[B, H, S, D]``, scale ``[B, H, D]``)."""
    scale = v_fp8_scale(v)
    return (v.float() / scale[:, :, None, :]).to(torch.float8_e4m3fn), scale
