"""Fidelity metrics against a reference (dense) output: PSNR, SSIM and relative L2.

Images/frames are ``[..., C, H, W]`` (e.g. video ``[B, F, C, H, W]``); every leading index is one image.
Per-image values are averaged unless ``reduction="none"``. Used by ``fastattn eval``, the attention-error
probe, the testbed and the benchmarks (this module depends on torch only).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _reduce(v: torch.Tensor, reduction: str):
    if reduction == "none":
        return v
    if reduction == "mean":
        return v.mean()
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def psnr(
    x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0, reduction: str = "mean"
) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image ``[...]`` (``inf`` where the images are identical)."""
    if x.shape != ref.shape:
        raise ValueError(f"shape mismatch {tuple(x.shape)} vs {tuple(ref.shape)}")
    mse = (x.double() - ref.double()).pow(2).flatten(-3).mean(-1)
    return _reduce(10 * torch.log10(data_range**2 / mse), reduction)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 1-D Gaussian ``[size]`` (float64)."""
    c = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-(c**2) / (2 * sigma**2))
    return w / w.sum()


def ssim(
    x: torch.Tensor,
    ref: torch.Tensor,
    data_range: float = 1.0,
    window: int = 11,
    sigma: float = 1.5,
    reduction: str = "mean",
) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) with a Gaussian window, per image ``[...]``.

    Local statistics use a separable ``window x window`` Gaussian (sigma 1.5) over the valid region (no
    padding), per channel, with ``K1 = 0.01, K2 = 0.03``; the SSIM map is averaged over channels and pixels.
    Matches ``skimage.metrics.structural_similarity(gaussian_weights=True, use_sample_covariance=False)``.
    """
    if x.shape != ref.shape:
        raise ValueError(f"shape mismatch {tuple(x.shape)} vs {tuple(ref.shape)}")
    *lead, c, h, w = x.shape
    if min(h, w) < window:
        raise ValueError(f"images of {h}x{w} are smaller than the SSIM window {window}")
    a = x.double().reshape(-1, c, h, w)
    b = ref.double().reshape(-1, c, h, w)
    g = gaussian_window(window, sigma).to(a.device)
    gh, gw = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1), g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)

    def blur(z):  # separable Gaussian, depthwise over channels
        return F.conv2d(F.conv2d(z, gh, groups=c), gw, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return _reduce(s.flatten(1).mean(1).reshape(lead), reduction)


def rel_l2(x: torch.Tensor, ref: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """``||x - ref|| / ||ref||`` per leading-dim sample ``[B]`` (flattened over everything else).

    For a single number over a whole tensor pass ``x[None], ref[None]``.
    """
    if x.shape != ref.shape:
        raise ValueError(f"shape mismatch {tuple(x.shape)} vs {tuple(ref.shape)}")
    d = (x.double() - ref.double()).flatten(1).norm(dim=1)
    n = ref.double().flatten(1).norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
    return _reduce(d / n, reduction)


def summarize(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0) -> dict:
    """All three metrics of frames ``x`` vs ``ref`` as plain floats (PSNR ``inf`` if identical)."""
    p = float(psnr(x, ref, data_range))
    return {
        "psnr": p if math.isfinite(p) else float("inf"),
        "ssim": float(ssim(x, ref, data_range)),
        "rel_l2": float(rel_l2(x.reshape(1, -1), ref.reshape(1, -1))),
    }
