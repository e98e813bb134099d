"""The plan schema and the explicit-context runtime: regression tests for the review's bugs (threads,
cross-attention of equal length, Wan 2.2's two transformers, preset fields) and per-head plans."""

from __future__ import annotations

import importlib.util
import json
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fastattn.attention import AttentionRuntime, ForwardContext
from fastattn.masks import TokenLayout, head_permutations
from fastattn.plans import (
    AttentionPlan,
    BandConfig,
    DenseConfig,
    HeadTable,
    SkipConfig,
    Window3DConfig,
    build_mask,
    known_keys,
    make_plan,
)

LAYOUT = TokenLayout.video(4, 8, 8, text_len=10, text_first=True)


def _tiny():
    spec = importlib.util.spec_from_file_location("_fa_tiny2", Path(__file__).with_name("test_diffusers.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------ schema


def test_schema_round_trip_and_unknown_fields_list_known_ones():
    plan = make_plan("wan", "balanced")
    again = AttentionPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['windw'\].*known for method 'band'.*'window'"):
        AttentionPlan.from_dict({"method": "band", "windw": 3})
    assert "sample_rows" in known_keys("dynamic") and "block_size" in known_keys("dynamic")
    assert set(AttentionPlan.setting_names()) <= set(known_keys("dense"))
    with pytest.raises(TypeError, match="dense_layers must hold ints"):
        make_plan("wan", method="band", window=4, dense_layers=[0.7])
    with pytest.raises(TypeError, match="dense_layers must be a list"):
        make_plan("wan", method="band", window=4, dense_layers=5)


def test_preset_file_takes_every_schema_field(tmp_path):
    """Bug 5: a preset file accepts what enable() accepts (sample_rows, key_group, order, block_size)."""
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"method": "dynamic", "sample_rows": 4, "key_group": 8, "block_size": 8}))
    plan = make_plan("wan", str(path))
    assert plan.method.sample_rows == 4 and plan.method.key_group == 8 and plan.block_size == 8
    path.write_text(json.dumps({"method": "window3d", "window": [1, 2, 2], "order": "HWF"}))
    assert make_plan("wan", str(path)).method.order == "HWF"
    path.write_text(json.dumps({"method": "band", "window": 4, "colour": "red"}))
    with pytest.raises(ValueError, match=r"p\.json.*unknown field\(s\) \['colour'\]"):
        make_plan("wan", str(path))
    path.write_bytes(b"\x80\x04\x95pickle")
    with pytest.raises(ValueError, match="not UTF-8 JSON"):
        make_plan("wan", str(path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_plan("wan", str(tmp_path / "missing.json"))


def test_fractional_dense_steps_scale_with_the_run():
    plan = AttentionPlan(BandConfig(window=8), dense_steps=0.25, block_size=8)
    assert plan.dense_steps_for(4) == 1 and plan.dense_steps_for(40) == 10
    assert plan.dense_reason(0, 1, 0, 4) == "dense_steps" and plan.dense_reason(0, 1, 1, 4) is None
    with pytest.raises(ValueError, match="fraction"):
        AttentionPlan(BandConfig(window=8), dense_steps=1.5)


def test_dense_layers_out_of_range_refused_before_patching():
    tiny = _tiny()
    model, _, _ = tiny.build("wan")
    before = tiny.snapshot(model)
    with pytest.raises(ValueError, match=r"dense_layers \[100\] out of range: the model has 2"):
        import fastattn.api as fa

        fa.enable(model, method="band", window=4, block_size=tiny.BS, dense_layers=[100])
    assert tiny.snapshot(model) == before and "_diffusers_hook" not in model.__dict__


# ------------------------------------------------------------------------------------------ diffusers bugs


def test_two_models_in_two_threads_do_not_mix():
    """Bug 1: each enabled model keeps its own forward state; threads never see each other's runtime."""
    import fastattn.api as fa

    tiny = _tiny()
    (m1, in1, _), (m2, in2, _) = tiny.build("wan"), tiny.build("wan")
    torch.manual_seed(3)
    for p in m2.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    h1 = fa.enable(m1, method="band", window=6, block_size=tiny.BS)
    h2 = fa.enable(m2, method="window3d", window=(0, 1, 1), block_size=tiny.BS, dense_layers=[0])
    ref1, ref2 = tiny.run(m1, in1), tiny.run(m2, in2)
    h1.reset_stats()
    h2.reset_stats()
    outs = {1: [], 2: []}
    barrier = threading.Barrier(2)

    def work(i, model, inputs):
        barrier.wait()
        for _ in range(20):
            outs[i].append(tiny.run(model, inputs))

    threads = [threading.Thread(target=work, args=a) for a in ((1, m1, in1), (2, m2, in2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(o, ref1) for o in outs[1]) and all(torch.equal(o, ref2) for o in outs[2])
    s1, s2 = h1.stats(), h2.stats()
    assert s1["sparse_calls"] == 40 and s1["calls"] == 40, s1
    assert s2["sparse_calls"] == 20 and s2["planned_dense"] == {"dense_layers": 20}, s2
    h1.disable()
    h2.disable()


def test_cross_attention_as_long_as_the_video_is_not_served_sparse():
    """Bug 2: Wan with 72 text tokens and 72 video tokens: cross-attention keeps its own backend, and
    dense_layers index self-attention layers only."""
    import fastattn.api as fa

    tiny = _tiny()
    model, inputs, (seq, *_) = tiny.build("wan")
    inputs["encoder_hidden_states"] = torch.randn(1, seq, 32)
    ref = tiny.run(model, inputs)
    h = fa.enable(model, method="band", window=6, block_size=tiny.BS, dense_layers=[1])
    out = tiny.run(model, inputs)
    st = h.stats()
    assert st["sparse_calls"] == 1 and st["planned_dense"] == {"dense_layers": 1} and not st["fallbacks"], st
    h.runtimes[0].sparse_fn = tiny.masked_oracle
    torch.testing.assert_close(out, tiny.run(model, inputs), rtol=1e-5, atol=1e-5)
    h.disable()
    h = fa.enable(model, method="dense")
    assert torch.equal(tiny.run(model, inputs), ref)
    h.disable()


def _wan22_pipe():
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    def transformer(seed):
        torch.manual_seed(seed)
        return WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
            text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        ).eval()  # fmt: skip

    return WanPipeline(
        tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer(0), transformer_2=transformer(1), boundary_ratio=0.5,
    )  # fmt: skip


def test_wan22_second_transformer_continues_the_step_count():
    """Bug 3: transformer_2 takes over mid-run at the pipeline's step, not at step 0."""
    import fastattn.api as fa

    tiny = _tiny()
    pipe = _wan22_pipe()
    handle = fa.enable(pipe, method="band", window=6, block_size=tiny.BS, dense_steps=2)
    seen = {0: [], 1: []}
    for i, m in enumerate(handle.models):
        orig = m.runtime.begin_forward

        def spy(ctx, _orig=orig, _i=i):
            seen[_i].append((ctx.step, ctx.cfg_branch, ctx.num_steps, ctx.sigma is not None))
            return _orig(ctx)

        m.runtime.begin_forward = spy
    torch.manual_seed(1)
    pipe(
        prompt_embeds=torch.randn(1, 12, 32), negative_prompt_embeds=torch.randn(1, 12, 32), height=32,
        width=48, num_frames=5, num_inference_steps=6, guidance_scale=5.0, output_type="latent",
    )  # fmt: skip
    steps = sorted({s for s, *_ in seen[0]} | {s for s, *_ in seen[1]})
    assert steps == list(range(6)), seen
    assert seen[1] and min(s for s, *_ in seen[1]) > 0, seen  # transformer_2 starts where the run is
    assert all(n == 6 and has_sigma for _, _, n, has_sigma in seen[0] + seen[1])
    assert {b for _, b, *_ in seen[0] + seen[1]} == {0, 1}  # cond / uncond from the cache context
    st = handle.stats()["models"]
    assert st[1]["sparse_calls"] > 0, st  # before the fix transformer_2 ran entirely dense
    handle.disable()


# ------------------------------------------------------------------------------------------ per-head plans


def _qkv(b=1, h=4, d=16, seed=0):
    torch.manual_seed(seed)
    return tuple(torch.randn(b, LAYOUT.seq_len, h, d) for _ in range(3))


def _oracle_per_head(q, k, v, masks, perm):
    """Independent per-head reference: gather each head's tokens, masked SDPA, scatter back."""
    out = torch.empty_like(q)
    for hd, mask in enumerate(masks):
        p = perm[hd] if perm is not None else torch.arange(q.shape[1])
        qh, kh, vh = (x[:, p, hd].unsqueeze(1) for x in (q, k, v))  # [B, 1, S, D] reordered
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask.to_token_mask()[0, 0])
        out[:, p, hd] = o[:, 0]
    return out


def _fw(rt, step=0, num_steps=None, branch=0):
    return rt.begin_forward(ForwardContext(LAYOUT, step, num_steps, branch))


def test_head_table_mixes_methods_orders_and_skip_per_head():
    methods = (BandConfig(window=12), Window3DConfig(window=(1, 2, 2)), SkipConfig(), DenseConfig())
    table = HeadTable(
        methods,
        torch.tensor([[[0, 1, 2, 3], [1, 1, 1, 1]]]),
        order_index=torch.tensor([[[0, 3, 0, 0], [0, 0, 0, 0]]]),  # head 1 of layer 0: "HWF"
    )
    plan = AttentionPlan(BandConfig(window=4), block_size=8, heads=table)
    rt = AttentionRuntime(plan, num_layers=2)
    q, k, v = _qkv()
    state = _fw(rt)
    out0 = rt.attend(state, q, k, v, layer=0)
    out1 = rt.attend(state, q, k, v, layer=1)
    rt.end_forward(state)
    orders = ["FHW", "HWF", "FHW", "FHW"]
    masks = [
        build_mask(methods[0], LAYOUT, 8),
        build_mask(Window3DConfig(window=(1, 2, 2), order="HWF"), LAYOUT, 8),
        build_mask(methods[2], LAYOUT, 8),
        build_mask(methods[3], LAYOUT, 8),
    ]
    ref0 = _oracle_per_head(q, k, v, masks, head_permutations(LAYOUT, orders))
    ref0[:, :, 2] = 0  # a skipped head outputs zeros
    torch.testing.assert_close(out0, ref0, rtol=1e-5, atol=1e-5)
    ref1 = _oracle_per_head(q, k, v, [build_mask(methods[1], LAYOUT, 8)] * 4, None)
    torch.testing.assert_close(out1, ref1, rtol=1e-5, atol=1e-5)
    st = rt.stats.as_dict()
    assert st["sparse_calls"] == 2 and 0 < st["density"] < 1
    assert len(rt._head_work) == 2  # one piece of work per distinct (row, layout)


def test_head_table_groups_bit_widths_and_step_groups():
    calls = []

    def kernel(q, k, v, mask, scale=None, quant="none", perm=None):
        calls.append((quant, q.shape[1]))
        return torch.zeros_like(q), None

    table = HeadTable(
        (BandConfig(window=8), DenseConfig()),
        torch.tensor([[[0, 0, 0, 0]], [[1, 1, 1, 1]]]),  # group 0 band, group 1 all dense
        step_bounds=(0.0, 0.5, 1.0),
        quant_index=torch.tensor([[[-1, 1, 1, -1]], [[-1, -1, -1, -1]]]),  # int8 on heads 1, 2
    )
    plan = AttentionPlan(BandConfig(window=4), block_size=8, heads=table)
    rt = AttentionRuntime(plan, num_layers=1, sparse_fn=kernel)
    q, k, v = _qkv()
    for step in range(4):
        state = _fw(rt, step, 4)
        rt.attend(state, q, k, v)
        rt.end_forward(state)
    assert calls == [("none", 2), ("int8", 2)] * 2  # steps 0, 1: one kernel call per bit-width
    st = rt.stats.as_dict()
    assert st["sparse_calls"] == 2 and st["planned_dense"] == {"method dense (head table)": 2}, st


def test_head_reuse_returns_the_cached_output_of_the_last_computed_step():
    table = HeadTable(
        (BandConfig(window=12),),
        torch.zeros(2, 1, 4, dtype=torch.int16),
        step_bounds=(0.0, 0.5, 1.0),
        reuse=torch.tensor([[[False] * 4], [[True, False, True, False]]]),
    )
    rt = AttentionRuntime(AttentionPlan(BandConfig(window=4), block_size=8, heads=table), num_layers=1)
    first, second = _qkv(seed=0), _qkv(seed=1)
    outs = []
    for step, x in enumerate((first, second)):
        state = _fw(rt, step * 2, 4)  # step 0 (group 0), step 2 (group 1: reuse heads 0 and 2)
        outs.append(rt.attend(state, *x))
        rt.end_forward(state)
    torch.testing.assert_close(outs[1][:, :, [0, 2]], outs[0][:, :, [0, 2]], rtol=0, atol=0)
    fresh = _oracle_per_head(*second, [build_mask(BandConfig(window=12), LAYOUT, 8)] * 4, None)
    torch.testing.assert_close(outs[1][:, :, [1, 3]], fresh[:, :, [1, 3]], rtol=1e-5, atol=1e-5)
    st = rt.stats.as_dict()
    full = build_mask(BandConfig(window=12), LAYOUT, 8).block_density()
    assert st["head_reuses"] == 2 and st["density"] == pytest.approx(0.75 * full)  # reused heads cost nothing
    assert rt.cache_bytes() > 0
    rt.reset_run()
    assert rt.cache_bytes() == 0


def test_residual_sharing_leaves_exact_heads_and_rows_exact():
    """WA-RS with a head table: R is captured with step 0's row and added later only to heads that are not
    exact (full mask, no quantization) in the row that runs; an all-dense row gets nothing added."""
    band = BandConfig(window=12)
    table = HeadTable(
        (band, DenseConfig()),
        torch.tensor([[[0, 0, 0, 0]], [[1, 0, 1, 0]], [[1, 1, 1, 1]]]),  # groups: all band / mixed / all dense
        step_bounds=(0.0, 1 / 3, 2 / 3, 1.0),
    )
    plan = AttentionPlan(band, block_size=8, heads=table, residual=True)
    rt = AttentionRuntime(plan, num_layers=1)
    inputs = [_qkv(seed=i) for i in range(3)]
    outs = []
    for step, x in enumerate(inputs):
        state = _fw(rt, step, 3)  # step 0 captures (group 0), step 1 applies (mixed row), step 2 all dense
        outs.append(rt.attend(state, *x))
        rt.end_forward(state)
    full = build_mask(DenseConfig(), LAYOUT, 8)
    banded = build_mask(band, LAYOUT, 8)
    dense = [_oracle_per_head(*x, [full] * 4, None) for x in inputs]
    sparse = [_oracle_per_head(*x, [banded] * 4, None) for x in inputs]
    r = dense[0] - sparse[0]
    torch.testing.assert_close(outs[0], dense[0], rtol=1e-5, atol=1e-5)  # the capture step is exact
    torch.testing.assert_close(outs[1][:, :, [0, 2]], dense[1][:, :, [0, 2]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[1][:, :, [1, 3]], (sparse[1] + r)[:, :, [1, 3]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[2], dense[2], rtol=1e-5, atol=1e-5)


def test_head_table_validation():
    with pytest.raises(ValueError, match="outside"):
        HeadTable((DenseConfig(),), torch.ones(1, 2, 2, dtype=torch.int16))
    with pytest.raises(TypeError, match="integer tensor"):
        HeadTable((DenseConfig(),), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="step_bounds"):
        HeadTable((DenseConfig(),), torch.zeros(2, 2, 2, dtype=torch.int8))
    table = HeadTable.uniform(BandConfig(window=4), 3, 2)
    with pytest.raises(ValueError, match="covers 3 layers, the model has 2"):
        AttentionPlan(BandConfig(window=4), heads=table).check_model(2, 2)


@pytest.mark.parametrize(
    "settings, match",
    [
        (dict(method="radial", window=(0, 0), temporal_window=-1), "temporal_window"),
        (dict(method="window3d", window=(-1, -1, -1)), r"ints >= 0"),
        (dict(method="window3d", window=(1, 2)), "must be 3 ints"),
        (dict(method="window3d", window="abc"), "must be 3 ints"),
        (dict(method="band", window=-5), r"ints >= 0"),
        (dict(method="arrow", factor=0), r"ints >= 1"),
        (dict(method="band", window=1e30), r"ints >= 0"),
        (dict(method="window3d", density=True), "density must be a fraction"),
    ],
)
def test_method_parameters_checked_when_the_plan_is_made(settings, match):
    """Bad geometry is refused by make_plan (before enable touches a model), not at the first forward."""
    with pytest.raises(ValueError, match=match):
        make_plan("wan", **settings)


def test_a_one_step_run_ends_and_the_next_run_starts_fresh():
    """After a run of one step (step 0 is also its last), the next run's step 0 is still a new run: it must
    serve the same calls as on a fresh runtime (residual sharing applies, nothing counted as left over)."""
    plan = AttentionPlan(BandConfig(window=4), block_size=8, residual=True, residual_refresh=0)
    q, k, v = _qkv()

    def run(rt, num_steps):
        outs = []
        for step in range(num_steps):
            state = _fw(rt, step, num_steps)
            outs.append(rt.attend(state, q, k, v, layer=0))
            rt.end_forward(state)
        return outs

    fresh = AttentionRuntime(plan, num_layers=1)
    want = run(fresh, 4)
    rt = AttentionRuntime(plan, num_layers=1)
    run(rt, 1)
    before = rt.stats.sparse_calls
    got = run(rt, 4)
    assert rt.stats.sparse_calls - before == fresh.stats.sparse_calls > 0
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
