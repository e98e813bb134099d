"""Calibration: PM-KVQ's positional-interpolation key scaling and sensitivity-based per-layer budgets.

* :func:`calibrate_key_scales`: run short calibration text with ``position_ids = arange(0, stride * L,
  stride)`` so RoPE sees long-context angles (positional interpolation), record post-RoPE keys and pre-RoPE query
  energies, then grid-search a SmoothAttention-style exponent ``alpha`` per layer: keys are divided by
  ``s_c = max|K_c| ** alpha`` before quantization and multiplied back after. The score is the expected error of
  the attention logits, ``sum_c E[q_c^2] * E[(K_c - K^_c)^2]``. Scales are shared by each RoPE pair (c, c + D/2)
  so they commute with the rotation. With per-channel key groups the search is close to a no-op (scaling a channel
  scales its group's error by the same factor), so it matters most for ``key_mode="token"``.
* :func:`layer_sensitivity` + :func:`allocate_bits`: PM-KVQ uses gradient sensitivities and an integer program;
  here sensitivity is measured directly (forward only): the KL of the next-token distribution on a held-out
  chunk when only one layer's past KV is quantized at each width, then an exact knapsack DP picks per-layer widths
  under the total memory budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from . import quant
from .cache import QuantizedKVCache, kv_geometry, projected_layer_bytes, with_cache
from .layer import _axis_group


def _attention_modules(model) -> list:
    mods = [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "layer_idx")]
    if not mods:
        raise TypeError(f"no attention modules with q_proj/layer_idx found in {type(model).__name__}")
    return sorted(mods, key=lambda m: m.layer_idx)


@torch.no_grad()
def record_kv(model, input_ids: torch.Tensor, stride: int = 4):
    """Keys ``[1, H, L, D]`` per layer (post-RoPE, positions ``0, stride, 2*stride, ...``) and query channel
    energies ``[H, D]`` per layer (mean of q^2 over tokens and over the query heads sharing each KV head)."""
    _, kv_heads, head_dim = kv_geometry(model.config)
    q_energy = {}

    def hook(mod, _inp, out):
        q = out.float().reshape(out.shape[0], out.shape[1], -1, head_dim)  # [B, L, Hq, D]
        e = q.pow(2).mean(dim=(0, 1))  # [Hq, D]
        q_energy[mod.layer_idx] = e.reshape(kv_heads, -1, head_dim).mean(1)

    handles = []
    for m in _attention_modules(model):
        m.q_proj.layer_idx = m.layer_idx
        handles.append(m.q_proj.register_forward_hook(hook))
    try:
        L = input_ids.shape[1]
        pos = torch.arange(0, stride * L, stride, device=input_ids.device)[None]
        cache = DynamicCache(config=model.config)
        model(input_ids=input_ids, position_ids=pos, use_cache=True, **with_cache(model, cache))
    finally:
        for h in handles:
            h.remove()
    keys = [layer.keys for layer in cache.layers]
    return keys, [q_energy[i] for i in range(len(keys))]


def _pair_max(x: torch.Tensor) -> torch.Tensor:
    """Max over each RoPE pair (c, c + D/2), broadcast back to ``[..., D]``."""
    h = x.shape[-1] // 2
    m = torch.maximum(x[..., :h], x[..., h:])
    return torch.cat([m, m], -1)


def calibrate_key_scales(
    model,
    input_ids: torch.Tensor,
    bits: int = 4,
    key_group: int = 64,
    key_mode: str = "channel",
    n_alpha: int = 20,
    stride: int = 4,
) -> tuple[list[torch.Tensor | None], list[float]]:
    """Per-layer key scales ``[H, D]`` (``None`` where no scaling is best) and the chosen alphas."""
    group = _axis_group(key_mode, key_group, "key_mode")
    keys, q_energy = record_kv(model, input_ids, stride)
    scales, alphas = [], []
    for k, w in zip(keys, q_energy):
        k = k[0].float()  # [H, L, D]
        usable = (k.shape[1] // group[0]) * group[0]
        if usable == 0:
            raise ValueError(f"calibration text too short: {k.shape[1]} tokens < key group {group[0]}")
        k = k[:, :usable]
        w = (w[:, : w.shape[-1] // 2] + w[:, w.shape[-1] // 2 :]).repeat(
            1, 2
        ) / 2  # RoPE-invariant pair energy
        amax = _pair_max(k.abs().amax(1)).clamp_min(1e-6)  # [H, D]
        best = (math.inf, 0.0, None)
        for alpha in np.linspace(0.0, 1.0, n_alpha):
            s = amax.pow(float(alpha))
            s = (
                s / s.log().mean(-1, keepdim=True).exp()
            )  # geometric mean 1 per head: keeps fp16 meta in range
            kq = (
                quant.dequantize(quant.quantize(k / s[:, None], bits, group, "torch"), torch.float32)
                * s[:, None]
            )
            err = float(((k - kq).pow(2).mean(1) * w).sum())
            if err < best[0]:
                best = (err, float(alpha), s)
        alphas.append(best[1])
        scales.append(None if best[1] == 0.0 else best[2])
    return scales, alphas


@torch.no_grad()
def layer_sensitivity(
    model,
    input_ids: torch.Tensor,
    eval_tokens: int = 64,
    bits_choices: Sequence[int] = (2, 4, 8),
    **cache_kwargs,
) -> np.ndarray:
    """``[layers, len(bits_choices)]`` mean KL(full || quantized) on the last ``eval_tokens`` of ``input_ids``
    when only that layer's past KV (the first part) is quantized at that width."""
    ctx, chunk = input_ids[:, :-eval_tokens], input_ids[:, -eval_tokens:]
    full = DynamicCache(config=model.config)
    model(input_ids=ctx, use_cache=True, **with_cache(model, full))
    past = [(layer.keys, layer.values) for layer in full.layers]
    ref = F.log_softmax(
        model(input_ids=chunk, use_cache=True, **with_cache(model, full)).logits[0].float(), -1
    )
    n = len(past)
    out = np.zeros((n, len(bits_choices)))
    for li in range(n):
        for bi, b in enumerate(bits_choices):
            # Every other layer stays at 16 bits: progressive mode with an unreachable budget.
            budgets = [float("inf")] * n
            budgets[li] = None
            cache = QuantizedKVCache(model.config, bits=b, layer_budgets=budgets, **cache_kwargs)
            for layer, (k, v) in zip(cache.layers, past):
                layer.update(k, v)
            lp = F.log_softmax(
                model(input_ids=chunk, use_cache=True, **with_cache(model, cache)).logits[0].float(), -1
            )
            out[li, bi] = float((ref.exp() * (ref - lp)).sum(-1).mean())
    return out


