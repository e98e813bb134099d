"""Contract tests of the text-encoder prefix cache's ComfyUI side, against fakes of ComfyUI's contract.

No ComfyUI core is installable from a package index and none of its GPL code may enter this repository, so the
fakes below are written from the contract's description (``nodes/host/llm_prefix.py``'s docstring), not from its
code:

- a decoder *core* called as ``core(x, attention_mask, embeds=[B, S, hidden], num_tokens=, intermediate_output=
  (None | int, negative from the end | "all" | list of layers), final_layer_norm_intermediate=, dtype=,
  position_ids=, embeds_info=)`` returning ``(last hidden state after the final norm, intermediate)``; positions
  ``0..S-1``; a causal mask plus ``-inf`` on keys whose ``attention_mask`` is 0; rotary tables from the module's
  ``precompute_freqs_cis(head_dim, position_ids, theta, rope_scale, rope_dims, device=)`` and the attention function
  from its ``optimized_attention_for_device(device, mask=, small_input=)``;
- layers called as ``layer(x=, attention_mask=, freqs_cis=, optimized_attention=)`` that hand rotated q and
  head-repeated (``repeat_interleave``) k, v ``[B, heads, S, head_dim]`` to ``optimized_attention(q, k, v, heads,
  mask=, skip_reshape=True)`` (output ``[B, S, heads * head_dim]``); newer cores' layers return ``(x, kv)``;
- text encoders (``SDClipModel``-like: a ``transformer`` whose ``model`` is the core, and
  ``encode_token_weights``); a CLIP with ``cond_stage_model``, ``tokenize``, ``encode_from_tokens``, ``clone``,
  ``load_model`` and a patcher whose ``add_object_patch`` attributes are set on the model while that patcher is
  loaded, the replaced ones kept in a backup shared by clones and put back when another clone loads.
"""

from __future__ import annotations

import asyncio
import re
import sys
import types
import zlib

import pytest
import torch
import torch.nn.functional as F
from fastattn.kvcache.frozen_prefix import FrozenPrefixKV
from fastattn.nodes import text_encoder_cache as tec
from fastattn.nodes.host.llm_prefix import PrefixCachedForward, decoder_reason

# ================================================================================ fakes of the host contract


