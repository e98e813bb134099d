"""Triton kernels: block-sparse, reordered, quantized attention forward (+ log-sum-exp).

One kernel family with a few ``tl.constexpr`` switches, in the style of Triton's fused-attention
tutorial: ``_attn_fwd`` tiles queries into ``BLOCK_M`` rows (one mask block) and sweeps the key blocks
its block list names, in ``BLOCK_N`` sub-tiles, with an online softmax in base 2.

Switches:
- ``QUANT``: K arrives as INT8 codes (INT4 values live in INT8; FP8 with ``QK_FP8``) with per-token fp32
  scales; Q arrives in 16 bits and each program quantizes its tile per token on load. The score tile is
  an integer (or FP8) product rescaled by ``q_scale ⊗ k_scale``.
- ``PV_FP8``: V arrives as FP8 e4m3, transposed ``[B, H, D, S_pad]``; P is scaled and rounded to FP8.
- ``PERM_Q`` / ``PERM_K`` / ``PERM_V`` / ``PERM_OUT``: token rows are gathered through ``perm`` on load and the output
  scattered back on store, so reordered attention needs no extra pass over Q/K/V/O.

Blocks follow :class:`~fastattn.attn_kernels.geometry.KernelGeometry`, on each side its own: ``nb0``
query blocks of the first segment ``[0, split)``, then blocks of ``[split, S)``; key blocks likewise with
``kv_nb0``, ``kv_split`` and ``S_KV`` (``S_KV != S``: a query chunk against a key chunk). The last block
of each segment may be short and is masked.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import quantize as Qz
from .geometry import BlockLists

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_PLACEHOLDERS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _placeholders(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(float32 [1], int32 [1])`` zeros on ``device``, passed for pointer arguments a launch does not use
    (scales without quantization, ``perm`` without reordering): the kernels neither read nor write them, so
    one pair per device serves every launch instead of two allocations per launch."""
    pair = _PLACEHOLDERS.get(device)
    if pair is None:
        pair = _PLACEHOLDERS[device] = (
            torch.zeros(1, dtype=torch.float32, device=device),
            torch.zeros(1, dtype=torch.int32, device=device),
        )
    return pair


@triton.jit
def _block_range(blk, nb0, split, seq_len, BS: tl.constexpr):
    in_first = blk < nb0
    start = tl.where(in_first, blk * BS, split + (blk - nb0) * BS)
    end = tl.where(in_first, tl.minimum(start + BS, split), tl.minimum(start + BS, seq_len))
    return start, end


@triton.jit
def _to_fp8(x, EMULATE: tl.constexpr):
    """Round to FP8 e4m3. Triton 3.6's interpreter drops the carry when rounding crosses a power of
    two (1.98 -> 1.0); under the interpreter we round to e4m3's grid in fp32 first (half to even, as
    the GPU and torch do), so the cast is exact."""
    if EMULATE:
        ax = tl.abs(x)
        e = tl.maximum(tl.floor(tl.math.log2(tl.maximum(ax, 1e-30))), -6.0)
        step = tl.math.exp2(e - 3.0)
        t = ax / step
        r = tl.floor(t + 0.5)
        r = tl.where((r - t == 0.5) & (r - 2.0 * tl.floor(r * 0.5) == 1.0), r - 1.0, r) * step
        x = tl.where(x < 0, -r, r)
    return x.to(tl.float8e4nv)


