"""The testbed adapter: the product runtime and presets on the testbed DiT (tiny model, CPU)."""

from __future__ import annotations

import pytest
import torch
from fastattn.evaluation.metrics import psnr
from fastattn.testbed.fast import enable
from fastattn.testbed.model import TestbedConfig, TestbedDiT
from fastattn.testbed.sample import sample

KW = dict(frames=2, size=32, num_steps=4, seed=3)  # grid (2, 8, 8): 128 tokens, 8 blocks of 16


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = TestbedDiT(TestbedConfig.tiny()).eval()
    with torch.no_grad():  # adaLN-zero init would leave attention without effect
        for p in m.parameters():
            p.normal_(0.0, 0.2)
    return m


def test_dense_plan_is_bit_exact_and_disable_restores(model):
    ref = sample(model, [1, 2], **KW)
    custom = [blk.attn.attention_fn for blk in model.blocks]
    h = enable(model, method="dense", block_size=16)
    out = sample(model, [1, 2], **KW)
    st = h.stats()
    h.disable()
    assert torch.equal(out, ref)
    assert st["planned_dense"] == {"method dense": 4 * len(model.blocks)} and st["forwards"] == 4
    assert [blk.attn.attention_fn for blk in model.blocks] == custom
    assert "_fastattn_handle" not in model.__dict__
    assert torch.equal(sample(model, [1, 2], **KW), ref)


def test_sparse_plan_counts_steps_and_residual_captures(model):
    ref = sample(model, [1], **KW)
    h = enable(model, method="window3d", density=0.5, dense_steps=1, residual=True, block_size=16)
    out = sample(model, [1], **KW)
    st = h.stats()
    layers = len(model.blocks)
    # step 0 dense and, being the last dense step, it captures the residual; steps 1..3 sparse
    assert st["planned_dense"] == {"residual capture (WA-RS)": layers}
    assert st["sparse_calls"] == 3 * layers and st["fallbacks"] == {}
    assert 0.5 < st["density"] < 1.0 and st["residual_peak_bytes"] > 0
    assert st["residual_bytes"] == 0  # freed when the run's last step ended
    assert not torch.equal(out, ref) and 15 < float(psnr(out, ref)) < float("inf")
    # a second run starts over: the residuals of the first are dropped at step 0
    h.reset_stats()
    out2 = sample(model, [1], **KW)
    assert torch.equal(out2, out) and h.stats()["planned_dense"] == {"residual capture (WA-RS)": layers}
    h.disable()


def test_presets_resolve_enable_twice_replaces_and_bad_input(model):
    h1 = enable(model, "fast", block_size=16)
    h2 = enable(model, "balanced", block_size=16)
    assert not h1.enabled and h2.enabled and model.__dict__["_fastattn_handle"] is h2
    assert h2.stats()["plan"]["method"] == "dynamic" and h2.stats()["plan"]["residual"] is True
    sample(model, [0], **KW)
    assert h2.stats()["sparse_calls"] > 0
    h2.disable()
    with pytest.raises(ValueError, match="valid presets here"):
        enable(model, "turbo")
    with pytest.raises(ValueError, match="for 'wan' models"):
        enable(model, "wan/balanced")
    with pytest.raises(TypeError, match="TestbedDiT"):
        enable(torch.nn.Linear(2, 2))
    assert "_fastattn_handle" not in model.__dict__
