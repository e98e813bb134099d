"""A quantized template-prefix KV cache inside ComfyUI's own decoder-LM text encoders.

ComfyUI's LLM text encoders (``comfy/text_encoders/llama.py``: HunyuanVideo's llava-llama3, Qwen-Image's and
Omnigen2's Qwen 2.5, Lumina 2's Gemma 2, HiDream's Llama) run every prompt wrapped in the same instruction
template through a decoder. Its *core* module (``<encoder>.transformer.model``) is called as
``core(x, attention_mask, embeds=[B, S, hidden], intermediate_output=..., final_layer_norm_intermediate=...,
dtype=...)`` and returns ``(last hidden state, intermediate)``; every layer is called as
``layer(x=, attention_mask=, freqs_cis=, optimized_attention=)`` and hands its rotated, head-repeated
``q, k, v [B, heads, S, head_dim]`` to ``optimized_attention(q, k, v, heads, mask=, skip_reshape=True)``. The core
has no past-KV path in ComfyUI 0.3.6x (newer cores' ``past_key_values`` serve their own generation loop).

:class:`PrefixCachedForward` is installed as an *object patch* of ``core.forward`` on a ``CLIP.clone()``'s
patcher (ComfyUI sets it while that clone is loaded and puts the original back otherwise; no ComfyUI module is
changed). It runs the template's fixed leading tokens once through the host's own layers, keeping each layer's
keys/values in a :class:`~fastattn.kvcache.frozen_prefix.FrozenPrefixKV` (packed at 8/4/2 bits) and the prefix's
output rows. For each prompt it runs only the tokens after the prefix through the same layers, handing each
layer an ``optimized_attention`` that puts the dequantized prefix keys/values in front of the suffix's, and
returns the full-length output (prefix rows from the cached pass, exact). Positions, causal and padding masks,
the rotary tables (the host's own ``precompute_freqs_cis``) and the attention function (the host's
``optimized_attention_for_device``) are what the core itself would use.

Rows that do not start with the prefix (another template, image tokens, the empty row prompt weights add) and
calls the cache does not understand run the previous forward and are counted with their reason.
Imports nothing from ComfyUI: the host's functions are read from the core's own module.
"""

from __future__ import annotations

import inspect
import logging
import sys
import time
import types

import torch

log = logging.getLogger("fastattn")

# The core's forward arguments this cache understands (ComfyUI 0.3.6x and newer cores).
KNOWN_ARGS = frozenset({"x", "attention_mask", "embeds", "num_tokens", "intermediate_output",
                        "final_layer_norm_intermediate", "dtype", "position_ids", "embeds_info",
                        "past_key_values"})  # fmt: skip
_CONFIG_FIELDS = ("hidden_size", "head_dim", "num_attention_heads", "num_key_value_heads", "rope_theta")
MODES = ("cache", "exact", "off")


def host_module(core):
    """The module that defines ``core``'s class (ComfyUI's ``comfy.text_encoders.llama``)."""
    return sys.modules.get(type(core).__module__)


def is_decoder_core(module) -> bool:
    """Whether ``module`` looks like the core of one of ComfyUI's llama.py decoders (token embedding, layers)."""
    layers = getattr(module, "layers", None)
    return (
        isinstance(module, torch.nn.Module)
        and isinstance(getattr(module, "embed_tokens", None), torch.nn.Module)
        and isinstance(layers, torch.nn.ModuleList)
        and len(layers) > 0
    )


