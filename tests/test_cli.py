"""The command line: ``fastattn demo`` on the shipped testbed weights (tiny size), and the verbs' wiring."""

from __future__ import annotations

import pytest
from fastattn.cli import BENCHMARKS, build_parser, main


def test_demo_writes_grid_and_reports_quality(tmp_path, capsys):
    main(["demo", "--out", str(tmp_path), "--frames", "2", "--size", "32", "--steps", "3", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert (tmp_path / "demo.png").stat().st_size > 1000 and (tmp_path / "demo.gif").stat().st_size > 1000
    assert "preset testbed/balanced" in printed and "PSNR" in printed


def test_demo_with_a_method_and_the_run_demo_api(tmp_path):
    from fastattn.testbed.demo import run_demo

    r = run_demo(out=tmp_path, labels=(3,), steps=3, method="window3d", density=0.5, device="cpu", frames=2,
                 size=32)  # fmt: skip
    assert r["stats"]["plan"]["method"] == "window3d" and r["stats"]["sparse_calls"] > 0
    assert 0.4 < r["attention_density"] < 1.0 and 10 < r["psnr"] < float("inf") and 0 < r["ssim"] < 1


def test_verbs_and_bad_input():
    ap = build_parser()
    assert ap.parse_args(["eval", "some/path", "--prompts", "a cat"]).command == "eval"
    assert ap.parse_args(["calibrate", "--testbed", "--target-density", "0.3", "--out", "x"]).command == "calibrate"
    assert set(BENCHMARKS) == {
        "kernels",
        "e2e",
        "quality",
        "calibrate",
        "kvcache-quality",
        "kvcache-speed",
        "kvcache-prefix",
    }
    with pytest.raises(SystemExit):
        ap.parse_args(["bench", "nonsense"])
    with pytest.raises(SystemExit) as exc:  # one-line error, exit status 2 (tests/test_demo.py)
        main(
            ["demo", "--preset", "turbo", "--frames", "2", "--size", "32", "--steps", "2", "--device", "cpu"]
        )
    assert exc.value.code == 2