def precompute_freqs_cis(head_dim, position_ids, theta, rope_scale=None, rope_dims=None, device=None):
    """Rotary tables ``(cos, sin)``, each ``[1, 1, S, head_dim]``, for ``position_ids [1, S]``."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    if rope_scale is not None:
        inv = inv / rope_scale
    angles = position_ids.float()[..., None] * inv
    angles = torch.cat([angles, angles], -1)[:, None]
    return angles.cos(), angles.sin()


def _rotate(x, cos, sin):
    first, second = x.chunk(2, -1)
    return x * cos + torch.cat([-second, first], -1) * sin


def host_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, **kwargs):
    assert skip_reshape, "the decoder hands (B, H, L, D)"
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).flatten(2)


def optimized_attention_for_device(device, mask=False, small_input=False):
    return host_attention


class Embedding(torch.nn.Embedding):
    def forward(self, ids, out_dtype=None):
        out = super().forward(ids)
        return out if out_dtype is None else out.to(out_dtype)


class RMSNorm(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Attention(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
        )
        self.q_proj = torch.nn.Linear(c.hidden_size, self.num_heads * c.head_dim)
        self.k_proj = torch.nn.Linear(c.hidden_size, self.num_kv_heads * c.head_dim)
        self.v_proj = torch.nn.Linear(c.hidden_size, self.num_kv_heads * c.head_dim)
        self.o_proj = torch.nn.Linear(self.num_heads * c.head_dim, c.hidden_size, bias=False)

    def forward(self, x, mask, freqs, attend):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = _rotate(q, *freqs), _rotate(k, *freqs)
        rep = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        return self.o_proj(attend(q, k, v, self.num_heads, mask=mask, skip_reshape=True))


class Block(torch.nn.Module):
    def __init__(self, c, tuple_out=False, sliding=False):
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(c.hidden_size, 2 * c.hidden_size), torch.nn.SiLU(),
                                       torch.nn.Linear(2 * c.hidden_size, c.hidden_size))  # fmt: skip
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(c.hidden_size), RMSNorm(c.hidden_size)
        self.tuple_out = tuple_out
        self.sliding_attention = 16 if sliding else False

    def forward(self, x, attention_mask=None, freqs_cis=None, optimized_attention=None):
        x = x + self.self_attn(self.input_layernorm(x), attention_mask, freqs_cis, optimized_attention)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return (x, None) if self.tuple_out else x


def config(**kw):
    base = dict(vocab_size=97, hidden_size=32, head_dim=16, num_attention_heads=4, num_key_value_heads=2,
                num_hidden_layers=3, rope_theta=10000.0, rope_scale=None, rope_dims=None)  # fmt: skip
    return types.SimpleNamespace(**{**base, **kw})


class Decoder(torch.nn.Module):
    """A llama.py-style decoder core (see the module docstring)."""

    causal = True  # a host variant that attends both ways overrides this

    def __init__(self, c, tuple_out=False, sliding=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.config = c
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size)
        self.layers = torch.nn.ModuleList(
            Block(c, tuple_out, sliding and i == 1) for i in range(c.num_hidden_layers)
        )
        self.norm = RMSNorm(c.hidden_size)
        with torch.no_grad():  # peaked attention, so errors in the keys show
            for layer in self.layers:
                layer.self_attn.q_proj.weight.mul_(3.0)
                layer.self_attn.k_proj.weight.mul_(3.0)
        self.requires_grad_(False)  # as ComfyUI freezes its text encoders

    def forward(self, x, attention_mask=None, embeds=None, num_tokens=None, intermediate_output=None,
                final_layer_norm_intermediate=True, dtype=None, position_ids=None, embeds_info=None):  # fmt: skip
        h = embeds if embeds is not None else self.embed_tokens(x, out_dtype=dtype)
        s = h.shape[1]
        if position_ids is None:
            position_ids = torch.arange(s).unsqueeze(0)
        c = self.config
        freqs = precompute_freqs_cis(c.head_dim, position_ids, c.rope_theta, c.rope_scale, c.rope_dims)
        mask = torch.full((s, s), float("-inf")).triu(1) if self.causal else torch.zeros(s, s)
        if attention_mask is not None:
            pad = torch.zeros(attention_mask.shape, dtype=h.dtype).masked_fill(
                attention_mask == 0, float("-inf")
            )
            mask = mask + pad[:, None, None, :]
        attend = optimized_attention_for_device(h.device, mask=True, small_input=True)
        n = len(self.layers)
        collected, only, idx = None, None, intermediate_output
        if isinstance(idx, list):
            collected, only, idx = [], set(idx), None
        elif idx == "all":
            collected, idx = [], None
        elif idx is not None and idx < 0:
            idx = n + idx
        intermediate = None
        for i, layer in enumerate(self.layers):
            if collected is not None and (only is None or i in only):
                collected.append(h.unsqueeze(1).clone())
            out = layer(x=h, attention_mask=mask, freqs_cis=freqs, optimized_attention=attend)
            h = out[0] if isinstance(out, tuple) else out
            if i == idx:
                intermediate = h.clone()
        h = self.norm(h)
        if collected is not None:
            if only is None or n in only:
                collected.append(h.unsqueeze(1).clone())
            intermediate = torch.cat(collected, 1)
        if intermediate is not None and final_layer_norm_intermediate:
            intermediate = self.norm(intermediate)
        return h, intermediate


class BidirectionalDecoder(Decoder):
    """A host whose decoder attends both ways: the template's states depend on the prompt, so no cache fits."""

    causal = False


class Transformer(torch.nn.Module):
    def __init__(self, core):
        super().__init__()
        self.model = core

    def forward(self, x, *args, **kwargs):
        return self.model(x, *args, **kwargs)


BOS, PAD = 1, 0
TEMPLATE = "<s> system : describe the picture by colour shape size texture and light . user : {} </s>"


def token_id(word: str) -> int:
    return {"<s>": BOS, "<pad>": PAD}.get(word, 2 + zlib.crc32(word.encode()) % 95)


def tokenize_words(text: str) -> list[tuple[int, float]]:
    """Words with optional ``(word:weight)``; ``<s>`` only where the text has it."""
    out = []
    for m in re.finditer(r"\((\S+?):([0-9.]+)\)|(\S+)", text):
        word, weight = (m.group(1), float(m.group(2))) if m.group(1) else (m.group(3), 1.0)
        out.append((token_id(word), weight))
    return out


