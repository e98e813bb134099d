"""The KV cache at its edges: bad arguments rejected where they are given, no silent staleness, no leaks.

Tiny random-weight Llama models as in tests/test_kvcache.py (head_dim 16: the default value_group of 64 does
not fit it).
"""

from __future__ import annotations

import gc
import importlib.util
import os
import sys
import time
import types
import weakref
from pathlib import Path

import pytest
import torch
from fastattn.kvcache import PrefixKVCache, QuantizedKVCache, QuantizedKVLayer, cache_prompt_prefix
from fastattn.kvcache.cache import with_cache
from transformers import LlamaConfig, LlamaForCausalLM

SMALL = dict(key_group=8, value_group=8, residual_length=8)


def _tiny(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        initializer_range=0.15,
    )
    return LlamaForCausalLM(cfg).eval()


def _full(model, prefix, suffix):
    with torch.no_grad():
        return model(torch.cat([prefix, suffix], 1)).logits[:, prefix.shape[1] :]


# ------------------------------------------------------------------------------------ PrefixKVCache


def test_prefix_cache_checks_the_suffix_and_its_mask():
    model = _tiny()
    pc = PrefixKVCache(model, torch.randint(0, 96, (1, 20)), bits=8, **SMALL)
    suffix = torch.randint(0, 96, (2, 5))
    with pytest.raises(
        ValueError, match=r"attention_mask must cover the suffix only: expected \[2, 5\], got \[2, 3\]"
    ):
        pc.forward(suffix, attention_mask=torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected \[2, 5\], got \[2, 25\].*prefix"):
        pc.forward(suffix, attention_mask=torch.ones(2, 25, dtype=torch.long))  # prefix + suffix: say so
    with pytest.raises(ValueError, match=r"suffix_ids must be a \[batch, tokens\] tensor .* got \[5\]"):
        pc.forward(suffix[0])
    with pytest.raises(ValueError, match=r"at least one token.*got \[2, 0\]"):
        pc.forward(suffix[:, :0])
    with pytest.raises(ValueError, match="integer token ids"):
        pc.forward(suffix.float())
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="batch_size must be a positive int"):
            pc.fork(bad)
    assert pc.uses == 0  # nothing was handed out
    out = pc.forward(suffix, attention_mask=torch.ones(2, 5, dtype=torch.long))
    assert out.logits.shape == (2, 5, 96)


def test_prefix_cache_is_rebuilt_after_a_weight_change():
    model = _tiny()
    prefix, suffix = torch.randint(0, 96, (1, 24)), torch.randint(0, 96, (1, 6))
    pc = PrefixKVCache(model, prefix, bits=8, **SMALL)
    assert (pc.forward(suffix).logits - _full(model, prefix, suffix)).abs().max() < 0.05
    with torch.no_grad():  # in place, as an optimizer step or load_state_dict does
        for p in model.model.layers[0].self_attn.parameters():
            p.mul_(-1.5)
    new = _full(model, prefix, suffix)
    assert (pc.forward(suffix).logits - new).abs().max() < 0.05 and pc.builds == 2
    # a replaced parameter (a LoRA merged by swapping the tensor, say) is seen too
    layer = model.model.layers[1].self_attn
    layer.k_proj.weight = torch.nn.Parameter(layer.k_proj.weight.detach() * 0.5)
    assert (pc.forward(suffix).logits - _full(model, prefix, suffix)).abs().max() < 0.05 and pc.builds == 3
    pc.forward(suffix)
    assert pc.builds == 3  # unchanged weights: no rebuild
    assert pc.fork().get_seq_length() == 24


# ----------------------------------------------------------------------------- QuantizedKVCache


def test_group_sizes_are_checked_when_the_cache_is_built():
    model = _tiny()
    with pytest.raises(ValueError, match=r"value group size 64 must divide head_dim 16.*value_group=16"):
        QuantizedKVCache.from_model(model, bits=4)  # the default; before: only at the first generate step
    for name in ("key_group", "value_group"):
        for bad in (0, -8, 2.5, True):
            with pytest.raises(ValueError, match=f"{name} must be a positive int"):
                QuantizedKVCache.from_model(model, bits=4, **{**SMALL, name: bad})
    with pytest.raises(ValueError, match="key group size 32 must divide head_dim 16.*key_group=16"):
        QuantizedKVCache.from_model(model, bits=4, key_mode="token", key_group=32, value_group=8)
    cache = QuantizedKVCache.from_model(model, bits=4, value_group=16)
    ids = torch.randint(0, 96, (1, 6))
    model.generate(ids, **with_cache(model, cache), max_new_tokens=2, do_sample=False)
    assert cache.get_seq_length() == 7


