"""Unit tests for fastattn.kvcache: packing kernels (Triton interpreter vs PyTorch), quantization bounds,
progressive re-packing, bad input, and generate() integration on tiny random models (GQA, batch, sliding)."""

import os

import numpy as np
import pytest
import torch
from fastattn.attn_kernels.kv_pack import HAS_TRITON, dequantize_packed
from fastattn.kvcache import (
    PrefixKVCache,
    QuantizedKVCache,
    QuantizedKVLayer,
    dequantize,
    pack,
    projected_layer_bytes,
    quantize,
    shrink,
    shrink_codes,
    unpack,
)
from fastattn.kvcache import cache as kv_cache_module
from fastattn.kvcache import calibrate as cal
from fastattn.kvcache.evaluate import compare, reference
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

needs_triton = pytest.mark.skipif(
    not (HAS_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")),
    reason="needs a GPU or the Triton interpreter",
)


def _tiny(cls=LlamaForCausalLM, cfg_cls=LlamaConfig, **kw):
    torch.manual_seed(0)
    cfg = cfg_cls(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA
        head_dim=16,
        max_position_embeddings=512,
        initializer_range=0.15,  # peaked logits, so quantization error is visible in the metrics
        **kw,
    )
    return cls(cfg).eval()


# ----------------------------------------------------------------------------- packing kernels


@needs_triton
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_triton_matches_torch(bits):
    codes = torch.randint(0, 2**bits, (2, 3, 5, 16), dtype=torch.uint8)
    p_torch, p_triton = pack(codes, bits, "torch"), pack(codes, bits, "triton")
    assert p_torch.shape[-1] == 16 * bits // 8
    assert torch.equal(p_torch, p_triton)
    assert torch.equal(unpack(p_triton, bits, "triton"), codes)
    assert torch.equal(unpack(p_torch, bits, "torch"), codes)


def test_pack_layout_is_little_endian_within_byte():
    codes = torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8)
    assert pack(codes, 2, "torch").tolist() == [[1 | 2 << 2 | 3 << 4]]
    assert pack(torch.tensor([[0xA, 0x5]], dtype=torch.uint8), 4, "torch").tolist() == [[0x5A]]


@needs_triton
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [(8, 1), (1, 8)])
def test_fused_dequant_triton_matches_torch(bits, group):
    x = torch.randn(1, 2, 16, 16) * 2 + 1
    q = quantize(x, bits, group, "torch")
    a = dequantize_packed(q.data, q.scale, q.zero, bits, group, torch.float32, "torch")
    b = dequantize_packed(q.data, q.scale, q.zero, bits, group, torch.float32, "triton")
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # Writing straight into a token slice of a bigger [B, H, S, D] buffer (what the cache does per decode step).
    buf = torch.full((1, 2, 20, 16), 7.0)
    dequantize_packed(q.data, q.scale, q.zero, bits, group, torch.float32, "triton", out=buf[:, :, 2:18])
    torch.testing.assert_close(buf[:, :, 2:18], a, rtol=0, atol=1e-6)
    assert (buf[:, :, :2] == 7).all() and (buf[:, :, 18:] == 7).all()
    # ragged token count, several batch*head rows, a head dim that is not a power of two
    x = torch.randn(2, 3, 40, 48)
    q = quantize(x, bits, group, "torch")
    a = dequantize_packed(q.data, q.scale, q.zero, bits, group, torch.float32, "torch")
    buf = torch.full((2, 3, 45, 48), 7.0)
    dequantize_packed(q.data, q.scale, q.zero, bits, group, torch.float32, "triton", out=buf[:, :, 1:41])
    torch.testing.assert_close(buf[:, :, 1:41], a, rtol=0, atol=1e-6)
    assert (buf[:, :, :1] == 7).all() and (buf[:, :, 41:] == 7).all()


# ----------------------------------------------------------------------------- quantization


@pytest.mark.parametrize("group", [(16, 1), (1, 16)])
def test_quantization_error_bound_and_ordering(group):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 32) * torch.linspace(0.1, 20, 32) + 7.0  # outlier channels and an offset
    errs = {}
    for bits in (2, 4, 8):
        q = quantize(x, bits, group)
        err = (dequantize(q, torch.float32) - x).abs()
        # Per-group bound: half a step (plus fp32 rounding).
        half_step = q.scale.float().repeat_interleave(group[0], -2).repeat_interleave(group[1], -1) / 2
        assert (err <= half_step * (1 + 1e-3) + 1e-5).all(), bits
        errs[bits] = float(err.mean())
    assert errs[8] < errs[4] / 8 < errs[2] / 16


