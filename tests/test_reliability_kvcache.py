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
    """Outside ComfyUI the node keeps its LM with fastattn.prompt's cache (keep_loaded off: dropped after the run)."""
    from fastattn.nodes.prompt_enhancer import enhance_prompt

    for name in ("comfy.model_management", "comfy.model_patcher", "comfy.patcher_extension"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    prompt = no_loaded_lms
    a, b = lm_dirs
    text = enhance_prompt("w1 w2", a, max_new_tokens=3, kv_bits="8", keep_loaded=False)
    assert isinstance(text, str) and prompt.loaded_causal_lms() == []
    enhance_prompt("w1 w2", b, max_new_tokens=3, kv_bits="8")  # keep_loaded on (the default)
    assert prompt.loaded_causal_lms() == [b]


# ---------------------------------------------------------------- fakes of ComfyUI's memory management contract
# Written from the contract, not from ComfyUI's code: a ModelPatcher holds ``model`` with its ``load_device`` and
# ``offload_device``, takes keyed callbacks, and ``detach()`` moves the model to the offload device and then runs
# the ON_DETACH callbacks ``(patcher, unpatch_all)``; a collected patcher detaches itself too.
# ``load_models_gpu`` puts each patcher's model on its load device and lists it as loaded, holding the patcher only
# weakly; an entry whose model is collected is dropped from the list right then (a finalizer), and
# ``unload_all_models`` walks the list by index, detaching each model, then removes what it unloaded.

ON_DETACH = "on_detach_after"


class FakeModelPatcher:
    def __init__(self, model, load_device, offload_device):
        self.model, self.load_device, self.offload_device = model, load_device, offload_device
        self.callbacks: dict = {}

    def add_callback_with_key(self, call_type, key, callback):
        self.callbacks.setdefault(call_type, {}).setdefault(key, []).append(callback)

    def detach(self, unpatch_all=True):
        if unpatch_all:
            self.model.to(self.offload_device)
        for callbacks in list(self.callbacks.get(ON_DETACH, {}).values()):
            for callback in callbacks:
                callback(self, unpatch_all)
        return self.model

    def __del__(self):
        self.detach(unpatch_all=False)


class _Loaded:
    def __init__(self, patcher, host):
        self.patcher, self.module = weakref.ref(patcher), weakref.ref(patcher.model)
        self.finalizer = weakref.finalize(patcher.model, host.drop_collected)


def fake_comfy(monkeypatch):
    """Installs fake comfy.model_management / model_patcher / patcher_extension modules; returns the first."""
    mm = types.ModuleType("comfy.model_management")
    mm.current_loaded_models, mm.load_calls = [], []
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.text_encoder_offload_device = lambda: torch.device("cpu")
    mm.soft_empty_cache = lambda force=False: None

    def drop_collected():
        mm.current_loaded_models[:] = [e for e in mm.current_loaded_models if e.module() is not None]

    def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                        force_full_load=False):  # fmt: skip
        mm.load_calls += [(weakref.ref(p), p.load_device, force_full_load) for p in models]
        for patcher in models:
            if not any(e.patcher() is patcher for e in mm.current_loaded_models):
                patcher.model.to(patcher.load_device)
                mm.current_loaded_models.insert(0, _Loaded(patcher, mm))

    def unload_all_models():
        unloaded = []
        for i in range(len(mm.current_loaded_models)):
            entry = mm.current_loaded_models[i]
            entry.patcher().detach()
            entry.finalizer.detach()
            unloaded.append(i)
        for i in sorted(unloaded, reverse=True):
            mm.current_loaded_models.pop(i)

    mm.drop_collected, mm.load_models_gpu, mm.unload_all_models = (drop_collected, load_models_gpu,
                                                                   unload_all_models)  # fmt: skip
    mp = types.ModuleType("comfy.model_patcher")
    mp.ModelPatcher = FakeModelPatcher
    ext = types.ModuleType("comfy.patcher_extension")
    ext.CallbacksMP = types.SimpleNamespace(ON_DETACH=ON_DETACH)
    for name, module in (("comfy.model_management", mm), ("comfy.model_patcher", mp),
                         ("comfy.patcher_extension", ext)):  # fmt: skip
        monkeypatch.setitem(sys.modules, name, module)
    return mm


def _loaded_lms(mm) -> list:
    return [e.patcher().model for e in mm.current_loaded_models if e.patcher() is not None]


