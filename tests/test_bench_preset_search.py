"""``bench/preset_search.py``: candidate plans scored on the testbed and timed as whole schedules with the same plan
object, per tier the fastest meeting the PSNR (tiny CPU models here: the numbers are meaningless; identities,
selection, written plan folders and errors are what is checked)."""

import json

import pytest

pytest.importorskip("diffusers")

from fastattn.bench import preset_search  # noqa: E402
from fastattn.plans import load_plan, make_plan  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("ps")
    out, plans = d / "wan.json", d / "plans"
    args = ["--family", "wan", "--tiny", "--targets", "0,0,0", "--out", str(out), "--write-plans", str(plans)]
    assert preset_search.main(args) == 0
    return json.loads(out.read_text()), out, plans


def test_every_row_measures_one_plan_for_quality_and_speed(tiny_run):
    record = tiny_run[0]
    assert record["family"] == "wan" and record["shape"] == "wan1.3b_480p" and record["targets_db_lowered"]
    assert record["dense"]["ms"] > 0 and record["testbed"]["tiny"] is True
    rows = record["rows"]
    assert len(rows) == 2
    for r in rows:
        q, s = r["quality"], r["speed"]
        assert (
            q["psnr"] > 0 and s["ms"] > 0 and s["speedup"] == pytest.approx(record["dense"]["ms"] / s["ms"])
        )
        assert q["plan_sha256"] == r["plan_sha256"] == s["plan_sha256"]  # the plans the two handles ran
        assert r["plan"] == make_plan("wan", **r["kwargs"]).to_dict()
        if "timed_as" not in s:
            assert s["timed_plan_sha256"] == r["plan_sha256"]
    plain, cached = rows
    assert plain["tiers"] == ["safe", "balanced", "fast"] and "timed_as" not in plain["speed"]
    # the cached candidate competes for fast only; its auto trigger is timed as the fixed schedule it produced
    assert cached["tiers"] == ["safe", "balanced", "fast"] and cached["quality"]["last_clip_schedule"] == [1]
    assert "blocks='fixed' at skip_fraction 0.500" in cached["speed"]["timed_as"]
    assert (
        cached["speed"]["timed_plan_sha256"] != cached["plan_sha256"]
        and cached["speed"]["blocks_skipped"] > 0
    )


def test_selection_is_the_fastest_eligible_row(tiny_run):
    record = tiny_run[0]
    for tier, sel in record["selection"].items():
        eligible = [r for r in record["rows"] if tier in r["tiers"] and r["quality"]["psnr"] >= 0]
        best = max(eligible, key=lambda r: r["speed"]["speedup"])
        assert sel["label"] == best["label"] and sel["speedup"] == best["speed"]["speedup"]
        assert sel["target_x"] == record["targets_x"][tier]
        assert sel["target_x_met"] == (sel["speedup"] >= sel["target_x"])
    fast, balanced = record["selection"]["fast"], record["selection"]["balanced"]
    assert fast["over_balanced"] == pytest.approx(fast["speedup"] / balanced["speedup"])


def _row(name, db, x=None, tiers=("safe", "balanced", "fast"), attn=0.5):
    speed = {"speedup": x} if x is not None else {"skipped": "time budget"}
    return {"label": name, "plan_sha256": name, "kwargs": {}, "tiers": list(tiers),
            "quality": {"psnr": db, "attention_fraction": attn}, "speed": speed}  # fmt: skip


def test_select_and_speed_order_on_synthetic_rows():
    targets_db = {"safe": 35.0, "balanced": 28.0, "fast": 24.0}
    targets_x = {"safe": 1.0, "balanced": 1.7, "fast": 2.04}
    rows = [_row("fastest-but-blurry", 23.0, 4.0, attn=0.1), _row("cache", 25.0, 3.0, tiers=["fast"], attn=0.2),
            _row("mid", 29.0, 1.8, attn=0.3), _row("exact-ish", 36.0, 1.1, attn=0.6),
            _row("untimed", 37.0, None, attn=0.5)]  # fmt: skip
    sel = preset_search.select(rows, targets_db, targets_x)
    assert (
        sel["safe"]["label"] == "exact-ish" and sel["safe"]["meeting_psnr"] == 2 and sel["safe"]["timed"] == 1
    )
    assert sel["balanced"]["label"] == "mid" and sel["balanced"]["target_x_met"] is True
    assert sel["fast"]["label"] == "cache" and sel["fast"]["over_balanced"] == pytest.approx(3.0 / 1.8)
    assert sel["fast"]["over_balanced_met"] is True
    # cached rows never serve safe/balanced, however fast
    sel = preset_search.select([_row("cache", 40.0, 9.0, tiers=["fast"])], targets_db, targets_x)
    assert "label" not in sel["safe"] and sel["safe"]["reason"] == "no candidate reached 35 dB"
    assert sel["fast"]["label"] == "cache"
    sel = preset_search.select([_row("untimed", 37.0)], targets_db, targets_x)
    assert sel["safe"]["reason"] == "1 candidate(s) reached 35 dB but none was timed"
    # timing order: per tier its cheapest candidate first, then the rest cheapest first; blurry rows not at all
    order = [r["label"] for r in preset_search.speed_order(rows, targets_db)]
    assert order == ["cache", "mid", "untimed", "exact-ish"]


