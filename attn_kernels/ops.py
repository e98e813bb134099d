"""Public entry point of the kernel layer: input checks, backend choice, custom op, fallbacks.

``sparse_attention`` is registered as the ``torch.library`` custom op ``fastattn::sparse_attention`` so
``torch.compile`` treats it as one opaque node. CUDA tensors run the Triton kernel; CPU tensors run the
exact PyTorch reference (or the Triton kernel in the interpreter when ``TRITON_INTERPRET=1`` and
``backend="triton"``). Inputs the kernel cannot serve (head_dim other than 64/128, fp32, a GPU older
than Ampere) run exact dense SDPA instead; every such fallback is counted with its reason and warned
about once.
"""

from __future__ import annotations

import functools
import math
import warnings
import weakref
from collections import Counter

import torch

from ..masks.block_mask import BlockMask
from ..masks.layout import TokenLayout
from . import quantize as Qz
from .reference import attention_reference

SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)

_fallbacks: Counter = Counter()
_warned: set[str] = set()
# perm tensors already checked, by id: (weak reference, tensor version at the check, device copies)
_perm_cache: dict[int, tuple] = {}


def _perm_entry(perm: torch.Tensor):
    entry = _perm_cache.get(id(perm))
    if entry is None or entry[0]() is not perm or entry[1] != perm._version:
        return None
    return entry


def fallback_counts() -> dict[str, int]:
    """How many calls fell back to dense attention, by reason."""
    return dict(_fallbacks)


def reset_fallback_counts() -> None:
    _fallbacks.clear()


def _warn_once(key: str, message: str, stacklevel: int) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=stacklevel + 1)


def _record_fallback(reason: str) -> None:
    _fallbacks[reason] += 1
    _warn_once(reason, f"fastattn: dense attention fallback ({reason}); counted in fallback_counts()", 3)


# ----------------------------------------------------------------------------- checks


