"""Keys and values of a fixed token prefix, quantized once and read back for every prompt.

A prompt template's leading tokens (HunyuanVideo's system instruction, Qwen-Image's chat header, ...) give the
same keys and values in every layer for every prompt. :class:`FrozenPrefixKV` stores them per layer, packed at
``bits`` (8, 4 or 2), and hands them back dequantized to whatever runs the prompt's own tokens after them. Unlike
:class:`~fastattn.kvcache.QuantizedKVLayer` it never grows: there is no recent window to keep in full precision,
so every token but the attention sinks is packed.

Layout of one layer, ``[batch, kv_heads, tokens, head_dim]``::

    [ sinks (fp) | body: groups of key_group tokens (packed) | tail: the rest, one group (packed) ]

Keys are quantized per channel (a group runs along tokens), values per token (a group runs along channels), as in
KIVI. ``bits=None`` keeps everything in the input dtype (an exact prefix cache, for checks). Memory is counted
like :meth:`QuantizedKVLayer.memory`: packed codes plus fp16 scales and zeros, full-precision parts as bf16.
"""

from __future__ import annotations

import torch

from . import quant

_BF16_BYTES = 2


def _value_group(head_dim: int, wanted: int) -> int:
    """The largest divisor of ``head_dim`` not above ``wanted`` (values are grouped along channels)."""
    return max(g for g in range(1, min(wanted, head_dim) + 1) if head_dim % g == 0)


class FrozenPrefixKV:
    """Per-layer prefix keys/values (see the module docstring).

    Args:
        bits: 8, 4 or 2 (packed), or None (kept as given).
        key_group: tokens per key group in the body (the tail shorter than that is one group of its own).
        value_group: channels per value group (the largest divisor of head_dim up to this).
        num_sinks: leading tokens kept in full precision (they take most attention mass; 0..8).
    """

    def __init__(self, bits: int | None = 8, key_group: int = 32, value_group: int = 64, num_sinks: int = 4):
        if bits is not None:
            quant.check_bits(bits)
        if not isinstance(key_group, int) or key_group < 1:
            raise ValueError(f"key_group must be a positive number of tokens, got {key_group!r}")
        if not isinstance(value_group, int) or value_group < 1:
            raise ValueError(f"value_group must be a positive number of channels, got {value_group!r}")
        if not isinstance(num_sinks, int) or not 0 <= num_sinks <= 8:
            raise ValueError(f"num_sinks must be in 0..8, got {num_sinks!r}")
        self.bits = bits
        self.key_group = key_group
        self.value_group = value_group
        self.num_sinks = num_sinks
        self._layers: list[dict] = []
        self.tokens: int | None = None

    def __len__(self) -> int:
        return len(self._layers)

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store the next layer's ``keys``/``values`` ``[B, kv_heads, P, head_dim]`` (every layer the same P)."""
        if keys.dim() != 4 or keys.shape != values.shape:
            raise ValueError(
                "keys and values must both be [batch, kv_heads, tokens, head_dim], got "
                f"{tuple(keys.shape)} and {tuple(values.shape)}"
            )
        p, d = keys.shape[-2], keys.shape[-1]
        if p == 0:
            raise ValueError("the prefix has no tokens")
        if self.tokens is not None and p != self.tokens:
            raise ValueError(f"every layer must hold the same {self.tokens} prefix tokens, got {p}")
        if self.bits is not None and d % (8 // self.bits):
            raise ValueError(
                f"head_dim {d} must be a multiple of {8 // self.bits} for {self.bits}-bit packing"
            )
        self.tokens = p
        keys, values = keys.detach(), values.detach()
        if self.bits is None:
            self._layers.append({"raw": (keys.clone(), values.clone()), "dtype": keys.dtype})
            return
        s = min(self.num_sinks, p)
        n_body = (p - s) // self.key_group * self.key_group
        gv = (1, _value_group(d, self.value_group))
        parts = []
        for lo, hi, gk in ((s, s + n_body, self.key_group), (s + n_body, p, p - s - n_body)):
            if hi > lo:
                k, v = keys[:, :, lo:hi], values[:, :, lo:hi]
                parts.append((quant.quantize(k, self.bits, (gk, 1)), quant.quantize(v, self.bits, gv)))
        sink = (keys[:, :, :s].clone(), values[:, :, :s].clone())
        self._layers.append({"sink": sink, "parts": parts, "dtype": keys.dtype})

    def layer(self, index: int, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index``'s prefix keys and values ``[B, kv_heads, P, head_dim]``, dequantized to ``dtype``
        (default: the dtype they were stored from)."""
        entry = self._layers[index]
        dtype = dtype or entry["dtype"]
        if "raw" in entry:
            return entry["raw"][0].to(dtype), entry["raw"][1].to(dtype)
        ks, vs = [entry["sink"][0].to(dtype)], [entry["sink"][1].to(dtype)]
        for qk, qv in entry["parts"]:
            ks.append(quant.dequantize(qk, dtype))
            vs.append(quant.dequantize(qv, dtype))
        return torch.cat(ks, -2), torch.cat(vs, -2)

    def memory(self) -> dict:
        """``total_bytes`` held (packed codes + fp16 scales/zeros + full-precision sinks counted as bf16) and
        ``bf16_bytes`` (the same keys and values in a bf16 cache)."""
        total = bf16 = 0
        for entry in self._layers:
            if "raw" in entry:
                n = sum(t.numel() for t in entry["raw"])
                total, bf16 = total + n * _BF16_BYTES, bf16 + n * _BF16_BYTES
                continue
            sink_elems = sum(t.numel() for t in entry["sink"])
            total += sink_elems * _BF16_BYTES + sum(q.nbytes for part in entry["parts"] for q in part)
            body_elems = sum(2 * qk.data.shape[:-1].numel() * qk.data.shape[-1] * 8 // qk.bits
                             for qk, _ in entry["parts"])  # fmt: skip
            bf16 += (sink_elems + body_elems) * _BF16_BYTES
        return {"total_bytes": total, "bf16_bytes": bf16, "layers": len(self._layers), "tokens": self.tokens or 0,
                "bits": self.bits}  # fmt: skip
