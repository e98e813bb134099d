"""Keys/values of a decode step, handed to the model still packed.

``QuantizedKVLayer.update`` returns a pair of :class:`PackedKV` tensors in fused mode. They have the shape, dtype
and device of the dense ``[B, H, S, D]`` keys/values they stand for, so the model's attention code sees nothing
unusual:

* ``torch.nn.functional.scaled_dot_product_attention`` on them (transformers' default ``sdpa`` attention, with or
  without its GQA packing and key-padding masks) runs :func:`~fastattn.attn_kernels.kv_decode.fused_decode_attention`,
  which reads the packed codes directly;
* transformers' ``repeat_kv`` (``x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)``, what its
  ``sdpa`` attention does before 5.24 when there is a padding mask) stays packed: the three steps are recorded,
  and SDPA on the result maps query head ``j`` to KV head ``j // n``;
* anything else (eager attention's matmuls, a causal multi-row query, a per-row mask, autograd) gets the dense
  tensor (with any recorded steps replayed), dequantized once per step, and the reason is counted in the layer's
  ``attention_stats``: a wrong answer is never possible, only a slower one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from ..attn_kernels.kv_decode import fused_decode_attention, mask_to_bias
from . import quant

# scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class DecodeView:
    """One layer's visible keys/values for one step: the small full-precision segment ``[sinks | window | new]``
    and the packed body, captured before the layer stores the new tokens (so a later dense read sees exactly what
    this step attends to)."""

    def __init__(self, layer, fp_k, fp_v, q_k, q_v, num_sinks: int, skip: int, key_scale):
        self.layer = layer
        self.fp_k, self.fp_v = fp_k, fp_v
        self.q_k, self.q_v = q_k, q_v
        self.num_sinks, self.skip, self.key_scale = num_sinks, skip, key_scale
        self._dense = None
        self.mutated = False  # an in-place op changed the dense copy: the packed codes no longer describe it
        b, h, f, d = fp_k.shape
        self.shape = (b, h, f + q_k.data.shape[-2] - skip, d)

    def dense(self, reason: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The ordinary ``[B, H, S, D]`` keys and values (dequantized once, then kept); counts ``reason``."""
        if self._dense is None:
            self.layer.count_dense(reason)
            dtype, backend = self.fp_k.dtype, self.layer.backend
            if self.key_scale is None:
                body_k = quant.dequantize(self.q_k, dtype, backend)
            else:  # same rounding as the layer's own path: scale in fp32, then to the model dtype
                body_k = (quant.dequantize(self.q_k, torch.float32, backend) * self.key_scale).to(dtype)
            body_v = quant.dequantize(self.q_v, dtype, backend)
            ns, sk = self.num_sinks, self.skip
            self._dense = tuple(
                torch.cat([fp[:, :, :ns], body[:, :, sk:], fp[:, :, ns:]], -2)
                for fp, body in ((self.fp_k, body_k), (self.fp_v, body_v))
            )
        return self._dense


