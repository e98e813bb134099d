"""Runtime layer without diffusers: step tracking, plans, mask cache, dynamic top-p, key padding, stats."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fastattn.attention import (
    AttentionPlan,
    AttentionRuntime,
    BandConfig,
    DynamicConfig,
    StepTracker,
    Window3DConfig,
    method_from_name,
    runtime_attention,
)
from fastattn.attention.dynamic import select_blocks
from fastattn.attention.runtime import ORPHAN_FALLBACKS
from fastattn.masks import TokenLayout

LAYOUT = TokenLayout.video(4, 8, 8, text_len=10, text_first=True)


def _qkv(b=1, s=LAYOUT.seq_len, h=2, d=16):
    torch.manual_seed(0)
    return (torch.randn(b, s, h, d) for _ in range(3))


def _masked_ref(q, k, v, token_mask):
    t = [x.transpose(1, 2) for x in (q, k, v)]
    return F.scaled_dot_product_attention(*t, attn_mask=token_mask).transpose(1, 2)


def test_step_tracker_batched_split_and_new_run():
    tr = StepTracker()
    assert [tr.advance(t) for t in (999.0, 999.0, 500.0, 500.0, 10.0)] == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
        (2, 0),
    ]
    assert tr.advance(999.0) == (0, 0)  # larger timestep: a new pipeline run
    tr.reset()
    assert tr.advance(10.0) == (0, 0)


def test_plan_dense_reasons_and_validation():
    rt = AttentionRuntime(
        AttentionPlan(BandConfig(window=8), dense_steps=1, dense_layers=(0, -1), block_size=8), 3
    )
    q, k, v = _qkv()
    for t in (900.0, 500.0):
        rt.begin_forward(LAYOUT, t)
        for _ in range(3):
            runtime_attention(q, k, v, None, None)
        rt.end_forward()
    st = rt.stats.as_dict()
    assert st["planned_dense"] == {"dense_steps": 3, "dense_layers": 2} and st["sparse_calls"] == 1
    with pytest.raises(ValueError, match="valid"):
        AttentionPlan(BandConfig(window=8), quant="int2")
    with pytest.raises(ValueError, match="exactly one"):
        Window3DConfig()
    with pytest.raises(ValueError, match="valid methods"):
        method_from_name("sliding")
    with pytest.raises(ValueError, match="takes"):
        method_from_name("band", window=3, top_p=0.5)


@pytest.mark.parametrize("config", [Window3DConfig(density=0.6), BandConfig(window=20)])
def test_structural_sparse_equals_masked_reference_and_cache(config):
    rt = AttentionRuntime(AttentionPlan(config, block_size=8), 2)
    q, k, v = _qkv()
    rt.begin_forward(LAYOUT, 1.0)
    out = runtime_attention(q, k, v, None, None)
    runtime_attention(q, k, v, None, None)
    rt.end_forward()
    mask = rt.masks.get(rt.plan, LAYOUT)
    assert rt.masks.builds == 1  # the second layer reused the mask
    if isinstance(config, Window3DConfig):
        assert mask.block_density() >= 0.6
    torch.testing.assert_close(out, _masked_ref(q, k, v, mask.to_token_mask()[0]), rtol=1e-5, atol=1e-5)
    assert rt.stats.as_dict()["density"] == pytest.approx(mask.block_density())


def test_dynamic_top_p_floor_ceiling_and_exactness():
    q, k, v = _qkv(b=2)
    cfg = DynamicConfig(top_p=0.5, min_density=0.2, max_density=0.4)
    qt, kt = q.transpose(1, 2), k.transpose(1, 2)
    mask = select_blocks(qt, kt, LAYOUT, cfg, 8)
    n = mask.num_blocks
    assert tuple(mask.kv_counts.shape) == (2, 2, n)
    bm = mask.to_block_map()
    text = mask.geometry.is_text()
    img = ~text
    # Image-image picks are clamped to the ceiling (+ the diagonal); text rows/columns always present.
    per_row = bm[:, :, img][..., img].sum(-1)
    assert int(per_row.max()) <= int(0.4 * n) + 1 and int(per_row.min()) >= 1
    assert bool(bm[:, :, text].all()) and bool(bm[..., text].all())
    rt = AttentionRuntime(AttentionPlan(cfg, block_size=8), 1)
    rt.begin_forward(LAYOUT, 1.0)
    out = runtime_attention(q, k, v, None, None)
    rt.end_forward()
    ref = _masked_ref(q, k, v, mask.to_token_mask())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert 0 < rt.stats.as_dict()["density"] < 1
    # top_p = 1 with a full ceiling is dense.
    full = select_blocks(qt, kt, LAYOUT, DynamicConfig(top_p=1.0, min_density=0.0, max_density=1.0), 8)
    assert full.block_density() == 1.0


def test_key_padding_mask_sparse_is_exact_and_other_masks_fall_back():
    lay = TokenLayout.video(4, 8, 8, text_len=10, text_first=False)  # [img, txt] as HunyuanVideo
    plan = AttentionPlan(BandConfig(window=20), block_size=8)
    rt = AttentionRuntime(plan, 1)
    q, k, v = _qkv(b=2, s=lay.seq_len)
    keep = torch.ones(2, 1, 1, lay.seq_len, dtype=torch.bool)
    keep[0, ..., -3:] = False
    keep[1, ..., -6:] = False
    rt.begin_forward(lay, 1.0)
    out = runtime_attention(q, k, v, keep, None)
    token = rt.masks.get(plan, lay).to_token_mask()[0]
    torch.testing.assert_close(out, _masked_ref(q, k, v, (token & keep[:, 0])[:, None]), rtol=1e-5, atol=1e-5)
    bad = keep.clone()
    bad[0, ..., 0] = False  # masks an image token
    runtime_attention(q, k, v, bad, None)
    runtime_attention(q, k, v, keep.float(), None)
    rt.end_forward()
    fb = rt.stats.as_dict()["fallbacks"]
    assert fb == {
        "attn_mask masks image tokens (only text padding is served sparse)": 1,
        "attn_mask of dtype torch.float32 (only boolean key-padding masks are served sparse)": 1,
    }


def test_unknown_length_and_orphan_calls_counted():
    rt = AttentionRuntime(AttentionPlan(BandConfig(window=8), block_size=8), 1)
    q, k, v = _qkv(s=50)
    rt.begin_forward(LAYOUT, 1.0)
    out = runtime_attention(q, k, v, None, None)
    rt.end_forward()
    torch.testing.assert_close(out, _masked_ref(q, k, v, None), rtol=0, atol=0)
    assert list(rt.stats.as_dict()["fallbacks"]) == [
        "sequence length 50 does not match the model's token layout (266)"
    ]
    before = sum(ORPHAN_FALLBACKS.values())
    runtime_attention(q, k, v, None, None)
    assert sum(ORPHAN_FALLBACKS.values()) == before + 1


def test_impossible_density_names_the_valid_range():
    rt = AttentionRuntime(AttentionPlan(Window3DConfig(density=0.02), block_size=8), 1)
    q, k, v = _qkv()
    rt.begin_forward(LAYOUT, 1.0)
    with pytest.raises(ValueError, match=r"Valid densities here: \[0\.\d+, 1.0\]"):
        runtime_attention(q, k, v, None, None)
    rt.end_forward()
