"""``fastattn demo``: bad arguments fail at once (one line, exit status 2, nothing sampled), the GPU figures
it quotes come from the committed benchmark JSON, a tiny run writes the HTML page with the clips, and the
real-shape panel's builder and timing run at a tiny shape on the CPU (the demo runs them at Wan-1.3B's on a
GPU; on the CPU it prints one skip line)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from fastattn.cli import main
from fastattn.plans.build import make_plan
from fastattn.testbed import demo
from fastattn.testbed.real_shape import (
    WAN_13B,
    RealShape,
    RealShapeDiT,
    build_stack,
    stack_config,
    time_real_shape,
)

# The real-shape panel's code at a CPU size: 2 layers, 64 tokens, 4 blocks of 16, CFG batch 2, 8 text tokens.
TINY_SHAPE = RealShape("Tiny", dim=128, heads=2, ffn=320, layers=2, grid=(2, 4, 8), batch=2, text_tokens=8,
                       what="16x8, 2 frames")  # fmt: skip

TINY = ["--frames", "2", "--size", "32", "--steps", "2", "--device", "cpu"]


@pytest.fixture
def no_sampling(monkeypatch):
    """Loading or sampling the model fails the test: validation must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the demo loaded or sampled the model before checking its arguments")

    monkeypatch.setattr(demo, "load_testbed", refuse)
    monkeypatch.setattr(demo, "sample", refuse)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--preset", "ultra"], "unknown preset 'ultra'"),
        (["--density", "2"], "--density must be a fraction in (0, 1]"),
        (["--quant", "int3"], "--quant must be one of"),
        (["--out", "/proc/x"], "--out /proc/x: cannot create the folder"),
        (["--size", "30"], "--size must be a multiple of the testbed's patch size 4"),
        (["--steps", "0"], "--steps must be a positive integer"),
        (["--clips", "-1"], "--clips must be a positive integer"),
        (["--method", "nope"], "unknown method 'nope'"),
        (["--device", "tpu"], "--device must be 'cpu' or 'cuda[:N]'"),
        (["--real-steps", "0"], "--real-steps must be a positive integer"),
        (["--real-layers", "31"], "--real-layers must be at most 30"),
        (["--real-layers", "-2"], "--real-layers must be a positive integer"),
        (["--real-shape"], "--real-shape needs a CUDA GPU"),
    ],
)
def test_bad_arguments_fail_at_once_with_one_line(args, expected, no_sampling, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", *TINY, *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastattn demo: error: ") and expected in err


def test_out_that_is_a_file_is_refused(tmp_path, no_sampling, capsys):
    path = tmp_path / "taken"
    path.write_text("not a folder")
    with pytest.raises(SystemExit) as exc:
        main(["demo", *TINY, "--out", str(path)])
    assert exc.value.code == 2 and f"--out {path}" in capsys.readouterr().err


