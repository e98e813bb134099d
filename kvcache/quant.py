"""Asymmetric group quantization of K/V blocks and integer bit-width shrinking (PM-KVQ).

A block ``x [..., R, D]`` is split into groups of ``GR`` rows x ``GC`` columns. KIVI's layouts are the two
useful cases: keys per channel (``GR = G`` tokens, ``GC = 1``), whose outlier channels then get their own
range, and values per token (``GR = 1``, ``GC = G`` channels). Each group stores ``scale`` and ``zero`` (its
minimum) in fp16; codes are ``round((x - zero) / scale)`` in ``[0, 2**bits - 1]``. A group's range is taken over
its finite values; ``inf``/``nan`` saturate at an end of it (they never widen the grid of the others).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attn_kernels.kv_pack import check_bits, dequantize_packed, pack, unpack

META_DTYPE = torch.float16  # 2 bytes each for scale and zero
_FP16_MAX = 65504.0


@dataclass
class QuantBlock:
    """Packed codes ``data [..., R, D*bits/8]`` (uint8) and ``scale``/``zero [..., R/GR, D/GC]`` (fp16)."""

    data: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.data.numel() + (self.scale.numel() + self.zero.numel()) * 2


def _grouped(x: torch.Tensor, group: tuple[int, int]) -> torch.Tensor:
    gr, gc = group
    *lead, r, d = x.shape
    if r % gr or d % gc:
        raise ValueError(f"block [{r}, {d}] is not divisible into groups of {gr} rows x {gc} columns")
    return x.reshape(*lead, r // gr, gr, d // gc, gc)


def quantize(x: torch.Tensor, bits: int, group: tuple[int, int], backend: str = "auto") -> QuantBlock:
    """Quantize ``x [..., R, D]`` per group and pack the codes."""
    check_bits(bits)
    xg = _grouped(x.float(), group)
    # The range comes from the finite values only: one inf or nan (an overflowed activation) would otherwise
    # stretch its group's grid to +-65504 and every other value of the group would round to the same code.
    # Non-finite values saturate instead: +inf at the top of the range, -inf and nan at the bottom.
    finite = torch.isfinite(xg)
    lo = torch.where(finite, xg, torch.inf).amin(dim=(-3, -1))
    hi = torch.where(finite, xg, -torch.inf).amax(dim=(-3, -1))
    none_finite = lo > hi
    lo = torch.where(none_finite, 0.0, lo).clamp(-_FP16_MAX, _FP16_MAX)
    hi = torch.where(none_finite, 0.0, hi).clamp(-_FP16_MAX, _FP16_MAX)
    qmax = (1 << bits) - 1
    # Round the fp16 metadata *outward* (zero down, scale up) and quantize against the stored values, so the
    # only error is the code rounding (<= scale / 2); rounding the zero to nearest would add up to 1e-3 * |min|,
    # which is larger than an 8-bit step for keys with a large offset.
    zero = lo.to(META_DTYPE)
    zero = torch.where(zero.float() > lo, torch.nextafter(zero, torch.full_like(zero, -torch.inf)), zero)
    scale = ((hi - zero.float()) / qmax).clamp_min(1e-8).to(META_DTYPE)
    scale = torch.where(
        scale.float() * qmax + zero.float() < hi,
        torch.nextafter(scale, torch.full_like(scale, torch.inf)),
        scale,
    )
    s = scale.float()[..., :, None, :, None]
    z = zero.float()[..., :, None, :, None]
    steps = ((xg - z) / s).nan_to_num_(nan=0.0, posinf=qmax, neginf=0.0)
    codes = torch.round(steps).clamp_(0, qmax).to(torch.uint8).reshape(x.shape)
    return QuantBlock(pack(codes, bits, backend), scale, zero, bits, group)


def dequantize(q: QuantBlock, dtype: torch.dtype, backend: str = "auto", out=None) -> torch.Tensor:
    """Back to ``[..., R, D]`` in ``dtype`` (written into ``out`` if given, see ``dequantize_packed``)."""
    return dequantize_packed(q.data, q.scale, q.zero, q.bits, q.group, dtype, backend, out)


def shrink_codes(codes: torch.Tensor, bits_from: int, bits_to: int) -> torch.Tensor:
    """Map b-bit codes onto b'-bit codes of the same range, in integers only.

    ``q' = round(q * (2**b' - 1) / (2**b - 1))``: the group's ``zero`` is unchanged and its scale grows by
    ``(2**b - 1) / (2**b' - 1)``, so the b'-bit grid spans exactly the old range and the original values
    are never needed (PM-KVQ's progressive shrinking).
    """
    m_from, m_to = (1 << bits_from) - 1, (1 << bits_to) - 1
    c = codes.to(torch.int32)
    return ((c * (2 * m_to) + m_from) // (2 * m_from)).to(torch.uint8)


def shrink(q: QuantBlock, bits_to: int, backend: str = "auto") -> QuantBlock:
    """Re-pack ``q`` at ``bits_to < q.bits``; checks shapes and the code mapping before returning."""
    check_bits(bits_to)
    if bits_to >= q.bits:
        raise ValueError(f"shrink needs fewer bits than {q.bits}, got {bits_to}")
    codes = unpack(q.data, q.bits, backend)
    new_codes = shrink_codes(codes, q.bits, bits_to)
    data = pack(new_codes, bits_to, backend)
    # Guard: a re-pack must keep the logical shape and round-trip exactly; anything else would corrupt the
    # cache silently, so fail loudly instead.
    expected = (*q.data.shape[:-1], q.data.shape[-1] * bits_to // q.bits)
    if tuple(data.shape) != expected or not torch.equal(unpack(data, bits_to, backend), new_codes):
        raise RuntimeError(
            f"re-packing {q.bits}->{bits_to} bits failed its shape/round-trip check "
            f"(got {tuple(data.shape)}, expected {expected})"
        )
    ratio = ((1 << q.bits) - 1) / ((1 << bits_to) - 1)
    scale = (q.scale.float() * ratio).to(META_DTYPE)
    return QuantBlock(data, scale, q.zero, bits_to, q.group)


def cat_blocks(a: QuantBlock | None, b: QuantBlock, dim: int = -2) -> QuantBlock:
    """Concatenate two blocks along the row (token) axis; both must share bits and grouping."""
    if a is None:
        return b
    if a.bits != b.bits or a.group != b.group:
        raise ValueError(f"cannot concatenate {a.bits}-bit {a.group} and {b.bits}-bit {b.group} blocks")
    return QuantBlock(
        torch.cat([a.data, b.data], dim),
        torch.cat([a.scale, b.scale], dim),
        torch.cat([a.zero, b.zero], dim),
        a.bits,
        a.group,
    )


def checksum(q: QuantBlock) -> int:
    """Position-weighted sum of the packed bytes: cheap, and changes if bytes are altered or moved."""
    flat = q.data.reshape(-1).to(torch.int64)
    w = torch.arange(flat.numel(), device=flat.device, dtype=torch.int64) % 65521 + 1
    return int((flat * w).sum())
