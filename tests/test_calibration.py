"""Calibration: observation from sampled rows, selection under a budget, plans that load and run, bad input.

CPU, small: the learned testbed at a 4x8x8 grid, a tiny random testbed and a tiny random diffusers Wan
pipeline; the error estimate of the observer is checked against real masked attention.
"""

from __future__ import annotations

import math

import pytest
import torch
from fastattn.calibration import (
    BudgetError,
    CalibrationError,
    CalibrationInterrupted,
    calibrate,
    run_calibration,
)
from fastattn.calibration.candidates import CandidateSet
from fastattn.calibration.costs import CostModel
from fastattn.calibration.observe import CalibrationObserver, sample_rows
from fastattn.evaluation.metrics import rel_l2
from fastattn.masks.block_mask import BlockMask
from fastattn.masks.layout import TokenLayout
from fastattn.masks.permutations import axis_order_permutation
from fastattn.plans import AttentionPlan
from fastattn.plans.files import load_plan
from fastattn.testbed.fast import enable
from fastattn.testbed.model import TestbedConfig, TestbedDiT, sdpa_attention
from fastattn.testbed.sample import load_testbed, sample

TINY = dict(frames=2, size=32)  # tiny random testbed: grid (2, 8, 8), 128 tokens
FAST = dict(steps=2, block_size=16, progress=False, methods=("paro", "skip", "reuse"))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    m = TestbedDiT(TestbedConfig.tiny()).eval()
    with torch.no_grad():  # adaLN-zero init would leave attention without effect
        for p in m.parameters():
            p.normal_(0.0, 0.2)
    return m


@pytest.fixture(scope="module")
def learned():
    return load_testbed()  # the shipped 19.2M testbed, float32 on the CPU


def _restored(model) -> bool:
    return "_fastattn_handle" not in model.__dict__ and all(
        blk.attn.attention_fn is sdpa_attention for blk in model.blocks
    )


# ------------------------------------------------------------------------------------------ observation


def test_observed_errors_equal_masked_attention_on_the_sampled_rows():
    layout = TokenLayout.video(3, 4, 6, text_len=10)  # text first, ragged blocks
    bs = 16
    cs = CandidateSet.build(layout, bs, ("paro", "sparse_vdit", "structural"))
    obs = CalibrationObserver(("paro",), 1, 2, (0.0, 1.0), 1, ("none",), bs, rows_per_block=3, seed=5)
    sc = obs._scratch_for(layout, cs, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, layout.seq_len, 16, generator=g) * 2 for _ in range(3))
    scale = 0.25
    out, err, energy, _, _ = obs._score(q[:, sc["rows"]], k, v, scale, cs, sc)
    rows = sample_rows(layout.seq_len, 3 * sc["n_blocks"], 5)
    assert torch.equal(rows, sc["rows"])
    exact = torch.softmax(q @ k.transpose(-1, -2) * scale, -1) @ v
    assert torch.allclose(out, exact[:, rows], atol=1e-5)
    checked = 0
    for om in cs.by_order:
        for j, ci in enumerate(om.index.tolist()[:6]):
            mask = BlockMask.from_block_map(om.maps[j], layout, bs)
            perm = axis_order_permutation(layout, om.order)
            qp, kp, vp = q[:, perm], k[:, perm], v[:, perm]
            tok = mask.to_token_mask()[0, 0]
            s = (qp @ kp.transpose(-1, -2) * scale).masked_fill(~tok, -math.inf)
            o = torch.nan_to_num(torch.softmax(s, -1)) @ vp
            o_orig = torch.empty_like(o)
            o_orig[:, perm] = o
            want = (o_orig[:, rows] - exact[:, rows]).pow(2).sum(-1).mean(-1)
            assert torch.allclose(err[:, ci], want, rtol=1e-4, atol=1e-6), cs.candidates[ci].label
            checked += 1
    assert checked > 20
    assert torch.allclose(energy, exact[:, rows].pow(2).sum(-1).mean(-1))