def test_bytes_accounting():
    q = quantize(torch.randn(1, 2, 64, 64), 4, (64, 1))
    assert q.data.shape == (1, 2, 64, 32) and q.data.dtype == torch.uint8
    assert q.nbytes == 2 * 64 * 32 + 2 * (2 * 64 * 2)  # codes + fp16 scale and zero per group


def test_shrink_codes_maps_range_endpoints_and_rounds():
    codes = torch.arange(256, dtype=torch.uint8)
    c4 = shrink_codes(codes, 8, 4)
    assert c4[0] == 0 and c4[255] == 15
    expected = torch.round(codes.float() * 15 / 255).to(torch.uint8)
    assert torch.equal(c4, expected)
    assert torch.equal(
        shrink_codes(torch.arange(16, dtype=torch.uint8), 4, 2),
        torch.round(torch.arange(16) * 3 / 15).to(torch.uint8),
    )


@pytest.mark.parametrize("to_bits", [4, 2])
def test_shrink_matches_direct_quantization_error(to_bits):
    torch.manual_seed(2)
    x = torch.randn(1, 2, 32, 16) * 3
    shrunk = quantize(x, 8, (16, 1))
    while shrunk.bits > to_bits:
        shrunk = shrink(shrunk, shrunk.bits // 2)
    direct = quantize(x, to_bits, (16, 1))
    e_shrunk = (dequantize(shrunk, torch.float32) - x).abs()
    e_direct = (dequantize(direct, torch.float32) - x).abs()
    # Same grid range, so the shrunk codes are within half a new step plus half an 8-bit step of the truth.
    assert float(e_shrunk.max()) <= float(direct.scale.float().max()) * 0.5 * 1.02 + 1e-3
    assert float(e_shrunk.mean()) < 1.1 * float(e_direct.mean())


def test_bits_outside_supported_raise():
    for bad in (1, 3, 16):
        with pytest.raises(ValueError, match=r"\(2, 4, 8\)"):
            quantize(torch.randn(1, 1, 8, 8), bad, (8, 1))
        with pytest.raises(ValueError, match=r"\(2, 4, 8\)"):
            QuantizedKVCache(num_layers=2, bits=bad)
    with pytest.raises(ValueError, match="shrink needs fewer bits"):
        shrink(quantize(torch.randn(1, 1, 8, 8), 4, (8, 1)), 8)


# ----------------------------------------------------------------------------- cache layer


def _kv(t, b=2, h=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, t, d, generator=g), torch.randn(b, h, t, d, generator=g)


def test_layer_layout_sinks_window_exact_body_close():
    layer = QuantizedKVLayer(bits=4, key_group=8, value_group=8, residual_length=8, num_sinks=4)
    k, v = _kv(40)
    ko, vo = layer.update(k, v)
    assert torch.equal(ko, k)  # prefill attends in full precision
    # 40 tokens = 4 sinks + 24 body (3 groups of 8) + 12 window (>= 8, < 8 + 8)
    assert layer.body_len == 24 and layer.win_k.shape[-2] == 12 and layer.get_seq_length() == 40
    k1, v1 = _kv(1, seed=1)
    ko, vo = layer.update(k1, v1)
    assert ko.shape == (2, 2, 41, 16)
    assert torch.equal(ko[:, :, :4], k[:, :, :4]) and torch.equal(ko[:, :, 28:40], k[:, :, 28:])
    assert torch.equal(ko[:, :, 40:], k1)
    body_err = (ko[:, :, 4:28] - k[:, :, 4:28]).abs().max()
    assert 0 < body_err < 0.5
    assert layer.get_mask_sizes(1) == (42, 0)


def test_prefill_storage_is_not_kept_alive_by_the_window():
    """After a long prefill the cache holds its packed body and a short window, not the prefill tensor:
    a window that were a view into it would keep the whole bf16 prefill alive, layer by layer."""
    layer = QuantizedKVLayer(bits=4, key_group=8, value_group=8, residual_length=8, num_sinks=4)
    k, v = _kv(400)
    layer.update(k.clone(), v.clone())
    for t in (layer.win_k, layer.win_v, layer.sink_k, layer.sink_v):
        assert t.untyped_storage().nbytes() <= 16 * t.shape[0] * t.shape[1] * t.shape[3] * t.element_size()
    assert layer.memory()["total_bytes"] < 0.6 * layer.memory()["bf16_bytes"]  # 4-bit + scales of 8-groups


def test_progressive_halving_repacks_in_place_and_respects_budget():
    b, h, d = 1, 2, 16
    budget = projected_layer_bytes(4, 128, h, d, b, (8, 1), (1, 8), 8, 2)
    layer = QuantizedKVLayer(
        bits=2, key_group=8, value_group=8, residual_length=8, num_sinks=2, budget_bytes=budget
    )
    k, v = _kv(128, b, h, d)
    seen = []
    for t in range(0, 128, 16):  # grows like a generation would
        layer.update(k[:, :, t : t + 16], v[:, :, t : t + 16])
        seen.append(layer.bits)
        assert layer.memory()["total_bytes"] <= budget
    assert seen[0] == 16 and seen[-1] == 4  # started at 16 bits, halved on the way
    assert [r[1:] for r in layer.repacks] == [(16, 8), (8, 4)]
    body_k, _ = layer._body()
    err = (body_k - k[:, :, 2 : 2 + layer.body_len]).abs()
    assert float(err.max()) < 0.6  # a 4-bit grid over ~[-3, 3] has steps of ~0.4


def test_repack_checksum_guard_detects_corruption():
    layer = QuantizedKVLayer(
        bits=2, key_group=8, value_group=8, residual_length=0, num_sinks=0, budget_bytes=1e9
    )
    k, v = _kv(32)
    layer.update(k, v)
    layer._halve()  # 16 -> 8
    layer.q_k.data[0, 0, 0, 0] ^= 0xFF  # a stray write into the packed codes
    with pytest.raises(RuntimeError, match="refusing to re-pack"):
        layer._halve()


def test_impossible_budgets_raise():
    cfg = LlamaConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16
    )
    with pytest.raises(ValueError, match="impossible KV budget"):
        QuantizedKVCache(cfg, bits=2, value_group=16, budget_bytes=1000, budget_context=4096)
    layer = QuantizedKVLayer(bits=2, key_group=8, value_group=8, residual_length=8, budget_bytes=2000)
    with pytest.raises(ValueError, match="impossible KV budget"):
        layer.update(*_kv(256))
    with pytest.raises(ValueError, match="impossible KV budget"):
        cal.allocate_bits(np.zeros((2, 2)), np.array([[5.0, 9.0], [5.0, 9.0]]), 8.0)
    with pytest.raises(ValueError, match="positive"):
        QuantizedKVLayer(budget_bytes=0)