def test_prompt_enhancer_node_lets_comfyui_manage_its_lm(lm_dirs, no_loaded_lms, monkeypatch):
    """Inside ComfyUI the LM is a ModelPatcher loaded with load_models_gpu: ComfyUI's unload_all_models ("Unload
    Models", POST /free, an out-of-memory error, --disable-smart-memory) releases it; nothing of ComfyUI is
    replaced, and fastattn.prompt's own cache is not used."""
    from fastattn.nodes.prompt_enhancer import enhance_prompt

    prompt = no_loaded_lms
    a, b = lm_dirs
    plain = prompt.enhance("w1 w2", model=a, max_new_tokens=3, bits=8)
    prompt.unload_causal_lm()
    mm = fake_comfy(monkeypatch)
    original = mm.unload_all_models
    assert enhance_prompt("w1 w2", a, max_new_tokens=3, kv_bits="8", keep_loaded=False) == plain
    # Loaded through ComfyUI, whole (plain torch layers cannot run with part of their weights elsewhere) ...
    ((patcher_alive, load_device, full),) = mm.load_calls
    assert full is True and load_device == mm.get_torch_device()
    assert patcher_alive() is None and mm.current_loaded_models == []  # ... then let go: nothing listed
    assert prompt.loaded_causal_lms() == []  # and fastattn.prompt's own cache was not used

    assert enhance_prompt("w1 w2", a, max_new_tokens=3, kv_bits="8") == plain  # keep_loaded on
    (module,) = _loaded_lms(mm)
    lm_alive = weakref.ref(module.lm)
    assert type(module).__name__ == "PromptEnhancerLM" and prompt.loaded_causal_lms() == []
    enhance_prompt("w1 w2", a, max_new_tokens=3, kv_bits="8")  # kept: loaded through ComfyUI, not read again
    assert _loaded_lms(mm) == [module] and len(mm.load_calls) == 3 and mm.load_calls[2][0]().model is module
    del module
    mm.unload_all_models()
    gc.collect()
    assert lm_alive() is None and mm.current_loaded_models == []  # released by ComfyUI's own unload
    assert mm.unload_all_models is original  # and nothing of ComfyUI was replaced

    enhance_prompt("w1 w2", a, max_new_tokens=3, kv_bits="8")  # read again after the unload
    (module,) = _loaded_lms(mm)
    lm_alive = weakref.ref(module.lm)
    del module
    enhance_prompt("w1 w2", b, max_new_tokens=3, kv_bits="8")  # one LM at a time: a goes
    gc.collect()
    assert lm_alive() is None and [m.path for m in _loaded_lms(mm)] == [b]
    mm.unload_all_models()
    assert mm.current_loaded_models == [] and mm.unload_all_models is original
    enhance_prompt("w1 w2", b, max_new_tokens=3, kv_bits="8", keep_loaded=False)  # read again, then let go
    assert mm.current_loaded_models == [] and prompt.loaded_causal_lms() == []


# A test-only node for the real host (written into the temporary custom_nodes, never part of the pack): it reports
# what ComfyUI's memory manager lists as loaded, whether a causal LM is still alive anywhere in the server process
# (weak references to the ones it saw loaded, and a scan of live objects), and whether
# comfy.model_management.unload_all_models is still ComfyUI's own function.
_PROBE_NODE = """
import gc, json, os, warnings, weakref

import comfy.model_management as mm
from transformers import GenerationMixin  # causal LMs (not their inner base models)

ORIGINAL_UNLOAD = mm.unload_all_models  # at import: before any prompt ran
_seen = []  # weak references to the causal LMs seen loaded by ComfyUI


def _defined_in_comfy(fn):
    code = getattr(fn, "__code__", None)
    return code is not None and os.path.realpath(code.co_filename) == os.path.realpath(mm.__file__)


class FastAttnTestMemoryProbe:
    RETURN_TYPES = ()
    FUNCTION = "probe"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"tag": ("STRING", {"default": ""})}, "optional": {"after": ("STRING", {"forceInput": True})}}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")

    def probe(self, tag, after=None):
        gc.collect()
        with warnings.catch_warnings():  # isinstance on some of torch's deprecated objects warns
            warnings.simplefilter("ignore")
            live_lms = sum(isinstance(o, GenerationMixin) for o in gc.get_objects())
        loaded = []
        for entry in mm.current_loaded_models:
            patcher = entry.model
            if patcher is None:
                continue
            loaded.append({"module": type(patcher.model).__name__, "device": str(entry.device),
                           "load_device": str(patcher.load_device), "offload_device": str(patcher.offload_device)})
            for m in patcher.model.modules():
                if isinstance(m, GenerationMixin) and not any(r() is m for r in _seen):
                    _seen.append(weakref.ref(m))
        report = {
            "tag": tag,
            "loaded": loaded,
            "seen": len(_seen),
            "seen_alive": sum(r() is not None for r in _seen),
            "live_lms": live_lms,
            "unload_is_original": mm.unload_all_models is ORIGINAL_UNLOAD and _defined_in_comfy(mm.unload_all_models),
            "torch_device": str(mm.get_torch_device()),
        }
        return {"ui": {"text": [json.dumps(report)]}}


NODE_CLASS_MAPPINGS = {"FastAttnTestMemoryProbe": FastAttnTestMemoryProbe}
"""


