"""Sampler determinism and step reporting; PSNR / SSIM / rel-L2 sanity."""

from __future__ import annotations

import math

import pytest
import torch
from fastattn.evaluation.metrics import psnr, rel_l2, ssim, summarize
from fastattn.testbed.model import TestbedConfig, TestbedDiT
from fastattn.testbed.sample import flow_times, sample


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = TestbedDiT(TestbedConfig.tiny()).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def test_flow_times():
    t = flow_times(4)
    assert t[0] == 1 and t[-1] == 0 and (t[1:] < t[:-1]).all()
    assert (flow_times(4, shift=3.0)[1:-1] > t[1:-1]).all()  # shift spends more steps at high noise


def test_sampler_deterministic_in_range_and_reports_steps(model):
    a = sample(model, [1, 2], frames=2, size=16, num_steps=3, seed=5)
    b = sample(model, [1, 2], frames=2, size=16, num_steps=3, seed=5)
    c = sample(model, [1, 2], frames=2, size=16, num_steps=3, seed=6)
    assert a.shape == (2, 2, 3, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    seen = []

    def fn(q, k, v, ctx):
        seen.append((ctx.step_index, ctx.layer_index, ctx.num_steps, q.shape[0]))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    model.set_attention_fn(fn)
    try:
        d = sample(model, [1, 2], frames=2, size=16, num_steps=3, seed=5, cfg_scale=2.0)
    finally:
        model.reset_attention_fn()
    depth = model.cfg.depth
    assert seen == [(s, layer, 3, 4) for s in range(3) for layer in range(depth)]  # CFG: batch 2B
    assert not torch.equal(d, a)  # guidance changes the result


def test_psnr():
    x = torch.rand(2, 3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert math.isinf(float(psnr(x, x)))
    y = (x + 0.01).clamp(0, 1)
    assert 35 < float(psnr(y, x)) < 45
    assert psnr(y, x, reduction="none").shape == (2, 3)


def test_ssim_identity_noise_and_skimage():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.avg_pool2d(torch.rand(4, 3, 64, 64, generator=g), 3, 1, 1)  # some structure
    assert abs(float(ssim(x, x)) - 1) < 1e-9
    values = [
        float(ssim((x + s * torch.randn(x.shape, generator=g)).clamp(0, 1), x)) for s in (0.02, 0.1, 0.3)
    ]
    assert values[0] > values[1] > values[2] and values[0] < 1
    from skimage.metrics import structural_similarity

    y = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    ref = structural_similarity(
        y[0].numpy(),
        x[0].numpy(),
        channel_axis=0,
        data_range=1.0,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )
    assert abs(float(ssim(y[0], x[0])) - ref) < 1e-6


def test_rel_l2_and_summary():
    x = torch.ones(2, 10)
    assert float(rel_l2(x, x)) == 0
    assert abs(float(rel_l2(1.1 * x, x)) - 0.1) < 1e-6
    s = summarize(torch.full((1, 2, 3, 16, 16), 0.5), torch.full((1, 2, 3, 16, 16), 0.5))
    assert math.isinf(s["psnr"]) and abs(s["ssim"] - 1) < 1e-9 and s["rel_l2"] == 0
