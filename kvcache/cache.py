"""``QuantizedKVCache``: a transformers 5.x ``Cache`` with one :class:`QuantizedKVLayer` per model layer."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache

from ..attn_kernels.kv_pack import check_bits
from .layer import QuantizedKVLayer, check_head_dim

try:  # transformers 5.16+
    from transformers.cache_utils import get_layer_types_and_kwargs as _hf_layer_types
except ImportError:  # older 5.x (5.0 - 5.13 checked): DynamicCache reads the config itself
    _hf_layer_types = None

_FULL = {"full_attention"}
_SLIDING = {"sliding_attention", "chunked_attention"}


def layer_types_and_windows(config) -> tuple[list[str], list[int | None]]:
    """``(layer_types, windows)`` of a decoder config, one entry per cache layer, the way the installed
    transformers' ``DynamicCache`` reads it; ``windows[i]`` is the sliding/chunk window of a sliding or chunked
    layer, else ``None``.

    Works across transformers 5.x: ``get_layer_types_and_kwargs`` is absent before 5.16, returns one kwargs dict
    shared by all layers in 5.16 - 5.18 and a list with one dict per layer in 5.20+.
    """
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if _hf_layer_types is not None:
        layer_types, layer_kwargs = _hf_layer_types(cfg)
        layer_types = list(layer_types)
        if isinstance(layer_kwargs, dict):  # 5.16 - 5.18: one dict shared by every layer
            layer_kwargs = [layer_kwargs] * len(layer_types)
        layer_kwargs = list(layer_kwargs)
        if len(layer_kwargs) != len(layer_types):
            raise RuntimeError(
                f"transformers returned {len(layer_types)} layer types but {len(layer_kwargs)} layer kwargs"
            )
    else:  # as DynamicCache(config=...) does in 5.0 - 5.13
        sliding = getattr(cfg, "sliding_window", None)
        chunk = getattr(cfg, "attention_chunk_size", None)
        layer_types = getattr(cfg, "layer_types", None)
        if layer_types is None:
            kind = (
                "sliding_attention"
                if sliding is not None
                else "chunked_attention"
                if chunk is not None
                else "full_attention"
            )
            layer_types = [kind] * cfg.num_hidden_layers
        layer_types = list(layer_types)
        shared = getattr(cfg, "num_kv_shared_layers", None)
        if shared:  # layers that reuse another layer's KV have no cache of their own (Gemma3n)
            layer_types = layer_types[:-shared]
        layer_kwargs = [
            {"sliding_window": sliding}
            if t == "sliding_attention"
            else {"sliding_window": chunk}
            if t == "chunked_attention"
            else {}
            for t in layer_types
        ]
    windows = [
        kw.get("sliding_window") if t in _SLIDING else None for t, kw in zip(layer_types, layer_kwargs)
    ]
    return layer_types, windows


def cache_argument(model) -> str:
    """The keyword a transformers model's ``forward`` (and ``generate``) takes its KV cache under: ``cache``
    from transformers 5.24 on (``past_key_values`` is deprecated there), ``past_key_values`` before."""
    import inspect

    forward = getattr(model, "forward", None)
    params = inspect.signature(forward).parameters if callable(forward) else {}
    return "cache" if "cache" in params else "past_key_values"


def with_cache(model, cache) -> dict:
    """``{cache_argument(model): cache}``, to pass a cache to ``model(...)`` or ``model.generate(...)``."""
    return {cache_argument(model): cache}


def kv_geometry(config) -> tuple[int, int, int]:
    """``(num_layers, kv_heads, head_dim)`` of a decoder config."""
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    try:
        layers = cfg.num_hidden_layers
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    except AttributeError as e:
        raise TypeError(
            f"expected a decoder config with num_hidden_layers/num_attention_heads, got {type(cfg)}"
        ) from e
    return layers, heads, head_dim


def projected_layer_bytes(
    bits: int,
    tokens: int,
    kv_heads: int,
    head_dim: int,
    batch: int = 1,
    key_group: tuple[int, int] = (64, 1),
    value_group: tuple[int, int] = (1, 64),
    residual_length: int = 32,
    num_sinks: int = 4,
    worst_case: bool = True,
) -> int:
    """Bytes one layer holds for ``tokens`` tokens (K + V; fp parts as bf16, meta as fp16).

    ``worst_case`` assumes the full-precision window is at its largest (``residual_length + flush - 1``), which
    is what a budget must allow for.
    """
    flush = max(key_group[0], value_group[0])
    sinks = min(num_sinks, tokens)
    rest = tokens - sinks
    if worst_case:
        window = min(rest, residual_length + flush - 1)
        body = ((rest - window) // flush) * flush if rest > window else 0
        window = rest - body
    else:
        body = max(rest - residual_length, 0) // flush * flush
        window = rest - body
    per_elem = 2.0 if bits == 16 else bits / 8
    unit = batch * kv_heads
    total = (sinks + window) * head_dim * 2 * 2 * unit + body * head_dim * 2 * per_elem * unit
    if bits != 16:
        for gr, gc in (key_group, value_group):
            total += unit * (body // gr) * (head_dim // gc) * 4  # fp16 scale + zero per group
    return int(math.ceil(total))


class QuantizedKVCache(Cache):
    """KV cache with packed INT8/INT4/INT2 storage, sinks and a full-precision recent window.

    Build it from a model config (layer types, so sliding-window layers get sliding cache layers) or from a
    layer count. Fixed-width mode: ``bits`` (or per-layer ``layer_bits``). PM-KVQ progressive mode:
    ``budget_bytes`` (total, split evenly) or ``layer_budgets`` (per layer, e.g. from
    :func:`fastattn.kvcache.calibrate.allocate_budgets`); layers start at 16 bits and halve down to ``bits``.

    ``attention``: ``"auto"`` (default), ``"fused"`` or ``"dequantize"``: whether decode steps attend over the
    packed codes with the fused kernel (:mod:`fastattn.attn_kernels.kv_decode`; automatic on CUDA through transformers'
    default ``sdpa`` attention) or dequantize the body first; see :meth:`attention_stats`.

    ``key_scales``: per-layer ``[kv_heads, head_dim]`` key divisors (or ``None``), from
    :func:`fastattn.kvcache.calibrate.calibrate_key_scales`.

    Example::

        cache = QuantizedKVCache.from_model(model, bits=4)
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64)
        cache.memory()["ratio"]  # packed bytes / bf16 bytes
    """

    def __init__(
        self,
        config=None,
        *,
        num_layers: int | None = None,
        bits: int = 4,
        layer_bits: Sequence[int] | None = None,
        key_group: int = 64,
        value_group: int = 64,
        key_mode: str = "channel",
        value_mode: str = "token",
        residual_length: int = 32,
        num_sinks: int = 4,
        budget_bytes: float | None = None,
        layer_budgets: Sequence[float] | None = None,
        budget_context: int | None = None,
        batch_size: int = 1,
        key_scales: Sequence[torch.Tensor | None] | None = None,
        backend: str = "auto",
        attention: str = "auto",
    ):
        check_bits(bits)
        if config is None and num_layers is None:
            raise ValueError("QuantizedKVCache needs a model config or num_layers")
        if config is not None:
            layer_types, windows = layer_types_and_windows(config)
            bad = sorted(set(layer_types) - _FULL - _SLIDING)
            if bad:
                raise ValueError(
                    f"QuantizedKVCache supports full_attention and sliding/chunked attention layers; this model "
                    f"has {bad} layers"
                )
            missing = [i for i, (t, w) in enumerate(zip(layer_types, windows)) if t in _SLIDING and not w]
            if missing:
                raise ValueError(f"sliding/chunked layers {missing} have no window size in the config")
        else:
            windows = [None] * num_layers
        n = len(windows)
        if n == 0:
            raise ValueError(
                "QuantizedKVCache needs at least one cache layer (the config or num_layers gave 0)"
            )
        if layer_bits is not None:
            if len(layer_bits) != n:
                raise ValueError(f"layer_bits has {len(layer_bits)} entries for {n} layers")
            for b in layer_bits:
                check_bits(b)
        if budget_bytes is not None and layer_budgets is not None:
            raise ValueError("pass either budget_bytes (total) or layer_budgets (per layer), not both")
        if budget_bytes is not None:
            if not budget_bytes > 0:
                raise ValueError(f"budget_bytes must be positive, got {budget_bytes!r}")
            layer_budgets = [budget_bytes / n] * n
        if layer_budgets is not None and len(layer_budgets) != n:
            raise ValueError(f"layer_budgets has {len(layer_budgets)} entries for {n} layers")
        if key_scales is not None and len(key_scales) != n:
            raise ValueError(f"key_scales has {len(key_scales)} entries for {n} layers")

        self.settings = dict(
            key_group=key_group,
            value_group=value_group,
            key_mode=key_mode,
            value_mode=value_mode,
            residual_length=residual_length,
            num_sinks=num_sinks,
        )
        layers = [
            QuantizedKVLayer(
                bits=layer_bits[i] if layer_bits is not None else bits,
                # a None entry keeps that layer in fixed-width mode
                budget_bytes=layer_budgets[i] if layer_budgets is not None else None,
                sliding_window=windows[i],
                key_scale=key_scales[i] if key_scales is not None else None,
                backend=backend,
                attention=attention,
                **self.settings,
            )
            for i in range(n)
        ]
        if config is not None:
            # Group sizes that do not fit the model's head_dim fail here, not at the first generate step.
            _, _, head_dim = kv_geometry(config)
            for layer in layers:
                check_head_dim(head_dim, layer.min_bits, layer.key_group, layer.value_group)
        if layer_budgets is not None and budget_context is not None and config is not None:
            _, heads, head_dim = kv_geometry(config)
            for i, layer in enumerate(layers):
                if layer_budgets[i] is None:
                    continue
                tokens = (
                    budget_context
                    if windows[i] is None
                    else min(budget_context, windows[i] + layer.flush_unit)
                )
                need = projected_layer_bytes(
                    layer.min_bits,
                    tokens,
                    heads,
                    head_dim,
                    batch_size,
                    layer.key_group,
                    layer.value_group,
                    residual_length,
                    layer.num_sinks,
                )
                if need > layer_budgets[i]:
                    raise ValueError(
                        f"impossible KV budget for layer {i}: {layer_budgets[i]:.0f} bytes < {need} bytes needed for "
                        f"{tokens} tokens at {layer.min_bits} bits"
                    )
        super().__init__(layers=layers)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store ``[B, H, T, D]`` states for ``layer_idx`` and return that layer's visible keys/values.

        All layers are created in ``__init__`` (never lazily), so a first ``update`` for any layer works on every
        transformers 5.x; a ``layer_idx`` outside the model's layers is an error, not a new layer.
        """
        if not 0 <= layer_idx < len(self.layers):
            raise IndexError(
                f"QuantizedKVCache was built for {len(self.layers)} layers, got update for layer {layer_idx}: build "
                "it from the model's config (QuantizedKVCache.from_model) or pass the right num_layers"
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    @classmethod
    def from_model(cls, model, **kwargs) -> QuantizedKVCache:
        """Build a cache for ``model`` after checking that it is a decoder that uses transformers' Cache API."""
        config = getattr(model, "config", None)
        can_generate = getattr(model, "can_generate", None)
        if config is None or not callable(can_generate) or not can_generate():
            raise TypeError(
                f"expected a transformers causal LM that supports the Cache API (generate/past_key_values), got "
                f"{type(model).__name__}"
            )
        if getattr(config, "is_encoder_decoder", False):
            raise TypeError(
                f"encoder-decoder models are not supported ({type(model).__name__}); use a decoder-only LM"
            )
        return cls(config, **kwargs)

    def attention_stats(self) -> dict:
        """Decode-step attention calls summed over layers: ``fused`` (over the packed codes) and ``dense`` (body
        dequantized first), with ``dense_reasons`` counting why."""
        out = {"fused": 0, "dense": 0, "dense_reasons": {}}
        for layer in self.layers:
            st = layer.attention_stats()
            out["fused"] += st["fused"]
            out["dense"] += st["dense"]
            for reason, n in st["dense_reasons"].items():
                out["dense_reasons"][reason] = out["dense_reasons"].get(reason, 0) + n
        return out

    def memory(self) -> dict:
        """Totals over layers: packed/fp/total bytes, the bf16 equivalent, their ``ratio`` and per-layer bits."""
        per = [layer.memory() for layer in self.layers]
        out = {k: sum(p[k] for p in per) for k in ("packed_bytes", "fp_bytes", "total_bytes", "bf16_bytes")}
        out["ratio"] = out["total_bytes"] / out["bf16_bytes"] if out["bf16_bytes"] else float("nan")
        out["layer_bits"] = [p["bits"] for p in per]
        return out