def test_write_plans_load_back_equal(tiny_run):
    record, out, plans = tiny_run
    assert sorted(record["written_plans"]) == sorted(
        str(plans / f"wan-{t}") for t in ("safe", "balanced", "fast")
    )
    rows = {r["plan_sha256"]: r for r in record["rows"]}
    for tier, sel in record["selection"].items():
        loaded = load_plan(plans / f"wan-{tier}")
        row = rows[sel["plan_sha256"]]
        assert loaded.plan == make_plan("wan", **row["kwargs"]) and loaded.plan.to_dict() == row["plan"]
        assert preset_search.plan_sha(loaded.plan) == sel["plan_sha256"]
        meta = loaded.meta
        assert meta.creator == "fastattn.bench.preset_search" and meta.creator_params == row["kwargs"]
        assert meta.model.family == "wan" and out.name in meta.doc and f"{sel['psnr']:.2f} dB" in meta.doc
        assert f"{sel['speedup']:.2f}x" in meta.doc


def test_quality_from_reuses_rows_by_plan_across_families(tiny_run, tmp_path):
    first, path, _ = tiny_run
    # another testbed definition is refused
    other = json.loads(path.read_text())
    other["testbed"]["steps"] = 16
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="scored another testbed definition"):
        preset_search.main(
            ["--family", "hunyuan_video", "--tiny", "--quality-from", str(tmp_path / "other.json")]
        )
    # another family's run serves (the same kwargs build the same plan, the same sha): speed only is measured
    out = tmp_path / "hunyuan.json"
    args = ["--family", "hunyuan_video", "--tiny", "--targets", "0,0,0", "--quality-from", str(path), "--out", str(out)]  # fmt: skip
    assert preset_search.main(args) == 0
    again = json.loads(out.read_text())
    assert again["shape"] == "hunyuan_720p"
    for a, b in zip(first["rows"], again["rows"]):
        assert b["plan_sha256"] == a["plan_sha256"] and b["quality"]["reused_from"] == str(path)
        assert b["quality"]["psnr"] == a["quality"]["psnr"]
        assert b["speed"]["plan_sha256"] == b["plan_sha256"] and b["speed"]["ms"] > 0
        assert b["speed"]["family_of_model"] == "hunyuan_video"


def test_family_without_a_real_shape_selects_by_testbed_cost(tmp_path):
    cands = tmp_path / "c.json"
    cands.write_text(json.dumps([{"method": "window3d", "density": 0.6, "clamp_density": True, "name": "wide"},
                                 {"method": "arrow", "density": 0.3, "clamp_density": True}]))  # fmt: skip
    out = tmp_path / "sd3.json"
    args = ["--family", "sd3", "--tiny", "--targets", "0,0,0", "--candidates", str(cands), "--out", str(out)]
    assert preset_search.main(args) == 0
    record = json.loads(out.read_text())
    assert [r["label"] for r in record["rows"]] == ["wide", "arrow d=0.3"]
    assert all("no real shape" in r["speed"]["skipped"] for r in record["rows"])
    cheapest = min(record["rows"], key=lambda r: r["quality"]["attention_fraction"])
    for sel in record["selection"].values():
        assert (
            sel["label"] == cheapest["label"]
            and sel["speedup"] is None
            and "no real shape" in sel["chosen_by"]
        )


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match=r"unknown family 'mochi'; valid: .*'wan'"):
        preset_search.main(["--family", "mochi", "--tiny"])
    with pytest.raises(
        SystemExit, match=r"unknown shape 'flux_2048' for family 'wan'; valid: \['wan1.3b_480p'"
    ):
        preset_search.main(["--family", "wan", "--shape", "flux_2048", "--tiny"])
    with pytest.raises(SystemExit, match=r"--targets must be 3 numbers"):
        preset_search.main(["--family", "wan", "--tiny", "--targets", "30,20"])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit, match=r"--candidates: cannot read .* as JSON"):
        preset_search.main(["--family", "wan", "--tiny", "--candidates", str(bad)])
    bad.write_text('{"method": "window3d"}')
    with pytest.raises(SystemExit, match=r"must hold a non-empty JSON list of plan keyword objects"):
        preset_search.main(["--family", "wan", "--tiny", "--candidates", str(bad)])
    bad.write_text('[{"method": "window3d", "density": 0.3}, {"method": "window3d", "densty": 0.3}]')
    with pytest.raises(SystemExit, match=r"candidate 1 .*unknown field\(s\) \['densty'\]"):
        preset_search.main(["--family", "wan", "--tiny", "--candidates", str(bad)])
    bad.write_text(
        '[{"method": "radial", "density": 0.2}, {"method": "radial", "density": 0.2, "name": "again"}]'
    )
    with pytest.raises(SystemExit, match=r"candidates 0 and 1 build the same plan"):
        preset_search.main(["--family", "wan", "--tiny", "--candidates", str(bad)])