def test_cost_model_default_table_and_bad_table(tmp_path):
    cost = CostModel.load()
    assert "derived from committed benchmark JSON" in cost.source
    assert cost.head_time(0.2) < cost.head_time(0.3) < cost.head_time(1.0)
    assert cost.head_time(0.3, "fp8") < cost.head_time(0.3)  # the measured FP8 kernel is faster per block
    assert cost.head_time(0.3, reordered=True) > cost.head_time(0.3)
    bad = tmp_path / "t.json"
    bad.write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a fastattn cost table"):
        CostModel.load(bad)


# ------------------------------------------------------------------------------------------ end to end


def test_testbed_plan_saves_loads_runs_and_matches_its_expected_work(tiny, tmp_path):
    res = run_calibration(tiny, [1, 2], target_density=0.45, **FAST, **TINY)
    plan = res.plan
    table = plan.heads
    assert table is not None and table.method_index.shape == (2, 2, 2)
    assert res.report["summary"]["expected_work"] <= 0.45 + 1e-9
    assert _restored(tiny)
    d = res.save(tmp_path / "plan")
    assert (d / "plan.json").exists() and (d / "plan.safetensors").exists() and (d / "report.json").exists()
    assert (d / "head_map.png").stat().st_size > 1000
    loaded = load_plan(d, fingerprint=res.meta.model)
    assert loaded.meta.creator == "fastattn.calibrate" and loaded.meta.steps == 2
    assert torch.equal(loaded.plan.heads.method_index, table.method_index)
    h = enable(tiny, plan=AttentionPlan.load(d))
    try:
        out = sample(tiny, [3], num_steps=2, seed=9, **TINY)
        st = h.stats()
    finally:
        h.disable()
    assert torch.isfinite(out).all() and st["fallbacks"] == {}
    assert st["density"] == pytest.approx(res.report["summary"]["expected_work"], abs=1e-6)


def test_residual_plan_counts_its_capture_step_in_the_work(tiny):
    """residual=True: the plan shares WA-RS residuals; the exact capture step is part of the target work, and
    the free first group (only the capture step) runs the second group's row."""
    steps = 4
    res = run_calibration(tiny, [1], target_density=0.6, residual=True, **{**FAST, "steps": steps}, **TINY)
    plan, summary = res.plan, res.report["summary"]
    assert plan.residual and summary["residual"] and res.meta.creator_params["residual"] is True
    assert 0.25 <= summary["expected_work"] <= 0.6 + 1e-9  # the capture alone is 1 / steps of the run
    assert torch.equal(res.selection.choice[0], res.selection.choice[1])
    h = enable(tiny, plan=plan)
    try:
        sample(tiny, [3], num_steps=steps, seed=9, **TINY)
        st = h.stats()
    finally:
        h.disable()
    assert st["planned_dense"].get("residual capture (WA-RS)") == tiny.cfg.depth
    assert st["density"] == pytest.approx(summary["expected_work"], abs=1e-6)
    with pytest.raises(CalibrationError, match="residual must be True or False"):
        run_calibration(tiny, [1], target_density=0.6, residual=1, **FAST, **TINY)


def test_calibrated_plan_beats_the_structural_window_at_equal_work(learned):
    kw = dict(frames=4, size=32)  # grid (4, 8, 8): 256 tokens, 16 blocks of 16
    steps, block = 3, 16
    held = [(4, 7), (13, 8)]

    def final(handle=None):
        outs = [
            sample(learned, [lab], num_steps=steps, seed=s, return_latents=True, **kw)[1] for lab, s in held
        ]
        st = handle.stats() if handle is not None else None
        if handle is not None:
            handle.disable()
        return torch.cat(outs), st

    dense, _ = final()
    rivals = {  # a structural 3-D window with a dense first step, and the testbed's dynamic preset
        "window3d": final(enable(learned, method="window3d", density=0.3, dense_steps=1, block_size=block)),
        "testbed/balanced": final(enable(learned, "testbed/balanced", block_size=block)),
    }
    work = min(st["density"] for _, st in rivals.values())
    plan = calibrate(learned, [(1, 100)], target_density=work, steps=steps, block_size=block, rows_per_block=4,
                     progress=False, **kw)  # fmt: skip
    cal, st_cal = final(enable(learned, plan=plan))
    assert st_cal["density"] <= work + 1e-6  # no more attention work than either rival
    # every planned reuse found an output to reuse (one step per group: each reused entry is one head-call)
    reused = int(plan.heads.reuse.sum()) if plan.heads.reuse is not None else 0
    assert st_cal["head_reuses"] == reused * len(held)
    assert not [n for n in st_cal["notes"] if "nothing cached" in n]
    e_cal = float(rel_l2(cal, dense))
    for name, (out, _) in rivals.items():
        assert e_cal < 0.9 * float(rel_l2(out, dense)), (name, e_cal, float(rel_l2(out, dense)))
    assert _restored(learned)


