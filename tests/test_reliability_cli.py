"""The command line at its edges: one-line errors with exit status 2, ``--version``, ``bench --cpu-smoke``
progress, ``fastattn eval``'s output folder and partial results; and the test layout under a checkout folder
that is not named ``fastattn``."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fastattn import __version__
from fastattn.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _exit(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def _one_line_error(code, err: str, command: str, *words: str) -> None:
    assert code == 2, (code, err)
    # stderr may also hold the libraries' loading bars; the error is the last line, and the only one
    lines = [line for line in err.strip().splitlines() if f"fastattn {command}: error" in line]
    assert len(lines) == 1 and err.strip().endswith(lines[0]), err
    assert lines[0].startswith(f"fastattn {command}: error: ") and "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_version(capsys):
    code, out, _ = _exit(["--version"], capsys)
    assert code == 0 and out.strip() == f"fastattn {__version__}"


def test_preset_errors_are_one_line_with_status_2(capsys, tmp_path):
    code, _, err = _exit(["preset", "inspect", str(tmp_path / "nowhere")], capsys)
    _one_line_error(code, err, "preset", "nowhere")
    bad = tmp_path / "plan.json"
    bad.write_text("{not json")
    code, _, err = _exit(["preset", "push", str(bad), "me/repo"], capsys)
    _one_line_error(code, err, "preset", "plan.json")


def test_bench_cpu_smoke_prints_progress(monkeypatch, capsys):
    import fastattn.attn_kernels as kernels

    # The real kernels take minutes in the interpreter; the progress lines are what is tested here.
    def reference(q, k, v, mask, quant="none", perm=None, backend=None):
        return kernels.attention_reference(q.float(), k.float(), v.float(), mask, perm=perm)[0]

    monkeypatch.setattr(kernels, "sparse_attention", reference)
    main(["bench", "--cpu-smoke"])
    err = capsys.readouterr().err
    lines = [line.strip() for line in err.splitlines() if line.strip().startswith("[")]
    assert (
        len(lines) == 24
        and lines[0].startswith("[1/24] dense, quant none")
        and lines[-1].startswith("[24/24]")
    )
    assert "reordered" in lines[1]


# ------------------------------------------------------------------------------------------ fastattn eval

_spec = importlib.util.spec_from_file_location(
    "_fa_eval_tests", Path(__file__).with_name("test_evaluation.py")
)


@pytest.fixture(scope="module")
def eval_tests():
    pytest.importorskip("diffusers")
    module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory, eval_tests):
    path = tmp_path_factory.mktemp("tiny-wan-cli") / "pipe"
    eval_tests._full_wan_pipe().save_pretrained(str(path))
    return str(path)


def _eval_args(eval_tests, pipe_dir, out, *extra):
    argv = eval_tests._args(pipe_dir, out, *extra)
    i = argv.index("--seeds")
    argv[i : i + 3] = ["--seeds", "0"]  # one seed, no warm-up, no probe: the edges, quickly
    return ["eval", *argv, "--no-warmup", "--attn-layers", "0"]


def test_eval_unwritable_out_fails_before_any_work(eval_tests, pipe_dir, tmp_path, capsys, monkeypatch):
    import fastattn.evaluation.evaluate as ev

    calls = []
    monkeypatch.setattr(ev, "_run_once", lambda *a, **k: calls.append(1))
    code, _, err = _exit(_eval_args(eval_tests, pipe_dir, "/proc/fastattn-x", "--method", "dense"), capsys)
    _one_line_error(code, err, "eval", "/proc/fastattn-x")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    code, _, err = _exit(_eval_args(eval_tests, pipe_dir, a_file / "sub", "--method", "dense"), capsys)
    _one_line_error(code, err, "eval", "not a writable folder")
    code, _, err = _exit(_eval_args(eval_tests, pipe_dir, a_file, "--method", "dense"), capsys)
    _one_line_error(code, err, "eval", "is a file")
    assert calls == []  # no pipeline call ran


def test_eval_impossible_density_exits_2_and_keeps_the_results(eval_tests, pipe_dir, tmp_path, capsys):
    out = tmp_path / "report"
    argv = _eval_args(eval_tests, pipe_dir, out, "--method", "dense", "--method", "window3d:0.01")
    code, _, err = _exit(argv, capsys)
    _one_line_error(code, err, "eval", "'window3d:0.01' failed", "impossible", "report.json")
    report = json.loads((out / "report.json").read_text())
    assert "partial" not in report and [c["label"] for c in report["configs"]] == ["dense", "window3d:0.01"]
    assert "error" not in report["configs"][0] and (out / "report.html").exists()


def test_eval_stopped_midway_leaves_a_partial_report(eval_tests, pipe_dir, tmp_path, capsys, monkeypatch):
    import fastattn.evaluation.evaluate as ev

    real = ev._evaluate_config

    def second_is_interrupted(pipe, config, *args):
        if config.label == "window3d:0.5":
            raise KeyboardInterrupt  # the user pressed Ctrl-C (or the job was killed) during config 2
        return real(pipe, config, *args)

    monkeypatch.setattr(ev, "_evaluate_config", second_is_interrupted)
    out = tmp_path / "report"
    with pytest.raises(KeyboardInterrupt):
        main(_eval_args(eval_tests, pipe_dir, out, "--method", "dense", "--method", "window3d:0.5"))
    report = json.loads((out / "report.json").read_text())
    assert report["partial"] is True and report["dense"]["time_s"] > 0
    assert [c["label"] for c in report["configs"]] == ["dense"] and report["configs"][0]["runs"]


def test_eval_report_that_cannot_be_written_at_the_end_is_saved_elsewhere(
    eval_tests, pipe_dir, tmp_path, capsys, monkeypatch
):
    import fastattn.evaluation.report as rp

    def disk_full(report, out_dir):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rp, "write_report", disk_full)
    code, _, err = _exit(_eval_args(eval_tests, pipe_dir, tmp_path / "r", "--method", "dense"), capsys)
    _one_line_error(code, err, "eval", "No space left on device", "saved it as")
    saved = Path(err.strip().rsplit("saved it as ", 1)[1])
    try:
        assert json.loads(saved.read_text())["configs"][0]["label"] == "dense"
    finally:
        saved.unlink()


# ------------------------------------------------------------------------- checkout folder's name


def test_tests_run_in_a_checkout_not_named_fastattn(tmp_path):
    """A zip download unpacks as ``fastattn-main``: the README's ``pytest -q tests`` must work there too.

    The repository root is the package, so pytest would collect the root as a package named after the folder
    and import its ``__init__.py`` outside any package (its relative imports fail). ``tests/pytest.ini`` makes
    ``tests/`` the rootdir, so the root is never collected."""
    clone = tmp_path / "fastattn-main"
    (clone / "tests").mkdir(parents=True)
    for name in ("__init__.py", "pyproject.toml"):
        shutil.copy(ROOT / name, clone / name)
    for name in ("conftest.py", "pytest.ini"):
        if (ROOT / "tests" / name).exists():
            shutil.copy(ROOT / "tests" / name, clone / "tests" / name)
    (clone / "tests" / "test_imports.py").write_text(
        "import fastattn\n\n\ndef test_it():\n    assert fastattn.TokenLayout is not None\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "1 passed" in run.stdout
