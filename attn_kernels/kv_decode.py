"""Fused decode attention over a quantized KV cache layer.

One decode step attends to ``[sinks | body | window | new]``. The body is read as packed codes and dequantized in
registers, tile by tile, so a step reads ``bits / 16`` of the bytes a bf16 cache would (plus the small
full-precision segment), instead of dequantizing the body into a bf16 buffer and reading that back.

Flash-decoding layout: program ``(bh, 0)`` attends to the full-precision segment (sinks, window and the new
tokens, concatenated by the caller: a few dozen tokens); programs ``(bh, 1..)`` each take an equal slice of the
body, enough slices to fill the GPU even at batch 1. Every program keeps an online softmax for all the query rows
that share its KV head (GQA rows ride along in one tile, so each packed byte is read once per step) and writes a
normalized partial output with its log-sum-exp; a second kernel merges the partials.

Values, and keys in the generic path, are dequantized with the formula of
:func:`fastattn.attn_kernels.kv_pack.dequantize_packed` (fp32 ``code * scale + zero``, times the calibrated key scale if
any, then rounded to the model dtype): bit-identical to what the unfused path materializes. With per-channel key
groups that no tile straddles (the default layout) the key scales are folded into the query instead,
``q . (c * s + z) = (q * s) . c + q . z``: algebraically the same, with ``q * s`` rounded to fp16 for bf16/fp16
models (a 10-bit mantissa: on an H200, rounding it to bf16 instead doubled the error against fp32 keys compared
with the unfused path's bf16 keys) and kept in fp32 for fp32 models.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import torch

from .kv_pack import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

_BLOCK_N = 64
_MASKED = -1.0e30  # finite: a slice whose keys are all masked gets weight exp(-1e30) = 0, never NaN
_LOG2E = 1.4426950408889634


def fused_available(device: torch.device) -> bool:
    """Whether the fused kernel can run on ``device`` (CUDA with Triton, or Triton's CPU interpreter)."""
    if not HAS_TRITON:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


if HAS_TRITON:

    @triton.jit
    def _online_step(s, v, m, l_sum, acc, PRECISION: tl.constexpr):
        # s: [R_PAD, BLOCK_N] scores in log2 units; v: [BLOCK_N, D_PAD] in the model dtype.
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        return m_new, l_sum, acc

    @triton.jit
    def _codes(codes_ptr, r, mask, d, D: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
               VEC: tl.constexpr):  # fmt: skip
        # The [BLOCK_N, D] integer codes of rows r ([BLOCK_N, 1]). VEC (power-of-two D): load the packed bytes as
        # they lie (wide loads) and interleave the bit planes in registers; else one byte load per code.
        PER: tl.constexpr = 8 // BITS
        if VEC:
            i = tl.arange(0, D // PER)[None, :]
            byte = tl.load(codes_ptr + r * (D // PER) + i, mask=mask, other=0).to(tl.int32)
            if BITS == 8:
                code = byte
            elif BITS == 4:  # code 2i in the low nibble, 2i + 1 in the high one
                code = tl.reshape(tl.join(byte & 15, byte >> 4), [BLOCK_N, D])
            else:  # join(join(c0, c2), join(c1, c3)) lays c0..c3 out in order along the last axis
                lo = tl.join(byte & 3, (byte >> 4) & 3)
                hi = tl.join((byte >> 2) & 3, (byte >> 6) & 3)
                code = tl.reshape(tl.join(lo, hi), [BLOCK_N, D])
        else:
            byte = tl.load(codes_ptr + r * (D // PER) + d // PER, mask=mask & (d < D), other=0).to(tl.int32)
            code = (byte >> ((d % PER) * BITS)) & ((1 << BITS) - 1)
        return code

    @triton.jit
    def _dequant_tile(codes_ptr, scale_ptr, zero_ptr, r, d, mask, D: tl.constexpr, GR: tl.constexpr,
                      GC: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr, VEC: tl.constexpr):  # fmt: skip
        # r: [BLOCK_N, 1] flat body rows (bh * N + token); d: [1, D_PAD]; mask: [BLOCK_N, 1] valid rows. Same
        # formula and group indexing as pack._dequant_kernel.
        code = _codes(codes_ptr, r, mask, d, D, BITS, BLOCK_N, VEC)
        mask = mask & (d < D)
        g = (r // GR) * (D // GC) + d // GC
        s = tl.load(scale_ptr + g, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(zero_ptr + g, mask=mask, other=0.0).to(tl.float32)
        return code.to(tl.float32) * s + z

    @triton.jit(do_not_specialize=["F", "N", "SKIP", "NS", "BIAS_STRIDE", "TOKENS_PER_SPLIT", "SPLITS"])
    def _partial_kernel(
        q_ptr, fk_ptr, fv_ptr,
        kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, kscale_ptr,
        bias_ptr, part_ptr, lse_ptr,
        F, N, SKIP, NS, HKV, BIAS_STRIDE, TOKENS_PER_SPLIT, SPLITS, qk_scale,
        R: tl.constexpr, R_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BITS: tl.constexpr,
        K_GR: tl.constexpr, K_GC: tl.constexpr, V_GR: tl.constexpr, V_GC: tl.constexpr,
        BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KSCALE: tl.constexpr, PRECISION: tl.constexpr,
        VEC: tl.constexpr, K_ROW: tl.constexpr, V_TOK: tl.constexpr, KROW_F16: tl.constexpr,
    ):  # fmt: skip
        bh = tl.program_id(0).to(tl.int64)  # batch * HKV + kv head
        split = tl.program_id(1)
        b = bh // HKV
        h = bh % HKV
        rows = tl.arange(0, R_PAD)
        d = tl.arange(0, D_PAD)[None, :]
        row_ok = rows < R
        d_ok = d < D
        q = tl.load(q_ptr + (bh * R + rows[:, None]) * D + d, mask=row_ok[:, None] & d_ok, other=0.0)
        m = tl.full([R_PAD], float("-inf"), tl.float32)
        l_sum = tl.zeros([R_PAD], tl.float32)
        acc = tl.zeros([R_PAD, D_PAD], tl.float32)
        n = tl.arange(0, BLOCK_N)
        if split == 0:  # the full-precision segment: sinks, then window + new tokens
            for start in range(0, F, BLOCK_N):
                t = start + n
                t_ok = t < F
                mask = t_ok[:, None] & d_ok
                k = tl.load(fk_ptr + (bh * F + t[:, None]) * D + d, mask=mask, other=0.0)
                v = tl.load(fv_ptr + (bh * F + t[:, None]) * D + d, mask=mask, other=0.0)
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
                if HAS_BIAS:  # positions in the visible sequence: sinks first, the rest after the body
                    pos = tl.where(t < NS, t, t + (N - SKIP))
                    s += (
                        tl.load(bias_ptr + b * BIAS_STRIDE + pos, mask=t_ok, other=0.0)[None, :]
                        * 1.4426950408889634
                    )
                s = tl.where(t_ok[None, :], s, -1.0e30)
                m, l_sum, acc = _online_step(s, v, m, l_sum, acc, PRECISION)
        else:  # one slice of the packed body; tiles start at multiples of BLOCK_N, tokens before SKIP masked
            lo = SKIP - SKIP % BLOCK_N + (split - 1) * TOKENS_PER_SPLIT
            hi = tl.minimum(lo + TOKENS_PER_SPLIT, N)
            if HAS_KSCALE:
                kscale = tl.load(kscale_ptr + h * D + d, mask=d_ok, other=0.0)
            for start in range(lo, hi, BLOCK_N):
                t = start + n
                t_ok = (t < hi) & (t >= SKIP)
                r = bh * N + t[:, None]
                if K_ROW:
                    # Per-channel key groups that no tile straddles: one scale/zero row per tile, folded into the
                    # query, q . (c * s + z) = (q * s) . c + q . z, so the codes go to the dot product as they are.
                    g_row = (bh * N + start) // K_GR
                    ks = tl.load(ks_ptr + g_row * D + d, mask=d_ok, other=0.0).to(tl.float32)
                    kz = tl.load(kz_ptr + g_row * D + d, mask=d_ok, other=0.0).to(tl.float32)
                    if HAS_KSCALE:
                        ks = ks * kscale
                        kz = kz * kscale
                    qf = q.to(tl.float32)
                    c = _codes(kc_ptr, r, t_ok[:, None], d, D, BITS, BLOCK_N, VEC)
                    if KROW_F16:  # codes (< 256) are exact in fp16; q * s keeps 10 mantissa bits
                        s = tl.dot(
                            (qf * ks).to(tl.float16), tl.trans(c.to(tl.float16)), input_precision=PRECISION
                        )
                    else:
                        s = tl.dot(qf * ks, tl.trans(c.to(tl.float32)), input_precision=PRECISION)
                    s = (s + tl.sum(qf * kz, 1)[:, None]) * qk_scale
                else:
                    k = _dequant_tile(
                        kc_ptr, ks_ptr, kz_ptr, r, d, t_ok[:, None], D, K_GR, K_GC, BITS, BLOCK_N, VEC
                    )
                    if HAS_KSCALE:
                        k = k * kscale
                    s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION) * qk_scale
                if V_TOK:
                    # Per-token value groups: load each row's D // V_GC scales once, broadcast in registers.
                    NG: tl.constexpr = D // V_GC
                    gi = r * NG + tl.arange(0, NG)[None, :]
                    vs = tl.load(vs_ptr + gi, mask=t_ok[:, None], other=0.0).to(tl.float32)
                    vz = tl.load(vz_ptr + gi, mask=t_ok[:, None], other=0.0).to(tl.float32)
                    vs = tl.reshape(tl.broadcast_to(vs[:, :, None], [BLOCK_N, NG, V_GC]), [BLOCK_N, D])
                    vz = tl.reshape(tl.broadcast_to(vz[:, :, None], [BLOCK_N, NG, V_GC]), [BLOCK_N, D])
                    c = _codes(vc_ptr, r, t_ok[:, None], d, D, BITS, BLOCK_N, VEC)
                    v = c.to(tl.float32) * vs + vz
                else:
                    v = _dequant_tile(
                        vc_ptr, vs_ptr, vz_ptr, r, d, t_ok[:, None], D, V_GR, V_GC, BITS, BLOCK_N, VEC
                    )
                v = v.to(q.dtype)
                if HAS_BIAS:
                    pos = NS + t - SKIP
                    s += (
                        tl.load(bias_ptr + b * BIAS_STRIDE + pos, mask=t_ok, other=0.0)[None, :]
                        * 1.4426950408889634
                    )
                s = tl.where(t_ok[None, :], s, -1.0e30)
                m, l_sum, acc = _online_step(s, v, m, l_sum, acc, PRECISION)
        safe = tl.where(l_sum > 0, l_sum, 1.0)
        out = acc / safe[:, None]
        lse = tl.where(l_sum > 0, m + tl.log2(safe), float("-inf"))
        row = (bh * SPLITS + split) * R + rows
        tl.store(part_ptr + row[:, None] * D + d, out, mask=row_ok[:, None] & d_ok)
        tl.store(lse_ptr + row, lse, mask=row_ok)

    @triton.jit(do_not_specialize=["SPLITS"])
    def _merge_kernel(part_ptr, lse_ptr, out_ptr, SPLITS, R: tl.constexpr, D: tl.constexpr,
                      D_PAD: tl.constexpr):  # fmt: skip
        # One program per query row; split 0 (the full-precision segment, which always holds the new token) is
        # never empty, so its log-sum-exp is finite and seeds the running maximum.
        row = tl.program_id(0).to(tl.int64)  # bh * R + r
        bh = row // R
        r = row % R
        d = tl.arange(0, D_PAD)
        d_ok = d < D
        first = bh * SPLITS * R + r
        mx = tl.load(lse_ptr + first)
        den = 1.0
        acc = tl.load(part_ptr + first * D + d, mask=d_ok, other=0.0)
        for s in range(1, SPLITS):
            i = (bh * SPLITS + s) * R + r
            lse = tl.load(lse_ptr + i)
            new = tl.maximum(mx, lse)
            alpha = tl.exp2(mx - new)
            w = tl.exp2(lse - new)
            acc = acc * alpha + w * tl.load(part_ptr + i * D + d, mask=d_ok, other=0.0)
            den = den * alpha + w
            mx = new
        tl.store(out_ptr + row * D + d, (acc / den).to(out_ptr.dtype.element_ty), mask=d_ok)


def _pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _num_body_splits(bh: int, body_tokens: int, device: torch.device, block_n: int, per_sm: int) -> int:
    """Slices per (batch, KV head): about ``per_sm`` programs per SM in all, never an empty slice."""
    if body_tokens <= 0:
        return 0
    blocks = math.ceil(body_tokens / block_n)
    return max(1, min(blocks, math.ceil(per_sm * _sm_count(device) / bh)))


def fused_decode_attention(
    q: torch.Tensor,
    fp_k: torch.Tensor,
    fp_v: torch.Tensor,
    q_k,
    q_v,
    *,
    num_sinks: int,
    skip: int = 0,
    key_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    block_n: int = _BLOCK_N,
    programs_per_sm: int = 8,
    num_warps: int = 4,
    num_stages: int = 2,
    vectorized: bool = True,
) -> torch.Tensor:
    """Attention of ``q [B, Hkv, R, D]`` (the R query rows that share each KV head) over one cache layer.

    Keys/values, in visible order: ``fp_k[:, :, :num_sinks]``, the packed body ``q_k``/``q_v``
    (:class:`~fastattn.kvcache.quant.QuantBlock`, ``[B, Hkv, N, ...]``) from token ``skip`` on, then
    ``fp_k[:, :, num_sinks:]``. ``key_scale``: ``[1, Hkv or 1, 1, D]`` calibrated key divisor that the body keys are
    multiplied by after dequantization. ``bias``: additive ``[B, S_visible]`` float mask (0 or very negative)
    shared by all query rows. Returns ``[B, Hkv, R, D]`` in ``q``'s dtype.
    """
    if not HAS_TRITON:
        raise RuntimeError("fused decode attention needs triton")
    b, hkv, r, d = q.shape
    n = q_k.data.shape[-2]
    f = fp_k.shape[-2]
    if fp_k.shape != (b, hkv, f, d) or fp_v.shape != (b, hkv, f, d):
        raise ValueError(f"full-precision keys/values must be [{b}, {hkv}, F, {d}], got {tuple(fp_k.shape)}")
    if f < 1 or not 0 <= num_sinks <= f:
        raise ValueError(f"need at least one full-precision token and 0 <= num_sinks <= {f}, got {num_sinks}")
    if q_k.bits != q_v.bits or q_k.data.shape[:3] != (b, hkv, n) or q_v.data.shape[:3] != (b, hkv, n):
        raise ValueError("packed keys and values must share bits and [B, Hkv, N] with the query")
    if not 0 <= skip <= n:
        raise ValueError(f"skip must be in 0..{n}, got {skip}")
    for blk in (q_k, q_v):
        if blk.group[0] and n % blk.group[0]:
            raise ValueError(f"body length {n} is not a multiple of the token group {blk.group[0]}")
    s_visible = num_sinks + (n - skip) + (f - num_sinks)
    if bias is not None and (bias.shape != (b, s_visible) or bias.dtype != torch.float32):
        raise ValueError(f"bias must be float32 [{b}, {s_visible}], got {tuple(bias.shape)} {bias.dtype}")
    for name, t in (("full-precision keys", fp_k), ("full-precision values", fp_v)):
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} are {t.dtype} on {t.device}, the query {q.dtype} on {q.device}")
    if q_k.data.device != q.device or (bias is not None and bias.device != q.device):
        raise ValueError(f"the packed cache and the mask must be on the query's device {q.device}")
    body = n - (skip - skip % block_n)  # from the tile that holds the first visible body token
    want = _num_body_splits(b * hkv, body, q.device, block_n, programs_per_sm)
    tokens_per_split = math.ceil(math.ceil(body / block_n) / want) * block_n if want else block_n
    splits = 1 + math.ceil(body / tokens_per_split)  # slice 0 is the full-precision segment
    q = q.contiguous()
    part = torch.empty(b * hkv, splits, r, d, device=q.device, dtype=torch.float32)
    lse = torch.empty(b * hkv, splits, r, device=q.device, dtype=torch.float32)
    out = torch.empty(b, hkv, r, d, device=q.device, dtype=q.dtype)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    d_pad = max(16, triton.next_power_of_2(d))
    vec = vectorized and d == d_pad
    dummy = lse  # never read when the matching HAS_* flag is off
    # Triton launches on the current CUDA device: make it the query's (models split over several GPUs).
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _partial_kernel[(b * hkv, splits)](
            q, fp_k.contiguous(), fp_v.contiguous(),
            q_k.data.contiguous(), q_k.scale.contiguous(), q_k.zero.contiguous(),
            q_v.data.contiguous(), q_v.scale.contiguous(), q_v.zero.contiguous(),
            key_scale.float().reshape(-1, d).expand(hkv, d).contiguous() if key_scale is not None else dummy,
            bias.contiguous() if bias is not None else dummy, part, lse,
            f, n, skip, num_sinks, hkv, s_visible, tokens_per_split, splits, scale * _LOG2E,
            R=r, R_PAD=max(16, triton.next_power_of_2(r)), D=d, D_PAD=d_pad, BITS=q_k.bits,
            K_GR=q_k.group[0], K_GC=q_k.group[1], V_GR=q_v.group[0], V_GC=q_v.group[1],
            BLOCK_N=block_n, HAS_BIAS=bias is not None, HAS_KSCALE=key_scale is not None,
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32", VEC=vec,
            K_ROW=q_k.group[1] == 1 and q_k.group[0] % block_n == 0, KROW_F16=q.dtype != torch.float32,
            V_TOK=vec and q_v.group[0] == 1 and d % q_v.group[1] == 0 and _pow2(d // q_v.group[1]),
            num_warps=num_warps, num_stages=num_stages,
        )  # fmt: skip
        _merge_kernel[(b * hkv * r,)](part, lse, out, splits, R=r, D=d, D_PAD=d_pad, num_warps=1)
    return out


def mask_to_bias(mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
    """An SDPA mask that is the same for every head and query row (``[B or 1, 1, 1, S]``, boolean or additive)
    as an additive float32 ``[B, S]`` bias; ``None`` stays ``None``. Raises ``ValueError`` for any other mask."""
    if mask is None:
        return None
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1 or mask.shape[-1] != length:
        raise ValueError(f"mask of shape {tuple(mask.shape)} is not one key mask per batch row")
    if mask.shape[0] not in (1, batch):
        raise ValueError(f"mask batch {mask.shape[0]} does not match {batch}")
    m = mask[:, 0, 0, :]
    if m.dtype == torch.bool:
        bias = torch.where(m, 0.0, _MASKED).float()
    else:
        bias = m.float().clamp_min(_MASKED)
    return bias.expand(batch, length).contiguous()
