"""diffusers integration on tiny random-weight models of every family (CPU, no downloads).

For each family: a dense plan reproduces the unpatched output bit for bit, ``disable()`` restores the
processors/backends exactly, a sparse plan equals the masked dense reference, enabling twice replaces
cleanly, and the layout the adapter reports is the real one.
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import fastattn.api as fa  # noqa: E402
from fastattn.masks import BlockMask  # noqa: E402

BS = 8  # mask block size for the tiny models (the GPU kernel uses 128; the CPU reference takes any)


# ----------------------------------------------------------------------------------- tiny models


def _flux():
    from diffusers import FluxTransformer2DModel

    m = FluxTransformer2DModel(
        patch_size=1,
        in_channels=8,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    )
    h, w, t = 6, 8, 10
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    inputs = dict(
        hidden_states=torch.randn(1, h * w, 8),
        encoder_hidden_states=torch.randn(1, t, 32),
        pooled_projections=torch.randn(1, 16),
        timestep=torch.tensor([0.5]),
        img_ids=ids.reshape(-1, 3),
        txt_ids=torch.zeros(t, 3),
        return_dict=False,
    )
    return m, inputs, (h * w + t, t, True, (1, h, w))


def _flux2():
    from diffusers import Flux2Transformer2DModel

    m = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=8,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        timestep_guidance_channels=16,
        axes_dims_rope=(4, 4, 4, 4),
    )
    h, w, t = 6, 8, 10
    ids = torch.zeros(h, w, 4)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    inputs = dict(
        hidden_states=torch.randn(1, h * w, 8),
        encoder_hidden_states=torch.randn(1, t, 32),
        timestep=torch.tensor([0.5]),
        img_ids=ids.reshape(1, -1, 4),
        txt_ids=torch.zeros(1, t, 4),
        guidance=torch.tensor([3.5]),
        return_dict=False,
    )
    return m, inputs, (h * w + t, t, True, (1, h, w))


def _wan(image_dim=None):
    from diffusers import WanTransformer3DModel

    m = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        text_dim=32,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
        image_dim=image_dim,
    )
    f, h, w = 3, 8, 12
    inputs = dict(
        hidden_states=torch.randn(1, 4, f, h, w),
        timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, 12, 32),
        return_dict=False,
    )
    if image_dim is not None:
        inputs["encoder_hidden_states_image"] = torch.randn(1, 5, image_dim)
    return m, inputs, (f * h * w // 4, 0, True, (f, h // 2, w // 2))


def _hunyuan():
    from diffusers import HunyuanVideoTransformer3DModel

    m = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=2,
        patch_size_t=1,
        text_embed_dim=32,
        pooled_projection_dim=16,
        rope_axes_dim=(4, 6, 6),
        guidance_embeds=True,
    )
    f, h, w, t = 3, 8, 12, 10
    mask = torch.ones(1, t, dtype=torch.long)
    mask[:, 7:] = 0  # padded text, as the pipeline pads prompts
    inputs = dict(
        hidden_states=torch.randn(1, 4, f, h, w),
        timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, t, 32),
        encoder_attention_mask=mask,
        pooled_projections=torch.randn(1, 16),
        guidance=torch.tensor([3500.0]),
        return_dict=False,
    )
    return m, inputs, (f * (h // 2) * (w // 2) + t, t, False, (f, h // 2, w // 2))


def _qwen():
    from diffusers import QwenImageTransformer2DModel

    m = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 6, 6),
    )
    h, w, t = 6, 8, 10
    mask = torch.ones(1, t, dtype=torch.long)
    mask[:, 8:] = 0
    inputs = dict(
        hidden_states=torch.randn(1, h * w, 16),
        encoder_hidden_states=torch.randn(1, t, 32),
        encoder_hidden_states_mask=mask,
        timestep=torch.tensor([0.5]),
        img_shapes=[(1, h, w)],
        return_dict=False,
    )
    return m, inputs, (h * w + t, t, True, (1, h, w))


def _sd3(dual=False):
    from diffusers import SD3Transformer2DModel

    m = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=16,
        out_channels=4,
        pos_embed_max_size=16,
        qk_norm="rms_norm" if dual else None,
        dual_attention_layers=(0,) if dual else (),
    )
    h, w, t = 12, 16, 10
    inputs = dict(
        hidden_states=torch.randn(1, 4, h, w),
        encoder_hidden_states=torch.randn(1, t, 32),
        pooled_projections=torch.randn(1, 16),
        timestep=torch.tensor([500]),
        return_dict=False,
    )
    return m, inputs, ((h // 2) * (w // 2) + t, t, False, (1, h // 2, w // 2))


def _cogvideox():
    from diffusers import CogVideoXTransformer3DModel

    m = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        time_embed_dim=16,
        text_embed_dim=32,
        num_layers=2,
        sample_width=12,
        sample_height=8,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=10,
    )
    f, h, w, t = 3, 8, 12, 10
    inputs = dict(
        hidden_states=torch.randn(1, f, 4, h, w),
        encoder_hidden_states=torch.randn(1, t, 32),
        timestep=torch.tensor([500]),
        return_dict=False,
    )
    return m, inputs, (f * (h // 2) * (w // 2) + t, t, True, (f, h // 2, w // 2))


def _ltx():
    from diffusers import LTXVideoTransformer3DModel

    m = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=16,
        cross_attention_dim=32,
        num_layers=2,
        caption_channels=32,
    )
    f, h, w, t = 3, 6, 8, 10
    inputs = dict(
        hidden_states=torch.randn(1, f * h * w, 8),
        encoder_hidden_states=torch.randn(1, t, 32),
        timestep=torch.tensor([500]),
        encoder_attention_mask=torch.ones(1, t, dtype=torch.long),
        num_frames=f,
        height=h,
        width=w,
        return_dict=False,
    )
    return m, inputs, (f * h * w, 0, True, (f, h, w))


FAMILIES = {
    "flux": _flux,
    "flux2": _flux2,
    "wan": _wan,
    "wan_i2v": lambda: _wan(image_dim=24),
    "hunyuan_video": _hunyuan,
    "qwen_image": _qwen,
    "sd3": _sd3,
    "sd35_dual": lambda: _sd3(dual=True),
    "cogvideox": _cogvideox,
    "ltx_video": _ltx,
}


def build(name):
    torch.manual_seed(0)
    model, inputs, layout = FAMILIES[name]()
    return model.eval(), inputs, layout


def run(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out[0] if isinstance(out, (tuple, list)) else out.sample


def snapshot(model):
    procs = model.attn_processors
    return {p: (proc, getattr(proc, "_attention_backend", "absent")) for p, proc in procs.items()}


def masked_oracle(q, k, v, block_mask, *, scale=None, quant="none", perm=None):
    """The block-sparse kernel's contract ``-> (out, fallback)`` as a masked dense SDPA."""
    assert isinstance(block_mask, BlockMask) and quant == "none" and perm is None
    tm = block_mask.to_token_mask().to(q.device)  # [Bm, Hm, S, S]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=tm, scale=scale), None


