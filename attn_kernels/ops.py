"""Public entry points of the kernel layer: input checks, backend choice, custom op, fallbacks.

``run_attention`` takes q ``[B, H, Sq, D]``, k and v ``[B, H, Skv, D]`` and block lists over a
:class:`~fastattn.attn_kernels.geometry.KernelGeometry` (``Sq != Skv`` allowed: a query chunk against a
key chunk), and returns an :class:`AttentionResult`: the output, the log-sum-exp, and the reason exact
dense attention ran instead of the kernel (``None`` when it did not); it counts nothing.
``sparse_attention`` is the backward-compatible self-attention wrapper (BlockMask in, output out) that
warns once per fallback reason; :func:`run_attention` returns the reason with every call.

Both run the ``torch.library`` custom op ``fastattn::sparse_attention`` so ``torch.compile`` treats the
kernel as one opaque node. CUDA tensors run FlashAttention-4 (:mod:`.fa4`, with ``fastattn[fa4]`` installed,
on sm90/sm100, for 16-bit calls without quantization or permutation on its block grid) or else the Triton
kernel; CPU tensors run the listed blocks only (:mod:`.cpu_sparse`, batched PyTorch products that equal the
exact reference up to float rounding), or the Triton kernel in the interpreter when ``TRITON_INTERPRET=1``
and ``backend="triton"``. Inputs no kernel can serve (head_dim other than 64/128, fp32, a GPU older than
Ampere) run exact dense attention instead. Every result names the backend that served it
(:attr:`AttentionResult.backend`); :func:`backend_stats` counts them per process, with the reasons
``backend="auto"`` left a CUDA call off FA4 (``FASTATTN_FA4=0`` keeps it off).

The op has an autograd formula (:mod:`.backward`): gradients of the reference math over the same block lists
and permutation, whichever forward ran (straight-through for quantized modes); the dense fallback is SDPA's.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
import weakref
from collections import Counter
from typing import NamedTuple

import torch

from . import backward as _backward
from . import fa4 as _fa4
from . import quantize as Qz
from .geometry import BlockLists, KernelGeometry, check_block_lists, dense_lists
from .reference import attention_reference, reference_attention

SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)

_warned: set[str] = set()
# tensors already checked, by ids: (weak references, versions at the check, what the check left behind)
_checked: dict[tuple[int, ...], tuple] = {}


def _version(t: torch.Tensor) -> int:
    return -1 if t.is_inference() else t._version  # inference tensors keep no version counter


def _memo(*tensors: torch.Tensor):
    """What was remembered about these tensors, while they live unchanged (None otherwise)."""
    entry = _checked.get(tuple(map(id, tensors)))
    if entry is None or any(r() is not t for r, t in zip(entry[0], tensors)):
        return None
    return entry[2] if entry[1] == tuple(map(_version, tensors)) else None


def _remember(value, *tensors: torch.Tensor):
    if len(_checked) > 256:
        # Entries of freed tensors go first: clearing live ones would check (a device sync) and copy again
        # every tensor a caller keeps, such as a per-head plan's permutations, on its next call.
        for key in [key for key, (refs, *_) in _checked.items() if any(r() is None for r in refs)]:
            del _checked[key]
        if len(_checked) > 256:
            _checked.clear()
    refs, versions = tuple(map(weakref.ref, tensors)), tuple(map(_version, tensors))
    _checked[tuple(map(id, tensors))] = (refs, versions, value)
    return value


def _warn_once(key: str, message: str, stacklevel: int) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=stacklevel + 1)


def _record_fallback(reason: str) -> None:
    """``sparse_attention`` says a fallback out loud once per reason (``run_attention`` returns it)."""
    _warn_once(reason, f"fastattn: dense attention fallback ({reason}); run_attention returns it per call", 3)


class _Result(NamedTuple):
    out: torch.Tensor  # [B, H, Sq, D]: q's dtype (and q's strides from the kernel)
    lse: torch.Tensor  # [B, H, Sq] float32 natural-log log-sum-exp; -inf for rows that read no key
    fallback: str | None  # why exact dense attention ran instead of the kernel; None if it did not


class AttentionResult(_Result):
    """What one attention call returns: ``(out, lse, fallback)`` (it unpacks as those three), and
    ``backend``, what served the call: ``"fa4"``, ``"triton"``, ``"cpu"`` (listed blocks in PyTorch),
    ``"reference"``, or ``"dense"`` (the exact dense fallback); None for a result built without one."""

    backend: str | None = None

    def __new__(cls, out, lse, fallback, backend: str | None = None):
        res = super().__new__(cls, out, lse, fallback)
        res.backend = backend
        return res


BACKENDS = ("auto", "triton", "fa4", "reference")
# backend="auto" sends a call to FA4 only from this many query-key pairs (B*H*Sq*Skv) up: below it FA4's host
# overhead per call outweighs its faster tiles (bench/results/fa4-check-h200.json: slower than Triton at
# 4 heads x 1,664 tokens, faster at FLUX 2048^2 and Wan 480p sizes).
FA4_MIN_WORK = 1e9
# per process: calls by the backend that served them, and why backend="auto" left CUDA calls off FA4
_served: Counter = Counter()
_fa4_skipped: Counter = Counter()


def backend_stats() -> dict:
    """``{"served": {backend: calls}, "fa4_skipped": {reason: calls}}`` since the last reset (eager calls;
    a compiled graph counts when it is traced). Each result also says its backend."""
    return {"served": dict(_served), "fa4_skipped": dict(_fa4_skipped)}


def reset_backend_stats() -> None:
    _served.clear()
    _fa4_skipped.clear()


def _served_by(res: AttentionResult, skipped: str | None = None) -> AttentionResult:
    if not torch.compiler.is_compiling():
        _served[res.backend] += 1
        if skipped is not None and res.out.is_cuda:
            _fa4_skipped[skipped] += 1
    return res


# ----------------------------------------------------------------------------- checks


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _check_tensors(q, k, v, square: bool) -> None:
    """q ``[B, H, Sq, D]``, k and v ``[B, H, Skv, D]`` (``Skv == Sq`` when ``square``)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [B, H, S, D], got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, S, D], got shape {tuple(t.shape)}")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if 0 in q.shape or 0 in k.shape or 0 in v.shape:
        shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        if 0 in (q.shape[-1], k.shape[-1], v.shape[-1]):
            raise ValueError(f"head_dim (D of [B, H, S, D]) must be at least 1; got {shapes}")
        raise ValueError(f"q, k, v must be non-empty [B, H, S, D] tensors; got {shapes}")
    b, h, _, d = q.shape
    if square:
        ok = q.shape == k.shape and k.shape[:3] == v.shape[:3] and v.shape[-1] == d
        expected = "q, k and v must share [B, H, S, D] (self-attention layout)"
    else:
        ok = k.shape[:2] == q.shape[:2] and k.shape[3] == d and v.shape == k.shape
        expected = (
            f"k and v must be [B, H, Skv, D] = [{b}, {h}, Skv, {d}], the batch, heads and head_dim of q "
            "[B, H, Sq, D]"
        )
    if not ok:
        raise ValueError(f"{expected}; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    if any(st == 0 and n > 1 for t in (q, k, v) for st, n in zip(t.stride()[2:], t.shape[2:])):
        raise ValueError("q, k, v must not be broadcast (stride 0) along tokens or channels")


def _check_scale(scale) -> None:
    """None (``1/sqrt(D)``) or a finite positive number: the kernel's running max assumes scores keep their
    order, and an infinite scale turns every row into NaN."""
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(
            f"scale must be a float (softmax temperature) or None, got {type(scale).__name__} {scale!r}"
        )
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive, finite float (softmax temperature), got {scale}")


def _check_flags(quant, **flags) -> None:
    if not isinstance(quant, str):
        raise TypeError(
            f"quant must be a mode name (str), one of {Qz.MODES}; got {type(quant).__name__} {quant!r}"
        )
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")


def _check_mask(block_mask, batch: int, heads: int, q_len: int, kv_len: int) -> None:
    if not (hasattr(block_mask, "block_lists") and hasattr(block_mask, "validate")):
        raise TypeError(f"block_mask must be a fastattn BlockMask or None, got {type(block_mask).__name__}")
    if not torch.compiler.is_compiling():
        block_mask.validate(batch, heads, q_len, kv_len)  # remembered on the mask


def _check_lists(lists: BlockLists, batch: int, heads: int, q_len: int, kv_len: int) -> None:
    """Shapes on every call; index ranges (a device sync) once per unchanged counts/indices tensors."""
    check_block_lists(lists, batch, heads, q_len, kv_len, values=False)
    if torch.compiler.is_compiling():
        return
    seen = _memo(lists.counts, lists.indices)  # key-block counts these lists were checked against
    if seen is None or lists.geometry.kv_blocks not in seen:
        check_block_lists(lists, batch, heads, q_len, kv_len)
        (seen if seen is not None else _remember(set(), lists.counts, lists.indices)).add(
            lists.geometry.kv_blocks
        )


def _check_perm(perm, heads: int, seq_len: int) -> None:
    if not isinstance(perm, torch.Tensor) or perm.dtype not in (torch.int32, torch.int64):
        raise TypeError("perm must be an int32/int64 tensor [S] or [H, S]")
    h, s = heads, seq_len
    if perm.shape not in ((s,), (h, s)):
        raise ValueError(f"perm must be [S]={s} or [H, S]=({h}, {s}), got {tuple(perm.shape)}")
    if not torch.compiler.is_compiling() and _memo(perm) is None:
        ok = torch.equal(
            torch.sort(perm.long(), dim=-1).values, torch.arange(s, device=perm.device).expand_as(perm)
        )
        if not ok:
            raise ValueError("perm must be a permutation of range(S) (per head)")
        _remember({}, perm)  # device copies of perm, filled by _perm_on


def _perm_on(perm: torch.Tensor, device: torch.device) -> torch.Tensor:
    """int32 contiguous copy of ``perm`` on ``device``, cached while ``perm`` is unchanged."""
    copies = None if torch.compiler.is_compiling() else _memo(perm)
    if copies is None:
        return perm.to(device=device, dtype=torch.int32).contiguous()
    if device not in copies:
        copies[device] = perm.to(device=device, dtype=torch.int32).contiguous()
    return copies[device]


# ----------------------------------------------------------------------------- custom op


@torch.library.custom_op("fastattn::sparse_attention", mutates_args=())
def _sparse_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_counts: torch.Tensor,
    kv_indices: torch.Tensor,
    perm: torch.Tensor | None,
    scale: float,
    block_size: int,
    q_split: int,
    kv_split: int,
    quant: str,
    kernel: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    geometry = KernelGeometry(q.shape[2], k.shape[2], block_size, q_split, kv_split)
    lists = BlockLists(kv_counts, kv_indices, geometry)
    if kernel == "fa4":  # chosen by _attend: 16-bit, no quant, no perm, lists on FA4's grid
        return _fa4.fa4_attention(q, k, v, lists, scale)
    if kernel == "triton":
        from .triton_attention import triton_attention

        return triton_attention(q, k, v, lists, scale, quant, perm)
    if q.device.type == "cpu":  # only the listed blocks, batched (equals the reference up to rounding)
        from .cpu_sparse import listed_blocks_attention

        return listed_blocks_attention(q, k, v, lists, scale, quant, perm)
    return reference_attention(q, k, v, lists, scale, quant, perm)


@_sparse_attention_op.register_fake
def _(q, k, v, kv_counts, kv_indices, perm, scale, block_size, q_split, kv_split, quant, kernel):
    b, h, s, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, h, s), dtype=torch.float32)


