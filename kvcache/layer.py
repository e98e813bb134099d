"""One model layer's quantized KV cache (a transformers 5.x ``CacheLayerMixin``).

Token order inside a layer::

    [ sinks (fp) | body (quantized, or raw fp while at 16 bits) | recent window (fp) ]

* ``sinks``: the first ``num_sinks`` tokens, kept in full precision (attention sinks carry large,
  unquantization-friendly attention mass).
* ``window``: the most recent tokens in full precision; once it holds ``residual_length + G`` tokens, its oldest
  ``G``-token chunk (``G`` = key group size along tokens) is quantized into the body, so the window always keeps
  at least ``residual_length`` tokens and key groups never straddle a flush.
* ``body``: keys quantized per channel (groups of ``key_group`` tokens) and values per token (groups of
  ``value_group`` channels) by default, as in KIVI.

Progressive mode (PM-KVQ): with ``budget_bytes`` the body starts at 16 bits; whenever the layer's footprint
exceeds the budget, the whole body halves its bit-width (16 -> 8 by quantizing, then 8 -> 4 -> 2 by integer
shrinking of the packed codes) until it fits; new tokens are then quantized straight to the current width.

All tensors are ``[batch, kv_heads, tokens, head_dim]``. Full-precision parts are *counted* as bf16 in
:meth:`memory` (2 bytes per element) whatever dtype the model runs in, so ratios are against a bf16 cache.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from ..attn_kernels.kv_decode import fused_available
from ..attn_kernels.kv_pack import check_bits
from . import quant
from .packed import DecodeView, PackedKV

_BF16_BYTES = 2
_PROGRESSIVE_START = 16


def _axis_group(mode: str, size: int, what: str) -> tuple[int, int]:
    """``(rows, columns)`` of one quantization group of ``what`` ("key" or "value")."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{what}_group must be a positive int (tokens or channels per group), got {size!r}")
    if mode == "channel":  # groups run along tokens, one channel at a time
        return (size, 1)
    if mode == "token":  # groups run along channels, one token at a time
        return (1, size)
    raise ValueError(f"{what}_mode must be 'channel' or 'token', got {mode!r}")


def check_head_dim(
    head_dim: int, bits: int, key_group: tuple[int, int], value_group: tuple[int, int]
) -> None:
    """``ValueError`` unless groups of ``key_group`` / ``value_group`` (rows, columns) and ``bits``-bit packing fit
    ``head_dim`` channels; the message says which setting would."""
    for name, (_, gc) in (("key", key_group), ("value", value_group)):
        if head_dim % gc:
            fits = max(g for g in range(1, min(gc, head_dim) + 1) if head_dim % g == 0)
            raise ValueError(
                f"{name} group size {gc} must divide head_dim {head_dim} ({name}_mode='token' groups run along "
                f"channels): pass {name}_group={fits} or another divisor of {head_dim}"
            )
    per = 8 // bits
    if head_dim % per:
        raise ValueError(f"head_dim {head_dim} must be a multiple of {per} for {bits}-bit packing")