class TextEncoder(torch.nn.Module):
    """``SDClipModel``-like: embeds the tokens, runs ``transformer(None, mask, embeds=...)``, weights them against
    an empty row it adds when any weight is not 1."""

    def __init__(self, core, layer_idx=-2):
        super().__init__()
        self.transformer = Transformer(core)
        self.layer_idx = layer_idx

    def encode_token_weights(self, sections):
        rows = [[t for t, _ in s] for s in sections]
        weighted = any(w != 1.0 for s in sections for _, w in s)
        width = max(map(len, rows))
        if weighted:
            rows.append([BOS])
        ids = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        embeds = self.transformer.model.embed_tokens(ids, out_dtype=torch.float32)
        x, inter = self.transformer(None, mask, embeds=embeds, num_tokens=mask.sum(1).tolist(),
                                    intermediate_output=self.layer_idx, final_layer_norm_intermediate=False,
                                    dtype=torch.float32)  # fmt: skip
        z = inter if self.layer_idx is not None else x
        out = z[: len(sections)].clone()
        if weighted:
            for i, s in enumerate(sections):
                for j, (_, w) in enumerate(s):
                    out[i, j] = (z[i, j] - z[-1, j]) * w + z[-1, j]
        return out, x[:, -1], {"attention_mask": mask[: len(sections)]}


class CLIPTextModel(torch.nn.Module):
    """A CLIP-L stand-in: not a decoder core (no ``model`` with layers)."""

    def __init__(self):
        super().__init__()
        self.text_model = torch.nn.Linear(4, 4)