def test_other_bad_input():
    with pytest.raises(ValueError, match="num_sinks"):
        QuantizedKVLayer(num_sinks=5)
    with pytest.raises(ValueError, match="key_mode"):
        QuantizedKVLayer(key_mode="row")
    with pytest.raises(ValueError, match="divide head_dim"):
        QuantizedKVLayer(value_group=64).update(*_kv(4, d=48))
    with pytest.raises(ValueError, match="config or num_layers"):
        QuantizedKVCache()

    class NotAnLM(torch.nn.Module):
        pass

    with pytest.raises(TypeError, match="Cache API"):
        QuantizedKVCache.from_model(NotAnLM())
    from transformers import BertConfig, BertModel

    bert = BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    )
    with pytest.raises(TypeError, match="Cache API"):
        QuantizedKVCache.from_model(bert)
    cfg = LlamaConfig(num_hidden_layers=2, layer_types=["full_attention", "linear_attention"])
    with pytest.raises(ValueError, match="linear_attention"):
        QuantizedKVCache(cfg)


def test_batch_reorder_acts_on_packed_codes():
    layer = QuantizedKVLayer(bits=4, key_group=8, value_group=8, residual_length=4, num_sinks=1)
    k, v = _kv(30, b=3)
    layer.update(k, v)
    before, _ = layer._body()
    layer.reorder_cache(torch.tensor([2, 0, 1]))
    after, _ = layer._body()
    assert torch.equal(after, before[[2, 0, 1]])
    layer.batch_repeat_interleave(2)
    assert layer._body()[0].shape[0] == 6


