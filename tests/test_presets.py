"""Structural presets: every family's safe/balanced/fast builds a plan; errors list valid choices."""

from __future__ import annotations

import json

import pytest
from fastattn.plans import make_plan
from fastattn.presets import LEVELS, preset_names, resolve_preset, structural_presets

FAMILIES = ("wan", "hunyuan_video", "cogvideox", "ltx_video", "flux", "flux2", "qwen_image", "sd3")


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_has_documented_levels(family):
    presets = structural_presets()[family]
    assert tuple(presets) == LEVELS
    densities = []
    for level in LEVELS:
        p = presets[level]
        assert "doc" in p and f"{round(p['density'] * 100)}%" in p["doc"]
        plan = make_plan(family, level)
        assert plan.method.density == p["density"] and plan.quant == p["quant"]
        densities.append(p["density"])
    assert densities == sorted(densities, reverse=True)  # safe is the densest


def test_overrides_and_explicit_family():
    plan = make_plan("wan", "wan/balanced", quant="none", dense_steps=0)
    assert plan.quant == "none" and plan.dense_steps == 0 and plan.method.name == "window3d"


def test_errors_list_valid_choices(tmp_path):
    with pytest.raises(
        ValueError, match=r"valid presets here: \['flux/safe', 'flux/balanced', 'flux/fast'\]"
    ):
        resolve_preset("turbo", "flux")
    with pytest.raises(ValueError, match="is for 'wan' models, but this model is 'flux'"):
        resolve_preset("wan/fast", "flux")
    with pytest.raises(ValueError, match="families"):
        resolve_preset("mochi/fast", "flux")
    with pytest.raises(ValueError, match="not both"):
        make_plan("wan", "safe", method="band")
    assert "sd3/fast" in preset_names()


def test_local_preset_file(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"family": "wan", "method": "radial", "density": 0.2, "quant": "int8"}))
    plan = make_plan("wan", str(path))
    assert plan.method.name == "radial" and plan.quant == "int8"
    with pytest.raises(ValueError, match="is for 'wan'"):
        make_plan("flux", str(path))


@pytest.mark.parametrize("family", FAMILIES)
def test_presets_serve_short_sequences_by_clamping_to_the_smallest_mask(family):
    """A preset's density may be below what a short layout allows (dense text rows/columns alone exceed
    it): the preset uses the smallest mask; the same density given explicitly is still an error."""
    from fastattn.masks import TokenLayout
    from fastattn.plans.methods import build_mask

    layout = TokenLayout.video(1, 32, 32, text_len=512, text_first=True)  # 512x512 FLUX-like: 1,536 tokens
    for level in LEVELS:
        plan = make_plan(family, level)
        mask = build_mask(plan.method, layout, 128)
        floor = build_mask(make_plan(family, level, density=1e-3, clamp_density=True).method, layout, 128)
        assert (
            mask.block_density() >= plan.method.density - 0.02
            or mask.block_density() == floor.block_density()
        )
    # A density the user asks for is checked, also on top of a preset.
    for explicit in (
        make_plan(family, method="window3d", density=0.05),
        make_plan(family, "fast", density=0.05),
    ):
        with pytest.raises(ValueError, match="impossible on this layout"):
            build_mask(explicit.method, layout, 128)


def test_clamping_warns_once_with_the_density_reached():
    from fastattn.masks import TokenLayout
    from fastattn.plans.methods import build_mask

    layout = TokenLayout.video(1, 24, 24, text_len=512, text_first=True)
    plan = make_plan("flux", "fast")
    with pytest.warns(
        UserWarning, match=r"density 0.15 is below the smallest mask .* using that mask, density 0\."
    ):
        build_mask(plan.method, layout, 128)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_mask(plan.method, layout, 128)  # once per layout


def test_clamp_density_must_be_a_bool():
    with pytest.raises(TypeError, match="clamp_density must be True or False"):
        make_plan("wan", method="window3d", density=0.3, clamp_density="yes")
