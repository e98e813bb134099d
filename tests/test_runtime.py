"""Runtime layer without diffusers: step tracking, plans, mask cache, dynamic top-p, key padding, stats."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fastattn.attention import AttentionRuntime, ForwardContext, StepTracker
from fastattn.attention.dynamic import select_blocks
from fastattn.masks import TokenLayout
from fastattn.plans import AttentionPlan, BandConfig, DynamicConfig, Window3DConfig, method_from_name

LAYOUT = TokenLayout.video(4, 8, 8, text_len=10, text_first=True)


def _qkv(b=1, s=LAYOUT.seq_len, h=2, d=16):
    torch.manual_seed(0)
    return (torch.randn(b, s, h, d) for _ in range(3))


class Adapter:
    """What a host adapter does: a context per forward (steps from timesteps here), the state handed back
    with every attention call of that forward."""

    def __init__(self, rt):
        self.rt, self.tracker, self.state = rt, StepTracker(), None

    def begin(self, layout, timestep, num_steps=None):
        step, branch = self.tracker.advance(timestep)
        self.state = self.rt.begin_forward(ForwardContext(layout, step, num_steps, branch, None, timestep))

    def attend(self, q, k, v, mask=None, scale=None, layer=None):
        return self.rt.attend(self.state, q, k, v, mask, scale, layer=layer)

    def end(self):
        self.rt.end_forward(self.state)
        self.state = None


def _oracle(record=None, zeros=False):
    """A sparse_fn with the kernel's contract ``-> (out, fallback)``: masked dense SDPA (or zeros)."""

    def fn(q, k, v, mask, scale=None, quant="none", perm=None):
        if record is not None:
            record(mask)
        if zeros:
            return torch.zeros_like(q), None
        assert perm is None
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to_token_mask(), scale=scale), None

    return fn


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
    fw = Adapter(rt)
    q, k, v = _qkv()
    for t in (900.0, 500.0):
        fw.begin(LAYOUT, t)
        for _ in range(3):
            fw.attend(q, k, v, None, None)
        fw.end()
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
    fw = Adapter(rt)
    q, k, v = _qkv()
    fw.begin(LAYOUT, 1.0)
    out = fw.attend(q, k, v, None, None)
    fw.attend(q, k, v, None, None)
    fw.end()
    mask = rt.masks.get(rt.plan.method, LAYOUT, rt.plan.block_size)
    assert rt.masks.builds == 1  # the second layer reused the mask
    if isinstance(config, Window3DConfig):
        assert mask.block_density() >= 0.6
    torch.testing.assert_close(out, _masked_ref(q, k, v, mask.to_token_mask()[0]), rtol=1e-5, atol=1e-5)
    assert rt.stats.as_dict()["density"] == pytest.approx(mask.block_density())
    # every kernel call says which backend served it (on the CPU: the listed-blocks PyTorch path)
    assert rt.stats.as_dict()["kernel_backends"] == {"cpu": 2}


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
    fw = Adapter(rt)
    fw.begin(LAYOUT, 1.0)
    out = fw.attend(q, k, v, None, None)
    fw.end()
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
    fw = Adapter(rt)
    q, k, v = _qkv(b=2, s=lay.seq_len)
    keep = torch.ones(2, 1, 1, lay.seq_len, dtype=torch.bool)
    keep[0, ..., -3:] = False
    keep[1, ..., -6:] = False
    fw.begin(lay, 1.0)
    out = fw.attend(q, k, v, keep, None)
    token = rt.masks.get(plan.method, lay, plan.block_size).to_token_mask()[0]
    torch.testing.assert_close(out, _masked_ref(q, k, v, (token & keep[:, 0])[:, None]), rtol=1e-5, atol=1e-5)
    bad = keep.clone()
    bad[0, ..., 0] = False  # masks an image token
    fw.attend(q, k, v, bad, None)
    fw.attend(q, k, v, keep.float(), None)
    fw.end()
    fb = rt.stats.as_dict()["fallbacks"]
    assert fb == {
        "attn_mask masks image tokens (only text padding is served sparse)": 1,
        "attn_mask of dtype torch.float32 (only boolean key-padding masks are served sparse)": 1,
    }