def test_memory_at_4k_context_smollm2_geometry():
    """SmolLM2's KV geometry (3 KV heads x 64): 4-bit <= 30%, 2-bit <= 20% of bf16 at 4,096 tokens."""
    ratios = {}
    for bits in (4, 2):
        layer = QuantizedKVLayer(bits=bits, residual_length=32, num_sinks=4)
        k, v = _kv(4096, b=1, h=3, d=64)
        layer.update(k, v)
        m = layer.memory()
        assert m["bf16_bytes"] == 4096 * 3 * 64 * 2 * 2
        assert m["total_bytes"] == m["packed_bytes"] + m["fp_bytes"]
        assert m["total_bytes"] <= projected_layer_bytes(bits, 4096, 3, 64)
        ratios[bits] = m["total_bytes"] / m["bf16_bytes"]
    assert ratios[4] <= 0.30 and ratios[2] <= 0.20


# ----------------------------------------------------------------------------- transformers 5.x versions


def _bench_config(**kw):
    # The CPU configuration of bench/kvcache_speed.py --tiny (GQA: 4 query / 2 KV heads).
    return LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, **kw,
    )  # fmt: skip


def _fill_like_the_bench(cache, n_layers, batch=2, heads=2, tokens=200, d=64):
    """A fresh cache, ``update`` for layer 0 before anything else, then every layer in order (no model)."""
    for li in range(n_layers):
        k, v = _kv(tokens, b=batch, h=heads, d=d, seed=li)
        ko, vo = cache.update(k, v, li)
        assert torch.equal(ko, k) and torch.equal(vo, v)  # a prefill gets its own states back
    assert cache.get_seq_length() == tokens and len(cache) == n_layers
    m = cache.memory()
    assert m["packed_bytes"] > 0 and m["bf16_bytes"] == n_layers * tokens * batch * heads * d * 2 * 2


def _hf_5_17_layer_types(config):
    """transformers 5.16 - 5.18's ``get_layer_types_and_kwargs``: one kwargs dict shared by all layers."""
    types = getattr(config, "layer_types", None)
    if types is None:
        kind = "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
        types = [kind] * config.num_hidden_layers
    return types, ({"sliding_window": config.sliding_window} if "sliding_attention" in types else {})


@pytest.mark.parametrize("api", ["installed", "5.16-5.18 (one kwargs dict)", "5.0-5.13 (no helper)"])
def test_layers_are_built_eagerly_on_every_transformers_5(api, monkeypatch):
    """Regression: on transformers 5.17 ``get_layer_types_and_kwargs`` returns a dict, which the cache zipped
    over as if it were per-layer: no layer was built and the bench's first ``update`` raised IndexError."""
    if api.startswith("5.16"):
        monkeypatch.setattr(kv_cache_module, "_hf_layer_types", _hf_5_17_layer_types)
    elif api.startswith("5.0"):
        monkeypatch.setattr(kv_cache_module, "_hf_layer_types", None)
    cfg = _bench_config()
    cache = QuantizedKVCache(cfg, bits=4)
    assert len(cache.layers) == 3 and all(isinstance(x, QuantizedKVLayer) for x in cache.layers)
    assert not any(x.is_sliding for x in cache.layers)
    _fill_like_the_bench(cache, 3)
    cache = QuantizedKVCache.from_model(LlamaForCausalLM(cfg), bits=2)
    _fill_like_the_bench(cache, 3)

    sliding = QuantizedKVCache(MistralConfig(num_hidden_layers=2, sliding_window=16), bits=8)
    assert [(x.is_sliding, x.sliding_window) for x in sliding.layers] == [(True, 16), (True, 16)]
    mixed = QuantizedKVCache(
        MistralConfig(
            num_hidden_layers=2, sliding_window=16, layer_types=["sliding_attention", "full_attention"]
        ),
        bits=8,
    )
    assert [(x.is_sliding, x.sliding_window) for x in mixed.layers] == [(True, 16), (False, None)]


def test_update_outside_the_model_layers_is_a_clear_error():
    cache = QuantizedKVCache(num_layers=2, bits=4)
    with pytest.raises(IndexError, match="built for 2 layers, got update for layer 2"):
        cache.update(*_kv(4), 2)
    with pytest.raises(ValueError, match="at least one cache layer"):
        QuantizedKVCache(num_layers=0)