# Training and gradient guidance: the reference math's gradients, recomputed from q, k, v (see .backward)
_sparse_attention_op.register_autograd(_backward.backward, setup_context=_backward.setup_context)


# ----------------------------------------------------------------------------- public API


def _triton_reason(q: torch.Tensor, quant: str) -> str | None:
    """Why the Triton kernel cannot serve this call (None when it can)."""
    d = q.shape[-1]
    if d not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {d} not in {SUPPORTED_HEAD_DIMS}"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} (kernel takes float16/bfloat16)"
    if q.is_cuda:
        major, minor = torch.cuda.get_device_capability(q.device)
        if major < 8:
            return f"GPU sm_{major}{minor} older than Ampere"
    return None


def pv_fp8_supported(device: torch.device) -> bool:
    """FP8 P.V needs Ada/Hopper tensor cores (sm_89+), or the interpreter."""
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) >= (8, 9)


def run_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    counts,
    indices: torch.Tensor | None = None,
    geometry: KernelGeometry | None = None,
    *,
    scale: float | None = None,
    quant: str = "none",
    perm: torch.Tensor | None = None,
    backend: str = "auto",
    need_lse: bool = True,
) -> AttentionResult:
    """Block-sparse (optionally reordered, quantized) attention of ``Sq`` queries against ``Skv`` keys.

    Args:
        q: ``[B, H, Sq, D]``; k, v: ``[B, H, Skv, D]`` (any strides; ``[B, S, H, D]`` memory viewed through
            ``.transpose(1, 2)`` works without a copy). float16/bfloat16 for the kernel; float32 runs the
            reference on the CPU and exact dense attention on a GPU.
        counts, indices, geometry: block lists, int32 ``[Bm, Hm, nQ]`` and ``[Bm, Hm, nQ, maxK]`` (``Bm`` 1 or
            B, ``Hm`` 1 or H; query block ``i`` reads key blocks ``indices[..., i, :counts[..., i]]``), and the
            :class:`KernelGeometry` they index (its ``q_len``/``kv_len`` must be Sq/Skv), best on q's device.
            Index ranges are checked once per unchanged tensors (a device sync). Or one ``BlockMask`` as
            ``counts``.
        scale: softmax scale, default ``1/sqrt(D)``.
        quant: a mode of :data:`fastattn.attn_kernels.QUANT_MODES` (see :func:`sparse_attention`).
        perm: gather index ``[S]`` or ``[H, S]``, self-attention only (``Sq == Skv``): attention runs on the
            reordered tokens (the block lists are in that order), the output comes back in the original one.
        backend: ``"auto"`` (FlashAttention-4 where it serves the call exactly, else Triton on CUDA, the
            listed blocks in PyTorch on the CPU), ``"fa4"`` (FlashAttention-4 or a ValueError saying why
            not), ``"triton"`` or ``"reference"``.
        need_lse: False when the caller uses only ``out``: a dense fallback then runs SDPA and ``lse`` is
            None (the kernel path returns it anyway, at no cost).

    Returns:
        :class:`AttentionResult` ``(out [B, H, Sq, D], lse [B, H, Sq] float32, fallback)`` and ``.backend``.
        ``lse`` is the natural-log log-sum-exp of each row's scaled scores (``-inf``, with ``out`` 0, for a row
        that reads no key), so results over disjoint key sets merge exactly. ``fallback``: why exact dense attention
        ran instead of the kernel (the block lists are then ignored), else ``None``; ``backend``: what served
        the call (also counted per process in :func:`backend_stats`).
    """
    _check_backend(backend)
    _check_tensors(q, k, v, square=False)
    _check_scale(scale)
    _check_flags(quant, need_lse=need_lse)
    b, h, sq, _ = q.shape
    skv = k.shape[2]
    if isinstance(counts, torch.Tensor):
        if indices is None or geometry is None:
            raise TypeError("run_attention takes counts, indices and geometry (or one BlockMask as counts)")
        lists = BlockLists(counts, indices, geometry)
        _check_lists(lists, b, h, sq, skv)
        if counts.device != q.device or indices.device != q.device:
            lists = BlockLists(counts.to(q.device), indices.to(q.device), geometry)
    elif indices is None and geometry is None:
        _check_mask(counts, b, h, sq, skv)
        lists = counts.to(q.device).block_lists()
    else:
        raise TypeError(
            f"counts must be an int32 tensor [Bm, Hm, nQ] (or a BlockMask), got {type(counts).__name__}"
        )
    Qz.QuantSpec.parse(quant)
    if perm is not None:
        if sq != skv:
            raise ValueError(f"perm reorders self-attention tokens: needs Sq == Skv, got Sq={sq}, Skv={skv}")
        _check_perm(perm, h, sq)
    return _attend(q, k, v, lists, scale, quant, perm, backend, need_lse=need_lse)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask=None,
    *,
    scale: float | None = None,
    quant: str = "none",
    perm: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Block-sparse (optionally reordered, quantized) self-attention; :func:`run_attention` for masks.

    Args:
        q, k, v: ``[B, H, S, D]`` (any strides; a ``[B, S, H, D]`` tensor's ``.transpose(1, 2)`` works
            without a copy). float16/bfloat16 for the kernel; float32 runs the reference.
        block_mask: a :class:`~fastattn.masks.BlockMask`: which key blocks each query block reads; ``None``
            means dense.
        scale: softmax scale, default ``1/sqrt(D)``.
        quant: ``"none"``, ``"int8"`` / ``"int4"`` (integer Q·Kᵀ, 16-bit P·V) or ``"int8-fp8"`` /
            ``"int4-fp8"`` (FP8 P·V on sm_89+; 16-bit P·V elsewhere), or ``"fp8"`` (FP8 Q·Kᵀ and P·V on
            sm_89+; ``"int8"`` elsewhere).
        perm: gather index ``[S]`` or ``[H, S]``: attention runs on the reordered tokens (the mask is in
            that order) and the output comes back in the original order.
        return_lse: also return the natural-log log-sum-exp ``[B, H, S]`` (float32; ``-inf`` for rows
            that read no key).
        backend: ``"auto"``, ``"fa4"``, ``"triton"`` or ``"reference"`` (see :func:`run_attention`).

    Returns:
        ``out`` with q's shape, dtype and strides, or ``(out, lse)``. A dense fallback is warned about once
        per reason (:func:`run_attention` returns the reason instead).
    """
    _check_backend(backend)
    _check_tensors(q, k, v, square=True)
    _check_scale(scale)
    _check_flags(quant, return_lse=return_lse)
    b, h, s, _ = q.shape
    if block_mask is None:
        lists = dense_lists(KernelGeometry.square(s, 128), q.device)
    else:
        _check_mask(block_mask, b, h, s, s)
        lists = block_mask.to(q.device).block_lists()
    Qz.QuantSpec.parse(quant)
    if perm is not None:
        _check_perm(perm, h, s)
    res = _attend(q, k, v, lists, scale, quant, perm, backend, need_lse=return_lse)
    if res.fallback is not None:
        _record_fallback(res.fallback)
    return (res.out, res.lse) if return_lse else res.out


def _attend(q, k, v, lists: BlockLists, scale, quant, perm, backend, need_lse) -> AttentionResult:
    """Inputs checked: pick the backend and run. A dense fallback without ``need_lse`` has ``lse`` None."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)  # checked by _check_scale
    if quant.endswith("fp8") and not pv_fp8_supported(q.device):
        # GPUs without FP8 tensor cores: 16-bit P.V (and integer Q.K^T for the all-FP8 mode)
        served = "int8" if quant == "fp8" else quant[: -len("-fp8")]
        note = f"quant {quant!r} served as {served!r} on {q.device} (no FP8 tensor cores)"
        _warn_once(note, f"fastattn: {note}", 3)
        quant = served

    if backend == "fa4":
        reason = _fa4.call_reason(q, k, v, quant, perm, lists.geometry) or _fa4_grid_reason(q, lists)
        if reason is not None:
            raise ValueError(f"backend='fa4' cannot serve this call: {reason}")
        try:
            return _served_by(_run(q, k, v, lists, "fa4", None, scale, quant))
        except Exception as e:
            raise RuntimeError(f"backend='fa4': FlashAttention-4 failed: {type(e).__name__}: {e}") from e
    skipped = None  # why backend="auto" left a CUDA call off FA4 (CPU calls are never FA4's: not counted)
    if backend == "auto":
        skipped = _fa4_skip_reason(q, k, v, quant, perm, lists)
        if skipped is None:
            try:
                return _served_by(_run(q, k, v, lists, "fa4", None, scale, quant))
            except Exception as e:  # a JIT or launch failure: Triton serves this and every call like it
                if torch.compiler.is_compiling():
                    raise
                skipped = _fa4.record_failure(q, e)
                _warn_once(skipped, f"fastattn: {skipped}; backend='auto' serves such calls with Triton", 3)

    kernel = "torch"  # the PyTorch path: listed blocks on the CPU, the exact reference on a GPU
    if backend != "reference" and (q.is_cuda or backend == "triton"):
        # Imported only here: it imports Triton, which CPU-only installs lack and the PyTorch path never needs.
        try:
            from .triton_attention import interpreting
        except ImportError as e:
            raise ValueError(
                f"backend={backend!r} serves CUDA tensors with fastattn's Triton kernel, but Triton cannot be "
                f"imported ({e}); install triton (it comes with CUDA builds of torch) or use backend='auto' on "
                "the CPU"
            ) from None

        if not (q.is_cuda or interpreting()):
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")
        kernel = "triton"
        reason = _triton_reason(q, quant)
        if reason is not None:
            res = AttentionResult(*_dense_fallback(q, k, v, scale, need_lse), reason, "dense")
            return _served_by(res, skipped)
        if lists.geometry.block_size != 128 and q.is_cuda and not interpreting():
            raise ValueError(f"the GPU kernel takes block_size 128 masks, got {lists.geometry.block_size}")
    perm_t = None if perm is None else _perm_on(perm, q.device)
    return _served_by(_run(q, k, v, lists, kernel, perm_t, scale, quant), skipped)


