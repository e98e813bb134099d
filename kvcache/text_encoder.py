"""Prompt-template prefix caching for the LLM text encoders of diffusion pipelines.

HunyuanVideo (and other pipelines with a decoder-only LLM text encoder) wrap every prompt in the same long
instruction template before encoding it. :func:`cache_prompt_prefix` runs the template's fixed leading tokens once
into a :class:`~fastattn.kvcache.QuantizedKVCache` and patches the encoder *instance* so that each call whose
``input_ids`` start with those tokens runs only the rest (prompt and padding) on a fork of that cache. The output
has the full length, as before: the prefix positions' hidden states are the ones computed once (exact), the
others attend to the quantized prefix keys/values (8-bit by default: near-lossless).

Calls that do not start with the prefix (another template, left padding, ``inputs_embeds``, a caller's own
cache) run the original forward unchanged and are counted as misses with their reason. ``disable()`` restores
the encoder exactly.

    handle = fastattn.kvcache.cache_prompt_prefix(pipe)           # HunyuanVideoPipeline: template found by itself
    video = pipe(prompt, ...).frames
    handle.stats()  # hits, misses (reasons), prefix tokens, tokens skipped, cache memory
    handle.disable()
"""

from __future__ import annotations

import copy
import inspect
import weakref

import torch

from .cache import QuantizedKVCache, kv_geometry
from .prefix import weights_key

_PROBES = ("a cat", "Zebra 123 on a bright beach", ".", "\u00e9t\u00e9")
# id(encoder) -> its enabled prefix cache. Weak: the patched forward holds the handle, so an entry lives exactly
# as long as the encoder does; a strong dict would keep every encoder (a 16 GB Llama) alive until disable().
_ACTIVE_PATCHES: weakref.WeakValueDictionary[int, PromptPrefixCache] = weakref.WeakValueDictionary()

_UNSUPPORTED_KWARGS = (
    "inputs_embeds",
    "past_key_values",
    "cache",
    "position_ids",
    "cache_position",
    "output_attentions",
    "logits_to_keep",
)


def template_prefix_ids(tokenizer, template: str) -> torch.Tensor:
    """``[1, P]`` ids that every ``template.format(prompt)`` starts with: the longest common prefix of the template
    tokenized around a few different prompts (so a BPE merge across the placeholder is never included)."""
    if "{}" not in template:
        raise ValueError("template must contain a '{}' placeholder for the prompt")
    rows = [tokenizer(template.format(p)).input_ids for p in _PROBES]
    n = 0
    while all(len(r) > n and r[n] == rows[0][n] for r in rows):
        n += 1
    if n == 0:
        raise ValueError("the template has no fixed leading tokens to cache")
    return torch.tensor(rows[0][:n]).unsqueeze(0)


def _cache_argument(encoder) -> str:
    """The name the encoder's forward takes its KV cache under (``cache`` from transformers 5.24, else
    ``past_key_values``); ``TypeError`` for anything that is not a decoder-only transformers model."""
    config = getattr(encoder, "config", None)
    params = (
        inspect.signature(encoder.forward).parameters if callable(getattr(encoder, "forward", None)) else {}
    )
    name = next((n for n in ("cache", "past_key_values") if n in params), None)
    if config is None or getattr(config, "is_encoder_decoder", False) or name is None:
        raise TypeError(
            f"prefix caching needs a decoder-only transformers text encoder that takes past_key_values (Llama, "
            f"Mistral, Qwen2, Gemma, ...); got {type(encoder).__name__}"
        )
    if hasattr(config, "vision_config") or hasattr(config, "text_config"):
        raise TypeError(
            f"{type(encoder).__name__} is a multimodal model (its positions depend on the image layout); prefix "
            "caching supports text-only decoder LMs"
        )
    return name


