"""FlashAttention-4 (``flash-attn-4``: FlashAttention's CuTe-DSL kernels, compiled just in time) as a
backend of the kernel layer on Hopper (sm90) and Blackwell (sm100) GPUs.

:func:`fastattn.attn_kernels.run_attention` picks it with ``backend="auto"`` when it is installed
(``pip install "fastattn[fa4]"``) and the call is one it serves exactly; ``backend="fa4"`` insists and
raises with the reason otherwise. Everything else stays on our Triton kernel. :func:`call_reason` says why a
call is not FA4's (``None`` when it is):

- float16/bfloat16 q, k, v on a CUDA sm90 or sm100 GPU, head_dim 64 or 128, channels contiguous;
- no quantization (FA4's FP8 forward is SM100-only and takes per-head descales, not our modes) and no token
  permutation (FA4 has no gather);
- block lists on FA4's block grid: ``block_size`` 128, and on each side one segment, or two split on a
  block boundary (a ragged first segment would shift every later block off FA4's uniform grid).

What FA4 (4.0.0b36) takes, as read from its ``flash_attn/cute/interface.py``:
``flash_attn_func(q, k, v, softmax_scale=, block_sparse_tensors=, return_lse=True) -> (out, lse)`` with q
``[B, Sq, H, D]``, k and v ``[B, Skv, H, D]`` (channels contiguous, other strides free, 16-byte aligned),
out ``[B, Sq, H, D]`` and lse ``[B, H, Sq]`` float32 in natural log, ``-inf`` (out 0) for a row that reads no
key: the same LSE as ours, so ring attention and residual merges can use it.

Block sparsity is FlexAttention's CSR form (``BlockSparseTensorsTorch``): per (batch, head, query tile)
``mask_block_cnt/idx`` (key tiles that get a ``mask_mod``) and ``full_block_cnt/idx`` (key tiles read whole),
batch and head dims of size 1 broadcast, with the tile sizes in ``block_size=(q, kv)``. Our listed blocks are
whole blocks, so they become the full lists and the mask lists are empty. FA4 walks a list from its end and
applies the sequence-length mask only to the first tile it reads, so a list must be ascending (the ragged
last key block, the highest index, is then the masked one); the conversion sorts. On sm90, 128-token blocks
run as 128x128 tiles for head_dim 64 and 128. On sm100 FA4 processes query tiles in pairs (``q_stage`` 2)
once Sq > 128, so its query block is 256 tokens, two of ours: it serves such lists only where both halves
read the same key blocks.
"""

from __future__ import annotations

import functools
import weakref
from typing import NamedTuple

import torch

from .geometry import BlockLists, KernelGeometry

BLOCK_SIZE = 128  # the only block size served (sm90 tiles; the tested geometry)
HEAD_DIMS = (64, 128)
ARCHS = {9: "sm90", 10: "sm100"}  # compute-capability majors FA4 serves here
INSTALL_HINT = "pip install 'fastattn[fa4]'"


class NotExpressible(ValueError):
    """Block lists FA4's block grid cannot hold exactly."""


class FA4Blocks(NamedTuple):
    """Block lists in FA4's form, on the lists' device."""

    full_cnt: torch.Tensor  # int32 [Bm, Hm, nQ']: key blocks read whole, per FA4 query block
    full_idx: torch.Tensor  # int32 [Bm, Hm, nQ', K']: ascending; slots past the count hold 0
    mask_cnt: torch.Tensor  # int32 [Bm, Hm, nQ']: zeros (no block needs a mask_mod)
    mask_idx: torch.Tensor  # int32 [Bm, Hm, nQ', 1]: zeros
    block_size: tuple[int, int]  # FA4's (query, key) block in tokens
    dense: bool  # every query block reads every key block: FA4's dense kernel serves it, no lists


# ----------------------------------------------------------------------------- availability


@functools.lru_cache(maxsize=1)
def _api():
    """``(flash_attn_func, BlockSparseTensorsTorch)`` from flash-attn-4 (imports CUTLASS: seconds)."""
    from flash_attn.cute import flash_attn_func
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    return flash_attn_func, BlockSparseTensorsTorch


