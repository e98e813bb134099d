"""The GPU benchmark scripts' logic, on their tiny CPU configurations (numbers are meaningless here)."""

import json

import pytest

pytest.importorskip("diffusers")


def test_e2e_tiny_times_schedules_and_extra_plans(tmp_path):
    from fastattn.bench import e2e

    out = tmp_path / "e2e.json"
    extra = [dict(name="dyn", method="dynamic", min_density=0.3, max_density=0.3, top_p=1.0, dense_steps=1,
                  residual=True, residual_refresh=4, reuse_steps=2)]  # fmt: skip
    # no --schedule-steps: whole schedules are the default headline (4 steps in the tiny check)
    rc = e2e.main(["--tiny", "--only", "Wan", "--extra-plans", json.dumps(extra), "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    recs = {r["preset"]: r for r in (data["records"] if isinstance(data, dict) else data)}
    assert set(recs) == {"balanced", "fast", "dyn"}
    for r in recs.values():
        sched = r["schedule_measured"]
        assert (
            sched["steps"] == 4 and sched["ms"] > 0 and sched["baseline_ms"] > 0 and 0 < sched["density"] <= 1
        )
        assert r["headline_speedup"] == sched["speedup"] and r["headline"] == "whole 4-step schedule, measured"
        assert r["schedule_steps_estimate"] == 4 and r["schedule_speedup_estimate"] > 0
    dyn = recs["dyn"]["schedule_measured"]
    assert dyn["selection_reuses"] > 0 and dyn["planned_dense"].get("residual capture (WA-RS)", 0) > 0
    with pytest.raises(SystemExit, match="needs a 'name'"):
        e2e.main(["--tiny", "--extra-plans", '[{"method": "dense"}]'])


def test_tile_sweep_parses_variants_and_needs_a_gpu():
    """The sweep's variant syntax maps onto the kernel's Tiles; without a GPU it stops with a clear message."""
    import torch
    from fastattn.attn_kernels.triton_attention import Tiles
    from fastattn.bench import tile_sweep

    assert tile_sweep.parse_tiles("128,4,3,64,0;64,8,2,0,1") == [
        (128, 4, 3, 64, False),
        (64, 8, 2, None, True),
    ]
    assert Tiles(*tile_sweep.TILES[0]) == Tiles(128, 8, 3)
    assert set(tile_sweep.MASKS) == set(tile_sweep.SHAPES)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            tile_sweep.main(["--shapes", "wan1.3b"])
