"""``bench/preset_quality.py``: every family preset's own plan file scored on the testbed (tiny CPU model here;
the numbers are meaningless, the rows, identities, adaptation notes and errors are what is checked)."""

import hashlib
import json

import pytest
from fastattn.bench import preset_quality
from fastattn.plans.files import load_plan
from fastattn.presets import PRESET_DIR


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pq") / "pq.json"
    rc = preset_quality.main(
        ["--tiny", "--families", "wan,flux,cogvideox", "--presets", "safe,fast", "--out", str(out)]
    )
    assert rc == 0
    return json.loads(out.read_text())


def test_tiny_run_has_a_scored_row_per_family_preset(tiny_run):
    rows = tiny_run["rows"]
    assert [(r["family"], r["preset"]) for r in rows] == [
        ("wan", "safe"), ("wan", "fast"), ("flux", "safe"), ("flux", "fast"), ("cogvideox", "safe"),
        ("cogvideox", "fast"),
    ]  # fmt: skip
    for r in rows:
        assert r["target_db"] == {"safe": 35.0, "fast": 24.0}[r["preset"]]
        assert r["psnr"] > 0 and 0 < r["attention_density"] <= 1
        assert r["met"] == (r["psnr"] >= r["target_db"])
        assert r["knobs"]["method"] == r["method"]
        assert r["seconds"] > 0 and r["wall_s"] >= 0
    # the table says the same as the rows
    assert tiny_run["table"]["wan"]["safe"] == {"psnr": rows[0]["psnr"], "met": rows[0]["met"]}
    assert tiny_run["device"] == "cpu" and tiny_run["steps"] == 4


def test_plan_identity_is_the_shipped_file(tiny_run):
    for r in tiny_run["rows"]:
        d = PRESET_DIR / "plans" / f"{r['family']}-{r['preset']}"
        assert r["plan_json_sha256"] == _sha(d / "plan.json")
        assert r["plan_tensors_sha256"] is None  # structural presets have no head table
        assert r["same_as_enable_preset"] is True
        assert r["knobs"] == load_plan(d).plan.to_dict()


def test_adapted_notes_say_what_changed(tiny_run):
    rows = {(r["family"], r["preset"]): r for r in tiny_run["rows"]}
    flux_safe = rows["flux", "safe"]
    assert flux_safe["method"] == "arrow"
    notes = " ".join(flux_safe["adapted"])
    assert "no text" in notes and "band" in notes
    assert any("block_size 128 -> 16" in n for n in flux_safe["adapted"])  # the tiny model's only change
    assert flux_safe["dense_layers_here"] == [0, 1]  # [0, -1] on the tiny model's 2 layers
    wan_safe = rows["wan", "safe"]
    assert wan_safe["dense_steps_here"] == round(0.2 * 4)
    assert any("dense_steps 0.2" in n for n in wan_safe["adapted"])
    # cogvideox/safe is the same plan as wan/safe on this run: measured once, recorded for both
    cog = rows["cogvideox", "safe"]
    assert cog["measured_with"] == "wan/safe" and wan_safe["measured_with"] is None
    assert cog["psnr"] == wan_safe["psnr"] and cog["plan_json_sha256"] != wan_safe["plan_json_sha256"]


def test_unknown_family_or_preset_is_a_clear_error():
    with pytest.raises(SystemExit, match=r"unknown famil.*'mochi'.*valid: .*'wan'"):
        preset_quality.main(["--tiny", "--families", "wan,mochi"])
    with pytest.raises(SystemExit, match=r"unknown preset.*'turbo'.*valid: .*'balanced'"):
        preset_quality.main(["--tiny", "--presets", "turbo"])
    with pytest.raises(SystemExit, match=r"--clips must be in 1\.\.8"):
        preset_quality.main(["--tiny", "--clips", "0"])


def test_summarize_renders_the_table(tiny_run):
    from fastattn.bench.summarize import preset_quality_table

    md = preset_quality_table(tiny_run)
    lines = md.splitlines()
    assert lines[0].startswith("| family | safe") and "balanced" in lines[0]
    wan = next(x for x in lines if x.startswith("| wan |"))
    r = tiny_run["rows"][0]
    assert f"{r['psnr']:.1f}" in wan and ("✓" if r["met"] else "✗") in wan
    assert "| — |" in wan  # balanced was not run
