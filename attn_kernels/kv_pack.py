"""Bit-packing of integer codes (INT8/INT4/INT2) and fused unpack-dequantize.

Layout: codes ``[..., D]`` (uint8, each < 2**bits) pack along the last axis into ``[..., D * bits // 8]``
bytes; byte ``i`` holds codes ``i*per .. i*per+per-1`` (``per = 8 // bits``), code ``j`` at bit offset
``j * bits`` (little-endian within the byte).

Every function has a Triton kernel and a PyTorch fallback that give bit-identical results. ``backend="auto"``
uses Triton for CUDA tensors only: on CPU the PyTorch path is much faster than Triton's interpreter, which the
tests still run explicitly (``backend="triton"`` with ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch

try:  # Triton is optional (not installed on macOS/Windows); the PyTorch fallback covers everything.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    HAS_TRITON = False

SUPPORTED_BITS = (2, 4, 8)
_BLOCK = 256


def check_bits(bits: int) -> int:
    """Return ``bits`` if it is a supported packed width, else raise ``ValueError``."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return bits


def _use_triton(t: torch.Tensor, backend: str) -> bool:
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "torch":
        return False
    if not HAS_TRITON:
        if backend == "triton":
            raise RuntimeError("backend='triton' requested but triton is not installed")
        return False
    import os

    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if backend == "triton":
        if not (t.is_cuda or interpreted):
            raise RuntimeError("backend='triton' needs a CUDA tensor or TRITON_INTERPRET=1")
        return True
    return t.is_cuda


# --------------------------------------------------------------------------- PyTorch reference paths


def _pack_torch(codes: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    c = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per, per).to(torch.int32)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    return (c << shifts).sum(-1).to(torch.uint8)