# ----------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", list(FAMILIES))
def test_dense_plan_exact_and_disable_restores(name):
    model, inputs, _ = build(name)
    before = snapshot(model)
    ref = run(model, inputs)
    handle = fa.enable(model, method="dense", block_size=BS)
    assert snapshot(model) != before or name in ()  # something was patched
    out = run(model, inputs)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert torch.equal(out, ref), f"{name}: dense plan not bit-exact (max diff {(out - ref).abs().max()})"
    st = handle.stats()
    assert st["calls"] > 0 and st["sparse_calls"] == 0, st
    assert st["planned_dense"].get("method dense", 0) == st["layers_per_forward"], st
    handle.disable()
    assert snapshot(model) == before
    assert not hasattr(model, "_fastattn_handle")
    assert torch.equal(run(model, inputs), ref)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_sparse_plan_equals_masked_reference_and_layout(name, monkeypatch):
    model, inputs, (seq, text, text_first, grid) = build(name)
    handle = fa.enable(model, method="band", window=6, block_size=BS)
    rt = handle.runtimes[0]
    seen = []
    orig_begin = rt.begin_forward

    def spy(ctx):
        seen.append(ctx.layout)
        return orig_begin(ctx)

    monkeypatch.setattr(rt, "begin_forward", spy)
    out = run(model, inputs)
    lay = seen[0]
    assert (lay.seq_len, lay.text_len, lay.text_first, lay.grid) == (seq, text, text_first, grid)
    st = handle.stats()
    assert st["sparse_calls"] == st["layers_per_forward"] > 0, st
    assert st["density"] < 1.0
    # Same model, same plan, the kernel replaced by a masked dense SDPA oracle.
    rt.sparse_fn = masked_oracle
    oracle = run(model, inputs)
    torch.testing.assert_close(out, oracle, rtol=1e-5, atol=1e-5)
    handle.disable()