class PromptPrefixCache:
    """Handle of a patched text encoder (see the module docstring). Build it with :func:`cache_prompt_prefix`."""

    def __init__(self, encoder, prefix_ids: torch.Tensor, bits: int = 8, **cache_kwargs):
        active = _ACTIVE_PATCHES.get(id(encoder))
        if active is not None and active.encoder is encoder and active.enabled:
            raise RuntimeError("this text encoder already has a prompt prefix cache; disable() it first")
        self._cache_arg = _cache_argument(encoder)
        if prefix_ids.dim() != 2 or prefix_ids.shape[0] != 1 or prefix_ids.shape[1] == 0:
            raise ValueError(f"prefix_ids must be a non-empty [1, P] tensor, got {tuple(prefix_ids.shape)}")
        self.encoder = encoder
        self.prefix_ids = prefix_ids.cpu()
        self.cache_kwargs = dict(bits=bits, **cache_kwargs)
        # Bad settings (bits, group sizes that do not divide head_dim, ...) fail now, not at the first prompt.
        probe = QuantizedKVCache(encoder.config, **self.cache_kwargs)
        _, heads, head_dim = kv_geometry(encoder.config)
        empty = torch.empty(1, heads, 0, head_dim)
        probe.layers[0].lazy_initialization(empty, empty)
        # Built lazily where the encoder runs; rebuilt if its device, dtype or weights change.
        self._prefix = None
        self._stats = {"hits": 0, "misses": 0, "miss_reasons": {}, "tokens_skipped": 0, "builds": 0}
        self._had_forward = "forward" in encoder.__dict__
        self._saved_forward = encoder.__dict__.get("forward")
        self._orig = encoder.forward  # bound: whatever forward the instance had (an offload hook's, say)

        def forward(*args, **kwargs):
            return self._forward(*args, **kwargs)

        self._patched = forward
        encoder.forward = forward
        _ACTIVE_PATCHES[id(encoder)] = self
        self.enabled = True

    @property
    def length(self) -> int:
        return self.prefix_ids.shape[1]

    def disable(self) -> None:
        """Put the encoder's ``forward`` back as it was and free the cached prefix."""
        if not self.enabled:
            return
        if self.encoder.__dict__.get("forward") is not self._patched:
            # e.g. an offload hook added later wraps our forward: removing ours would remove the hook too
            raise RuntimeError(
                "the encoder's forward was replaced after the prefix cache was enabled (e.g. by an offload hook); "
                "remove that wrapper first, then disable() the prefix cache"
            )
        if self._had_forward:
            self.encoder.forward = self._saved_forward
        else:
            del self.encoder.forward
        _ACTIVE_PATCHES.pop(id(self.encoder), None)
        self._prefix = None
        self.enabled = False

    def stats(self) -> dict:
        out = {**self._stats, "miss_reasons": dict(self._stats["miss_reasons"]), "prefix_tokens": self.length}
        out["memory"] = self._prefix["cache"].memory() if self._prefix is not None else None
        return out

    # ------------------------------------------------------------------ internals

    def _miss(self, reason: str, args, kwargs):
        self._stats["misses"] += 1
        self._stats["miss_reasons"][reason] = self._stats["miss_reasons"].get(reason, 0) + 1
        return self._orig(*args, **kwargs)

    def _build(self, device: torch.device) -> dict:
        cache = QuantizedKVCache(self.encoder.config, **self.cache_kwargs)
        with torch.no_grad():
            out = self._orig(
                input_ids=self.prefix_ids.to(device),
                use_cache=True,
                output_hidden_states=True,
                **{self._cache_arg: cache},
            )
        self._stats["builds"] += 1
        return {"key": self._key(device), "cache": cache, "out": out}

    def _key(self, device: torch.device) -> tuple:
        return weights_key(self.encoder, device)

    def _forward(self, *args, **kwargs):
        if args:
            return self._miss("positional arguments", args, kwargs)
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        bad = [k for k in _UNSUPPORTED_KWARGS if kwargs.get(k) is not None and kwargs.get(k) is not False]
        if ids is None or bad:
            return self._miss(f"call with {bad[0] if bad else 'no input_ids'}", args, kwargs)
        config = self.encoder.config
        return_dict = kwargs.get("return_dict")
        if return_dict is False or (return_dict is None and not getattr(config, "return_dict", True)):
            return self._miss("return_dict=False", args, kwargs)
        p = self.length
        if ids.dim() != 2 or ids.shape[1] <= p:
            return self._miss("input shorter than the prefix", args, kwargs)
        if not torch.equal(ids[:, :p].cpu(), self.prefix_ids.expand(ids.shape[0], p)):
            return self._miss("input does not start with the cached prefix", args, kwargs)
        if mask is not None and (mask.dim() != 2 or not bool(mask[:, :p].all())):
            return self._miss("attention mask hides part of the prefix", args, kwargs)
        if self._prefix is None or self._prefix["key"] != self._key(ids.device):
            self._prefix = self._build(ids.device)
        b, s = ids.shape[0], ids.shape[1] - p
        cache = copy.deepcopy(self._prefix["cache"])
        if b > 1:
            cache.batch_repeat_interleave(b)
        want_hidden = kwargs.pop("output_hidden_states", None)
        if want_hidden is None:
            want_hidden = getattr(config, "output_hidden_states", False)
        use_cache = kwargs.pop("use_cache", None)
        if use_cache is None:
            use_cache = getattr(config, "use_cache", True)
        kwargs.update(
            input_ids=ids[:, p:],
            **{self._cache_arg: cache},
            position_ids=torch.arange(p, p + s, device=ids.device).expand(b, s),
            use_cache=True,
            output_hidden_states=True if want_hidden else None,
        )
        out = self._orig(**kwargs)
        self._stats["hits"] += 1
        self._stats["tokens_skipped"] += b * p
        out = self._join(self._prefix["out"], out, b, bool(want_hidden))
        if not use_cache:  # the caller asked for no cache: do not hand back (and keep alive) the forked one
            for name in ("past_key_values", "cache"):
                if getattr(out, name, None) is not None:
                    setattr(out, name, None)
        return out

    @staticmethod
    def _join(prefix_out, out, batch: int, want_hidden: bool):
        """The suffix output with the prefix positions put back in front (every field with a sequence axis)."""

        def cat(a, c):
            return torch.cat([a.to(c.dtype).expand(batch, *a.shape[1:]), c], 1)

        for name in ("last_hidden_state", "logits"):
            if getattr(out, name, None) is not None and getattr(prefix_out, name, None) is not None:
                setattr(out, name, cat(getattr(prefix_out, name), getattr(out, name)))
        if want_hidden:
            out.hidden_states = tuple(cat(a, c) for a, c in zip(prefix_out.hidden_states, out.hidden_states))
        else:
            out.hidden_states = None
        return out