def test_layer_api_of_older_transformers_5():
    """5.0 - 5.3 pass ``cache_position`` to ``get_mask_sizes``; 5.0 - 5.10 name ``get_max_length``
    ``get_max_cache_shape``."""
    full = QuantizedKVLayer(bits=4, key_group=8, value_group=8, residual_length=8)
    full.update(*_kv(20))
    assert full.get_mask_sizes(torch.arange(20, 23)) == full.get_mask_sizes(3) == (23, 0)
    assert full.get_max_cache_shape() == full.get_max_length() == -1
    sliding = QuantizedKVLayer(bits=8, key_group=4, value_group=8, residual_length=4, sliding_window=16)
    sliding.update(*_kv(20))
    assert sliding.get_mask_sizes(torch.arange(20, 21)) == sliding.get_mask_sizes(1) == (16, 5)
    assert sliding.get_max_cache_shape() == 16


# ----------------------------------------------------------------------------- models


def test_generate_matches_dynamic_cache_when_nothing_is_quantized():
    model = _tiny()
    ids = torch.randint(0, 96, (2, 12))
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    cache = QuantizedKVCache.from_model(model, bits=4, key_group=8, value_group=8, residual_length=64)
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=10, do_sample=False
    )
    assert torch.equal(out, ref)
    assert cache.get_seq_length() == 21 and cache.memory()["packed_bytes"] == 0


@pytest.mark.parametrize("bits,max_kl", [(8, 1e-3), (4, 0.05)])
def test_teacher_forced_quality_tiny_gqa_model(bits, max_kl):
    model = _tiny()
    ids = torch.randint(0, 96, (1, 48))
    ref = reference(model, ids, 24)

    def make():
        return QuantizedKVCache.from_model(
            model, bits=bits, key_group=8, value_group=8, residual_length=8, num_sinks=2
        )

    r = compare(model, ids, make, ref)
    assert r["memory"]["packed_bytes"] > 0  # the body really was quantized
    assert r["kl"] < max_kl and r["top1"] >= 0.8  # random weights: near-ties make top-1 noisy
    r2 = compare(
        model,
        ids,
        lambda: QuantizedKVCache.from_model(
            model, bits=2, key_group=8, value_group=8, residual_length=8, num_sinks=2
        ),
        ref,
        free_running=False,
    )
    assert r2["kl"] > r["kl"]  # fewer bits, more error: the metric can tell


def test_generate_batch_with_left_padding():
    model = _tiny()
    ids = torch.randint(1, 96, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in row 1
    cache = QuantizedKVCache.from_model(model, bits=8, key_group=8, value_group=8, residual_length=8)
    out = model.generate(
        ids, attention_mask=mask, past_key_values=cache, max_new_tokens=8, do_sample=False, pad_token_id=0
    )
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 48)
    assert (out[:, 40:] == ref[:, 40:]).float().mean() >= 0.75  # 8-bit: near-identical greedy tokens


def test_sliding_window_layers_match_dynamic_cache():
    model = _tiny(MistralForCausalLM, MistralConfig, sliding_window=16)
    cache = QuantizedKVCache.from_model(
        model, bits=8, key_group=4, value_group=8, residual_length=4, num_sinks=4
    )
    assert all(layer.is_sliding and layer.num_sinks == 0 for layer in cache.layers)
    ref_cache = DynamicCache(config=model.config)
    ids = torch.randint(0, 96, (1, 30))
    with torch.no_grad():
        a = model(ids, past_key_values=cache, use_cache=True).logits
        b = model(ids, past_key_values=ref_cache, use_cache=True).logits
        torch.testing.assert_close(a, b)
        for t in range(20):
            tok = b[:, -1:].argmax(-1)
            a = model(tok, past_key_values=cache, use_cache=True).logits
            b = model(tok, past_key_values=ref_cache, use_cache=True).logits
            assert cache.get_mask_sizes(1, 0) == ref_cache.get_mask_sizes(1, 0)
            assert (a - b).abs().max() < 0.05, t
    # Only about one window of tokens is kept, however long the sequence gets.
    assert cache.layers[0].memory()["tokens"] <= 16 + 4


def test_prefix_cache_reuse_matches_full_forward():
    model = _tiny()
    prefix, s1, s2 = torch.randint(0, 96, (1, 40)), torch.randint(0, 96, (1, 6)), torch.randint(0, 96, (1, 9))
    pc = PrefixKVCache(model, prefix, bits=8, key_group=8, value_group=8, residual_length=8)
    assert pc.cache.memory()["packed_bytes"] > 0
    for s in (s1, s2):
        out = pc.forward(s)
        with torch.no_grad():
            full = model(torch.cat([prefix, s], 1)).logits[:, 40:]
        assert (out.logits - full).abs().max() < 0.05
    assert pc.cache.get_seq_length() == 40 and pc.uses == 2  # the shared prefix was not modified