def _keys(t: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 2, t, 16, generator=g), torch.randn(1, 2, t, 16, generator=g)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_a_non_finite_key_keeps_its_group_neighbours_precise(bad):
    layer = QuantizedKVLayer(bits=4, key_group=16, value_group=16, residual_length=0, num_sinks=0)
    k, v = _keys()
    k[0, 0, 3, 5] = bad
    layer.update(k, v)
    assert layer.body_len == 16
    body_k, _ = layer._body()
    others = torch.ones(16, dtype=torch.bool)
    others[3] = False
    col = k[0, 0, others, 5]  # the 15 finite tokens of the channel group that holds the bad value
    step = float(col.max() - col.min()) / 15
    err = (body_k[0, 0, others, 5] - col).abs().max()
    assert err <= step / 2 * 1.01 + 1e-3, (err, step)  # before: the group's range was +-65504, all collapsed
    assert torch.isfinite(body_k).all()  # the bad value saturates at its group's range
    rest = torch.ones_like(k, dtype=torch.bool)
    rest[0, 0, :, 5] = False
    assert (body_k[rest] - k[rest]).abs().max() < 0.5  # other channels were never affected


def test_a_dtype_or_device_change_mid_cache_is_an_error():
    layer = QuantizedKVLayer(bits=4, key_group=16, value_group=16, residual_length=0, num_sinks=0)
    k, v = _keys()
    layer.update(k, v)
    with pytest.raises(
        ValueError, match="dtype changed: the cache holds torch.float32 keys/values, got torch.bfloat16"
    ):
        layer.update(k[:, :, :1].bfloat16(), v[:, :, :1].bfloat16())
    with pytest.raises(ValueError, match="dtype changed"):
        layer.update(k[:, :, :1], v[:, :, :1].double())
    assert layer.cumulative_length == 16  # the rejected updates stored nothing
    keys, values = layer.update(k[:, :, :1], v[:, :, :1])
    assert keys.dtype == values.dtype == torch.float32 and keys.shape[-2] == 17


# ------------------------------------------------------------------------------------------- leaks


def test_prompt_prefix_cache_does_not_keep_the_encoder_alive():
    encoder = _tiny().model  # a decoder-only text encoder (LlamaModel), as in HunyuanVideo
    handle = cache_prompt_prefix(encoder, prefix_ids=torch.randint(0, 96, (1, 12)), value_group=16)
    with torch.no_grad():
        encoder(input_ids=torch.cat([handle.prefix_ids, torch.randint(0, 96, (1, 4))], 1))
    assert handle.stats()["hits"] == 1
    alive = weakref.ref(encoder)
    del encoder, handle  # the user drops the pipeline without disable()
    gc.collect()
    assert alive() is None


def test_a_second_prefix_cache_on_the_same_encoder_is_still_refused():
    encoder = _tiny().model
    h = cache_prompt_prefix(encoder, prefix_ids=torch.randint(0, 96, (1, 12)), value_group=16)
    with pytest.raises(RuntimeError, match="already has a prompt prefix cache"):
        cache_prompt_prefix(encoder, prefix_ids=torch.randint(0, 96, (1, 12)), value_group=16)
    h.disable()
    cache_prompt_prefix(encoder, prefix_ids=torch.randint(0, 96, (1, 12)), value_group=16).disable()


# ----------------------------------------------------------------------- prompt enhancer models


def _save_lm(path, seed: int) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>"] + [f"w{i}" for i in range(93)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    model = _tiny(seed)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lms")
    return _save_lm(root / "a", 0), _save_lm(root / "b", 1)


@pytest.fixture
def no_loaded_lms():
    from fastattn import prompt

    prompt.unload_causal_lm()
    yield prompt
    prompt.unload_causal_lm()