def test_same_seed_same_plan_and_resume_after_interrupt(tiny, tmp_path):
    args = dict(target_density=0.5, seed=3, **FAST, **TINY)
    first = calibrate(tiny, [1, 2, 3], **args)
    again = calibrate(tiny, [1, 2, 3], **args)
    for name in ("method_index", "order_index", "quant_index", "reuse"):
        a, b = getattr(first.heads, name), getattr(again.heads, name)
        assert (a is None and b is None) or torch.equal(a, b)
    assert first.heads.methods == again.heads.methods

    calls = {"n": 0}

    def stop_in_prompt_two(i, x):
        calls["n"] += 1
        if calls["n"] == 3:  # the first step of the second prompt (2 steps per prompt)
            raise KeyboardInterrupt

    ckpt = tmp_path / "ckpt"
    with pytest.raises(CalibrationInterrupted, match=r"prompt 2 of 3.*1 finished prompt\(s\) are saved"):
        calibrate(tiny, [1, 2, 3], checkpoint_dir=ckpt, callback=stop_in_prompt_two, **args)
    assert _restored(tiny)
    assert (ckpt / "state.json").exists()
    resumed = calibrate(tiny, [1, 2, 3], checkpoint_dir=ckpt, callback=lambda i, x: None, **args)
    assert torch.equal(resumed.heads.method_index, first.heads.method_index)
    assert resumed.heads.methods == first.heads.methods
    with pytest.raises(CalibrationError, match="other calibration arguments.*prompts"):
        calibrate(tiny, [1, 2, 4], checkpoint_dir=ckpt, callback=lambda i, x: None, **args)


def test_selection_meets_budgets_and_chains_reuse_at_most_max_reuse():
    from fastattn.calibration.observe import MAX_REUSE
    from fastattn.calibration.select import Problem, reuse_distance, select

    g, l, h, k = 6, 2, 3, 4
    gen = torch.Generator().manual_seed(0)
    err = torch.rand(g, l, h, k, generator=gen, dtype=torch.float64) * torch.tensor([0.0, 0.01, 0.05, 0.2])
    work = torch.tensor([1.0, 0.5, 0.25, 0.1], dtype=torch.float64).expand(g, l, h, k).clone()
    time = work * 1.1
    reuse_err = torch.full((g, l, h, MAX_REUSE), 0.001, dtype=torch.float64)
    reuse_err[0] = float("inf")  # nothing to reuse at the first group
    p = Problem(err, work, time, torch.ones(g, l, h, k, dtype=torch.bool), reuse_err,
                torch.full((g,), 1 / g, dtype=torch.float64), 0.0)  # fmt: skip
    sel = select(p, target_density=0.2)
    assert sel.work <= 0.2 + 1e-9
    dist = reuse_distance(sel.reuse, sel.dense_rows)
    assert (
        int(dist.max()) == MAX_REUSE and not sel.reuse[0].any()
    )  # cheap reuse is chained, never past the limit
    # more budget never costs accuracy
    assert select(p, target_density=0.5).error <= sel.error + 1e-12
    with pytest.raises(BudgetError, match="cannot be met"):
        select(
            Problem(err, work, time, p.valid, torch.full_like(reuse_err, float("inf")), p.weights),
            target_density=0.05,
        )


