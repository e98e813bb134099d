"""``fastattn demo``: bad arguments fail at once (one line, exit status 2, nothing sampled), the GPU figures
it quotes come from the committed benchmark JSON, and a tiny run writes the HTML page with the clips."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from fastattn.cli import main
from fastattn.testbed import demo

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


def test_whole_schedule_speed_is_quoted_when_measured(tmp_path):
    row = {"model": "M", "resolution": "8x8", "preset": "fast", "speedup": 1.5, "method": "radial",
           "quant": "none", "device": "GPU X", "schedule_measured": {"steps": 50, "speedup": 1.25}}  # fmt: skip
    (tmp_path / "e2e-nvidia_h200.json").write_text(json.dumps([row, {**row, "preset": "safe"}]))
    assert demo.gpu_expectations("fast", tmp_path) == [
        "M 8x8: 1.25x over a whole 50-step schedule (radial, quant none; GPU X, e2e-nvidia_h200.json)"
    ]


def test_tiny_run_writes_the_page_with_clips_and_table(tmp_path):
    r = demo.run_demo(out=tmp_path, steps=2, device="cpu", frames=2, size=32, clips=1)
    page = (tmp_path / "demo.html").read_text()
    assert 'src="demo.gif"' in page and 'src="demo.png"' in page
    assert (tmp_path / "demo.gif").stat().st_size > 1000
    assert (
        f"{r['psnr']:.2f}" in page and "preset testbed/balanced" in page and "GPU figures to expect" in page
    )
    assert r["stats"]["sparse_calls"] > 0 and r["stats"]["fallbacks"] == {}
    assert r["warmup_s"] > 0 and r["speedup"] == pytest.approx(r["dense_s"] / r["fast_s"])