def test_command_line_exit_status_and_no_traceback():
    r = subprocess.run(
        [sys.executable, "-m", "fastattn.cli", "demo", "--preset", "ultra", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "unknown preset 'ultra'" in r.stderr


def test_gpu_figures_come_from_the_committed_json():
    lines = demo.gpu_expectations("balanced")
    rows = json.loads((demo.RESULTS_DIR / "e2e-nvidia_h200.json").read_text())
    balanced = [r for r in rows if r.get("preset") == "balanced"]
    assert balanced and len([x for x in lines if "e2e-nvidia_h200.json" in x]) == len(balanced)
    for r, line in zip(balanced, lines):
        measured = r.get("schedule_measured")
        speed = measured["speedup"] if isinstance(measured, dict) else r["speedup"]
        assert line.startswith(r["model"]) and f"{speed:.2f}x" in line
    quality = json.loads((demo.RESULTS_DIR / "quality-nvidia_h200.json").read_text())
    held = next(r for r in quality["heldout"] if r["config"] == "preset testbed/balanced")
    assert any(f"{held['psnr']:.1f} dB" in x and "quality-nvidia_h200.json" in x for x in lines)
    assert demo.gpu_expectations(None) == []
    # the real-shape expectation: testbed/balanced's settings timed on diffusers Wan-1.3B (dense_steps aside)
    dyn = json.loads((demo.RESULTS_DIR / "e2e-dynamic-wan13-nvidia_h200.json").read_text())
    row = next(r for r in dyn if r["preset"] == "dyn0.2-r4-rs4")
    real = [x for x in lines if x.startswith("real-shape: ")]
    assert len(real) == 1 and f"{row['schedule_measured']['speedup']:.2f}x over a whole 50-step" in real[0]
    assert "dense_steps 0.1 (here 0.125)" in real[0]
    assert not [x for x in demo.gpu_expectations("fast") if x.startswith("real-shape: ")]  # no refresh-0 row


def test_real_shape_expectation_needs_the_same_settings(tmp_path):
    plan = make_plan("testbed", "balanced", block_size=128)
    kw = {k: plan.to_dict()[k] for k in ("method", "min_density", "max_density", "reuse_steps", "residual",
                                         "residual_refresh", "dense_steps")}  # fmt: skip
    row = {"model": "W", "resolution": "8x8", "frames": 5, "preset": "mine", "speedup": 1.9, "quant": "none",
           "device": "GPU X", "plan_kwargs": kw, "schedule_measured": {"steps": 50, "speedup": 1.4}}  # fmt: skip
    other = {**row, "preset": "other", "plan_kwargs": {**kw, "min_density": 0.3}}
    fp8 = {**row, "preset": "fp8", "quant": "fp8"}
    (tmp_path / demo.REAL_SHAPE_RESULTS[0]).write_text(json.dumps([row, other, fp8]))
    assert demo.real_shape_expectations(plan, tmp_path) == [
        "real-shape: W 8x8 x 5 frames (diffusers, random weights): 1.40x over a whole 50-step schedule, 1.90x per "
        f"sparse step (mine: the same settings; GPU X, {demo.REAL_SHAPE_RESULTS[0]})"
    ]


def test_whole_schedule_speed_is_quoted_when_measured(tmp_path):
    row = {"model": "M", "resolution": "8x8", "preset": "fast", "speedup": 1.5, "method": "radial",
           "quant": "none", "device": "GPU X", "schedule_measured": {"steps": 50, "speedup": 1.25}}  # fmt: skip
    (tmp_path / "e2e-nvidia_h200.json").write_text(json.dumps([row, {**row, "preset": "safe"}]))
    assert demo.gpu_expectations("fast", tmp_path) == [
        "M 8x8: 1.25x over a whole 50-step schedule (radial, quant none; GPU X, e2e-nvidia_h200.json)"
    ]


def test_tiny_run_writes_the_page_with_clips_and_table(tmp_path, capsys):
    r = demo.run_demo(out=tmp_path, steps=2, device="cpu", frames=2, size=32, clips=1)
    page = (tmp_path / "demo.html").read_text()
    # no GPU: the real-shape panel is skipped, one line saying why, on the console and on the page
    skip = [x for x in capsys.readouterr().out.splitlines() if "real-shape speed panel" in x]
    assert len(skip) == 1 and skip[0].endswith(demo.REAL_SKIP_CPU) and "needs a CUDA GPU" in skip[0]
    assert demo.REAL_SKIP_CPU in page and r["real_shape"] is None
    assert 'src="demo.gif"' in page and 'src="demo.png"' in page
    assert (tmp_path / "demo.gif").stat().st_size > 1000
    assert (
        f"{r['psnr']:.2f}" in page and "preset testbed/balanced" in page and "GPU figures to expect" in page
    )
    assert r["stats"]["sparse_calls"] > 0 and r["stats"]["fallbacks"] == {}
    assert r["warmup_s"] > 0 and r["speedup"] == pytest.approx(r["dense_s"] / r["fast_s"])


def test_wan_shaped_stack_has_wan_13b_dims():
    cfg = stack_config(WAN_13B)
    assert (cfg.dim, cfg.heads, cfg.head_dim, cfg.depth, int(cfg.dim * cfg.mlp_ratio)) == (
        1536,
        12,
        128,
        30,
        8960,
    )
    assert cfg.grid() == (21, 30, 52) and WAN_13B.tokens == 32760 and WAN_13B.batch == 2
    with torch.device("meta"):  # no memory: shapes only
        model = RealShapeDiT(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert 1.3e9 < n < 1.45e9  # Wan2.1-T2V-1.3B's blocks (its text embedder aside)
    blk = model.blocks[0]
    assert blk.mlp[0].out_features == 8960 and blk.cross.kv.in_features == 1536


def test_stack_is_built_on_the_device_with_small_random_weights():
    model = build_stack(TINY_SHAPE, "cpu", torch.float32)
    w = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert w.device.type == "cpu" and w.dtype == torch.float32 and abs(float(w.std()) - 0.02) < 0.002
    assert model.blocks[0].mlp[0].out_features == 320
    assert model.blocks[0].__dict__["_text"].shape == (2, 8, 128)
    assert "_text" not in "".join(model.state_dict())  # inputs, not weights


@pytest.fixture(scope="module")
def tiny_timing():
    plan = make_plan("testbed", "balanced", block_size=16)
    return time_real_shape(TINY_SHAPE, plan, device="cpu", steps=4, dtype=torch.float32)


def test_real_shape_timing_gives_both_schedules_and_the_plans_work(tiny_timing):
    r = tiny_timing
    assert len(r["dense_step_s"]) == len(r["preset_step_s"]) == 4 and r["dense_s"] > 0 and r["preset_s"] > 0
    assert r["dense_s"] == pytest.approx(sum(r["dense_step_s"])) and r["preset_s"] == pytest.approx(
        sum(r["preset_step_s"])
    )
    assert r["speedup"] == pytest.approx(r["dense_s"] / r["preset_s"])
    # a 4-step run of balanced: dense_steps round(0.5) = 0, so step 0 captures the residual in both layers
    assert r["stats"]["planned_dense"] == {"residual capture (WA-RS)": 2} and r["stats"]["sparse_calls"] == 6
    # kernel calls: the 6 sparse calls and the sparse half of the 2 captures
    assert 0 < r["density"] < 1 and r["kernel_backends"] == {"cpu": 8}
    assert r["stats"]["fallbacks"] == {} and r["stats"]["forwards"] == 4
    assert r["dense_backend"] == "SDPA default" and list(r["dense_probe_s"]) == [
        "SDPA default"
    ]  # no cuDNN here
    assert r["warmup_s"]["dense"] > 0 and r["warmup_s"]["preset"] > 0


def test_real_shape_panel_prints_and_writes_the_timing(tiny_timing, tmp_path):
    panel = demo.real_shape_panel(tiny_timing, "preset testbed/balanced", full_layers=30)
    fast = panel.rows[1]
    assert fast[4] == f"{tiny_timing['speedup']:.2f}x" and fast[5] == f"{tiny_timing['density']:.2f}"
    assert "kernels: cpu 8" in fast[1] and "6 sparse / 2 dense calls" in fast[1]
    assert (
        panel.notes[0].startswith("Speed only: random weights")
        and "2 of 30 layers (time-boxed" in panel.notes[0]
    )
    assert (
        "residual capture (WA-RS) 2" in panel.notes[1] and "whole 4-step schedule" in panel.notes[1].lower()
    )
    page = demo.write_html(tmp_path, ["run"], [["dense"]], [], [], panel).read_text()
    assert panel.title in page and f"{tiny_timing['speedup']:.2f}x" in page and "Speed only" in page


def test_demo_runs_the_panel_with_its_settings(monkeypatch, tmp_path, capsys):
    """The demo's GPU path on the CPU: its shape swapped for the tiny one, --real-layers 1 time-boxes it."""
    calls = []

    def spy(shape, plan, device, steps):
        calls.append((shape, plan, device, steps))
        return time_real_shape(shape, plan, device=device, steps=steps, dtype=torch.float32)

    monkeypatch.setattr(demo, "WAN_13B", TINY_SHAPE)
    monkeypatch.setattr(demo, "time_real_shape", spy)
    s = demo.check_demo_args(out=tmp_path, device="cpu", frames=2, size=32, real_steps=3, real_layers=1)
    s = dataclasses.replace(s, real_shape=True, plan=make_plan("testbed", "balanced", block_size=16))
    result, panel = demo._real_shape(s, demo_console())
    assert calls == [(TINY_SHAPE.with_layers(1), s.plan, "cpu", 3)] and len(result["preset_step_s"]) == 3
    out = capsys.readouterr().out
    assert "1 of 2 layers (time-boxed by --real-layers)" in out and "Speed only" in out and not panel.skip


def demo_console():
    from rich.console import Console

    return Console(width=200)