class PackedKV(torch.Tensor):
    """A ``[B, H, S, D]`` key or value tensor that is really a :class:`DecodeView` (see the module docstring)."""

    @staticmethod
    def __new__(cls, view: DecodeView, which: int, ops: tuple = (), shape=None):
        return torch.Tensor._make_wrapper_subclass(
            cls, shape or view.shape, dtype=view.fp_k.dtype, device=view.fp_k.device, requires_grad=False
        )

    def __init__(self, view: DecodeView, which: int, ops: tuple = (), shape=None):
        self.view = view
        self.which = which  # 0 keys, 1 values
        self.ops = ops  # the steps of repeat_kv applied so far: ("unsqueeze",), ("expand", n), ("reshape", n)

    @property
    def repeat(self) -> int:
        """KV heads repeated ``n`` times by a complete ``repeat_kv``, 1 for the tensor as the cache returned it."""
        return self.ops[2][1] if len(self.ops) == 3 else 1

    def __repr__(self):
        return f"PackedKV({'keys' if self.which == 0 else 'values'}, shape={tuple(self.shape)}, {self.view.q_k.bits}-bit body)"

    def dense(self, reason: str) -> torch.Tensor:
        t = self.view.dense(reason)[self.which]
        b, h, s, d = t.shape
        for op in self.ops:  # replay the recorded repeat_kv steps
            if op[0] == "unsqueeze":
                t = t[:, :, None]
            elif op[0] == "expand":
                t = t.expand(b, h, op[1], s, d)
            else:
                t = t.reshape(b, h * op[1], s, d)
        return t

    def _repeat_kv_step(self, func, args):
        """The next step of transformers' ``repeat_kv`` on this tensor, still packed; ``None`` for anything else."""
        b, h, s, d = self.view.shape
        sizes = (
            tuple(args[1]) if len(args) == 2 and isinstance(args[1], (tuple, list, torch.Size)) else args[1:]
        )
        full = slice(None)
        if func is torch.Tensor.__getitem__ and not self.ops and args[1] == (full, full, None, full, full):
            return PackedKV(self.view, self.which, (("unsqueeze",),), (b, h, 1, s, d))
        if func is torch.Tensor.expand and len(self.ops) == 1 and len(sizes) == 5:
            n = sizes[2]
            if isinstance(n, int) and n >= 1 and tuple(sizes) == (b, h, n, s, d):
                return PackedKV(self.view, self.which, (*self.ops, ("expand", n)), (b, h, n, s, d))
        if func is torch.Tensor.reshape and len(self.ops) == 2:
            n = self.ops[1][1]
            if tuple(sizes) == (b, h * n, s, d):
                return PackedKV(self.view, self.which, (*self.ops, ("reshape", n)), (b, h * n, s, d))
        return None

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            out, reason = _try_fused_sdpa(args, kwargs)
            if out is not None:
                return out
            args, kwargs = _densify((args, kwargs), reason)
        elif args and isinstance(args[0], PackedKV) and not kwargs:
            step = args[0]._repeat_kv_step(func, args)
            if step is not None:
                return step
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # In place / out=: the change lands in the dense copy, so SDPA must read that copy from now on.
        if func._schema.is_mutable:
            for x in (*args, *kwargs.values()):
                if isinstance(x, PackedKV):
                    x.view.mutated = True
        args, kwargs = _densify((args, kwargs), f"used by {func.__name__} (not SDPA)")
        return func(*args, **kwargs)


def _densify(tree, reason: str):
    return tree_map(lambda x: x.dense(reason) if isinstance(x, PackedKV) else x, tree)


def _try_fused_sdpa(args, kwargs) -> tuple[torch.Tensor | None, str]:
    """Run SDPA fused if its arguments are a decode step over one :class:`DecodeView`; else ``(None, reason)``."""
    a = dict(zip(_SDPA_PARAMS, args))
    a.update(kwargs)
    q, k, v = a.get("query"), a.get("key"), a.get("value")
    if not (
        isinstance(k, PackedKV)
        and isinstance(v, PackedKV)
        and k.view is v.view
        and k.which == 0
        and v.which == 1
        and k.ops == v.ops
        and len(k.ops) in (0, 3)
    ):
        return None, "SDPA keys/values are not one packed cache view"
    view = k.view
    if view.mutated:
        return None, "keys/values were modified in place"
    b, hkv, s, d = view.shape
    n = k.repeat  # query head j reads KV head j // n after repeat_kv
    if isinstance(q, PackedKV) or q.dim() != 4 or q.shape[0] != b or q.shape[-1] != d:
        return None, f"query shape {tuple(q.shape)} does not match keys {tuple(k.shape)}"
    if q.requires_grad and torch.is_grad_enabled():
        return None, "autograd through the cache"
    if a.get("dropout_p", 0.0) or a.get("is_causal", False):
        return None, "dropout or is_causal in SDPA"
    hq, lq = q.shape[1], q.shape[2]
    if n > 1:
        if hq != hkv * n or lq != 1:
            return None, f"query heads {hq} x {lq} rows do not match keys repeated {n}x over {hkv} heads"
        rows = q.reshape(b, hkv, n, d)
    elif hq == hkv:  # MHA, or transformers' pack_gqa: the group's query rows sit on the sequence axis
        rows = q
    elif a.get("enable_gqa", False) and hq % hkv == 0 and lq == 1:
        rows = q.reshape(b, hkv, hq // hkv, d)
    else:
        return None, f"query heads {hq} x {lq} rows cannot be grouped onto {hkv} KV heads"
    try:
        bias = mask_to_bias(a.get("attn_mask"), b, s)
    except ValueError as e:
        return None, f"attention mask: {e}"
    out = fused_decode_attention(
        rows,
        view.fp_k,
        view.fp_v,
        view.q_k,
        view.q_v,
        num_sinks=view.num_sinks,
        skip=view.skip,
        key_scale=view.key_scale,
        bias=bias,
        scale=a.get("scale"),
    )
    view.layer.count_fused()
    return out.reshape(q.shape), ""