def test_unknown_length_and_orphan_calls_counted():
    rt = AttentionRuntime(AttentionPlan(BandConfig(window=8), block_size=8), 1)
    fw = Adapter(rt)
    q, k, v = _qkv(s=50)
    fw.begin(LAYOUT, 1.0)
    out = fw.attend(q, k, v, None, None)
    fw.end()
    torch.testing.assert_close(out, _masked_ref(q, k, v, None), rtol=0, atol=0)
    assert list(rt.stats.as_dict()["fallbacks"]) == [
        "sequence length 50 does not match the model's token layout (266)"
    ]
    out = rt.attend(None, q, k, v)  # no forward context: dense, counted
    assert rt.stats.as_dict()["fallbacks"]["no forward context"] == 1


def test_impossible_density_names_the_valid_range():
    rt = AttentionRuntime(AttentionPlan(Window3DConfig(density=0.02), block_size=8), 1)
    fw = Adapter(rt)
    q, k, v = _qkv()
    fw.begin(LAYOUT, 1.0)
    with pytest.raises(ValueError, match=r"Valid densities here: \[0\.\d+, 1.0\]"):
        fw.attend(q, k, v, None, None)
    fw.end()


def _run_steps(rt, steps, inputs):
    """One forward per step (decreasing timesteps), one attention call per forward; returns the outputs."""
    fw = Adapter(rt)
    outs = []
    for i in range(steps):
        fw.begin(LAYOUT, 1000.0 - i)
        outs.append(fw.attend(*inputs[i], None, None))
        fw.end()
    return outs