def _unpack_torch(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    c = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return c.reshape(*packed.shape[:-1], packed.shape[-1] * per).to(torch.uint8)


# --------------------------------------------------------------------------- Triton kernels

if HAS_TRITON:

    @triton.jit
    def _pack_kernel(codes_ptr, out_ptr, n_out, BITS: tl.constexpr, BLOCK: tl.constexpr):
        # One lane per output byte: OR together its 8 // BITS codes.
        PER: tl.constexpr = 8 // BITS
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_out
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        for j in tl.static_range(PER):
            c = tl.load(codes_ptr + offs * PER + j, mask=mask, other=0).to(tl.int32)
            acc = acc | (c << (j * BITS))
        tl.store(out_ptr + offs, acc.to(tl.uint8), mask=mask)

    @triton.jit
    def _unpack_kernel(packed_ptr, out_ptr, n_codes, BITS: tl.constexpr, BLOCK: tl.constexpr):
        # One lane per output code: read its byte, shift, mask.
        PER: tl.constexpr = 8 // BITS
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_codes
        byte = tl.load(packed_ptr + offs // PER, mask=mask, other=0).to(tl.int32)
        code = (byte >> ((offs % PER) * BITS)) & ((1 << BITS) - 1)
        tl.store(out_ptr + offs, code.to(tl.uint8), mask=mask)

    @triton.jit
    def _dequant_kernel(
        packed_ptr,
        scale_ptr,
        zero_ptr,
        out_ptr,
        T,
        OUT_STRIDE_BH,
        D: tl.constexpr,
        GR: tl.constexpr,
        GC: tl.constexpr,
        BITS: tl.constexpr,
        BLOCK_T: tl.constexpr,
        D_PAD: tl.constexpr,
    ):
        # x[r, d] = code[r, d] * scale[g] + zero[g], g = (r // GR) * (D // GC) + d // GC: one formula covers
        # per-channel groups along tokens (GR = G, GC = 1) and per-token groups along channels (GR = 1, GC = G).
        # One program writes a [BLOCK_T, D] tile of one (batch, head): no runtime division per element, and
        # rows are (batch*head, token) so the output may be a token-slice of a bigger [B, H, S, D] buffer (its
        # batch*head stride is passed in: the cache dequantizes straight into the attention input).
        PER: tl.constexpr = 8 // BITS
        bh = tl.program_id(1).to(tl.int64)
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None]
        d = tl.arange(0, D_PAD)[None, :]  # head dims that are not a power of two are padded and masked
        mask = (t < T) & (d < D)
        r = bh * T + t
        byte = tl.load(packed_ptr + r * (D // PER) + d // PER, mask=mask, other=0).to(tl.int32)
        code = (byte >> ((d % PER) * BITS)) & ((1 << BITS) - 1)
        g = (r // GR) * (D // GC) + d // GC
        s = tl.load(scale_ptr + g, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(zero_ptr + g, mask=mask, other=0.0).to(tl.float32)
        dst = bh * OUT_STRIDE_BH + t * D + d
        tl.store(out_ptr + dst, (code.to(tl.float32) * s + z).to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- public API


def pack(codes: torch.Tensor, bits: int, backend: str = "auto") -> torch.Tensor:
    """Pack uint8 codes ``[..., D]`` (values < 2**bits) into bytes ``[..., D * bits // 8]``."""
    check_bits(bits)
    per = 8 // bits
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    if codes.shape[-1] % per:
        raise ValueError(f"last dim {codes.shape[-1]} must be a multiple of {per} for {bits}-bit packing")
    if bits == 8:
        return codes.clone()
    if not _use_triton(codes, backend):
        return _pack_torch(codes, bits)
    codes = codes.contiguous()
    out = torch.empty(*codes.shape[:-1], codes.shape[-1] // per, dtype=torch.uint8, device=codes.device)
    n_out = out.numel()
    if n_out:
        _pack_kernel[(triton.cdiv(n_out, _BLOCK),)](codes, out, n_out, BITS=bits, BLOCK=_BLOCK)
    return out


def unpack(packed: torch.Tensor, bits: int, backend: str = "auto") -> torch.Tensor:
    """Inverse of :func:`pack`: bytes ``[..., Dp]`` to uint8 codes ``[..., Dp * 8 // bits]``."""
    check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    if bits == 8:
        return packed.clone()
    if not _use_triton(packed, backend):
        return _unpack_torch(packed, bits)
    packed = packed.contiguous()
    per = 8 // bits
    out = torch.empty(*packed.shape[:-1], packed.shape[-1] * per, dtype=torch.uint8, device=packed.device)
    n = out.numel()
    if n:
        _unpack_kernel[(triton.cdiv(n, _BLOCK),)](packed, out, n, BITS=bits, BLOCK=_BLOCK)
    return out


def dequantize_packed(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group: tuple[int, int],
    dtype: torch.dtype,
    backend: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unpack and dequantize in one pass.

    Shapes: ``packed [..., R, D*bits/8]`` (uint8), ``scale``/``zero [..., R/GR, D/GC]`` with
    ``group = (GR, GC)``; returns ``[..., R, D]`` in ``dtype``. The leading dims are flattened into rows, so
    ``R`` must be a multiple of ``GR`` (groups never straddle heads).

    ``out``: optional ``[B, H, R, D]`` destination, e.g. a token slice of the full attention buffer (last dim
    contiguous, heads evenly strided); saves one full-size copy per decode step.
    """
    check_bits(bits)
    gr, gc = group
    per = 8 // bits
    d = packed.shape[-1] * per
    out_shape = (*packed.shape[:-1], d)
    if not _use_triton(packed, backend):
        codes = _unpack_torch(packed, bits) if bits != 8 else packed
        rows = codes.numel() // d
        c = codes.reshape(rows // gr, gr, d // gc, gc).float()
        s = scale.reshape(rows // gr, 1, d // gc, 1).float()
        z = zero.reshape(rows // gr, 1, d // gc, 1).float()
        res = (c * s + z).to(dtype).reshape(out_shape)
        if out is None:
            return res
        out.copy_(res.reshape(out.shape))
        return out
    if out is None:
        out = torch.empty(out_shape, dtype=dtype, device=packed.device)
    if (
        out.dim() != 4
        or out.stride(-1) != 1
        or out.stride(-2) != d
        or out.stride(0) != out.shape[1] * out.stride(1)
    ):
        raise ValueError("out must be [B, H, R, D] with contiguous rows and evenly strided heads")
    bh, t = out.shape[0] * out.shape[1], out.shape[2]
    if bh and t:
        block_t = max(1, min(64, 4096 // d))
        _dequant_kernel[(triton.cdiv(t, block_t), bh)](
            packed.contiguous(),
            scale.contiguous(),
            zero.contiguous(),
            out,
            t,
            out.stride(1),
            D=d,
            GR=gr,
            GC=gc,
            BITS=bits,
            BLOCK_T=triton.next_power_of_2(block_t),
            D_PAD=triton.next_power_of_2(d),
        )
    return out