def allocate_bits(
    sensitivity: np.ndarray, costs: np.ndarray, budget: float, resolution: int = 4000
) -> list[int]:
    """Exact (up to cost rounding) knapsack: choose one option per layer minimising total sensitivity with
    total cost <= budget. Returns the option index per layer; ``ValueError`` if even the cheapest options do
    not fit."""
    n, c = sensitivity.shape
    if costs.min(1).sum() > budget:
        raise ValueError(
            f"impossible KV budget: {budget:.0f} bytes < {costs.min(1).sum():.0f} bytes at the lowest bit-widths"
        )
    unit = budget / resolution
    icost = np.ceil(costs / unit).astype(int)
    inf = np.inf
    dp = np.full(resolution + 1, inf)
    dp[0] = 0.0
    choice = np.zeros((n, resolution + 1), dtype=int)
    for li in range(n):
        new = np.full(resolution + 1, inf)
        for ci in range(c):
            w = icost[li, ci]
            if w > resolution:
                continue
            cand = np.full(resolution + 1, inf)
            cand[w:] = dp[: resolution + 1 - w] + sensitivity[li, ci]
            better = cand < new
            new[better] = cand[better]
            choice[li, better] = ci
        dp = new
    if not np.isfinite(dp).any():  # cost rounding pushed the cheapest plan over: fall back to it
        return [int(i) for i in costs.argmin(1)]
    u = int(np.nanargmin(dp))
    picks = []
    for li in range(n - 1, -1, -1):
        ci = choice[li, u]
        picks.append(int(ci))
        u -= icost[li, ci]
    return picks[::-1]


def layer_costs(config, bits_choices: Sequence[int], context: int, batch: int = 1, **settings) -> np.ndarray:
    """``[layers, len(bits_choices)]`` projected bytes per layer at ``context`` tokens (worst-case window)."""
    n, heads, head_dim = kv_geometry(config)
    kg = _axis_group(settings.get("key_mode", "channel"), settings.get("key_group", 64), "key_mode")
    vg = _axis_group(settings.get("value_mode", "token"), settings.get("value_group", 64), "value_mode")
    row = [
        projected_layer_bytes(
            b,
            context,
            heads,
            head_dim,
            batch,
            kg,
            vg,
            settings.get("residual_length", 32),
            settings.get("num_sinks", 4),
        )
        for b in bits_choices
    ]
    return np.array([row] * n, dtype=float)


def bf16_bytes(config, context: int, batch: int = 1) -> int:
    """Bytes of a bf16 KV cache holding ``context`` tokens."""
    n, heads, head_dim = kv_geometry(config)
    return n * batch * heads * head_dim * 2 * 2 * context


def allocate_budgets(
    config,
    sensitivity: np.ndarray,
    ratio: float,
    context: int,
    bits_choices: Sequence[int] = (2, 4, 8),
    batch: int = 1,
    **settings,
) -> dict:
    """Per-layer bits and byte budgets so the whole cache stays within ``ratio`` x bf16 at ``context`` tokens.

    Returns ``{"layer_bits", "layer_budgets", "budget_bytes", "projected_ratio"}``; pass ``layer_budgets`` and
    ``bits=min(bits_choices)`` to :class:`QuantizedKVCache` for progressive mode.
    """
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    costs = layer_costs(config, bits_choices, context, batch, **settings)
    budget = ratio * bf16_bytes(config, context, batch)
    picks = allocate_bits(sensitivity, costs, budget)
    layer_budgets = [float(costs[i, p]) for i, p in enumerate(picks)]
    return {
        "layer_bits": [int(bits_choices[p]) for p in picks],
        "layer_budgets": layer_budgets,
        "budget_bytes": budget,
        "projected_ratio": sum(layer_budgets) / bf16_bytes(config, context, batch),
    }