def test_key_scale_calibration_and_allocation():
    model = _tiny()
    ids = torch.randint(0, 96, (1, 64))
    scales, alphas = cal.calibrate_key_scales(model, ids, bits=2, key_group=16, key_mode="token", n_alpha=5)
    assert len(scales) == 2 and all(0.0 <= a <= 1.0 for a in alphas)
    for s in scales:
        if s is not None:
            assert s.shape == (2, 16) and torch.allclose(s[:, :8], s[:, 8:])  # shared by RoPE pairs
    cache = QuantizedKVCache.from_model(
        model, bits=2, key_mode="token", key_group=16, value_group=8, key_scales=scales
    )
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    sens = cal.layer_sensitivity(
        model, ids, eval_tokens=16, bits_choices=(2, 8), key_group=8, value_group=8, residual_length=4
    )
    assert sens.shape == (2, 2) and (sens >= -1e-6).all() and (sens[:, 0] > sens[:, 1]).all()
    # The DP equals brute force on a small instance.
    rng = np.random.default_rng(0)
    s, c = rng.random((4, 3)), rng.random((4, 3)) * 10
    budget = 18.0
    picks = cal.allocate_bits(s, c, budget)
    best = min(
        (sum(s[i, p[i]] for i in range(4)), p)
        for p in np.ndindex(3, 3, 3, 3)
        if sum(c[i, p[i]] for i in range(4)) <= budget * (1 - 4 / 4000)
    )
    assert sum(c[i, picks[i]] for i in range(4)) <= budget
    assert sum(s[i, picks[i]] for i in range(4)) <= best[0] + 1e-9


# ----------------------------------------------------------------------------- fused decode attention


@needs_triton
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("d", [32, 48])  # 48: not a power of two, the kernel's per-code load path
def test_fused_decode_kernel_matches_sdpa_on_dequantized_cache(bits, d):
    from fastattn.attn_kernels.kv_decode import fused_decode_attention, mask_to_bias

    torch.manual_seed(bits)
    b, h, g, n, f, ns = 2, 2, 4, 192, 7, 3
    k, v = torch.randn(b, h, n, d) * 3 + 1, torch.randn(b, h, n, d)
    qk, qv = quantize(k, bits, (64, 1), "torch"), quantize(v, bits, (1, 16), "torch")
    fk, fv, q = torch.randn(b, h, f, d), torch.randn(b, h, f, d), torch.randn(b, h, g, d)
    # skip 70: the visible body starts inside a tile and a key group (sliding layers)
    for key_scale, skip in ((None, 0), (torch.rand(1, h, 1, d) + 0.5, 64), (None, 70)):
        bk = dequantize(qk, torch.float32, "torch") * (1.0 if key_scale is None else key_scale)
        bv = dequantize(qv, torch.float32, "torch")
        keys = torch.cat([fk[:, :, :ns], bk[:, :, skip:], fk[:, :, ns:]], -2)
        vals = torch.cat([fv[:, :, :ns], bv[:, :, skip:], fv[:, :, ns:]], -2)
        mask = torch.ones(b, 1, 1, keys.shape[-2], dtype=torch.bool)
        mask[1, ..., :70] = False  # left padding that covers a whole body slice and part of the next
        for m in (None, mask, torch.where(mask, 0.0, torch.finfo(torch.float32).min)):
            ref = torch.nn.functional.scaled_dot_product_attention(q, keys, vals, attn_mask=m)
            out = fused_decode_attention(
                q, fk, fv, qk, qv, num_sinks=ns, skip=skip, key_scale=key_scale,
                bias=mask_to_bias(m, b, keys.shape[-2]),
            )  # fmt: skip
            torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)  # fp32; a wrong scale is off by >0.1


