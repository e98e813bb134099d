"""Compare a cache against the full-precision cache on real text (the issue's protocol).

* Teacher-forced: the full cache generates a greedy reference continuation; the cache under test prefills the
  prompt and is then fed the *reference* tokens one at a time; each step's logits are compared with the full
  cache's: top-1 agreement, mean KL(full || test), perplexity ratio on the reference tokens.
* Free-running: greedy generation with the cache under test; the fraction of tokens before the first divergence
  from the reference (reported, not a bar: one early near-tie flips every later token).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from .cache import with_cache


@dataclass
class Reference:
    """Greedy reference from the full cache: ``tokens [N]`` and the logits that predicted them ``[N, V]``."""

    tokens: torch.Tensor
    logits: torch.Tensor


@torch.no_grad()
def _decode(model, input_ids: torch.Tensor, cache, feed: torch.Tensor | None, n: int):
    """Prefill ``input_ids [1, P]``, then ``n`` decode steps; feeds ``feed`` (teacher forcing) or the argmax.

    Returns (tokens [n], logits [n, V]) where logits[i] predicted tokens[i].
    """
    cache_kw = with_cache(model, cache)  # once: it inspects the forward's signature
    out = model(input_ids=input_ids, use_cache=True, **cache_kw)
    logits = [out.logits[0, -1].float()]
    tokens = []
    for i in range(n):
        tok = feed[i] if feed is not None else logits[-1].argmax()
        tokens.append(tok)
        if i == n - 1:
            break
        out = model(input_ids=tok.view(1, 1), use_cache=True, **cache_kw)
        logits.append(out.logits[0, -1].float())
    return torch.stack(tokens), torch.stack(logits)


def reference(model, input_ids: torch.Tensor, new_tokens: int = 128) -> Reference:
    """Greedy continuation of ``input_ids [1, P]`` with a full-precision ``DynamicCache``."""
    tokens, logits = _decode(model, input_ids, DynamicCache(config=model.config), None, new_tokens)
    return Reference(tokens, logits)


def compare(
    model, input_ids: torch.Tensor, make_cache: Callable[[], object], ref: Reference, free_running=True
):
    """Teacher-forced metrics (and free-running agreement) of ``make_cache()`` against ``ref``.

    Returns a dict: ``top1``, ``kl`` (mean KL(full || test) in nats), ``ppl_full``, ``ppl_test``,
    ``ppl_ratio``, ``free_running`` (prefix fraction) and the cache's own ``memory()`` if it has one.
    """
    n = ref.tokens.numel()
    cache = make_cache()
    _, logits = _decode(model, input_ids, cache, ref.tokens, n)
    lp_full = F.log_softmax(ref.logits, -1)
    lp_test = F.log_softmax(logits, -1)
    kl = (lp_full.exp() * (lp_full - lp_test)).sum(-1)
    nll_full = -lp_full.gather(-1, ref.tokens[:, None]).mean()
    nll_test = -lp_test.gather(-1, ref.tokens[:, None]).mean()
    res = {
        "top1": float((logits.argmax(-1) == ref.logits.argmax(-1)).float().mean()),
        "kl": float(kl.mean()),
        "ppl_full": float(nll_full.exp()),
        "ppl_test": float(nll_test.exp()),
        "ppl_ratio": float((nll_test - nll_full).exp()),
    }
    if hasattr(cache, "memory"):
        res["memory"] = cache.memory()
    if free_running:
        toks, _ = _decode(model, input_ids, make_cache(), None, n)
        diff = (toks != ref.tokens).nonzero()
        res["free_running"] = float(diff[0, 0]) / n if len(diff) else 1.0
    return res