def _run(q, k, v, lists: BlockLists, kernel: str, perm_t, scale: float, quant: str) -> AttentionResult:
    counts, indices, geom = lists  # on q's device
    args = (perm_t, scale, geom.block_size, geom.q_split, geom.kv_split, quant, kernel)
    out, lse = _sparse_attention_op(q, k, v, counts, indices, *args)
    served = kernel if kernel != "torch" else ("cpu" if q.device.type == "cpu" else "reference")
    return AttentionResult(out, lse, None, served)


def _fa4_grid_reason(q, lists: BlockLists) -> str | None:
    """Why FA4's block grid on q's GPU cannot hold these lists (converted here, once per lists: the op's
    own conversion then finds them remembered)."""
    try:
        _fa4.fa4_blocks(lists, _fa4.q_group_for(q))
    except _fa4.NotExpressible as e:
        return str(e)
    return None


def _fa4_skip_reason(q, k, v, quant, perm, lists: BlockLists) -> str | None:
    """Why backend="auto" leaves this CUDA call off FA4 (None: FA4 serves it)."""
    if os.environ.get("FASTATTN_FA4", "1") == "0":
        return "FASTATTN_FA4=0"
    b, h, sq, _ = q.shape
    if b * h * sq * k.shape[2] < FA4_MIN_WORK:
        return f"call below FA4's size threshold ({FA4_MIN_WORK:.0e} query-key pairs): Triton is faster there"
    reason = _fa4.call_reason(q, k, v, quant, perm, lists.geometry) or _fa4.failure(q)
    return reason if reason is not None else _fa4_grid_reason(q, lists)


def _dense_fallback(q, k, v, scale, need_lse):
    """Exact dense attention (ignores the block lists: the fallback is always the exact model)."""
    if not need_lse:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale), None
    return attention_reference(q, k, v, None, scale)