@needs_triton
def test_fused_decode_kernel_rejects_bad_input():
    from fastattn.attn_kernels.kv_decode import fused_decode_attention, mask_to_bias

    qk, qv = quantize(torch.randn(1, 2, 64, 16), 4, (64, 1)), quantize(torch.randn(1, 2, 64, 16), 4, (1, 16))
    fk = torch.randn(1, 2, 3, 16)
    with pytest.raises(ValueError, match=r"must be \[1, 2, F, 16\]"):
        fused_decode_attention(torch.randn(1, 2, 4, 16), fk[..., :8], fk[..., :8], qk, qv, num_sinks=0)
    with pytest.raises(ValueError, match="skip must be in 0..64"):
        fused_decode_attention(torch.randn(1, 2, 4, 16), fk, fk, qk, qv, num_sinks=0, skip=65)
    with pytest.raises(ValueError, match="one key mask per batch row"):
        mask_to_bias(torch.ones(1, 1, 4, 67, dtype=torch.bool), 1, 67)


def _decode_logits(model, cache, ids, steps, **kw):
    """Prefill ``ids``, then teacher-force ``steps`` tokens; the logits of every decode step."""
    out = []
    with torch.no_grad():
        logits = model(ids, past_key_values=cache, use_cache=True, **kw).logits
        for _ in range(steps):
            tok = logits[:, -1:].argmax(-1)
            if "attention_mask" in kw:
                kw["attention_mask"] = torch.cat([kw["attention_mask"], torch.ones_like(tok)], 1)
            logits = model(tok, past_key_values=cache, use_cache=True, **kw).logits
            out.append(logits[:, -1])
    return torch.stack(out, 1)


@needs_triton
@pytest.mark.parametrize("case", ["gqa_padded", "sliding", "key_scale"])
def test_fused_decode_in_the_model_matches_the_dequantized_path(case):
    kw, cache_kw = {}, dict(bits=4, key_group=8, value_group=8, residual_length=8, num_sinks=2)
    ids = torch.randint(1, 96, (2, 40))
    if case == "sliding":  # the visible span starts inside the body once the window slides
        model = _tiny(MistralForCausalLM, MistralConfig, sliding_window=24)
        cache_kw.update(key_group=4, residual_length=4)
    else:
        model = _tiny()
    if case == "gqa_padded":  # left padding: SDPA gets a key mask (transformers' pack_gqa decode path)
        mask = torch.ones_like(ids)
        mask[1, :13] = 0
        kw["attention_mask"] = mask
    if case == "key_scale":
        scales, _ = cal.calibrate_key_scales(model, ids[:1], bits=4, key_group=8, n_alpha=3)
        cache_kw["key_scales"] = scales
    ref_cache = QuantizedKVCache.from_model(model, attention="dequantize", **cache_kw)
    cache = QuantizedKVCache.from_model(model, attention="fused", **cache_kw)
    ref = _decode_logits(model, ref_cache, ids, 10, **dict(kw))
    out = _decode_logits(model, cache, ids, 10, **dict(kw))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    st = cache.attention_stats()
    assert st["fused"] == 10 * len(cache.layers) and st["dense"] == 0, st
    assert ref_cache.attention_stats()["dense_reasons"] == {"attention='dequantize'": 10 * len(cache.layers)}


@needs_triton
def test_packed_kv_used_outside_sdpa_is_dense_and_counted():
    # Eager attention runs repeat_kv and matmuls on the returned keys: each layer dequantizes once per step, the
    # answer is the dequantized path's, and the reason is reported.
    torch.manual_seed(0)
    model = _tiny(attn_implementation="eager")
    ids = torch.randint(1, 96, (1, 40))
    cache_kw = dict(bits=4, key_group=8, value_group=8, residual_length=8)
    ref = _decode_logits(
        model, QuantizedKVCache.from_model(model, attention="dequantize", **cache_kw), ids, 4
    )
    cache = QuantizedKVCache.from_model(model, attention="fused", **cache_kw)
    torch.testing.assert_close(_decode_logits(model, cache, ids, 4), ref)
    st = cache.attention_stats()
    assert st["fused"] == 0 and st["dense"] == 4 * len(cache.layers)
    assert all("not SDPA" in r for r in st["dense_reasons"]), st


def test_auto_attention_dequantizes_on_cpu_and_says_why():
    model = _tiny()
    cache = QuantizedKVCache.from_model(model, bits=4, key_group=8, value_group=8, residual_length=8)
    _decode_logits(model, cache, torch.randint(1, 96, (1, 40)), 3)
    assert cache.attention_stats()["dense_reasons"] == {"no fused kernel on cpu (needs CUDA and triton)": 6}
    with pytest.raises(ValueError, match="attention must be"):
        QuantizedKVCache.from_model(model, attention="flash")