@functools.lru_cache(maxsize=1)
def import_error() -> str | None:
    """Why flash-attn-4 cannot be imported (None when it can); tried once per process."""
    try:
        _api()
    except Exception as e:  # a missing package, or a broken CUTLASS DSL install: either way not usable
        return f"flash-attn-4 is not importable ({type(e).__name__}: {e}); {INSTALL_HINT}"
    return None


def geometry_reason(geom: KernelGeometry) -> str | None:
    """Why FA4's uniform block grid cannot hold lists over ``geom`` (None when it can)."""
    if geom.block_size != BLOCK_SIZE:
        return f"block_size {geom.block_size} (FA4 is served {BLOCK_SIZE}-token blocks)"
    for side, length, split in (("q", geom.q_len, geom.q_split), ("kv", geom.kv_len, geom.kv_split)):
        if split % geom.block_size and split != length:
            return (
                f"{side}_split {split} is not a multiple of block_size {geom.block_size}: its ragged first "
                "segment moves the later blocks off FA4's block grid"
            )
    return None


def call_reason(q, k, v, quant: str, perm, geometry: KernelGeometry) -> str | None:
    """Why FA4 cannot serve this call exactly (None when it can). The import is tried last, so calls FA4
    could never serve (CPU tensors, permutations...) do not load it."""
    if not q.is_cuda:
        return f"tensors on {q.device} (FA4 runs on CUDA GPUs)"
    major, minor = torch.cuda.get_device_capability(q.device)
    if major not in ARCHS:
        return f"GPU sm_{major}{minor} (FA4 is served on {' and '.join(ARCHS.values())})"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} (FA4 takes float16/bfloat16)"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head_dim {q.shape[-1]} not in {HEAD_DIMS}"
    if quant != "none":
        return f"quant {quant!r} (FA4 serves unquantized 16-bit attention)"
    if perm is not None:
        return "token permutation (FA4 has no gather)"
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        return "q, k or v channels not contiguous (stride(-1) != 1)"
    reason = geometry_reason(geometry)
    return reason if reason is not None else import_error()


# Calls that failed in FA4 (JIT compile or launch), by (device, dtype, head_dim): backend="auto" then keeps
# them on Triton for the rest of the process instead of failing again on every call.
_failed: dict[tuple, str] = {}


def _failure_key(q: torch.Tensor) -> tuple:
    return (q.device, q.dtype, q.shape[-1])


def failure(q: torch.Tensor) -> str | None:
    """The FA4 error an earlier call like this one met (None if none did)."""
    return _failed.get(_failure_key(q))


def record_failure(q: torch.Tensor, error: BaseException) -> str:
    reason = f"FA4 failed ({type(error).__name__}: {str(error)[:300]})"
    _failed[_failure_key(q)] = reason
    return reason


# ----------------------------------------------------------------------------- block lists -> FA4


def to_fa4(lists: BlockLists, q_group: int = 1) -> FA4Blocks:
    """Our block lists as FA4's block-sparse tensors (pure tensor work on the lists' device).

    ``q_group``: our query blocks per FA4 query block (2 on sm100 once Sq > 128). Raises
    :class:`NotExpressible` when FA4's grid cannot hold the lists exactly. Reads the counts once (a device
    sync on a GPU) to tell dense lists and, with ``q_group`` 2, to compare the paired rows.
    """
    counts, indices, geom = lists
    reason = geometry_reason(geom)
    if reason is not None:
        raise NotExpressible(reason)
    if q_group not in (1, 2):
        raise ValueError(f"q_group must be 1 or 2, got {q_group}")
    nk = geom.kv_blocks
    cnt = counts.to(torch.int32)
    if indices.shape[-1] == 0:  # no block listed anywhere: one padding slot, FA4 takes no empty dim
        indices = torch.zeros(*cnt.shape, 1, dtype=torch.int32, device=cnt.device)
    slots = torch.arange(indices.shape[-1], device=indices.device)
    # Ascending lists (FA4 masks the sequence end only on the first tile of its backward walk); padding
    # slots take nk so they sort last, then read 0. A list names each block once, so it fits in nk slots.
    idx = torch.sort(torch.where(slots < cnt[..., None], indices, nk), dim=-1).values[..., :nk]
    idx = torch.where(slots[: idx.shape[-1]] < cnt[..., None], idx, 0).to(torch.int32)
    dense = bool((cnt == nk).all())
    if q_group == 2 and not dense:
        if cnt.shape[-1] % 2:  # an odd last block pairs with itself (it covers FA4's last block alone)
            cnt, idx = torch.cat([cnt, cnt[..., -1:]], -1), torch.cat([idx, idx[..., -1:, :]], -2)
        same = (cnt[..., 0::2] == cnt[..., 1::2]) & (idx[..., 0::2, :] == idx[..., 1::2, :]).all(-1)
        if not bool(same.all()):
            raise NotExpressible(
                "query blocks 2i and 2i+1 read different key blocks (FA4 on sm100 runs 256-query blocks)"
            )
        cnt, idx = cnt[..., 0::2], idx[..., 0::2, :]
    cnt, idx = cnt.contiguous(), idx.contiguous()
    return FA4Blocks(
        full_cnt=cnt,
        full_idx=idx,
        mask_cnt=torch.zeros_like(cnt),
        mask_idx=torch.zeros(*cnt.shape, 1, dtype=torch.int32, device=cnt.device),
        block_size=(BLOCK_SIZE * q_group, BLOCK_SIZE),
        dense=dense,
    )