def cache_prompt_prefix(
    pipe_or_encoder,
    tokenizer=None,
    template: str | None = None,
    prefix_ids: torch.Tensor | None = None,
    encoder_attr: str = "text_encoder",
    tokenizer_attr: str = "tokenizer",
    bits: int = 8,
    **cache_kwargs,
) -> PromptPrefixCache:
    """Cache a prompt template's fixed prefix in a pipeline's LLM text encoder (see the module docstring).

    ``pipe_or_encoder``: a diffusers pipeline (its ``encoder_attr`` / ``tokenizer_attr`` components are used) or
    a text encoder. The prefix is ``prefix_ids [1, P]`` if given, else the fixed leading tokens of ``template``
    (a string with ``{}`` for the prompt), else the pipeline's own default template (HunyuanVideo). ``bits`` and
    ``cache_kwargs`` configure the :class:`QuantizedKVCache` of the prefix.
    """
    encoder = getattr(pipe_or_encoder, encoder_attr, None)
    if encoder is None:
        encoder = pipe_or_encoder
    else:
        tokenizer = tokenizer or getattr(pipe_or_encoder, tokenizer_attr, None)
    if prefix_ids is None:
        if template is None:
            template = default_template(pipe_or_encoder)
        if tokenizer is None:
            raise ValueError(
                "a tokenizer is needed to find the template's prefix tokens (or pass prefix_ids)"
            )
        prefix_ids = template_prefix_ids(tokenizer, template)
    return PromptPrefixCache(encoder, prefix_ids, bits=bits, **cache_kwargs)


def default_template(pipe) -> str:
    """The prompt template a pipeline wraps prompts in by default; ``ValueError`` if we do not know it."""
    for cls in type(pipe).__mro__:
        if cls.__name__ == "HunyuanVideoPipeline":
            import importlib

            module = importlib.import_module(cls.__module__)
            return module.DEFAULT_PROMPT_TEMPLATE["template"]
    raise ValueError(
        f"no default prompt template known for {type(pipe).__name__} (known: HunyuanVideoPipeline); pass "
        "template='...{}...' or prefix_ids"
    )
