"""Real-host test of Fast Attention Calibrate and Save Plan: a real ComfyUI (``COMFYUI_DIR``, run as in
``tests/test_comfyui_diffusion_host.py``, whose fixtures and graph builder this reuses) calibrates the tiny
random-weight Wan 2.1 checkpoint, the PLAN drives a Fast Attention node into a KSampler, and Save Plan writes the
plan under the output folder. Skipped without ``COMFYUI_DIR``."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

if not os.environ.get("COMFYUI_DIR"):
    pytest.skip(
        "real-host ComfyUI test: set COMFYUI_DIR to a ComfyUI source checkout", allow_module_level=True
    )

_spec = importlib.util.spec_from_file_location(
    "fastattn_test_comfy_diffusion_host", Path(__file__).with_name("test_comfyui_diffusion_host.py")
)
dh = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dh)
host, server = (
    dh.host,
    dh.server,
)  # the module's fixtures: a ComfyUI base with the checkpoints, a running host


def test_calibrate_node_plan_runs_in_fast_attention_and_save_plan_writes_it(server):
    g = dh.graph("wan", dh.apply_patch(), prefix="latents/wan_calibrated")
    g["cal"] = {
        "class_type": "FastAttnCalibrate",
        "inputs": {"model": ["1", 0], "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0],
                   "seed": 3, "runs": 1, "steps": 3, "cfg": 2.0, "sampler_name": "euler", "scheduler": "simple",
                   "target_density": 0.6, "residual": True},
    }  # fmt: skip
    g["fa"]["inputs"]["plan"] = ["cal", 0]
    g["save"] = {"class_type": "FastAttnSavePlan",
                 "inputs": {"plan": ["cal", 0], "name": "wan-calibrated-test", "hub_repo": "", "private": True}}  # fmt: skip
    entry = server.run(dh.with_report(g), timeout=600)
    assert entry["status"]["status_str"] == "success", (entry["status"]["messages"], server.log_tail())
    assert "residual capture (WA-RS)" in entry["outputs"]["rep"]["text"][0]  # the residual=True plan shares R
    out = dh.load_file(server.output_file(entry, "7"))["latent_tensor"]
    assert out.isfinite().all()
    report = entry["outputs"]["cal"]["text"][0]
    assert "expected attention work" in report
    saved = entry["outputs"]["save"]["text"][0]
    where = Path(server.output_dir) / "fastattn_plans" / "wan-calibrated-test"
    assert saved == f"saved {where}" and (where / "plan.json").is_file() and (where / "report.json").is_file()