@pytest.mark.skipif(not os.environ.get("COMFYUI_DIR"), reason="real-host ComfyUI test: set COMFYUI_DIR")
def test_real_comfyui_unload_models_frees_the_enhancer_lm(lm_dirs, tmp_path):
    """The Prompt Enhancer's LM is one of ComfyUI's loaded models: listed by its memory manager while kept,
    released (no live reference left in the server) by ComfyUI's own "Unload Models" request (``POST /free``),
    and no ComfyUI function is replaced on the way. With keep_loaded off nothing stays after the run."""
    import json

    spec = importlib.util.spec_from_file_location("_fa_comfy_host", Path(__file__).with_name("comfy_host.py"))
    comfy_host = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(comfy_host)
    host = comfy_host.make_base(tmp_path)
    probe_dir = Path(host["base"]) / "custom_nodes" / "fastattn_test_probe"
    probe_dir.mkdir(parents=True)
    (probe_dir / "__init__.py").write_text(_PROBE_NODE)
    server = comfy_host.ComfyServer(host, ready_path="/object_info/FastAttnTestMemoryProbe")
    runs = iter(range(1000))

    def probe(enhancer: dict | None = None) -> dict:
        n = next(runs)
        graph = {"9": {"class_type": "FastAttnTestMemoryProbe", "inputs": {"tag": f"probe {n}"}}}
        if enhancer is not None:
            graph["1"] = {"class_type": "FastAttnPromptEnhancer", "inputs": enhancer}
            graph["9"]["inputs"]["after"] = ["1", 0]  # the probe runs after the enhancer
        entry = server.run(graph, timeout=240)
        assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
        return json.loads(entry["outputs"]["9"]["text"][0])

    try:
        _, info = server.get("/object_info/FastAttnPromptEnhancer")
        assert info["FastAttnPromptEnhancer"]["input"]["optional"]["keep_loaded"][0] == "BOOLEAN"
        enhancer = {"prompt": "w1 w2", "model_path": lm_dirs[0], "max_new_tokens": 3, "kv_bits": "8"}
        kept = probe(enhancer)  # keep_loaded on (the default)
        device = kept["torch_device"]  # "cpu" under main.py --cpu
        assert [m["module"] for m in kept["loaded"]] == ["PromptEnhancerLM"], kept  # loaded by ComfyUI
        assert kept["loaded"][0]["device"] == device and kept["loaded"][0]["load_device"] == device
        assert kept["seen_alive"] == 1 and kept["live_lms"] == 1, kept
        assert kept["unload_is_original"], kept  # ComfyUI's unload_all_models, not a wrapper
        assert probe()["seen_alive"] == 1  # kept between prompts
        # ComfyUI's worker reads the flag when its queue wakes it; a request that lands while it is still
        # collecting garbage after a prompt is read only at its next wake-up, so ask again until it is served.
        freed = "fastattn Prompt Enhancer: ComfyUI unloaded the LM"
        deadline = time.monotonic() + 90
        while freed not in server.log_tail(100_000):
            assert time.monotonic() < deadline, server.log_tail()
            status, _ = comfy_host.http(server.url + "/free", {"unload_models": True})
            assert status == 200
            time.sleep(3)
        after = probe()
        assert after["loaded"] == [] and after["seen"] == 1, after
        assert after["seen_alive"] == 0 and after["live_lms"] == 0, after  # no reference left anywhere
        assert after["unload_is_original"], after
        assert server.log_tail(100_000).count(freed) == 1  # freed once; later unloads find nothing kept

        once = probe(dict(enhancer, keep_loaded=False))  # loaded through ComfyUI, freed after the rewrite
        assert once["loaded"] == [] and once["live_lms"] == 0 and once["unload_is_original"], once
        assert server.log_tail(100_000).count("Requested to load PromptEnhancerLM") == 2  # ComfyUI's own log
    finally:
        server.stop()


def test_prompt_enhancer_lm_dtype_follows_comfyuis_device(lm_dirs, no_loaded_lms, monkeypatch):
    """Inside ComfyUI the LM is read in the dtype that suits ComfyUI's device: float32 on the CPU, bf16 (else
    fp16) on a GPU — float32 there would take twice the memory ComfyUI has to find for it."""
    import fastattn.prompt as prompt_mod
    from fastattn.nodes import prompt_enhancer as pe

    assert pe.lm_dtype("cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert pe.lm_dtype("cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert pe.lm_dtype(torch.device("cuda", 0)) == torch.float16

    asked = []
    real = prompt_mod.read_causal_lm
    monkeypatch.setattr(
        prompt_mod,
        "read_causal_lm",
        lambda path, dtype=torch.float32: asked.append(dtype) or real(path, dtype),
    )
    mm = fake_comfy(monkeypatch)
    pe.enhance_prompt("w1 w2", lm_dirs[0], max_new_tokens=3, kv_bits="8", keep_loaded=False)
    assert asked == [pe.lm_dtype(mm.get_torch_device())]