@triton.jit
def _to_codes(y, QMAX: tl.constexpr, TO_FP8: tl.constexpr, EMULATE: tl.constexpr):
    """Scaled values to FP8, or to integers in [-QMAX, QMAX] rounded half away from zero (as
    ``quantize._round_half_away``)."""
    if TO_FP8:
        codes = _to_fp8(y, EMULATE)
    else:
        y = tl.where(y >= 0, tl.floor(y + 0.5), -tl.floor(0.5 - y))
        codes = tl.minimum(tl.maximum(y, -QMAX), QMAX).to(tl.int8)
    return codes


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, KS, VS, KMEAN, CNT, IDX, PERM, QD, KD, VD,
    sqb, sqh, sqs, sqd,
    skb, skh, sks, skd,
    svb, svh, svs, svd,
    sob, soh, sos, sod,
    scb, sch, scq,
    sib, sih, siq,
    sph,
    H, S, split, nb0, S_KV, kv_split, kv_nb0, qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    QUANT: tl.constexpr,
    K_PER_HEAD: tl.constexpr,  # one K scale per head (KS is [B * H]), folded into Q's row scale
    QK_FP8: tl.constexpr,
    PV_FP8: tl.constexpr,
    PERM_Q: tl.constexpr,
    PERM_K: tl.constexpr,
    PERM_V: tl.constexpr,
    PERM_OUT: tl.constexpr,
    P_SHIFT: tl.constexpr,  # log2 of FP8 P's scale (0 without FP8 P): applied inside exp2, undone in the LSE
    QMAX: tl.constexpr,  # Q's code range in quantized modes (127, 7 or FP8's 448)
    TWO_LEVEL: tl.constexpr,
    TMA_QK: tl.constexpr,  # Hopper: Q/K tiles through the tensor-memory accelerator (descriptors QD/KD)
    TMA_V: tl.constexpr,  # and V tiles (descriptor VD)
    DOT_F32: tl.constexpr,  # interpreter only: bf16 dots and fp8 rounding are wrong there (see _to_fp8)
    ROWS: tl.constexpr,  # query rows per program: BLOCK_M, or a fraction of it (a mask block split over programs)
    WARP_SPEC: tl.constexpr,  # ask Triton to warp-specialize the key loop (producer/consumer warps)
):  # fmt: skip
    Q_SPLIT: tl.constexpr = BLOCK_M // ROWS
    qb = tl.program_id(0) // Q_SPLIT
    q_part = tl.program_id(0) % Q_SPLIT
    bh = tl.program_id(1)
    b32 = bh // H
    h32 = bh % H
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    # 64-bit only for the (batch, head) base; per-element offsets stay 32-bit so the compiler keeps
    # seeing contiguous, vectorisable rows.
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    V += b * svb + h * svh
    O += b * sob + h * soh
    LSE += (b * H + h) * S
    PERM += h * sph
    q_start, q_end = _block_range(qb, nb0, split, S, BLOCK_M)
    q_start += q_part * ROWS
    rows = q_start + tl.arange(0, ROWS)
    row_ok = rows < q_end
    dcol = tl.arange(0, HEAD_DIM)

    if PERM_Q or PERM_OUT:
        prow = tl.load(PERM + rows, mask=row_ok, other=0)
    else:
        prow = rows
    qrow = prow if PERM_Q else rows
    if TMA_QK:
        q = tl.reshape(QD.load([b32, h32, q_start, 0]), (ROWS, HEAD_DIM))
    else:
        q = tl.load(Q + qrow[:, None] * sqs + dcol[None, :] * sqd, mask=row_ok[:, None], other=0.0)
    if QUANT:
        # per-token scales, the same arithmetic as quantize.quantize_qk_reference
        qf = q.to(tl.float32)
        # K smoothing shifted each row's scores by q . mean(k); the LSE gets it back, from unrounded q
        kmean = tl.load(KMEAN + (b * H + h) * HEAD_DIM + dcol)
        lse_shift = tl.sum(qf * kmean[None, :], 1) * qk_scale
        q_sc = tl.maximum(tl.max(tl.abs(qf), 1), 1e-12) / QMAX
        q = _to_codes(qf / q_sc[:, None], QMAX, QK_FP8, DOT_F32)
        q_scale = q_sc * qk_scale
        if K_PER_HEAD:
            q_scale = q_scale * tl.load(KS + b * H + h)
        else:
            KS += (b * H + h) * S_KV

    m_i = tl.full([ROWS], -float("inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)

    count = tl.load(CNT + b * scb + h * sch + qb * scq)
    count = tl.where(q_start < q_end, count, 0)  # a split part past a short block's end: nothing to do
    idx_ptr = IDX + b * sib + h * sih + qb * siq
    SUB: tl.constexpr = BLOCK_M // BLOCK_N
    for i in tl.range(count, warp_specialize=WARP_SPEC):
        kb = tl.load(idx_ptr + i)
        k_start, k_end = _block_range(kb, kv_nb0, kv_split, S_KV, BLOCK_M)
        for sub in tl.static_range(SUB):
            cols = k_start + sub * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < k_end
            if PERM_K or PERM_V:
                pcol = tl.load(PERM + cols, mask=col_ok, other=0)
            else:
                pcol = cols
            kcol = pcol if PERM_K else cols
            # Load [BLOCK_N, D] and transpose in registers: Triton then keeps K's reduction axis
            # contiguous in shared memory, which 8-bit tensor-core products require.
            if TMA_QK:
                kt = tl.trans(
                    tl.reshape(KD.load([b32, h32, k_start + sub * BLOCK_N, 0]), (BLOCK_N, HEAD_DIM))
                )
            else:
                kt = tl.trans(
                    tl.load(K + kcol[:, None] * sks + dcol[None, :] * skd, mask=col_ok[:, None], other=0.0)
                )
            # s: scores in base-2 units once multiplied by the row's scale (q_scale, or qk_scale), which
            # the exponent's FMA does; the row max needs only one multiply per row (scales are > 0).
            if QK_FP8:
                s = tl.dot(q, kt)
            elif QUANT:
                si = tl.dot(q, kt, out_dtype=tl.int32)
                # int32 -> fp32 by the magic-number trick (exact for |x| < 2^22; |q.k| <= 128*127^2):
                # two ALU ops instead of an I2F conversion, which runs at the exp2 unit's slow rate.
                s = (si + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
            elif DOT_F32:
                s = tl.dot(q.to(tl.float32), kt.to(tl.float32))
            else:
                s = tl.dot(q, kt)
            if QUANT and not K_PER_HEAD:
                s = s * tl.load(KS + cols, mask=col_ok, other=0.0)[None, :]
            if k_start + (sub + 1) * BLOCK_N > k_end:  # ragged tail of a segment
                s = tl.where(col_ok[None, :], s, -float("inf"))
            # With FP8 P, p comes out already scaled by 2^P_SHIFT (keeps small probabilities out of e4m3's
            # subnormals); l_i and acc carry the same factor, which cancels in acc / l_i.
            if QUANT:
                m_new = tl.maximum(m_i, tl.max(s, 1) * q_scale)
                p = tl.math.exp2(s * q_scale[:, None] - (m_new - P_SHIFT)[:, None])
            else:
                m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
                p = tl.math.exp2(s * qk_scale - (m_new - P_SHIFT)[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            if PV_FP8:
                # FP8 V is stored transposed: load [D, BLOCK_N] (tokens contiguous) and transpose.
                if TMA_V:
                    v = tl.trans(
                        tl.reshape(VD.load([b32, h32, 0, k_start + sub * BLOCK_N]), (HEAD_DIM, BLOCK_N))
                    )
                else:
                    v = tl.trans(
                        tl.load(
                            V + cols[None, :] * svs + dcol[:, None] * svd, mask=col_ok[None, :], other=0.0
                        )
                    )
                if TWO_LEVEL:
                    # Hopper's FP8 MMA accumulates with reduced precision: start each tile from zero
                    # and add into the fp32 accumulator.
                    acc += tl.dot(_to_fp8(p, DOT_F32), v)
                else:
                    acc = tl.dot(_to_fp8(p, DOT_F32), v, acc)
            else:
                vcol = pcol if PERM_V else cols
                if TMA_V:
                    v = tl.reshape(VD.load([b32, h32, k_start + sub * BLOCK_N, 0]), (BLOCK_N, HEAD_DIM))
                else:
                    v = tl.load(V + vcol[:, None] * svs + dcol[None, :] * svd, mask=col_ok[:, None], other=0)
                if DOT_F32:
                    acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc)
                else:
                    acc = tl.dot(p.to(v.dtype), v, acc)
            m_i = m_new

    if PV_FP8:
        v_scale = tl.load(VS + (b * H + h) * HEAD_DIM + dcol)
        acc = acc * v_scale[None, :]
    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse2 = m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0)) - P_SHIFT
    if QUANT:
        lse2 += lse_shift
    lse = tl.where(has_keys, lse2 * 0.6931471805599453, -float("inf"))
    orow = prow if PERM_OUT else rows
    tl.store(O + orow[:, None] * sos + dcol[None, :] * sod, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + orow, lse, mask=row_ok)


@triton.jit
def _quant_qk(
    X, OUT, SCALE, MEAN, HEAD_SCALE, PERM,
    sxb, sxh, sxs, sxd, sph, H, S,
    D: tl.constexpr, TB: tl.constexpr, QMAX: tl.constexpr,
    PER_TOKEN: tl.constexpr, PER_HEAD: tl.constexpr, GATHER: tl.constexpr, SMOOTH: tl.constexpr,
    TO_FP8: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    tb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = tb * TB + tl.arange(0, TB)
    ok = rows < S
    d = tl.arange(0, D)
    src = tl.load(PERM + h * sph + rows, mask=ok, other=0).to(tl.int64) if GATHER else rows.to(tl.int64)
    x = tl.load(X + b * sxb + h * sxh + src[:, None] * sxs + d[None, :] * sxd, mask=ok[:, None], other=0)
    x = x.to(tl.float32)
    if SMOOTH:
        x = tl.where(ok[:, None], x - tl.load(MEAN + bh * D + d)[None, :], 0.0)
    if PER_HEAD:
        scale = tl.zeros([TB], tl.float32) + tl.load(HEAD_SCALE + bh)
    else:
        amax = tl.max(tl.abs(x), 1)
        if not PER_TOKEN:
            amax = tl.zeros([TB], tl.float32) + tl.max(amax, 0)
        scale = tl.maximum(amax, 1e-12) / QMAX
    y = _to_codes(x / scale[:, None], QMAX, TO_FP8, EMULATE)
    tl.store(OUT + (bh * S + rows)[:, None] * D + d[None, :], y, mask=ok[:, None])
    if not PER_HEAD:  # per-head scales are already in HEAD_SCALE
        tl.store(SCALE + bh * S + rows, scale, mask=ok)


@triton.jit
def _quant_v_fp8(
    V, OUT, VSCALE, PERM,
    svb, svh, svs, svd, sph, H, S, S_PAD,
    D: tl.constexpr, TB: tl.constexpr, GATHER: tl.constexpr, EMULATE: tl.constexpr,
):  # fmt: skip
    tb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = tb * TB + tl.arange(0, TB)
    ok = rows < S
    d = tl.arange(0, D)
    src = tl.load(PERM + h * sph + rows, mask=ok, other=0).to(tl.int64) if GATHER else rows.to(tl.int64)
    x = tl.load(V + b * svb + h * svh + src[:, None] * svs + d[None, :] * svd, mask=ok[:, None], other=0)
    y = x.to(tl.float32) / tl.load(VSCALE + bh * D + d)[None, :]
    # transposed store: element (s, d) at d * S_PAD + s
    tl.store(OUT + bh * D * S_PAD + d[None, :] * S_PAD + rows[:, None], _to_fp8(y, EMULATE), mask=ok[:, None])


# ----------------------------------------------------------------------------- launch


def _mask_strides(t: torch.Tensor, batch: int, heads: int):
    """Strides of a [Bm, Hm, ...] mask tensor, 0 on broadcast dims."""
    sb = 0 if t.shape[0] == 1 else t.stride(0)
    sh = 0 if t.shape[1] == 1 else t.stride(1)
    return sb, sh, t.stride(2)


def tma_available(q: torch.Tensor) -> bool:
    """Hopper+ GPU, not the interpreter."""
    return q.is_cuda and not interpreting() and torch.cuda.get_device_capability(q.device)[0] >= 9


def _descriptor(t: torch.Tensor, block: list[int]):
    """TMA descriptor over a 4-D tensor (any 16-byte-aligned strides), or None if it is not allowed."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    try:
        return TensorDescriptor(t, list(t.shape), list(t.stride()), block)
    except AssertionError:  # misaligned base or strides: pointer loads serve it
        return None


def _short_d64(head_dim: int, quant: bool, seq_len: int | None) -> bool:
    # H200 sweep at 4,096 tokens, head_dim 64, 3-D window 30%: (32, 4, 2) with pointer loads 0.078 ms against
    # 0.34 ms for the long-sequence default (128, 8, 3) with TMA (cuDNN dense: 0.079 ms). Not measured beyond
    # 8k tokens, so longer sequences keep the default.
    return head_dim == 64 and not quant and seq_len is not None and seq_len <= 8192


class Tiles(NamedTuple):
    """Launch shape of one call. ``rows`` < the mask block splits each query block over programs."""

    block_n: int
    warps: int
    stages: int
    rows: int | None = None  # None: the whole mask block
    warp_spec: bool = False


def default_tiles(
    head_dim: int, quant: bool, block_m: int, seq_len: int | None = None, tma: bool = True
) -> Tiles:
    """Tiles for a launch, from the H200 sweep ``bench/results/tile-sweep*-nvidia_h200.json`` (TMA on):

    - bf16: (128, 8 warps, 3 stages) over whole 128-row blocks: 0.86-0.90x cuDNN's dense rate per computed
      block on Wan (4 warps over 64-row halves: 0.51-0.80x).
    - quantized, with TMA: 4 warps over 64-row halves of a block, 3 stages. Dense Wan-1.3B: fp8 1.07x and
      int8-fp8 1.02x cuDNN, against 0.57x / 0.55x with the bf16 shape and 0.66x / 0.64x with (128, 8, 2);
      dense FLUX 2048^2: 0.99x / 0.88x. (Since then the kernel quantizes Q itself and folds the scales:
      fp8 1.19x, ``tile-sweep-fp8-head-scale-nvidia_h200.json``; 2 and 4 stages stayed slower.) Without TMA that shape measured 0.30x, so pointer loads keep the
      earlier (128, 8, 2).
    - short head_dim-64 sequences: see ``_short_d64``.
    """
    if interpreting():
        return Tiles(min(block_m, 32), 4, 1)
    if _short_d64(head_dim, quant, seq_len):
        return Tiles(32, 4, 2)
    if quant:
        return Tiles(128, 4, 3, rows=64) if tma else Tiles(128, 8, 2)
    return Tiles(128, 8, 3)


def quantize_inputs(q, k, v, spec: Qz.QuantSpec, perm: torch.Tensor | None):
    """K's codes and scales (+ FP8 V), in the reordered token order when ``perm`` is given, and the K
    smoothing vector. Q is quantized by the attention kernel itself."""
    b, h, s, d = k.shape
    dev = k.device
    out = {}
    gather = perm is not None
    perm_t = perm if gather else _placeholders(dev)[1]
    sph = 0 if (not gather or perm.dim() == 1) else perm.stride(0)
    grid = (triton.cdiv(s, Qz.QUANT_BLOCK), b * h)
    kmean = Qz.k_smoothing_mean(k).contiguous()
    per_head = spec.k_granularity == "head"
    head_scale = Qz.k_head_scale(k, kmean, spec.qmax).contiguous() if per_head else kmean  # else: unread
    codes = torch.empty(b, h, s, d, dtype=torch.float8_e4m3fn if spec.qk_fp8 else torch.int8, device=dev)
    scale = head_scale if per_head else torch.empty(b, h, s, dtype=torch.float32, device=dev)
    _quant_qk[grid](
        k, codes, scale, kmean, head_scale, perm_t, *k.stride(), sph, h, s,
        D=d, TB=Qz.QUANT_BLOCK, QMAX=spec.qmax, PER_TOKEN=spec.per_token, PER_HEAD=per_head, GATHER=gather,
        SMOOTH=True, TO_FP8=spec.qk_fp8, EMULATE=interpreting(),
    )  # fmt: skip
    out["k"] = (codes, scale)  # [B, H] with one scale per head, else [B, H, S]
    out["kmean"] = kmean
    if spec.pv_fp8:
        s_pad = triton.cdiv(s, 16) * 16
        v8 = torch.zeros(b, h, d, s_pad, dtype=torch.float8_e4m3fn, device=dev)  # pad must not be NaN
        vscale = Qz.v_fp8_scale(v).contiguous()
        _quant_v_fp8[grid](
            v,
            v8,
            vscale,
            perm_t,
            *v.stride(),
            sph,
            h,
            s,
            s_pad,
            D=d,
            TB=Qz.QUANT_BLOCK,
            GATHER=gather,
            EMULATE=interpreting(),
        )
        out["v"] = (v8, vscale)
    return out


def triton_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    blocks,
    scale: float | None = None,
    quant: str = "none",
    perm: torch.Tensor | None = None,
    tiles: Tiles | tuple | None = None,
    two_level: bool = False,
    use_tma: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel: q ``[B, H, Sq, D]``, k and v ``[B, H, Skv, D]`` -> ``(out [B, H, Sq, D], lse [B, H,
    Sq] float32)``. ``blocks``: :class:`BlockLists`, or a mask with ``block_lists()`` (a BlockMask).

    Inputs are validated by :mod:`fastattn.attn_kernels.ops`; this only launches."""
    cnt, idx, geom = blocks if isinstance(blocks, BlockLists) else blocks.block_lists()
    b, h, s, d = q.shape
    s_kv = k.shape[2]
    spec = Qz.QuantSpec.parse(quant)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    bm = geom.block_size
    tile_len = max(s, s_kv)  # the tile tables were measured on self-attention of this length
    if use_tma is None:
        use_tma = tma_available(q) and not (tiles is None and _short_d64(d, spec.qk_bits > 0, tile_len))
    t = Tiles(*tiles) if tiles else default_tiles(d, spec.qk_bits > 0, bm, tile_len, use_tma)
    block_n = min(t.block_n, bm)
    rows = min(t.rows or bm, bm)
    if bm % rows or (rows < bm and rows < 16):
        raise ValueError(f"tiles.rows must divide the mask block size {bm} and be >= 16, got {rows}")
    out = torch.empty_like(q)
    lse = torch.empty(b, h, s, dtype=torch.float32, device=q.device)
    dummy, no_perm = _placeholders(q.device)
    has_perm = perm is not None
    perm_t = perm if has_perm else no_perm
    sph = 0 if (not has_perm or perm.dim() == 1) else perm.stride(0)

    kk, vv = k, v
    ks = vs = kmean = dummy
    perm_k, perm_v = has_perm, has_perm
    if spec.qk_bits:
        quantized = quantize_inputs(q, k, v, spec, perm)
        (kk, ks), kmean = quantized["k"], quantized["kmean"]
        perm_k = False  # codes are already in the reordered order
        if spec.pv_fp8:
            vv, vs = quantized["v"]
            perm_v = False
    if spec.pv_fp8:
        v_strides = (vv.stride(0), vv.stride(1), vv.stride(3), vv.stride(2))  # logical [B, H, S, D]
    else:
        v_strides = vv.stride()

    grid = (geom.q_blocks * (bm // rows), b * h)
    qd = kd = vd = None
    if use_tma:
        if not has_perm:
            qd = _descriptor(q, [1, 1, rows, d])
        if not perm_k:
            kd = _descriptor(kk, [1, 1, block_n, d])
        if spec.pv_fp8:
            # transposed FP8 V: the token offset is the innermost coordinate and must be 16-byte aligned
            if geom.kv_split % 16 == 0:
                vd = _descriptor(vv, [1, 1, d, block_n])
        elif not perm_v:
            vd = _descriptor(vv, [1, 1, block_n, d])
    _attn_fwd[grid](
        q, kk, vv, out, lse, ks, vs, kmean, cnt, idx, perm_t, qd, kd, vd,
        *q.stride(), *kk.stride(), *v_strides, *out.stride(),
        *_mask_strides(cnt, b, h), *_mask_strides(idx, b, h), sph,
        h, s, geom.q_split, geom.q_blocks_first, s_kv, geom.kv_split, geom.kv_blocks_first, scale * LOG2E,
        HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=block_n, QUANT=bool(spec.qk_bits), K_PER_HEAD=spec.k_granularity == "head", QK_FP8=spec.qk_fp8, PV_FP8=spec.pv_fp8,
        PERM_Q=has_perm, PERM_K=perm_k, PERM_V=perm_v, PERM_OUT=has_perm, P_SHIFT=math.log2(Qz.P_FP8_SCALE) if spec.pv_fp8 else 0.0,
        QMAX=spec.qmax if spec.qk_bits else 1.0, TWO_LEVEL=two_level, TMA_QK=qd is not None and kd is not None, TMA_V=vd is not None, DOT_F32=interpreting(),
        ROWS=rows, WARP_SPEC=t.warp_spec, num_warps=t.warps, num_stages=t.stages,
    )  # fmt: skip
    return out, lse
