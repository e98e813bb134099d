"""``bench/comfyui.py --tiny``: the ComfyUI step-time benchmark's logic on tiny models, on the CPU.

Runs only where ``COMFYUI_DIR`` points at a ComfyUI source checkout (ComfyUI is GPL-3.0 and none of its code is
in this repository). The benchmark runs in a subprocess under the host's Python, ``COMFYUI_PYTHON`` (default: this
interpreter), which needs ComfyUI's requirements and fastattn (README, Development). Numbers are meaningless here:
this checks that every variant gets a record, the timed steps are sparse steps of the Fast Attention node, and
peers that cannot run here are recorded as skipped with a reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
if not COMFYUI_DIR:
    pytest.skip("ComfyUI benchmark test: set COMFYUI_DIR to a ComfyUI source checkout to run it",
                allow_module_level=True)  # fmt: skip

VARIANTS = {"default", "fastattn-balanced", "fastattn-fast", "kitchen-int8", "kitchen-sol"}
MODELS = {"Wan2.1-T2V-1.3B", "FLUX.1-dev"}


def test_comfyui_bench_tiny_records_every_variant(tmp_path):
    out = tmp_path / "comfyui.json"
    env = dict(os.environ, COMFYUI_DIR=os.path.abspath(COMFYUI_DIR), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)  # the tiny run takes fastattn's reference path on the CPU
    proc = subprocess.run(
        [os.environ.get("COMFYUI_PYTHON", sys.executable), str(ROOT / "bench" / "comfyui.py"), "--tiny",
         "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = json.loads(out.read_text())
    assert {(r["model"], r["variant"]) for r in records} == {(m, v) for m in MODELS for v in VARIANTS}
    assert "ms/step" in proc.stdout.splitlines()[-len(records) - 1]  # the table comes last
    for r in records:
        assert r["bench"] == "comfyui" and r["comfyui"] and r["comfy_attention"]
        if r["variant"].startswith("kitchen-") and "step_ms" not in r:
            assert r["skipped"]  # comfy_kitchen missing, or int8 on the CPU: recorded with the reason
            continue
        assert r.get("error") is None and r["step_ms"] > 0 and r["finite"], r
        assert r["speedup_vs_default"] > 0 and r["default_step_ms"] > 0
        if r["variant"].startswith("fastattn-"):
            assert r["timed_steps_sparse"], r  # the timed steps are past the preset's dense steps
            assert 0 < r["density"] < 1 and r["sparse_calls"] > 0 and r["fallback_calls"] == 0, r
            assert r["preset"] == r["variant"].split("-", 1)[1] and r["plan"]["dense_steps"] is not None
            assert r["out_rel_l2_vs_default"] < 0.2
        elif r["variant"] == "kitchen-sol":  # comfy_kitchen's eager reference on the CPU
            assert r["served_calls"] > 0 and r["sol_backend"].startswith("eager"), r
    by = {(r["model"], r["variant"]): r for r in records}
    wan = by[("Wan2.1-T2V-1.3B", "fastattn-balanced")]
    assert wan["batch"] == 2 and wan["tokens"] == 3 * 16 * 16 and wan["model_config"] == "WAN21_T2V"
    assert by[("FLUX.1-dev", "default")]["model_config"] == "Flux"
    kitchen = by[("FLUX.1-dev", "kitchen-int8")]
    assert "step_ms" not in kitchen and kitchen["skipped"]  # no CPU kernel for INT8 attention