def decoder_reason(core) -> str | None:
    """Why the prefix cache cannot drive ``core``; None when it can."""
    name = type(core).__name__
    if not is_decoder_core(core):
        return f"{name} is not a decoder LM core (no embed_tokens / layers)"
    config = getattr(core, "config", None)
    missing = [f for f in _CONFIG_FIELDS if getattr(config, f, None) is None]
    if missing:
        return f"{name}'s config has no {', '.join(missing)}"
    if config.num_attention_heads % config.num_key_value_heads:
        return f"{name}: {config.num_attention_heads} heads are not a multiple of {config.num_key_value_heads} KV heads"
    for i, layer in enumerate(core.layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return f"{name} layer {i} has no self_attn with q/k/v/o projections"
        if getattr(layer, "sliding_attention", False):
            return (f"{name} layer {i} uses sliding-window attention (Gemma 3): its mask is built inside the "
                    "layer for the tokens it is given, so a suffix-only pass would change it")  # fmt: skip
    module = host_module(core)
    for fn in ("precompute_freqs_cis", "optimized_attention_for_device"):
        if not callable(getattr(module, fn, None)):
            return f"{name}'s module {type(core).__module__} has no {fn}() (a ComfyUI version this cache does not know)"
    params = inspect.signature(type(core).forward).parameters
    if not {"embeds", "intermediate_output"} <= set(params):
        return f"{name}.forward takes no embeds / intermediate_output (a ComfyUI version this cache does not know)"
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Prefix:
    """One built prefix: its embeddings ``[1, P, hidden]``, K/V store and output rows for one request spec."""

    def __init__(self, key, embeds, kv, x, intermediate, build_ms):
        self.key, self.embeds, self.kv, self.x, self.intermediate = key, embeds, kv, x, intermediate
        self.build_ms = build_ms


class PrefixCachedForward:
    """The object patch for ``<core path>.forward`` (see the module docstring).

    Args:
        core: the decoder core (``Llama2_``-like module).
        prefix_ids: the template's fixed leading token ids.
        bits: 8, 4 or 2 (the prefix K/V packed at that width).
        previous: what runs calls the cache does not take: an object patch already on this key, else the core's
            own class forward bound to it.
        store: ``FrozenPrefixKV`` class (passed in so this module imports no quantizer at load).

    ``mode``: ``"cache"`` (default), ``"exact"`` (unquantized prefix K/V, for checks), ``"off"`` (always the
    previous forward, uncounted).
    """

    def __init__(self, core, prefix_ids, bits: int, store, previous=None):
        reason = decoder_reason(core)
        if reason is not None:
            raise TypeError(reason)
        ids = torch.as_tensor(list(prefix_ids), dtype=torch.long)
        if ids.dim() != 1 or ids.numel() == 0:
            raise ValueError(f"prefix_ids must be a non-empty list of token ids, got {prefix_ids!r}")
        store(bits)  # bad bits fail now, not at the first prompt
        self.core = core
        self.prefix_ids = ids.unsqueeze(0)
        self.bits = bits
        self.store = store
        self.previous = previous if previous is not None else types.MethodType(type(core).forward, core)
        self._signature = inspect.signature(type(core).forward)
        self._host = host_module(core)
        config = core.config
        self.rep = config.num_attention_heads // config.num_key_value_heads
        self.mode = "cache"
        self.summary = ""  # the apply-time report (set by the node)
        self._prefixes: dict[str, _Prefix] = {}
        self.reset_stats()

    @property
    def length(self) -> int:
        return self.prefix_ids.shape[1]

    def reset_stats(self) -> None:
        self.stats = {"calls": 0, "rows_cached": 0, "rows_missed": 0, "miss_reasons": {}, "builds": 0,
                      "tokens_skipped": 0, "build_ms": None}  # fmt: skip

    def drop(self, mode: str) -> None:
        """Forget the prefix built for ``mode`` (it is rebuilt when needed)."""
        self._prefixes.pop(mode, None)

    def memory(self) -> dict | None:
        """The cached prefix K/V's memory (``FrozenPrefixKV.memory()``), None before the first build."""
        built = self._prefixes.get("cache")
        return built.kv.memory() if built is not None else None

    # ------------------------------------------------------------------ the call

    def __call__(self, *args, **kwargs):
        if self.mode == "off":
            return self.previous(*args, **kwargs)
        self.stats["calls"] += 1
        try:
            bound = self._signature.bind(self.core, *args, **kwargs)
        except TypeError:
            return self._miss("arguments the cache does not know", args, kwargs)
        a = dict(bound.arguments)
        a.pop(next(iter(self._signature.parameters)))  # self
        unknown = sorted(set(a) - KNOWN_ARGS)
        if unknown:
            return self._miss(f"argument {unknown[0]!r} the cache does not know", args, kwargs)
        embeds = a.get("embeds")
        if embeds is None:
            return self._miss("token ids instead of embeddings", args, kwargs)
        if a.get("position_ids") is not None:
            return self._miss("explicit position ids (image tokens)", args, kwargs)
        if a.get("embeds_info"):
            return self._miss("image or other embeddings in the prompt", args, kwargs)
        if a.get("past_key_values") is not None:
            return self._miss("the caller's own KV cache (generation)", args, kwargs)
        p = self.length
        if embeds.dim() != 3 or embeds.shape[1] <= p:
            return self._miss("input not longer than the template prefix", args, kwargs)
        mask = a.get("attention_mask")
        if mask is not None and (mask.dim() != 2 or tuple(mask.shape) != tuple(embeds.shape[:2])):
            return self._miss("attention mask that is not [batch, tokens]", args, kwargs)
        io = a.get("intermediate_output")
        spec = (tuple(io) if isinstance(io, list) else io, bool(a.get("final_layer_norm_intermediate", True)))
        prefix_embeds = self._prefix_embeds(embeds)
        rows = (embeds[:, :p] == prefix_embeds).flatten(1).all(1)
        if mask is not None:
            rows &= mask[:, :p].bool().all(1)
        if not bool(rows.any()):
            return self._miss("input does not start with the template prefix", args, kwargs)
        built = self._prefix(embeds, spec)
        hit = rows.nonzero().flatten()
        out = self._cached(embeds[hit], None if mask is None else mask[hit], spec, built)
        self.stats["rows_cached"] += hit.numel()
        self.stats["tokens_skipped"] += hit.numel() * p
        if bool(rows.all()):
            return out
        # Rows without the prefix (e.g. the empty row ComfyUI adds for prompt weights) run the previous forward.
        rest = (~rows).nonzero().flatten()
        self._count("row without the template prefix (e.g. the empty row prompt weights add)", rest.numel())
        sub = dict(a, embeds=embeds[rest], attention_mask=None if mask is None else mask[rest])
        if isinstance(a.get("num_tokens"), (list, tuple)):
            sub["num_tokens"] = [a["num_tokens"][i] for i in rest.tolist()]
        other = self.previous(**sub)
        return _merge_rows(out, other, hit, rest, embeds.shape[0])

    def _count(self, reason: str, rows: int) -> None:
        self.stats["rows_missed"] += rows
        self.stats["miss_reasons"][reason] = self.stats["miss_reasons"].get(reason, 0) + rows

    def _miss(self, reason: str, args, kwargs):
        embeds = kwargs.get("embeds")
        self._count(reason, embeds.shape[0] if isinstance(embeds, torch.Tensor) and embeds.dim() == 3 else 1)
        return self.previous(*args, **kwargs)

    # ------------------------------------------------------------------ building the prefix

    def _weights_key(self) -> tuple:
        """What the prefix depends on in the weights: parameter identities and in-place versions (LoRA patched
        into the weights), and the lowvram weight functions ComfyUI applies patches through instead."""
        params = list(self.core.parameters())
        fns = tuple(id(f) for m in self.core.modules()
                    for f in (*getattr(m, "weight_function", ()), *getattr(m, "bias_function", ())))  # fmt: skip
        return tuple(id(p) for p in params), tuple(p._version for p in params), fns

    def _prefix_embeds(self, embeds: torch.Tensor) -> torch.Tensor:
        """The prefix tokens' embeddings as the host computes them (``embed_tokens(ids, out_dtype=...)``)."""
        ids = self.prefix_ids.to(embeds.device)
        embed = self.core.embed_tokens
        try:
            out = embed(ids, out_dtype=embeds.dtype)
        except TypeError:  # a plain torch Embedding
            out = embed(ids)
        return out.to(embeds.dtype)

    def _prefix(self, embeds: torch.Tensor, spec) -> _Prefix:
        key = (embeds.device, embeds.dtype, spec, self._weights_key())
        built = self._prefixes.get(self.mode)
        if built is not None and built.key == key:
            return built
        self._prefixes.pop(self.mode, None)  # free the old one first
        _sync(embeds.device)
        start = time.perf_counter()
        with torch.no_grad():
            prefix_embeds = self._prefix_embeds(embeds)
            kv = self.store(None if self.mode == "exact" else self.bits)
            x, intermediate = self._run(prefix_embeds, None, 0, None, spec, capture=kv)
        _sync(embeds.device)
        ms = (time.perf_counter() - start) * 1000
        built = _Prefix(key, prefix_embeds, kv, x, intermediate, ms)
        self._prefixes[self.mode] = built
        if self.mode == "cache":
            self.stats["builds"] += 1
            self.stats["build_ms"] = ms
        return built

    # ------------------------------------------------------------------ running the layers

    def _cached(self, embeds, mask, spec, built: _Prefix):
        p, b = self.length, embeds.shape[0]
        x, intermediate = self._run(embeds[:, p:], None if mask is None else mask[:, p:], p, built.kv, spec)
        x = torch.cat([built.x.to(x.dtype).expand(b, *built.x.shape[1:]), x], 1)
        if intermediate is not None:
            pre = built.intermediate.to(intermediate.dtype)
            intermediate = torch.cat([pre.expand(b, *pre.shape[1:]), intermediate], intermediate.dim() - 2)
        return x, intermediate

    def _run(self, h, key_mask, offset: int, past, spec, capture=None):
        """The core's forward over ``h [B, S, hidden]`` placed at positions ``offset..offset+S-1``, after
        ``past`` (prefix K/V, or None); with ``capture`` each layer's keys/values are stored in it.
        Returns ``(x, intermediate)`` as the core does for ``spec = (intermediate_output,
        final_layer_norm_intermediate)``."""
        core, config = self.core, self.core.config
        if getattr(core, "normalize_in", False):
            h = h * (config.hidden_size**0.5)
        b, s = h.shape[:2]
        positions = torch.arange(offset, offset + s, device=h.device).unsqueeze(0)
        freqs = self._host.precompute_freqs_cis(config.head_dim, positions, config.rope_theta,
                                                getattr(config, "rope_scale", None),
                                                getattr(config, "rope_dims", None), device=h.device)  # fmt: skip
        mask = _mask(b, s, offset, key_mask, h.dtype, h.device)
        attention = self._host.optimized_attention_for_device(h.device, mask=True, small_input=True)
        io, norm_intermediate = spec
        n = len(core.layers)
        only = None
        collected = None
        if isinstance(io, tuple):
            collected, only, io = [], set(io), None
        elif io == "all":
            collected, io = [], None
        elif isinstance(io, int) and io < 0:
            io = n + io
        intermediate = None
        for i, layer in enumerate(core.layers):
            if collected is not None and (only is None or i in only):
                collected.append(h.unsqueeze(1).clone())
            attend = self._attention(i, attention, past, capture)
            out = layer(x=h, attention_mask=mask, freqs_cis=freqs, optimized_attention=attend)
            h = out[0] if isinstance(out, tuple) else out  # newer cores return (x, present_kv)
            if i == io:
                intermediate = h.clone()
        norm = getattr(core, "norm", None)
        if norm is not None:
            h = norm(h)
        if collected is not None:
            if only is None or n in only:
                collected.append(h.unsqueeze(1).clone())
            intermediate = torch.cat(collected, 1)
        if intermediate is not None and norm_intermediate and norm is not None:
            intermediate = norm(intermediate)
        return h, intermediate

    def _attention(self, index: int, attention, past, capture):
        rep = self.rep

        def attend(q, k, v, heads, mask=None, **kwargs):
            if capture is not None:
                # the layer repeated each KV head `rep` times (repeat_interleave): keep one copy of each
                kv_k, kv_v = k[:, ::rep], v[:, ::rep]
                if not torch.equal(kv_k.repeat_interleave(rep, 1), k):
                    raise RuntimeError("the layer's keys are not its KV heads repeated per head: a ComfyUI "
                                       "version this cache does not know")  # fmt: skip
                capture.append(kv_k, kv_v)
            if past is not None:
                pk, pv = past.layer(index, k.dtype)
                b = k.shape[0]
                pk = pk.to(k.device).expand(b, -1, -1, -1).repeat_interleave(rep, 1)
                pv = pv.to(v.device).expand(b, -1, -1, -1).repeat_interleave(rep, 1)
                k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
            return attention(q, k, v, heads, mask=mask, **kwargs)

        return attend


def _mask(b: int, s: int, offset: int, key_mask, dtype, device) -> torch.Tensor:
    """Additive mask ``[B or 1, 1, S, offset + S]``: every prefix key visible, causal over the new tokens, and
    the new tokens' padding (``key_mask`` 0) hidden, as the core masks a whole prompt."""
    blocked = torch.ones(s, s, dtype=torch.bool, device=device).triu(1)
    blocked = torch.cat([torch.zeros(s, offset, dtype=torch.bool, device=device), blocked], 1)[None, None]
    if key_mask is not None:
        pad = torch.cat(
            [torch.zeros(b, offset, dtype=torch.bool, device=device), key_mask.to(device) == 0], 1
        )
        blocked = blocked | pad[:, None, None, :]
    return torch.zeros(blocked.shape, dtype=dtype, device=device).masked_fill(blocked, float("-inf"))


def _merge_rows(hit_out, rest_out, hit, rest, batch: int):
    """The core's output tuple for the whole batch from the cached rows ``hit`` and the other rows ``rest``."""
    merged = []
    for a, c in zip(hit_out, rest_out):
        if (a is None) != (c is None):
            raise RuntimeError("the cached and the uncached rows returned different outputs (an intermediate "
                               "on one side only)")  # fmt: skip
        if a is None:
            merged.append(None)
            continue
        out = a.new_empty((batch, *a.shape[1:]))
        out[hit], out[rest] = a, c.to(a.dtype)
        merged.append(out)
    return tuple(merged)