def test_load_causal_lm_keeps_a_bounded_number_and_unloads(lm_dirs, no_loaded_lms):
    prompt = no_loaded_lms
    a, b = lm_dirs
    model_a, _ = prompt.load_causal_lm(a)
    assert prompt.load_causal_lm(a)[0] is model_a  # cached
    alive = weakref.ref(model_a)
    del model_a
    prompt.load_causal_lm(b)  # default max_loaded=1: a goes out
    gc.collect()
    assert alive() is None and prompt.loaded_causal_lms() == [b]
    prompt.load_causal_lm(a, max_loaded=2)
    assert prompt.loaded_causal_lms() == [b, a]
    assert prompt.unload_causal_lm(b) == 1 and prompt.loaded_causal_lms() == [a]
    assert prompt.unload_causal_lm("/not/loaded") == 0
    assert prompt.unload_causal_lm() == 1 and prompt.loaded_causal_lms() == []
    with pytest.raises(ValueError, match="max_loaded must be a positive int"):
        prompt.load_causal_lm(a, max_loaded=0)


def test_prompt_enhancer_node_frees_its_model(lm_dirs, no_loaded_lms, monkeypatch):
    from fastattn.nodes.prompt_enhancer import enhance_prompt

    prompt = no_loaded_lms
    a, b = lm_dirs
    text = enhance_prompt("w1 w2", a, max_new_tokens=3, kv_bits="8", keep_loaded=False)
    assert isinstance(text, str) and prompt.loaded_causal_lms() == []

    # Inside ComfyUI: "Unload Models" / "Free model and node cache" (POST /free), an out-of-memory error, and
    # --disable-smart-memory after each prompt all call comfy.model_management.unload_all_models().
    host_calls = []
    mm = types.ModuleType("comfy.model_management")
    mm.unload_all_models = lambda: host_calls.append("host")
    original = mm.unload_all_models
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    enhance_prompt("w1 w2", b, max_new_tokens=3, kv_bits="8")  # keep_loaded=True by default
    assert prompt.loaded_causal_lms() == [b] and mm.unload_all_models is not original
    mm.unload_all_models()
    assert host_calls == ["host"] and prompt.loaded_causal_lms() == []  # ComfyUI's own unload ran, then ours
    assert mm.unload_all_models is original  # and the host's function is back as it was


@pytest.mark.skipif(not os.environ.get("COMFYUI_DIR"), reason="real-host ComfyUI test: set COMFYUI_DIR")
def test_real_comfyui_unload_models_frees_the_enhancer_lm(lm_dirs, tmp_path):
    """ComfyUI's own "Unload Models" request (``POST /free``) frees the LM the node keeps (ComfyUI's log says so)."""
    spec = importlib.util.spec_from_file_location("_fa_comfy_host", Path(__file__).with_name("comfy_host.py"))
    comfy_host = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(comfy_host)
    server = comfy_host.ComfyServer(
        comfy_host.make_base(tmp_path), ready_path="/object_info/FastAttnPromptEnhancer"
    )
    try:
        _, info = server.get("/object_info/FastAttnPromptEnhancer")
        assert info["FastAttnPromptEnhancer"]["input"]["optional"]["keep_loaded"][0] == "BOOLEAN"
        enhancer = {"prompt": "w1 w2", "model_path": lm_dirs[0], "max_new_tokens": 3, "kv_bits": "8"}
        graph = {
            "1": {"class_type": "FastAttnPromptEnhancer", "inputs": enhancer},
            "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},
        }
        entry = server.run(graph, timeout=240)
        assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
        freed = "fastattn Prompt Enhancer: freed 1 kept LM(s)"
        assert freed not in server.log_tail(100_000)  # kept between runs
        # ComfyUI's worker reads the flag when its queue wakes it; a request that lands while it is still
        # collecting garbage after the prompt is read only at its next wake-up, so ask again until it is served.
        deadline = time.monotonic() + 90
        while freed not in server.log_tail(100_000):
            assert time.monotonic() < deadline, server.log_tail()
            status, _ = comfy_host.http(server.url + "/free", {"unload_models": True})
            assert status == 200
            time.sleep(3)
        assert server.log_tail(100_000).count(freed) == 1  # freed once; later unloads find nothing kept
    finally:
        server.stop()