def test_enable_twice_replaces_cleanly():
    model, inputs, _ = build("flux")
    before = snapshot(model)
    ref = run(model, inputs)
    h1 = fa.enable(model, method="band", window=4, block_size=BS)
    h2 = fa.enable(model, method="dense", block_size=BS)
    assert not h1.enabled and h2.enabled
    assert model._diffusers_hook._hook_order == ["fastattn_context"]  # one context hook, not two
    assert torch.equal(run(model, inputs), ref)
    h1.disable()  # disabling a replaced handle is a no-op
    assert h2.enabled
    h2.disable()
    assert snapshot(model) == before and not model._forward_pre_hooks
    assert "_diffusers_hook" not in model.__dict__ and "forward" not in model.__dict__  # no trace left


def test_cross_attention_keeps_its_backend_and_masks_counted():
    model, inputs, _ = build("wan")
    cross = {p: proc._attention_backend for p, proc in model.attn_processors.items() if ".attn2." in p}
    h = fa.enable(model, method="band", window=6, block_size=BS)
    # only self-attention is routed to fastattn: cross-attention never reaches the runtime
    assert {p: model.attn_processors[p]._attention_backend for p in cross} == cross
    run(model, inputs)
    st = h.stats()
    assert st["fallbacks"] == {} and st["sparse_calls"] == 2, st
    h.disable()
    # HunyuanVideo's padded text: a key-padding mask, served sparse exactly (no fallback).
    model, inputs, _ = build("hunyuan_video")
    h = fa.enable(model, method="band", window=6, block_size=BS)
    run(model, inputs)
    st = h.stats()
    assert st["fallback_calls"] == 0 and st["sparse_calls"] == 2, st
    h.disable()


@pytest.mark.parametrize("name", ["hunyuan_video", "qwen_image"])
def test_padded_text_mask_read_once_per_forward(name):
    """The families that pass a key-padding mask: HunyuanVideo one tensor per forward, Qwen-Image a new one
    per layer (its adapter says they are alike). Only the first self-attention call of a forward reads the
    mask's values (one host sync on a GPU); the model's output stays that of the masked reference."""
    from fastattn.attention.host_sync import HostSyncs

    model, inputs, _ = build(name)
    handle = fa.enable(model, method="band", window=6, block_size=BS)
    rt = handle.runtimes[0]
    out = run(model, inputs)  # warm-up: builds the masks of the shorter (padding dropped) layout
    recorded, attend = [], rt.attend

    def recording(state, *args, **kwargs):
        syncs = HostSyncs()
        with syncs:
            result = attend(state, *args, **kwargs)
        recorded.append((state, dict(syncs.calls)))
        return result

    rt.attend = recording
    for _ in range(2):
        assert torch.equal(run(model, inputs), out)
    firsts = [calls for i, (state, calls) in enumerate(recorded) if i == 0 or recorded[i - 1][0] is not state]
    later = [calls for i, (state, calls) in enumerate(recorded) if i and recorded[i - 1][0] is state]
    assert firsts == [{"torch.Tensor.tolist": 1}] * 2 and later and not any(later), [c for _, c in recorded]
    st = handle.stats()
    assert st["fallback_calls"] == 0 and st["dense_calls"] == 0, st
    rt.sparse_fn = masked_oracle
    torch.testing.assert_close(run(model, inputs), out, rtol=1e-5, atol=1e-5)
    handle.disable()


def test_bad_input_errors():
    model, inputs, _ = build("wan")
    with pytest.raises(ValueError, match="valid methods"):
        fa.enable(model, method="nope")
    with pytest.raises(ValueError, match=r"valid presets here: \['wan/safe'"):
        fa.enable(model, preset="ultra")
    with pytest.raises(ValueError, match="is for 'flux' models"):
        fa.enable(model, preset="flux/balanced")
    with pytest.raises(ValueError, match=r"density must be a fraction in \(0, 1\]"):
        fa.enable(model, method="window3d", density=1.5)
    with pytest.raises(ValueError, match="valid"):
        fa.enable(model, method="band", window=3, quant="int3")
    with pytest.raises(ValueError, match="does not support"):
        fa.enable(torch.nn.Linear(2, 2), method="dense")
    assert not hasattr(model, "_fastattn_handle")
    # A density below what the layout allows: clear error at the first call, with the valid range.
    h = fa.enable(model, method="window3d", density=0.01, block_size=BS)
    with pytest.raises(ValueError, match="impossible on this layout"):
        run(model, inputs)
    h.disable()
