"""The training script end to end (tiny, CPU), loading its weights, and the attention analysis."""

from __future__ import annotations

import json
import math

import torch
from fastattn.testbed import analyze, train
from fastattn.testbed.sample import load_testbed, sample


def test_tiny_training_saves_loadable_weights_and_analysis(tmp_path):
    meta = train.main(
        ["--out", str(tmp_path), "--tiny", "--steps", "5", "--log-every", "1", "--device", "cpu"]
    )
    assert meta["train"]["steps"] == 5
    curve = json.loads((tmp_path / "loss.json").read_text())["curve"]
    losses = [v for e in curve for k, v in e.items() if k.startswith("loss")]
    assert len(curve) == 5 and all(math.isfinite(v) and v > 0 for v in losses)
    assert math.isfinite(meta["results"]["heldout_loss_ema_mean"])

    model = load_testbed(tmp_path)
    assert model.cfg.depth == 2 and next(model.parameters()).dtype == torch.float32
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if n.startswith("out."))  # trained
    clip = sample(model, [0], frames=2, size=16, num_steps=2)
    assert clip.shape == (1, 2, 3, 16, 16) and torch.isfinite(clip).all()

    stats = analyze.main(
        ["--weights", str(tmp_path), "--times", "0.5", "--clips", "1", "--queries", "16", "--no-plot"]
    )
    saved = json.loads((tmp_path / "attention_stats.json").read_text())
    assert len(saved["heads"]) == model.cfg.depth * model.cfg.heads == len(stats["heads"])
    for h in saved["heads"]:
        assert 0 <= h["local_3x3x3"] <= h["window_5x7x7"] <= 1 + 1e-6
        assert 0 < h["entropy"] <= 1 + 1e-6


def test_head_stats_tell_local_from_uniform():
    grid = (3, 4, 4)
    pos = analyze.grid_coords(grid)
    q = analyze.query_sample(grid, 5)
    s = pos.shape[0]
    uniform = torch.full((1, 1, len(q), s), 1.0 / s)
    diag = torch.zeros(1, 1, len(q), s)
    diag[0, 0, torch.arange(len(q)), q] = 1.0  # each query attends only to itself
    u = analyze.head_stats(uniform, pos[q], pos)
    d = analyze.head_stats(diag, pos[q], pos)
    assert float(d["local_3x3x3"][0]) == 1 and float(d["same_position"][0]) == 1
    assert float(d["entropy"][0]) == 0 and abs(float(u["entropy"][0]) - 1) < 1e-6
    assert float(u["local_3x3x3"][0]) < 0.5
    assert (
        analyze.classify({k: float(v[0]) for k, v in d.items()}, {k: float(v[0]) for k, v in u.items()})
        == "local"
    )