class ClipL(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer = CLIPTextModel()

    def encode_token_weights(self, sections):
        return None, torch.ones(1, 4), {}


class Root(torch.nn.Module):
    """A two-encoder ``cond_stage_model`` like HunyuanVideo's: conditioning from ``llama``, pooled from
    ``clip_l``."""

    def __init__(self, llama=None, clip_l=True):
        super().__init__()
        if llama is not None:
            self.llama = llama
        if clip_l:
            self.clip_l = ClipL()

    def encode_token_weights(self, tokens):
        pooled = self.clip_l.encode_token_weights(tokens["l"])[1] if hasattr(self, "clip_l") else None
        if not hasattr(self, "llama"):
            return torch.zeros(1, 1, 4), pooled, {}
        cond, _, extra = self.llama.encode_token_weights(tokens["llama"])
        return cond, pooled, extra


class Patcher:
    LOADED: dict = {}  # id(model) -> the patcher whose object patches are set

    def __init__(self, model, backup=None):
        self.model, self.object_patches = model, {}
        self.object_patches_backup = {} if backup is None else backup

    def clone(self):
        n = Patcher(self.model, self.object_patches_backup)
        n.object_patches = dict(self.object_patches)
        return n

    def add_object_patch(self, name, obj):
        self.object_patches[name] = obj

    def load(self):
        for name, old in self.object_patches_backup.items():
            _set_attr(self.model, name, old)
        self.object_patches_backup.clear()
        for name, obj in self.object_patches.items():
            self.object_patches_backup.setdefault(name, _set_attr(self.model, name, obj))
        Patcher.LOADED[id(self.model)] = self


def _set_attr(obj, path, value):
    *parents, last = path.split(".")
    for p in parents:
        obj = getattr(obj, p)
    old = getattr(obj, last)
    setattr(obj, last, value)
    return old


class CLIP:
    def __init__(self, root, template=TEMPLATE, patcher=None):
        self.cond_stage_model, self.template = root, template
        self.patcher = patcher or Patcher(root)

    def clone(self):
        return CLIP(self.cond_stage_model, self.template, self.patcher.clone())

    def tokenize(self, text):
        return {"l": [tokenize_words(text)], "llama": [tokenize_words(self.template.format(text))]}

    def load_model(self):
        self.patcher.load()
        return self.patcher

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        self.load_model()
        cond, pooled, extra = self.cond_stage_model.encode_token_weights(tokens)
        return {"cond": cond, "pooled_output": pooled, **extra} if return_dict else cond


def make_clip(decoder_cls=Decoder, template=TEMPLATE, clip_l=True, **kw):
    core = decoder_cls(config(), **kw)
    return CLIP(Root(TextEncoder(core), clip_l=clip_l), template), core


def rel(a, b):
    return float((a - b).norm() / b.norm())


PROMPT = "a red fox in fresh snow at dawn"

# ================================================================================ the quantized prefix store


def test_contract_frozen_prefix_store_round_trips_and_counts_memory():
    torch.manual_seed(0)
    k, v = torch.randn(1, 2, 45, 16), torch.randn(1, 2, 45, 16)
    exact = FrozenPrefixKV(None)
    exact.append(k, v)
    assert all(torch.equal(a, b) for a, b in zip(exact.layer(0), (k, v)))
    errors = {}
    for bits in (8, 4, 2):
        store = FrozenPrefixKV(bits, key_group=16)
        store.append(k, v)
        store.append(k * 2, v)
        kk, vv = store.layer(1)
        assert kk.shape == k.shape and kk.dtype == k.dtype
        assert torch.equal(kk[:, :, :4], 2 * k[:, :, :4])  # attention sinks stay in full precision
        errors[bits] = max(rel(kk, 2 * k), rel(vv, v))
        mem = store.memory()
        assert mem["layers"] == 2 and mem["tokens"] == 45 and mem["bf16_bytes"] == 2 * 2 * (45 * 2 * 16 * 2)
        assert mem["total_bytes"] < mem["bf16_bytes"]
    assert errors[8] < 1e-2 < errors[4] < errors[2] < 0.5, errors
    with pytest.raises(ValueError, match="bits must be one of"):
        FrozenPrefixKV(3)
    store = FrozenPrefixKV(8)
    with pytest.raises(ValueError, match="batch, kv_heads, tokens, head_dim"):
        store.append(k[0], v[0])
    store.append(k, v)
    with pytest.raises(ValueError, match="same 45 prefix tokens"):
        store.append(k[:, :, :9], v[:, :, :9])
    with pytest.raises(ValueError, match="multiple of 4 for 2-bit"):
        FrozenPrefixKV(2).append(torch.randn(1, 1, 8, 6), torch.randn(1, 1, 8, 6))


# ================================================================================ the adapter on the core


def _adapter(core, prefix_len=None, bits=8, mode="cache"):
    ids = [t for t, _ in tokenize_words(TEMPLATE.format(PROMPT))]
    prefix = ids[: prefix_len or TEMPLATE.split().index("{}")]
    a = PrefixCachedForward(core, prefix, bits, FrozenPrefixKV)
    a.mode = mode
    return a


def _inputs(core, *texts, pad_to=None):
    rows = [[t for t, _ in tokenize_words(TEMPLATE.format(t))] if not t.startswith("!") else
            [t for t, _ in tokenize_words(t[1:])] for t in texts]  # fmt: skip
    width = pad_to or max(map(len, rows))
    ids = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return core.embed_tokens(ids, out_dtype=torch.float32), mask


SPECS = [(-2, False), (-1, True), ("all", True), ([0, 3], False), (None, True)]


@pytest.mark.parametrize("tuple_out", [False, True], ids=["v0.3.6x", "newer-core-layers"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: str(s))
def test_contract_unquantized_prefix_reproduces_the_core(spec, tuple_out):
    core = Decoder(config(), tuple_out=tuple_out)
    embeds, mask = _inputs(core, PROMPT, "a blue boat", pad_to=30)  # the second row is padded
    io, norm = spec
    kwargs = dict(
        embeds=embeds, intermediate_output=io, final_layer_norm_intermediate=norm, dtype=torch.float32
    )
    want = core(None, mask, **kwargs)
    adapter = _adapter(core, mode="exact")
    got = adapter(None, mask, **kwargs)
    for w, g in zip(want, got):
        assert (w is None) == (g is None)
        if w is not None:
            assert g.shape == w.shape and g.dtype == w.dtype
            assert torch.allclose(g, w, atol=1e-5, rtol=1e-5), rel(g, w)
    assert adapter.stats["rows_cached"] == 2 and adapter.stats["rows_missed"] == 0


def test_contract_quantized_prefix_is_close_and_the_layout_exact():
    core = Decoder(config())
    embeds, mask = _inputs(core, PROMPT)
    want = core(None, mask, embeds=embeds, intermediate_output=-2, final_layer_norm_intermediate=False)
    errors = {}
    for bits in (8, 4, 2):
        adapter = _adapter(core, bits=bits)
        got = adapter(None, mask, embeds=embeds, intermediate_output=-2, final_layer_norm_intermediate=False)
        for w, g in zip(want, got):
            assert g.shape == w.shape and g.dtype == w.dtype and g.isfinite().all()
        p = adapter.length
        assert torch.allclose(got[1][:, :p], want[1][:, :p], atol=1e-5)  # prefix rows: the exact pass
        errors[bits] = rel(got[1], want[1])
        mem = adapter.memory()
        assert mem["tokens"] == p and mem["layers"] == 3 and mem["total_bytes"] < mem["bf16_bytes"]
    # measured on this model: 8 bits ~3e-3, 4 bits ~5e-2
    assert errors[8] < 1e-2 and errors[8] < errors[4] < errors[2], errors


def test_contract_rows_without_the_prefix_run_the_previous_forward():
    core = Decoder(config())
    embeds, mask = _inputs(core, PROMPT, "!a plain prompt without template", pad_to=28)
    want = core(None, mask, embeds=embeds, intermediate_output=-2)
    adapter = _adapter(core, mode="exact")
    got = adapter(None, mask, embeds=embeds, num_tokens=mask.sum(1).tolist(), intermediate_output=-2)
    assert torch.allclose(got[0], want[0], atol=1e-5) and torch.allclose(got[1], want[1], atol=1e-5)
    assert torch.equal(got[1][1], core(None, mask[1:], embeds=embeds[1:], intermediate_output=-2)[1][0])
    assert adapter.stats["rows_cached"] == 1 and adapter.stats["rows_missed"] == 1
    assert list(adapter.stats["miss_reasons"]) == ["row without the template prefix (e.g. the empty row prompt "
                                                   "weights add)"]  # fmt: skip


def test_contract_calls_the_cache_does_not_take_reach_the_previous_forward_and_are_counted():
    core = Decoder(config())
    embeds, mask = _inputs(core, PROMPT)
    adapter = _adapter(core)
    ids = torch.tensor([[t for t, _ in tokenize_words(TEMPLATE.format(PROMPT))]])
    pos = torch.arange(embeds.shape[1]).unsqueeze(0)
    cases = {
        "explicit position ids (image tokens)": dict(embeds=embeds, position_ids=pos),
        "image or other embeddings in the prompt": dict(embeds=embeds, embeds_info=[{"type": "image"}]),
        "token ids instead of embeddings": dict(dtype=torch.float32),
        "input not longer than the template prefix": dict(embeds=embeds[:, :5]),
        "input does not start with the template prefix": dict(embeds=embeds.flip(1)),
    }
    for reason, kw in cases.items():
        x = ids if reason.startswith("token ids") else None
        m = mask[:, : kw["embeds"].shape[1]] if "embeds" in kw else mask
        assert torch.equal(adapter(x, m, **kw)[0], core(x, m, **kw)[0]), reason
        assert adapter.stats["miss_reasons"].get(reason) == 1, (reason, adapter.stats)
    with pytest.raises(
        TypeError, match="surprise"
    ):  # the encoder's own forward answers what it does not take
        adapter(None, mask, embeds=embeds, surprise=1)
    assert "arguments the cache does not know" in adapter.stats["miss_reasons"]
    assert adapter.stats["rows_cached"] == 0 and adapter.stats["builds"] == 0
    adapter.mode = "off"
    adapter(None, mask, embeds=embeds)
    assert adapter.stats["calls"] == 6  # "off" runs the previous forward uncounted


def test_contract_prefix_is_rebuilt_when_the_weights_change():
    core = Decoder(config())
    embeds, mask = _inputs(core, PROMPT)
    adapter = _adapter(core, mode="exact")
    adapter(None, mask, embeds=embeds)
    adapter(None, mask, embeds=embeds)
    assert adapter._prefixes["exact"] is not None
    with torch.no_grad():  # what a LoRA patched into the weights does
        core.layers[0].self_attn.k_proj.weight.add_(0.5)
    got = adapter(None, mask, embeds=embeds, intermediate_output=-1)
    want = core(None, mask, embeds=embeds, intermediate_output=-1)
    assert torch.allclose(got[1], want[1], atol=1e-5)
    adapter.mode = "cache"
    adapter(None, mask, embeds=embeds)
    core.layers[1].mlp[0].weight = torch.nn.Parameter(core.layers[1].mlp[0].weight.detach() * 2)  # replaced
    adapter(None, mask, embeds=embeds)
    assert adapter.stats["builds"] == 2


def test_contract_decoders_the_cache_cannot_drive_say_why():
    assert "sliding-window" in decoder_reason(Decoder(config(), sliding=True))
    assert "not a multiple" in decoder_reason(Decoder(config(num_key_value_heads=3, num_attention_heads=4)))
    assert "not a decoder LM core" in decoder_reason(CLIPTextModel())
    assert decoder_reason(Decoder(config())) is None
    with pytest.raises(TypeError, match="sliding-window"):
        PrefixCachedForward(Decoder(config(), sliding=True), [1, 2], 8, FrozenPrefixKV)
    with pytest.raises(ValueError, match="bits must be one of"):
        PrefixCachedForward(Decoder(config()), [1, 2], 3, FrozenPrefixKV)
    with pytest.raises(ValueError, match="non-empty list of token ids"):
        PrefixCachedForward(Decoder(config()), [], 8, FrozenPrefixKV)


# ================================================================================ the node on a CLIP


def test_contract_node_caches_on_a_clone_and_leaves_the_clip_as_it_was():
    clip, core = make_clip()
    tokens = clip.tokenize(PROMPT)
    base = clip.encode_from_tokens(tokens, return_dict=True)
    patched, report = tec.apply_text_encoder_cache(clip, "8")
    assert patched is not clip and not clip.patcher.object_patches
    adapter = patched.patcher.object_patches["llama.transformer.model.forward"]
    assert isinstance(adapter, PrefixCachedForward) and adapter.length == TEMPLATE.split().index("{}")
    for text in (f"llama (Transformer): {adapter.length} template tokens cached (3 layers)", "at 8 bits vs",
                 "in bf16", "ms saved", "relative L2 error", "clip_l (CLIPTextModel): left as is: not a decoder LM"):  # fmt: skip
        assert text in report, report
    out = patched.encode_from_tokens(tokens, return_dict=True)
    assert out["cond"].shape == base["cond"].shape and out["cond"].dtype == base["cond"].dtype
    assert torch.equal(out["attention_mask"], base["attention_mask"])
    assert 0 < rel(out["cond"], base["cond"]) < 1e-2
    assert isinstance(core.__dict__.get("forward"), PrefixCachedForward)  # set while the clone is loaded
    again = clip.encode_from_tokens(tokens, return_dict=True)  # the original loads: its forward is back
    assert torch.equal(again["cond"], base["cond"])
    assert not isinstance(core.__dict__.get("forward"), PrefixCachedForward)
    live = tec.report_text(patched)
    assert live.startswith(report) and "1 prompt row(s) from the cache" in live, live
    # prompt weights: ComfyUI adds an empty row without the template; it runs the encoder's own forward
    weighted = clip.tokenize("a (red:1.4) fox in fresh snow")
    w_base = clip.encode_from_tokens(weighted)
    w_out = patched.encode_from_tokens(weighted)
    assert rel(w_out, w_base) < 1e-2
    assert "1 on the encoder's own forward: row without the template prefix" in tec.report_text(patched)
    assert tec.report_text(clip) == "fastattn text-encoder cache is not applied to this CLIP"


def test_contract_node_passes_through_what_it_cannot_cache_with_the_reason():
    only_clip_l = CLIP(Root(None))
    same, report = tec.apply_text_encoder_cache(only_clip_l, "8")
    assert same is only_clip_l and report.startswith("fastattn text-encoder cache: not applied")
    assert "clip_l (CLIPTextModel): not a decoder LM" in report
    no_template, _ = make_clip(template="<s> {}")
    same, report = tec.apply_text_encoder_cache(no_template, "4")
    assert same is no_template and "only 1 fixed token(s) before the prompt" in report, report
    sliding, _ = make_clip(sliding=True)
    same, report = tec.apply_text_encoder_cache(sliding, "8")
    assert same is sliding and "sliding-window attention (Gemma 3)" in report
    picky, _ = make_clip()
    picky.tokenize = lambda text: (_ for _ in ()).throw(KeyError("images"))
    same, report = tec.apply_text_encoder_cache(picky, "8")
    assert same is picky and "tokenizer failed on a probe prompt (KeyError" in report, report
    clip, _ = make_clip()
    same, report = tec.apply_text_encoder_cache(clip, "off")
    assert same is clip and "off" in report
    with pytest.raises(ValueError, match="bits must be one of"):
        tec.apply_text_encoder_cache(clip, "16")


def test_contract_a_host_the_cache_does_not_reproduce_is_passed_through():
    clip, core = make_clip(BidirectionalDecoder)
    same, report = tec.apply_text_encoder_cache(clip, "8")
    assert same is clip and "does not reproduce" in report, report
    assert not clip.patcher.object_patches and not isinstance(
        core.__dict__.get("forward"), PrefixCachedForward
    )


def test_contract_stacks_on_an_upstream_object_patch_and_replaces_its_own():
    clip, core = make_clip()
    seen = []

    def upstream(*args, **kwargs):  # another node's object patch of the same forward
        seen.append(kwargs.get("embeds").shape[0] if kwargs.get("embeds") is not None else None)
        return type(core).forward(core, *args, **kwargs)

    clip = clip.clone()
    clip.patcher.add_object_patch("llama.transformer.model.forward", upstream)
    patched, _ = tec.apply_text_encoder_cache(clip, "8")
    adapter = patched.patcher.object_patches["llama.transformer.model.forward"]
    assert adapter.previous is upstream
    seen.clear()
    patched.encode_from_tokens(patched.tokenize("a (red:1.3) fox"))
    assert seen == [1]  # only the row without the template reached it
    twice, _ = tec.apply_text_encoder_cache(patched, "4")
    again = twice.patcher.object_patches["llama.transformer.model.forward"]
    assert again is not adapter and again.previous is upstream and again.bits == 4


def test_contract_v3_node_declares_its_io_and_returns_clip_and_report(monkeypatch):
    """The V3 class against a fake ``comfy_api.latest`` (only what the schema description names)."""
    io = types.SimpleNamespace()

    class Spec:
        def __init__(self, *args, **kwargs):
            self.args, self.kwargs = args, kwargs

    def comfy_type(name):
        return types.SimpleNamespace(io_type=name, Input=type(name + "In", (Spec,), {}),
                                     Output=type(name + "Out", (Spec,), {}))  # fmt: skip

    class NodeOutput:
        def __init__(self, *args, ui=None):
            self.args, self.ui = args, ui

    for name in ("Model", "Clip", "Combo", "Float", "Int", "String", "AnyType", "Latent", "Boolean"):
        setattr(io, name, comfy_type(name))
    io.Custom, io.ComfyNode, io.NodeOutput, io.Schema = (
        comfy_type,
        type("ComfyNode", (), {}),
        NodeOutput,
        Spec,
    )
    latest = types.ModuleType("comfy_api.latest")
    latest.io, latest.ComfyExtension = io, type("ComfyExtension", (), {})
    monkeypatch.setitem(sys.modules, "comfy_api", types.ModuleType("comfy_api"))
    monkeypatch.setitem(sys.modules, "comfy_api.latest", latest)
    monkeypatch.delitem(sys.modules, "fastattn.nodes.comfy_nodes", raising=False)
    import fastattn

    nodes = asyncio.run(asyncio.run(fastattn.comfy_entrypoint()).get_node_list())
    node = next(n for n in nodes if n.define_schema().kwargs["node_id"] == "FastAttnTextEncoderCache")
    s = node.define_schema().kwargs
    assert s["display_name"] == "Fast Attention Text Encoder Cache" and s["category"] == "fastattn"
    assert [type(i).__name__ for i in s["inputs"]] == ["ClipIn", "ComboIn"]
    assert (
        s["inputs"][1].kwargs["options"] == ["8", "4", "2", "off"] and s["inputs"][1].kwargs["default"] == "8"
    )
    assert all(i.kwargs.get("tooltip") for i in s["inputs"])
    assert [type(o).__name__ for o in s["outputs"]] == ["ClipOut", "StringOut"]
    clip, _ = make_clip()
    out = node.execute(clip, "8")
    patched, report = out.args
    assert patched is not clip and "template tokens cached" in report and out.ui == {"text": [report]}
    patched.encode_from_tokens(patched.tokenize(PROMPT))
    report_node = next(n for n in nodes if n.define_schema().kwargs["node_id"] == "FastAttnReport")
    clip_input = [i for i in report_node.define_schema().kwargs["inputs"] if type(i).__name__ == "ClipIn"]
    assert len(clip_input) == 1 and clip_input[0].kwargs["optional"] and clip_input[0].kwargs["tooltip"]
    merged = report_node.execute(types.SimpleNamespace(), clip=patched).args[0]
    assert merged.startswith("fastattn is not applied to this model") and report in merged
    assert "1 prompt row(s) from the cache" in merged