class QuantizedKVLayer(CacheLayerMixin):
    """Quantized cache for one attention layer. See the module docstring for the layout.

    Args:
        bits: packed width of the body (2, 4 or 8); in progressive mode the lowest width allowed.
        key_group / value_group: group sizes (tokens for per-channel groups, channels for per-token groups).
        key_mode / value_mode: ``"channel"`` or ``"token"`` grouping.
        residual_length: minimum number of recent tokens kept in full precision.
        num_sinks: leading tokens kept in full precision (0..4); ignored (0) for sliding-window layers.
        budget_bytes: PM-KVQ progressive mode if set: the layer's memory budget (K + V, as counted by
            :meth:`memory`).
        sliding_window: for sliding-window attention layers: only the last ``sliding_window - 1`` past tokens
            are kept visible, as in ``DynamicSlidingWindowLayer``.
        key_scale: optional ``[kv_heads, head_dim]`` (or ``[head_dim]``) per-channel key divisor applied before
            quantization and undone after (see :mod:`fastattn.kvcache.calibrate`).
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` for the pack/unpack kernels.
        attention: how a decode step reads the body. ``"fused"``: :mod:`fastattn.attn_kernels.kv_decode` attends over the
            packed codes (returned as :class:`~fastattn.attn_kernels.kv_packed.PackedKV`; needs CUDA or
            ``TRITON_INTERPRET=1``); ``"dequantize"``: the body is dequantized into ordinary tensors;
            ``"auto"`` (default): fused on CUDA when Triton is installed, else dequantize. Every step that does not
            run fused while a quantized body exists is counted with its reason in :meth:`attention_stats`.
    """

    is_sliding = False
    is_croppable = False

    def __init__(
        self,
        bits: int = 4,
        key_group: int = 64,
        value_group: int = 64,
        key_mode: str = "channel",
        value_mode: str = "token",
        residual_length: int = 32,
        num_sinks: int = 4,
        budget_bytes: float | None = None,
        sliding_window: int | None = None,
        key_scale: torch.Tensor | None = None,
        backend: str = "auto",
        attention: str = "auto",
    ):
        super().__init__()
        check_bits(bits)
        if attention not in ("auto", "fused", "dequantize"):
            raise ValueError(f"attention must be 'auto', 'fused' or 'dequantize', got {attention!r}")
        if not 0 <= num_sinks <= 4:
            raise ValueError(f"num_sinks must be in 0..4, got {num_sinks}")
        if residual_length < 0:
            raise ValueError(f"residual_length must be >= 0, got {residual_length}")
        if budget_bytes is not None and not budget_bytes > 0:
            raise ValueError(f"budget_bytes must be a positive number of bytes, got {budget_bytes!r}")
        if sliding_window is not None and sliding_window < 2:
            raise ValueError(f"sliding_window must be >= 2, got {sliding_window}")
        self.min_bits = bits
        self.key_group = _axis_group(key_mode, key_group, "key")
        self.value_group = _axis_group(value_mode, value_group, "value")
        # Tokens move from the window to the body in chunks that keep every token-axis group whole.
        self.flush_unit = max(self.key_group[0], self.value_group[0])
        if self.flush_unit % min(self.key_group[0], self.value_group[0]):
            raise ValueError("key and value token-group sizes must divide each other")
        self.residual_length = residual_length
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.num_sinks = 0 if self.is_sliding else num_sinks
        self.budget_bytes = budget_bytes
        self.key_scale = key_scale
        self.backend = backend
        self.attention = attention
        self._stats = {"fused": 0, "dense": 0, "dense_reasons": {}}
        self._clear()

    # ------------------------------------------------------------------ state

    def _clear(self) -> None:
        self.bits = _PROGRESSIVE_START if self.budget_bytes is not None else self.min_bits
        self.sink_k = self.sink_v = None  # [B, H, s, D]
        self.win_k = self.win_v = None  # [B, H, w, D]
        self.raw_k = self.raw_v = None  # body while at 16 bits
        self.q_k = self.q_v = None  # quant.QuantBlock while quantized
        self.body_len = 0
        self.cumulative_length = 0
        self._checksum = None
        self.repacks = []  # (tokens, bits_from, bits_to), for inspection and tests
        self.keys = self.values = None
        self.is_initialized = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.dim() != 4 or value_states.dim() != 4:
            raise ValueError(
                "expected key/value states of shape [batch, kv_heads, tokens, head_dim], got "
                f"{tuple(key_states.shape)} and {tuple(value_states.shape)}"
            )
        if key_states.dtype != value_states.dtype or key_states.device != value_states.device:
            raise ValueError(
                f"keys and values must share dtype and device, got {key_states.dtype} on {key_states.device} "
                f"and {value_states.dtype} on {value_states.device}"
            )
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        if value_states.shape[-1] != d:
            raise ValueError(f"keys have head_dim {d} but values {value_states.shape[-1]}")
        check_head_dim(d, self.min_bits, self.key_group, self.value_group)
        empty = key_states[:, :, :0]
        self.sink_k, self.sink_v = empty.clone(), value_states[:, :, :0].clone()
        self.win_k, self.win_v = empty.clone(), value_states[:, :, :0].clone()
        self._ks = None
        if self.key_scale is not None:
            ks = self.key_scale.to(self.device, torch.float32)
            if ks.shape not in ((h, d), (d,)):
                raise ValueError(f"key_scale must have shape [{h}, {d}] or [{d}], got {tuple(ks.shape)}")
            self._ks = ks.reshape(1, -1, 1, d)  # broadcasts over batch and tokens
        self.is_initialized = True

    # ------------------------------------------------------------------ body helpers

    def _body(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The body dequantized to the model dtype, ``[B, H, body_len, D]`` each."""
        if self.q_k is None:
            if self.raw_k is None:
                return self.sink_k[:, :, :0], self.sink_v[:, :, :0]
            return self.raw_k, self.raw_v
        k = quant.dequantize(self.q_k, torch.float32 if self._ks is not None else self.dtype, self.backend)
        if self._ks is not None:
            k = (k * self._ks).to(self.dtype)
        return k, quant.dequantize(self.q_v, self.dtype, self.backend)

    def _visible(self, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[sinks | body | window | new]`` in one preallocated buffer per K/V: the body is dequantized straight
        into its slice, so a decode step writes the full-size tensor once (``torch.cat`` would write it twice)."""
        if self.q_k is None or self._ks is not None:
            body_k, body_v = self._body()
            return (
                torch.cat([self.sink_k, body_k, self.win_k, k_new], -2),
                torch.cat([self.sink_v, body_v, self.win_v, v_new], -2),
            )
        ns, nb, nw = self.sink_k.shape[-2], self.body_len, self.win_k.shape[-2]
        outs = []
        for sink, q, win, new in (
            (self.sink_k, self.q_k, self.win_k, k_new),
            (self.sink_v, self.q_v, self.win_v, v_new),
        ):
            b, h, t, d = new.shape
            out = torch.empty(b, h, ns + nb + nw + t, d, dtype=self.dtype, device=new.device)
            out[:, :, :ns] = sink
            quant.dequantize(q, self.dtype, self.backend, out=out[:, :, ns : ns + nb])
            out[:, :, ns + nb : ns + nb + nw] = win
            out[:, :, ns + nb + nw :] = new
            outs.append(out)
        return outs[0], outs[1]

    def _quantize_kv(self, k: torch.Tensor, v: torch.Tensor, bits: int):
        if self._ks is not None:
            k = k.float() / self._ks
        return quant.quantize(k, bits, self.key_group, self.backend), quant.quantize(
            v, bits, self.value_group, self.backend
        )

    def _append_body(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.bits == _PROGRESSIVE_START:
            self.raw_k = k if self.raw_k is None else torch.cat([self.raw_k, k], -2)
            self.raw_v = v if self.raw_v is None else torch.cat([self.raw_v, v], -2)
        else:
            qk, qv = self._quantize_kv(k, v, self.bits)
            self.q_k, self.q_v = quant.cat_blocks(self.q_k, qk), quant.cat_blocks(self.q_v, qv)
            self._record_checksum()
        self.body_len += k.shape[-2]

    def _drop_body_front(self, n: int) -> None:
        """Sliding layers: forget the oldest ``n`` body tokens (``n`` is a multiple of the flush unit)."""
        if self.q_k is None:
            self.raw_k, self.raw_v = self.raw_k[:, :, n:], self.raw_v[:, :, n:]
        else:
            for name in ("q_k", "q_v"):
                q = getattr(self, name)
                gr = q.group[0]
                setattr(
                    self,
                    name,
                    # contiguous copies: the fused decode kernel indexes the body as one dense block
                    quant.QuantBlock(
                        q.data[:, :, n:].contiguous(),
                        q.scale[:, :, n // gr :].contiguous(),
                        q.zero[:, :, n // gr :].contiguous(),
                        q.bits,
                        q.group,
                    ),
                )
            self._record_checksum()
        self.body_len -= n

    def _record_checksum(self) -> None:
        # Only progressive mode re-packs the body, so only it needs the guard (a full pass over the body, with a
        # host sync: too costly to pay at every flush of a fixed-width cache).
        if self.budget_bytes is not None:
            self._checksum = (quant.checksum(self.q_k), quant.checksum(self.q_v))

    def _halve(self) -> None:
        """Halve the body's bit-width in place (PM-KVQ), guarded by the recorded checksum."""
        new_bits = self.bits // 2
        if self.q_k is None:  # 16 -> 8: the only step that reads the original values
            if self.raw_k is not None:
                self.q_k, self.q_v = self._quantize_kv(self.raw_k, self.raw_v, new_bits)
                self._record_checksum()
            self.raw_k = self.raw_v = None
        else:
            if self._checksum != (quant.checksum(self.q_k), quant.checksum(self.q_v)):
                raise RuntimeError("quantized KV body changed since it was written; refusing to re-pack it")
            self.q_k = quant.shrink(self.q_k, new_bits, self.backend)
            self.q_v = quant.shrink(self.q_v, new_bits, self.backend)
            self._record_checksum()
        self.repacks.append((self.cumulative_length, self.bits, new_bits))
        self.bits = new_bits

    # ------------------------------------------------------------------ Cache API

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store the new ``[B, H, T, D]`` states and return all visible keys/values, ``[B, H, S, D]``.

        Past tokens come back dequantized; the new ones are returned as given, so a prefill attends in full
        precision, as with transformers' own quantized caches.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != self.sink_k.shape[0] or key_states.shape[1] != self.sink_k.shape[1]:
            raise ValueError(
                f"batch/heads changed: cache holds {tuple(self.sink_k.shape[:2])}, got {tuple(key_states.shape[:2])}"
            )
        for t in (key_states, value_states):
            # The stored tokens are in the first dtype; mixing would return them in the old one (or promote).
            if t.dtype != self.dtype:
                raise ValueError(
                    f"dtype changed: the cache holds {self.dtype} keys/values, got {t.dtype}; build a new cache "
                    "after changing the model's dtype"
                )
            if t.device != self.device:
                raise ValueError(
                    f"device changed: the cache holds keys/values on {self.device}, got {t.device}; build a new "
                    "cache after moving the model"
                )
        past = self.cumulative_length
        keep = min(past, self.sliding_window - 1) + key_states.shape[-2] if self.is_sliding else None
        k_out, v_out = self._packed_view(key_states, value_states, keep)
        if k_out is None:
            k_out, v_out = self._visible(key_states, value_states)
            if keep is not None:  # same visible span as DynamicSlidingWindowLayer
                k_out, v_out = k_out[:, :, -keep:], v_out[:, :, -keep:]

        self._store(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        self._enforce_budget()
        return k_out, v_out

    def _packed_view(self, k_new: torch.Tensor, v_new: torch.Tensor, keep: int | None):
        """``(PackedKV keys, PackedKV values)`` for a fused decode step, or ``(None, None)`` (reason counted)."""
        if self.q_k is None:
            return None, None  # nothing quantized: the ordinary path reads no packed bytes
        reason = None
        if self.attention == "dequantize":
            reason = "attention='dequantize'"
        elif self.attention == "fused" and not fused_available(k_new.device):
            raise RuntimeError("attention='fused' needs CUDA tensors (or TRITON_INTERPRET=1) and triton")
        elif self.attention == "auto" and not (k_new.is_cuda and fused_available(k_new.device)):
            reason = f"no fused kernel on {k_new.device.type} (needs CUDA and triton)"
        elif k_new.shape[-2] != 1:
            reason = f"{k_new.shape[-2]} new tokens (the fused kernel serves one-token decode steps)"
        elif k_new.requires_grad:
            reason = "autograd through the cache"
        skip = 0
        if reason is None and keep is not None:
            skip = self.sink_k.shape[-2] + self.body_len + self.win_k.shape[-2] + 1 - keep
            if skip > self.body_len:
                reason = "sliding window shorter than the full-precision window"
        if reason is not None:
            self.count_dense(reason)
            return None, None
        fp_k = torch.cat([self.sink_k, self.win_k, k_new], -2)
        fp_v = torch.cat([self.sink_v, self.win_v, v_new], -2)

        view = DecodeView(self, fp_k, fp_v, self.q_k, self.q_v, self.sink_k.shape[-2], max(skip, 0), self._ks)
        return PackedKV(view, 0), PackedKV(view, 1)

    def count_fused(self) -> None:
        self._stats["fused"] += 1

    def count_dense(self, reason: str) -> None:
        self._stats["dense"] += 1
        reasons = self._stats["dense_reasons"]
        reasons[reason] = reasons.get(reason, 0) + 1

    def attention_stats(self) -> dict:
        """Decode steps that attended over the packed body (``fused``) and steps that dequantized it (``dense``,
        with ``dense_reasons``), since the layer was built."""
        return {**self._stats, "dense_reasons": dict(self._stats["dense_reasons"])}

    def _store(self, k: torch.Tensor, v: torch.Tensor) -> None:
        n_sink = min(self.num_sinks - self.sink_k.shape[-2], k.shape[-2])
        if n_sink > 0:
            self.sink_k = torch.cat([self.sink_k, k[:, :, :n_sink]], -2)
            self.sink_v = torch.cat([self.sink_v, v[:, :, :n_sink]], -2)
            k, v = k[:, :, n_sink:], v[:, :, n_sink:]
        self.win_k = torch.cat([self.win_k, k], -2)
        self.win_v = torch.cat([self.win_v, v], -2)
        excess = self.win_k.shape[-2] - self.residual_length
        n_flush = (excess // self.flush_unit) * self.flush_unit
        if n_flush > 0:
            self._append_body(self.win_k[:, :, :n_flush], self.win_v[:, :, :n_flush])
            # Copy the short remainder: a view would keep the whole flushed (e.g. prefill-sized) bf16 tensor
            # alive, one per layer, and the cache would hold more memory than a bf16 cache.
            self.win_k = self.win_k[:, :, n_flush:].clone()
            self.win_v = self.win_v[:, :, n_flush:].clone()
        if self.is_sliding:
            # Keep at least sliding_window - 1 tokens; drop whole leading chunks beyond that.
            surplus = self.body_len + self.win_k.shape[-2] - (self.sliding_window - 1)
            n_drop = min(self.body_len, (max(surplus, 0) // self.flush_unit) * self.flush_unit)
            if n_drop > 0:
                self._drop_body_front(n_drop)

    def _enforce_budget(self) -> None:
        if self.budget_bytes is None:
            return
        while self.memory()["total_bytes"] > self.budget_bytes:
            if self.bits <= self.min_bits:
                raise ValueError(
                    f"impossible KV budget: {self.budget_bytes:.0f} bytes cannot hold {self.cumulative_length} "
                    f"tokens even at {self.min_bits} bits ({self.memory()['total_bytes']} bytes needed); raise "
                    "the budget or lower min bits / the context length"
                )
            self._halve()

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        # transformers 5.0 - 5.3 pass ``cache_position`` (the query's positions), later ones its length
        if isinstance(query_length, torch.Tensor):
            query_length = query_length.shape[0]
        if not self.is_sliding:
            return self.cumulative_length + query_length, 0
        w = self.sliding_window
        offset = max(self.cumulative_length - w + 1, 0)
        if self.cumulative_length >= w:
            return w - 1 + query_length, offset
        return self.cumulative_length + query_length, offset

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return self.sliding_window if self.is_sliding else -1

    def get_max_cache_shape(self) -> int:  # the abstract name of get_max_length in transformers 5.0 - 5.10
        return self.get_max_length()

    def reset(self) -> None:
        self._clear()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "QuantizedKVLayer cannot be cropped (quantized tokens cannot be rolled back)"
        )

    # Batch-dimension edits act on the packed codes directly: indexing rows never mixes quantization groups.
    def _map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        for name in ("sink_k", "sink_v", "win_k", "win_v", "raw_k", "raw_v"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))
        for name in ("q_k", "q_v"):
            q = getattr(self, name)
            if q is not None:
                setattr(self, name, quant.QuantBlock(fn(q.data), fn(q.scale), fn(q.zero), q.bits, q.group))
        if self.q_k is not None:
            self._record_checksum()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def offload(self):  # the packed cache is already small; keep it where it is
        return None

    def prefetch(self):
        return None

    # ------------------------------------------------------------------ accounting

    def memory(self) -> dict:
        """Bytes held: ``packed_bytes`` (codes + fp16 scales/zeros), ``fp_bytes`` (sinks, window and a 16-bit
        body, counted as bf16), ``total_bytes`` and ``bf16_bytes`` (the same tokens in a bf16 cache)."""
        if not self.is_initialized:
            return {
                "packed_bytes": 0,
                "fp_bytes": 0,
                "total_bytes": 0,
                "bf16_bytes": 0,
                "tokens": 0,
                "bits": self.bits,
            }
        fp = [self.sink_k, self.sink_v, self.win_k, self.win_v, self.raw_k, self.raw_v]
        fp_bytes = sum(t.numel() * _BF16_BYTES for t in fp if t is not None)
        packed = sum(q.nbytes for q in (self.q_k, self.q_v) if q is not None)
        tokens = self.sink_k.shape[-2] + self.body_len + self.win_k.shape[-2]
        per_token = (self.sink_k.shape[0] * self.sink_k.shape[1]) * (
            self.sink_k.shape[-1] + self.sink_v.shape[-1]
        )
        return {
            "packed_bytes": packed,
            "fp_bytes": fp_bytes,
            "total_bytes": packed + fp_bytes,
            "bf16_bytes": tokens * per_token * _BF16_BYTES,
            "tokens": tokens,
            "bits": self.bits,
        }
