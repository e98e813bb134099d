"""Quantize a fixed prompt-template prefix once and reuse it for every prompt.

LLM text encoders of diffusion pipelines (HunyuanVideo's Llava-Llama template, Qwen-Image's system prompt, ...)
and prompt enhancers prepend the same instruction to every prompt. :class:`PrefixKVCache` runs that prefix once
into a :class:`QuantizedKVCache` and hands out independent copies, so each prompt only runs its own tokens.
"""

from __future__ import annotations

import copy

import torch

from .cache import QuantizedKVCache, with_cache


class PrefixKVCache:
    """A quantized KV cache of ``prefix_ids [1, P]`` for ``model``, forked per prompt.

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
        self.cache = QuantizedKVCache.from_model(model, **cache_kwargs)
        with torch.no_grad():
            out = model(
                input_ids=prefix_ids.to(model.device), use_cache=True, **with_cache(model, self.cache)
            )
        self.last_logits = out.logits[:, -1]
        self.uses = 0

    @property
    def length(self) -> int:
        return self.prefix_ids.shape[1]

    def fork(self, batch_size: int = 1) -> QuantizedKVCache:
        """An independent copy of the prefix cache (packed tensors are copied), repeated to ``batch_size``."""
        cache = copy.deepcopy(self.cache)
        if batch_size > 1:
            cache.batch_repeat_interleave(batch_size)
        self.uses += 1
        return cache

    def forward(self, suffix_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """Run ``suffix_ids [B, S]`` after the cached prefix; returns the model output (``past_key_values`` is the
        forked cache). ``attention_mask`` covers the suffix only; the prefix is prepended as ones."""
        b, s = suffix_ids.shape
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