def test_residual_sharing_captures_at_last_dense_step_and_applies_later():
    """WA-RS: at the last dense step R = dense - sparse is kept; later steps return sparse + R."""
    plan = AttentionPlan(BandConfig(window=8), dense_steps=2, residual=True, block_size=8)
    rt = AttentionRuntime(plan, 1)
    torch.manual_seed(0)
    base = torch.randn(3, 1, LAYOUT.seq_len, 2, 16)
    inputs = [tuple(base + 0.05 * i * torch.randn_like(base)) for i in range(4)]
    outs = _run_steps(rt, 4, inputs)
    dense = [_masked_ref(*x, None) for x in inputs]
    token_mask = plan_token_mask(plan)
    sparse = [_masked_ref(*x, token_mask) for x in inputs]
    torch.testing.assert_close(outs[0], dense[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[1], dense[1], atol=1e-5, rtol=1e-5)  # capture step returns dense
    r = dense[1] - sparse[1]
    for i in (2, 3):
        torch.testing.assert_close(outs[i], sparse[i] + r, atol=1e-5, rtol=1e-5)
        # and the residual makes it closer to dense than the plain sparse output
        assert (outs[i] - dense[i]).norm() < (sparse[i] - dense[i]).norm()
    st = rt.stats.as_dict()
    assert st["planned_dense"] == {"dense_steps": 1, "residual capture (WA-RS)": 1}
    assert st["sparse_calls"] == 2
    assert rt.residual_bytes() == outs[0].numel() * 4
    rt.reset_run()
    assert rt.residual_bytes() == 0


def test_residual_refresh_and_capture_without_dense_steps():
    plan = AttentionPlan(BandConfig(window=8), residual=True, residual_refresh=2, block_size=8)
    rt = AttentionRuntime(plan, 1)
    q, k, v = _qkv()
    _run_steps(rt, 5, [(q, k, v)] * 5)
    # step 0: nothing to apply -> capture; steps 2 and 4 refresh; 1 and 3 apply
    st = rt.stats.as_dict()
    assert st["planned_dense"] == {"residual capture (WA-RS)": 3} and st["sparse_calls"] == 2
    with pytest.raises(ValueError, match="residual_refresh needs residual=True"):
        AttentionPlan(BandConfig(window=8), residual_refresh=2)


def plan_token_mask(plan):
    from fastattn.plans import build_mask

    return build_mask(plan.method, LAYOUT, plan.block_size).to_token_mask()


def test_sampled_block_mass_is_exact_with_every_row_and_single_token_groups():
    """With every query row sampled and key groups of one token, the estimate is the true block mass."""
    from fastattn.attention.dynamic import _sampled_block_mass
    from fastattn.masks.layout import BlockGeometry

    q, k, _ = _qkv(b=1, h=2, d=16)
    qt, kt = q.transpose(1, 2), k.transpose(1, 2)
    est = _sampled_block_mass(qt, kt, LAYOUT, 8, 0.25, rows=8, group=1)
    p = ((qt @ kt.transpose(-1, -2)) * 0.25).softmax(-1)  # [1, 2, S, S]
    starts, ends = BlockGeometry(LAYOUT, 8).bounds()
    owner = torch.repeat_interleave(torch.arange(len(starts)), ends - starts)
    n = len(starts)
    per_key_block = torch.zeros(1, 2, LAYOUT.seq_len, n).index_add_(3, owner, p)
    # blocks shorter than 8 rows repeat rows in the estimate; compare on the full blocks only
    full = (ends - starts) == 8
    exact = torch.stack([per_key_block[:, :, s:e].mean(2) for s, e in zip(starts, ends)], 2)
    torch.testing.assert_close(est[:, :, full], exact[:, :, full], rtol=1e-4, atol=1e-5)
    assert torch.allclose(est.sum(-1), torch.ones(1, 2, n), atol=1e-5)


def test_sampled_estimator_picks_the_high_mass_blocks():
    """Keys that copy a query block's queries (strong alignment) must be selected for that block."""
    torch.manual_seed(1)
    q, k, _ = _qkv(b=1, h=1, d=16)
    qt, kt = q.transpose(1, 2).clone(), k.transpose(1, 2).clone()
    lay = LAYOUT
    # image block 5 (tokens from text_len + 32) aligned to key block 12 (a far block)
    q0, k0 = lay.text_len + 4 * 8, lay.text_len + 11 * 8
    kt[:, :, k0 : k0 + 8] = 4 * qt[:, :, q0 : q0 + 8].mean(2, keepdim=True)
    cfg = DynamicConfig(top_p=1.0, min_density=0.15, max_density=0.15)
    bm = select_blocks(qt, kt, lay, cfg, 8).to_block_map()
    qb, kb = 2 + 4, 2 + 11  # two text blocks come first
    assert bool(bm[0, 0, qb, kb])
    with pytest.raises(ValueError, match="estimator"):
        DynamicConfig(estimator="exact")


def test_dynamic_density_is_accumulated_on_device_and_exact():
    """Dynamic masks' density is summed as a tensor (no host sync per call) and read exactly in stats."""
    cfg = DynamicConfig(top_p=0.6, min_density=0.2, max_density=0.6)
    rt = AttentionRuntime(AttentionPlan(cfg, block_size=8), 2)
    fw = Adapter(rt)
    densities = []
    rt.sparse_fn = _oracle(lambda mask: densities.append(mask.block_density()), zeros=True)
    for i in range(3):
        q, k, v = (x * (1 + i) for x in _qkv(b=2))
        fw.begin(LAYOUT, 100.0 - i)
        fw.attend(q, k, v, None, None)
        fw.attend(k, q, v, None, None)
        fw.end()
    assert rt.stats.pending_work is not None  # nothing read back yet
    assert rt.stats.as_dict()["density"] == pytest.approx(sum(densities) / len(densities))
    assert rt.stats.pending_work is None and len(set(densities)) > 1
    mask = select_blocks(*(x.transpose(1, 2) for x in list(_qkv(b=2))[:2]), LAYOUT, cfg, 8)
    with pytest.raises(ValueError, match="does not fit"):
        mask.mark_valid(2, 2, LAYOUT.seq_len + 1)


def test_dynamic_selection_reused_for_reuse_steps_per_layer_and_cfg_pass():
    cfg = DynamicConfig(top_p=0.6, min_density=0.2, max_density=0.6, reuse_steps=2)
    rt = AttentionRuntime(AttentionPlan(cfg, block_size=8), 2)
    fw = Adapter(rt)
    seen = []
    rt.sparse_fn = _oracle(seen.append, zeros=True)
    torch.manual_seed(0)
    inputs = [
        [tuple(torch.randn(1, LAYOUT.seq_len, 2, 16) for _ in range(3)) for _ in range(2)] for _ in range(3)
    ]
    for step in range(3):  # two layers per forward, CFG as two passes per step
        for _branch in range(2):
            fw.begin(LAYOUT, 100.0 - step)
            for layer in range(2):
                fw.attend(*inputs[step][layer], None, None)
            fw.end()
    # calls in order: (step, branch, layer); step 1 reuses step 0's masks, step 2 selects anew
    by = {
        (s, b, layer): seen[s * 4 + b * 2 + layer] for s in range(3) for b in range(2) for layer in range(2)
    }
    for b in range(2):
        for layer in range(2):
            assert by[(1, b, layer)] is by[(0, b, layer)]
            assert by[(2, b, layer)] is not by[(1, b, layer)]
    assert by[(0, 0, 0)] is not by[(0, 1, 0)] and by[(0, 0, 0)] is not by[(0, 0, 1)]
    st = rt.stats.as_dict()
    assert st["selections"] == 8 and st["selection_reuses"] == 4
    # the reused mask is the one step 0 selected, not one recomputed from step 1's inputs
    fresh = select_blocks(*(x.transpose(1, 2) for x in inputs[1][0][:2]), LAYOUT, cfg, 8)
    assert not torch.equal(fresh.to_token_mask(), by[(1, 0, 0)].to_token_mask())
    rt.reset_run()
    assert rt.selections == {}
    with pytest.raises(ValueError, match="reuse_steps must be a positive int"):
        DynamicConfig(reuse_steps=0)


@pytest.mark.parametrize("grid", [(7, 6, 10), (16, 4, 6), (64, 1, 1), (40, 2, 1), (1, 9, 12)])
@pytest.mark.parametrize("target", [0.2, 0.35, 0.6])
def test_window3d_density_search_picks_the_least_dense_balanced_window(target, grid):
    """Against brute force over window builds: the search's window reaches the target, keeps F's and the
    spatial share within a factor 2 (+ one step of the coarser axis), and no such window reaching the target
    is less dense."""
    import itertools

    from fastattn.masks import patterns
    from fastattn.plans.methods import _spatial_windows, _window_for_density, build_mask

    layout = TokenLayout.video(*grid, text_len=5 if grid[1] * grid[2] > 2 else 0)
    f, h, w = layout.grid
    wf, wh, ww = _window_for_density(layout, target, 8, "FHW")
    got = build_mask(Window3DConfig(density=target), layout, 8).block_density()
    assert got == pytest.approx(patterns.window3d(layout, (wf, wh, ww), 8).block_density())
    assert got >= target
    best = 1.0
    for f_, (spatial, share) in itertools.product(range(f), zip(*_spatial_windows(h, w))):
        frac_f = f_ / max(f - 1, 1)
        slack = 1 / max(min(f, max(h, w)) - 1, 1)
        one_axis_group = f == 1 or max(h, w) == 1
        if not one_axis_group and (frac_f > 2 * share + slack or share > 2 * frac_f + slack):
            continue
        d = patterns.window3d(layout, (f_, *spatial), 8).block_density()
        if d >= target:
            best = min(best, d)
    assert got == pytest.approx(best)
    # the one-scale search it replaces: never better
    one_scale = [
        patterns.window3d(layout, (round(s * (f - 1)), round(s * (h - 1)), round(s * (w - 1))), 8)
        for s in torch.linspace(0, 1, 101).tolist()
    ]
    assert got <= min(m.block_density() for m in one_scale if m.block_density() >= target) + 1e-6
