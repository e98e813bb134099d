"""Quantize a fixed prompt-template prefix once and reuse it for every prompt.

LLM text encoders of diffusion pipelines (HunyuanVideo's Llava-Llama template, Qwen-Image's system prompt, ...)
and prompt enhancers prepend the same instruction to every prompt. :class:`PrefixKVCache` runs that prefix once
into a :class:`QuantizedKVCache` and hands out independent copies, so each prompt only runs its own tokens.
"""

from __future__ import annotations

import copy

import torch

from .cache import QuantizedKVCache, with_cache


def weights_key(model, device=None) -> tuple:
    """What a cached prefix depends on: ``device``, the weights' dtype and the weights themselves (an in-place
    update bumps a parameter's version; a replaced or added parameter, e.g. a LoRA, changes the identities).
    Cheap: no tensor is read."""
    params = list(model.parameters())
    dtype = params[0].dtype if params else None
    return (device, dtype, len(params), sum(p._version for p in params), sum(id(p) for p in params))


def _check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(
            f"batch_size must be a positive int (prompts that share the prefix), got {batch_size!r}"
        )


class PrefixKVCache:
    """A quantized KV cache of ``prefix_ids [1, P]`` for ``model``, forked per prompt.

    The prefix is run again (``builds`` counts it) when the model's weights, dtype or device changed since it
    was run, so a fork never serves keys/values of the old weights.

    Example::

        prefix = PrefixKVCache(model, tok(template, return_tensors="pt").input_ids, bits=4)
        out = prefix.forward(tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids,
                             output_hidden_states=True)
    """

    def __init__(self, model, prefix_ids: torch.Tensor, **cache_kwargs):
        if prefix_ids.dim() != 2 or prefix_ids.shape[0] != 1 or prefix_ids.shape[1] == 0:
            raise ValueError(f"prefix_ids must be a non-empty [1, P] tensor, got {tuple(prefix_ids.shape)}")
        self.model = model
        self.prefix_ids = prefix_ids
        self.cache_kwargs = cache_kwargs
        self.builds = 0
        self._build()
        self.uses = 0

    def _build(self) -> None:
        cache = QuantizedKVCache.from_model(self.model, **self.cache_kwargs)
        with torch.no_grad():
            out = self.model(
                input_ids=self.prefix_ids.to(self.model.device),
                use_cache=True,
                **with_cache(self.model, cache),
            )
        self.cache = cache
        self.last_logits = out.logits[:, -1]
        self._key = weights_key(self.model, self.model.device)
        self.builds += 1

    @property
    def length(self) -> int:
        return self.prefix_ids.shape[1]

    def fork(self, batch_size: int = 1) -> QuantizedKVCache:
        """An independent copy of the prefix cache (packed tensors are copied), repeated to ``batch_size``;
        the prefix is run again first if the model changed since (see the class docstring)."""
        _check_batch_size(batch_size)
        if weights_key(self.model, self.model.device) != self._key:
            self._build()
        cache = copy.deepcopy(self.cache)
        if batch_size > 1:
            cache.batch_repeat_interleave(batch_size)
        self.uses += 1
        return cache

    def forward(self, suffix_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """Run ``suffix_ids [B, S]`` (``S >= 1``) after the cached prefix; returns the model output
        (``past_key_values`` is the forked cache). ``attention_mask [B, S]`` covers the suffix only; the prefix is
        prepended as ones."""
        if not isinstance(suffix_ids, torch.Tensor) or suffix_ids.dim() != 2:
            shape = (
                list(suffix_ids.shape) if isinstance(suffix_ids, torch.Tensor) else type(suffix_ids).__name__
            )
            raise ValueError(f"suffix_ids must be a [batch, tokens] tensor of token ids, got {shape}")
        if (
            suffix_ids.dtype.is_floating_point
            or suffix_ids.dtype.is_complex
            or suffix_ids.dtype == torch.bool
        ):
            raise ValueError(f"suffix_ids must hold integer token ids, got {suffix_ids.dtype}")
        b, s = suffix_ids.shape
        if b == 0 or s == 0:
            raise ValueError(f"suffix_ids needs at least one prompt of at least one token, got {[b, s]}")
        if attention_mask is not None and tuple(attention_mask.shape) != (b, s):
            hint = (
                " (it covers prefix + suffix; pass the suffix's columns only)"
                if (attention_mask.dim() == 2 and attention_mask.shape[1] == self.length + s)
                else ""
            )
            raise ValueError(
                f"attention_mask must cover the suffix only: expected {[b, s]}, got {list(attention_mask.shape)}"
                + hint
            )
        cache = self.fork(b)
        if attention_mask is not None:
            ones = torch.ones(b, self.length, dtype=attention_mask.dtype, device=attention_mask.device)
            attention_mask = torch.cat([ones, attention_mask], 1)
        positions = torch.arange(self.length, self.length + s, device=suffix_ids.device).expand(b, s)
        with torch.no_grad():
            return self.model(
                input_ids=suffix_ids,
                attention_mask=attention_mask,
                **with_cache(self.model, cache),
                position_ids=positions,
                use_cache=True,
                **kwargs,
            )