def test_error_budget_mode_trades_time_and_bits(tiny):
    loose = run_calibration(tiny, [1], error_budget=0.5, **{**FAST, "methods": ("paro", "skip")}, **TINY)
    tight = run_calibration(tiny, [1], error_budget=1e-6, **{**FAST, "methods": ("paro", "skip")}, **TINY)
    assert loose.selection.error <= 0.5 and tight.selection.error <= 1e-6
    assert loose.selection.time <= tight.selection.time
    assert tight.selection.work >= loose.selection.work


# ------------------------------------------------------------------------------------------ bad input


def test_bad_input_is_refused_and_nothing_stays_patched(tiny, monkeypatch):
    with pytest.raises(CalibrationError, match="no adapter for Linear"):
        calibrate(torch.nn.Linear(2, 2), ["x"], target_density=0.3)
    with pytest.raises(CalibrationError, match="give target_density"):
        calibrate(tiny, [1])
    with pytest.raises(CalibrationError, match=r"target_density must be a number in \(0, 1\]"):
        calibrate(tiny, [1], target_density=1.5)
    with pytest.raises(CalibrationError, match=r"class label is an int in \[0, 24\)"):
        calibrate(tiny, [99], target_density=0.3, **FAST, **TINY)
    with pytest.raises(CalibrationError, match="unknown calibration method 'nope'"):
        calibrate(tiny, [1], target_density=0.3, methods=("nope",))
    # a budget no plan of these candidates meets (no skip, no reuse: some blocks are always computed)
    with pytest.raises(BudgetError, match="target_density 0.001 cannot be met: the sparsest plan"):
        calibrate(tiny, [1], target_density=0.001, **{**FAST, "methods": ("window3d",)}, **TINY)
    assert _restored(tiny)

    # every call falls back to dense (as fp32 on a GPU would): nothing to observe
    import fastattn.calibration.host_testbed as ht

    real_enable = ht.enable

    def fallback(q, k, v, mask, *, scale=None, quant="none", perm=None):
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, scale=scale
        ), "test: kernel unavailable"

    monkeypatch.setattr(ht, "enable", lambda model, plan: real_enable(model, plan=plan, sparse_fn=fallback))
    with pytest.raises(CalibrationError, match="no self-attention call.*kernel: test: kernel unavailable"):
        calibrate(tiny, [1], target_density=0.3, **FAST, **TINY)
    assert _restored(tiny)


# ------------------------------------------------------------------------------------------ diffusers


def test_tiny_diffusers_pipeline_end_to_end(tmp_path):
    pytest.importorskip("diffusers")
    import fastattn
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()  # fmt: skip
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))  # fmt: skip
    g = torch.Generator().manual_seed(1)
    prompt = {"prompt_embeds": torch.randn(1, 12, 32, generator=g),
              "negative_prompt_embeds": torch.randn(1, 12, 32, generator=g)}  # fmt: skip
    run = dict(height=64, width=96, num_frames=9, guidance_scale=5.0)
    procs = dict(transformer.attn_processors)
    backends = {p: getattr(x, "_attention_backend", None) for p, x in procs.items()}
    plan = fastattn.calibrate(pipe, [prompt], target_density=0.6, steps=2, block_size=8, progress=False,
                              out=tmp_path / "wan-plan", **run)  # fmt: skip
    assert transformer.attn_processors == procs
    assert {
        p: getattr(x, "_attention_backend", None) for p, x in transformer.attn_processors.items()
    } == backends
    loaded = load_plan(tmp_path / "wan-plan")
    assert loaded.meta.model.family == "wan" and loaded.meta.layout.grid == (3, 4, 6)
    handle = fastattn.enable(pipe, plan=plan)
    try:
        out = pipe(**prompt, num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0),
                   **run).frames  # fmt: skip
        st = handle.stats()
    finally:
        handle.disable()
    assert torch.isfinite(out).all() and st["sparse_calls"] + sum(st["planned_dense"].values()) > 0
    assert st["density"] <= 0.6 + 1e-6
    with pytest.raises(CalibrationError, match="pass the diffusers pipeline"):
        fastattn.calibrate(transformer, [prompt], target_density=0.5)