@needs_triton
def test_fused_decode_half_precision_is_as_close_as_the_dequantized_path():
    # The default key layout folds key scales into the query; in half precision that product is rounded to
    # fp16, which must not lose more than the unfused path's rounded keys do.
    from fastattn.attn_kernels.kv_decode import fused_decode_attention

    torch.manual_seed(0)
    b, h, g, n, d, f, ns = 2, 2, 4, 256, 64, 9, 3
    qk = quantize(torch.randn(b, h, n, d) * 4 + 2, 4, (64, 1), "torch")
    qv = quantize(torch.randn(b, h, n, d), 4, (1, 64), "torch")
    fk, fv, q = torch.randn(b, h, f, d), torch.randn(b, h, f, d), torch.randn(b, h, g, d) * 2
    keys = torch.cat([fk[:, :, :ns], dequantize(qk, torch.float32, "torch"), fk[:, :, ns:]], -2)
    vals = torch.cat([fv[:, :, :ns], dequantize(qv, torch.float32, "torch"), fv[:, :, ns:]], -2)
    exact = torch.nn.functional.scaled_dot_product_attention(q.double(), keys.double(), vals.double())
    half = [x.half() for x in (q, fk, fv)]
    fused = fused_decode_attention(half[0], half[1], half[2], qk, qv, num_sinks=ns).double()
    unfused = torch.nn.functional.scaled_dot_product_attention(*(x.half().float() for x in (q, keys, vals)))
    err_fused, err_unfused = (fused - exact).abs().max(), (unfused.double() - exact).abs().max()
    assert err_fused <= 1.5 * err_unfused, (err_fused, err_unfused)


@needs_triton
def test_packed_kv_modified_in_place_is_read_dense():
    layer = QuantizedKVLayer(
        bits=4, key_group=8, value_group=8, residual_length=4, num_sinks=2, attention="fused"
    )
    torch.manual_seed(0)
    layer.update(torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16))
    keys, values = layer.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16))
    q = torch.randn(1, 2, 1, 16)
    keys.mul_(0.5)  # in place: the fused kernel reads the packed codes, which no longer describe these keys
    out = torch.nn.functional.scaled_dot_product_attention(q, keys, values)
    dk, dv = keys.view.dense("check")
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, dk, dv))
    assert layer.attention_stats()["fused"] == 0


@needs_triton
def test_repeat_kv_then_sdpa_stays_fused_and_other_uses_replay_it():
    # transformers' sdpa attention before 5.24 repeats the KV heads when there is a padding mask.
    from transformers.integrations.sdpa_attention import repeat_kv

    torch.manual_seed(0)
    layer = QuantizedKVLayer(
        bits=4, key_group=8, value_group=8, residual_length=4, num_sinks=2, attention="fused"
    )
    layer.update(torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16))
    keys, values = layer.update(torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16))
    kr, vr = repeat_kv(keys, 3), repeat_kv(values, 3)
    assert type(kr).__name__ == "PackedKV" and kr.shape == (2, 6, 41, 16) and kr.repeat == 3
    q = torch.randn(2, 6, 1, 16)
    mask = torch.ones(2, 1, 1, 41, dtype=torch.bool)
    mask[1, ..., :9] = False
    out = torch.nn.functional.scaled_dot_product_attention(q, kr, vr, attn_mask=mask)
    dk, dv = (x.repeat_interleave(3, dim=1) for x in keys.view.dense("reference"))
    torch.testing.assert_close(
        out, torch.nn.functional.scaled_dot_product_attention(q, dk, dv, attn_mask=mask)
    )
    assert layer.attention_stats()["fused"] == 1
    torch.testing.assert_close(
        kr.sum(), dk.sum()
    )  # any other use replays the recorded steps on the dense keys
    half = keys[:, :, None, :, :]
    torch.testing.assert_close(half.expand(2, 2, 3, 41, 16) * 1.0, dk.reshape(2, 2, 3, 41, 16))


def test_quantizers_import_without_transformers():
    """The ComfyUI text-encoder node needs only the quantizers: importing them must not import transformers
    (a host may carry another version of it)."""
    import subprocess
    import sys

    code = (
        "import sys; import fastattn.kvcache.quant, fastattn.kvcache.frozen_prefix; "
        "assert 'transformers' not in sys.modules, 'transformers imported'; "
        "from fastattn.kvcache import QuantizedKVCache, quantize; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