def _version(t: torch.Tensor) -> int:
    return -1 if t.is_inference() else t._version  # inference tensors keep no version counter


# conversions by (counts id, indices id, geometry, q_group): (weak refs, versions, FA4Blocks or the error)
_converted: dict[tuple, tuple] = {}


def fa4_blocks(lists: BlockLists, q_group: int = 1) -> FA4Blocks:
    """:func:`to_fa4`, remembered while the counts and indices tensors live unchanged (as ops.py remembers
    its checks): a plan's masks are converted once, not per call."""
    counts, indices, geom = lists
    key = (id(counts), id(indices), geom, q_group)
    versions = (_version(counts), _version(indices))
    hit = _converted.get(key)
    if hit is not None and hit[0][0]() is counts and hit[0][1]() is indices and hit[1] == versions:
        value = hit[2]
    else:
        try:
            value = to_fa4(lists, q_group)
        except NotExpressible as e:
            value = e
        if len(_converted) > 256:
            _converted.clear()
        _converted[key] = ((weakref.ref(counts), weakref.ref(indices)), versions, value)
    if isinstance(value, NotExpressible):
        raise value
    return value


def q_group_for(q: torch.Tensor) -> int:
    """Our query blocks per FA4 query block on q's GPU (see the module doc)."""
    major = torch.cuda.get_device_capability(q.device)[0]
    return 2 if major == 10 and q.shape[2] > BLOCK_SIZE else 1


# ----------------------------------------------------------------------------- launch


def fa4_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lists: BlockLists, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q ``[B, H, Sq, D]``, k and v ``[B, H, Skv, D]`` -> ``(out [B, H, Sq, D] with the strides
    ``torch.empty_like(q)`` has, lse [B, H, Sq] float32)``, through FA4. Inputs checked by
    :func:`call_reason`; raises :class:`NotExpressible` for lists FA4 cannot hold."""
    flash_attn_func, block_sparse_tensors = _api()
    blocks = fa4_blocks(lists, q_group_for(q))
    sparse = None
    if not blocks.dense:
        sparse = block_sparse_tensors(
            mask_block_cnt=blocks.mask_cnt,
            mask_block_idx=blocks.mask_idx,
            full_block_cnt=blocks.full_cnt,
            full_block_idx=blocks.full_idx,
            block_size=blocks.block_size,
        )
    with torch.no_grad():  # the op's autograd formula is ours (.backward), not FA4's
        out, lse = flash_attn_func(
            *(t.detach().transpose(1, 2) for t in (q, k, v)),
            softmax_scale=scale,
            block_sparse_tensors=sparse,
            return_lse=True,
        )
    out = out.transpose(1, 2)  # [B, H, Sq, D] view of FA4's [B, Sq, H, D]
    # The op promises empty_like(q)'s strides (its fake says so, and compiled code relies on it): the same
    # memory order when q itself is a [B, S, H, D] view (diffusers' layout), else one copy.
    if out.stride() != torch.empty_like(q, device="meta").stride():
        out = torch.empty_like(q).copy_(out)
    return out, lse