# ------------------------------------------------------------------------------------------ Hub


def test_calibrated_testbed_plan_round_trips_through_the_hub(tiny, tmp_path, monkeypatch):
    """The shipped calibrated testbed plan (presets/plans/testbed-calibrated-*) when there is one, else a
    fresh one: pushed to a local Hub, pulled back through hf://, the same plan and meta."""
    import importlib.util
    from pathlib import Path

    from fastattn.plans.files import shipped_plans
    from huggingface_hub import constants

    spec = importlib.util.spec_from_file_location(
        "fastattn_test_hub_server", Path(__file__).with_name("hub_server.py")
    )
    hub_server = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hub_server)
    shipped = [p for p in shipped_plans() if p.name.startswith("testbed-calibrated")]
    if shipped:
        loaded = load_plan(shipped[0])
        plan, meta = loaded.plan, loaded.meta
    else:
        res = run_calibration(tiny, [1], target_density=0.5, **FAST, **TINY)
        plan, meta = res.plan, res.meta
    server = hub_server.HubServer().start()
    try:
        cache = str(tmp_path / "hf-cache")
        for k, v in {"HF_ENDPOINT": server.url, "HF_HUB_CACHE": cache, "HF_HUB_DISABLE_XET": "1",
                     "HF_HUB_DISABLE_TELEMETRY": "1", "HF_TOKEN": "hf_test_token"}.items():  # fmt: skip
            monkeypatch.setenv(k, v)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        address = plan.push_to_hub("org/calibrated", subdir="testbed", meta=meta)
        back = load_plan(address, fingerprint=meta.model)
    finally:
        server.stop()
    assert back.meta.creator == "fastattn.calibrate" and back.meta.layout == meta.layout
    for name in ("method_index", "order_index", "quant_index", "reuse", "map_index", "block_maps"):
        a, b = getattr(plan.heads, name), getattr(back.plan.heads, name)
        assert (a is None and b is None) or (torch.equal(a, b) and a.dtype == b.dtype), name
    assert back.plan.heads.methods == plan.heads.methods


# ------------------------------------------------------------------------------------------ CLI


def test_cli_calibrates_the_testbed_and_refuses_bad_input(tmp_path, capsys):
    from fastattn.cli import main

    out = tmp_path / "plan"
    main(["calibrate", "--testbed", "--prompts", "1", "5:100", "--frames", "2", "--size", "32", "--steps", "2",
          "--block-size", "16", "--rows-per-block", "2", "--target-density", "0.5", "--out", str(out),
          "--no-progress", "--device", "cpu"])  # fmt: skip
    assert "expected attention work" in capsys.readouterr().out
    loaded = load_plan(out)
    assert loaded.meta.creator == "fastattn.calibrate" and loaded.meta.model.family == "testbed"
    assert (out / "report.json").exists()
    for argv, message in (
        (["calibrate", "--testbed", "--prompts", "x", "--target-density", "0.3", "--out", str(out)], "class label"),
        (["calibrate", "--testbed", "--prompts", "1", "--out", str(out)], "give --target-density"),
        (["calibrate", str(tmp_path / "nope"), "--prompts", "a", "--target-density", "0.3", "--out", str(out)],
         "no such pipeline folder"),
    ):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_bench_calibrate_tiny_writes_its_json(tmp_path):
    import json

    from fastattn.bench import calibrate as bench

    assert bench.main(["--tiny", "--targets", "0.3", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "calibrate-tiny.json").read_text())
    row = data["calibrated"][0]
    assert row["attention_density"] <= 0.3 + 1e-6 and row["calibration_seconds"] > 0
    assert data["summary"]["work<=0.3"]["calibrated_psnr"] == row["psnr"]
    assert json.loads((tmp_path / "calibrate-costs-tiny.json").read_text())["format"] == "fastattn-cost-table"
    assert load_plan(tmp_path / "plans" / "testbed-calibrated-0.3").meta.creator == "fastattn.calibrate"