def check_inputs(q, k, v, block_mask, perm, quant) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [B, H, S, D], got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, S, D], got shape {tuple(t.shape)}")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if not (q.shape == k.shape and k.shape[:3] == v.shape[:3] and v.shape[-1] == q.shape[-1]):
        raise ValueError(
            "q, k and v must share [B, H, S, D] (self-attention layout); got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    if any(st == 0 for t in (q, k, v) for st in t.stride()[2:]) and q.shape[2] > 1:
        raise ValueError("q, k, v must not be broadcast (stride 0) along tokens or channels")
    Qz.QuantSpec.parse(quant)
    b, h, s, _ = q.shape
    if block_mask is not None:
        if not isinstance(block_mask, BlockMask):
            raise TypeError(
                f"block_mask must be a fastattn BlockMask or None, got {type(block_mask).__name__}"
            )
        if not torch.compiler.is_compiling():
            block_mask.validate(b, h, s)
    if perm is not None:
        if not isinstance(perm, torch.Tensor) or perm.dtype not in (torch.int32, torch.int64):
            raise TypeError("perm must be an int32/int64 tensor [S] or [H, S]")
        if perm.shape not in ((s,), (h, s)):
            raise ValueError(f"perm must be [S]={s} or [H, S]=({h}, {s}), got {tuple(perm.shape)}")
        if not torch.compiler.is_compiling() and _perm_entry(perm) is None:
            ok = torch.equal(
                torch.sort(perm.long(), dim=-1).values, torch.arange(s, device=perm.device).expand_as(perm)
            )
            if not ok:
                raise ValueError("perm must be a permutation of range(S) (per head)")
            if len(_perm_cache) > 256:
                _perm_cache.clear()
            _perm_cache[id(perm)] = (weakref.ref(perm), perm._version, {})


def _perm_on(perm: torch.Tensor, device: torch.device) -> torch.Tensor:
    """int32 contiguous copy of ``perm`` on ``device``, cached while ``perm`` is unchanged."""
    entry = None if torch.compiler.is_compiling() else _perm_entry(perm)
    if entry is None:
        return perm.to(device=device, dtype=torch.int32).contiguous()
    copies = entry[2]
    if device not in copies:
        copies[device] = perm.to(device=device, dtype=torch.int32).contiguous()
    return copies[device]


@functools.lru_cache(maxsize=64)
def _dense_mask(seq_len: int, block_size: int) -> BlockMask:
    return BlockMask.dense(TokenLayout(seq_len), block_size)


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
    split: int,
    quant: str,
    use_triton: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    mask = BlockMask(kv_counts, kv_indices, TokenLayout(q.shape[2], split, True), block_size)
    if use_triton:
        from .triton_attention import triton_attention

        return triton_attention(q, k, v, mask, scale, quant, perm)
    out, lse = attention_reference(q, k, v, mask, scale, quant, perm)
    return out, lse


@_sparse_attention_op.register_fake
def _(q, k, v, kv_counts, kv_indices, perm, scale, block_size, split, quant, use_triton):
    b, h, s, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, h, s), dtype=torch.float32)


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


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask | None = None,
    *,
    scale: float | None = None,
    quant: str = "none",
    perm: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Block-sparse (optionally reordered, quantized) attention.

    Args:
        q, k, v: ``[B, H, S, D]`` (any strides; a ``[B, S, H, D]`` tensor's ``.transpose(1, 2)`` works
            without a copy). float16/bfloat16 for the kernel; float32 runs the reference.
        block_mask: which key blocks each query block reads; ``None`` means dense.
        scale: softmax scale, default ``1/sqrt(D)``.
        quant: ``"none"``, ``"int8"`` / ``"int4"`` (integer Q·Kᵀ, 16-bit P·V) or ``"int8-fp8"`` /
            ``"int4-fp8"`` (FP8 P·V on sm_89+; 16-bit P·V elsewhere), or ``"fp8"`` (FP8 Q·Kᵀ and P·V on
            sm_89+; ``"int8"`` elsewhere).
        perm: gather index ``[S]`` or ``[H, S]``: attention runs on the reordered tokens (the mask is in
            that order) and the output comes back in the original order.
        return_lse: also return the natural-log log-sum-exp ``[B, H, S]`` (float32; ``-inf`` for rows
            that read no key).
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.

    Returns:
        ``out`` with q's shape, dtype and strides, or ``(out, lse)``.
    """
    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}")
    check_inputs(q, k, v, block_mask, perm, quant)
    b, h, s, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if not scale > 0:  # the kernel's running max assumes scores keep their order
        raise ValueError(f"scale must be a positive float (softmax temperature), got {scale}")
    if quant.endswith("fp8") and not pv_fp8_supported(q.device):
        # GPUs without FP8 tensor cores: 16-bit P.V (and integer Q.K^T for the all-FP8 mode)
        served = "int8" if quant == "fp8" else quant[: -len("-fp8")]
        note = f"quant {quant!r} served as {served!r} on {q.device} (no FP8 tensor cores)"
        _warn_once(note, f"fastattn: {note}", 2)
        quant = served
    mask = block_mask if block_mask is not None else _dense_mask(s, 128)

    if backend == "reference":
        use_triton = False
    else:
        from .triton_attention import interpreting

        reason = _triton_reason(q, quant)
        can_run = q.is_cuda or interpreting()
        if backend == "triton" and not can_run:
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")
        use_triton = reason is None and (q.is_cuda or backend == "triton")
        if reason is not None and (q.is_cuda or backend == "triton"):
            _record_fallback(reason)
            return _dense_fallback(q, k, v, scale, return_lse)
    if use_triton and mask.block_size != 128 and q.is_cuda and not interpreting():
        raise ValueError(f"the GPU kernel takes block_size 128 masks, got {mask.block_size}")
    mask = mask.to(q.device)
    perm_t = None if perm is None else _perm_on(perm, q.device)
    out, lse = _sparse_attention_op(
        q,
        k,
        v,
        mask.kv_counts,
        mask.kv_indices,
        perm_t,
        scale,
        mask.block_size,
        mask.layout.split,
        quant,
        use_triton,
    )
    return (out, lse) if return_lse else out


def _dense_fallback(q, k, v, scale, return_lse):
    """Exact dense attention (ignores the mask: the fallback is always the exact model)."""
    if not return_lse:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    out, lse = attention_reference(q, k, v, None, scale)
    return out, lse
