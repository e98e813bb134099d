"""Fast Attention Calibrate and Save Plan, against the fakes of ComfyUI's runtime contract in
``tests/test_comfy_contract.py`` (its tiny Wan-like model, ModelPatcher and sampler; no ComfyUI code)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from fastattn.nodes import calibrate as cal
from fastattn.nodes import fast_attention as fa
from fastattn.nodes.host import find_patch
from fastattn.plans.files import load_plan

_spec = importlib.util.spec_from_file_location(
    "fastattn_test_comfy_fakes", Path(__file__).with_name("test_comfy_contract.py")
)
fakes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fakes)


def fake_sample(model, *, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent):
    """What comfy.sample.sample does, as far as fastattn sees it: one sampler call over ``steps`` sigmas."""
    noise = torch.randn(latent["samples"].shape, generator=torch.Generator().manual_seed(seed))
    sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()
    return fakes.sample(model, noise, sigmas, positive)


LATENT = {"samples": fakes.WAN_X}
KW = dict(runs=2, steps=3, block_size=8, sample_fn=fake_sample, methods=("paro", "skip", "reuse"))


def test_calibrate_node_makes_a_plan_fast_attention_runs_and_save_plan_writes(tmp_path):
    model = fakes.wan_patcher()
    before = (dict(model.wrappers), dict(model.callbacks), dict(model.model_options["transformer_options"]))
    plan, text = cal.calibrate_model(model, fakes.CTX, fakes.CTX, LATENT, target_density=0.6, **KW)
    assert (
        dict(model.wrappers),
        dict(model.callbacks),
        dict(model.model_options["transformer_options"]),
    ) == before
    assert find_patch(model) is None  # the input MODEL was never patched
    assert isinstance(plan, fa.PlanChoice) and plan.meta.model.family == "wan" and plan.plan.heads is not None
    assert "expected attention work" in text and plan.report["summary"]["expected_work"] <= 0.6 + 1e-9
    fast = fa.apply_fast_attention(model, plan=plan)
    fakes.sample(fast, fakes.WAN_X, [1.0, 0.5, 0.25, 0.0], fakes.CTX)
    assert 0 < find_patch(fast).last["density"] <= 0.6 + 1e-6
    saved = cal.save_plan(plan, "wan-calibrated", output_dir=tmp_path)
    where = tmp_path / cal.PLAN_FOLDER / "wan-calibrated"
    assert saved == f"saved {where}" and (where / "report.json").exists()
    assert load_plan(where).meta.creator == "fastattn.calibrate"


def test_calibrate_node_residual_plan_shares_its_residual_in_fast_attention():
    model = fakes.wan_patcher()
    plan, text = cal.calibrate_model(model, fakes.CTX, fakes.CTX, LATENT, target_density=0.6, residual=True, **KW)
    assert plan.plan.residual and plan.report["summary"]["residual"]
    assert plan.report["summary"]["expected_work"] <= 0.6 + 1e-9
    fast = fa.apply_fast_attention(model, plan=plan)
    fakes.sample(fast, fakes.WAN_X, [1.0, 0.5, 0.25, 0.0], fakes.CTX)
    report = find_patch(fast).last
    assert 0 < report["density"] <= 0.6 + 1e-6
    assert "residual capture (WA-RS)" in str(report), report


def test_calibrate_and_save_plan_refuse_bad_input(tmp_path):
    with pytest.raises(fa.NodeError, match="needs a model fastattn serves"):
        cal.calibrate_model(
            fakes.ModelPatcher(fakes.BaseModel(fakes.NextDiT())), fakes.CTX, fakes.CTX, LATENT, **KW
        )
    patched = fa.apply_fast_attention(fakes.wan_patcher(), preset="balanced")
    with pytest.raises(fa.NodeError, match="already has Fast Attention applied"):
        cal.calibrate_model(patched, fakes.CTX, fakes.CTX, LATENT, **KW)
    with pytest.raises(fa.NodeError, match="latent_image must be a LATENT"):
        cal.calibrate_model(fakes.wan_patcher(), fakes.CTX, fakes.CTX, fakes.WAN_X, **KW)
    with pytest.raises(fa.NodeError, match="target_density 0.001 cannot be met"):
        cal.calibrate_model(fakes.wan_patcher(), fakes.CTX, fakes.CTX, LATENT, target_density=0.001,
                            **{**KW, "methods": ("window3d",)})  # fmt: skip
    plan = fa.load_plan_choice("wan-fast")
    with pytest.raises(fa.NodeError, match="use letters, digits"):
        cal.save_plan(plan, "../evil", output_dir=tmp_path)
    with pytest.raises(fa.NodeError, match="expected owner/name"):
        cal.save_plan(plan, "ok", hub_repo="not a repo", output_dir=tmp_path)
    with pytest.raises(fa.NodeError, match="must come from a Fast Attention Calibrate or Plan node"):
        cal.save_plan("plan", "ok", output_dir=tmp_path)
