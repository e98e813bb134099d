"""The demo's real-shape speed panel: a Wan-2.1-1.3B-shaped DiT layer stack with random weights, timed over a
whole short schedule with dense attention and with a testbed preset.

At the testbed's own size (4,096 tokens) a GPU is bound by the host: the sparse path's per-call work costs
more than the attention it saves, so sparse presets run slower than dense there. Sparse attention pays where
attention dominates a step, at video lengths. This panel times the shape where a user runs it: Wan-2.1-1.3B's
blocks (dim 1536, 12 heads of 128, FFN 8960, 30 layers, cross-attention to 512 text tokens) on its 480p x 81
frame latent grid (21 x 30 x 52 = 32,760 tokens), the conditional and unconditional CFG branches in one batch
of 2.

The stack is the testbed's own :class:`~fastattn.testbed.model.TestbedDiT` at those dims, each block given
Wan's cross-attention (:class:`CrossBlock`); no diffusers. Self-attention goes through the same
:func:`fastattn.testbed.fast.enable` path as the testbed, so the preset (its dense steps, residual captures and
selection reuse for a run of that many steps) applies exactly as on the testbed. Weights are ~N(0, 0.02),
built on the target device (a meta build, ``to_empty``): random weights give near-uniform attention maps,
so this measures speed only, never quality::

    result = time_real_shape(WAN_13B, plan, device="cuda", steps=10)
    result["speedup"]          # dense schedule time / preset schedule time
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .fast import enable
from .model import Block, RMSNorm, TestbedConfig, TestbedDiT
from .sample import flow_times


@dataclass(frozen=True)
class RealShape:
    """The shape of a video DiT the panel builds with random weights and times.

    Args:
        name: the model whose shape this is.
        dim, heads, ffn, layers: width, attention heads (head_dim = dim / heads), MLP hidden size, blocks.
        grid: latent token grid ``(F, H, W)`` after patching; ``S = F * H * W`` tokens.
        batch: rows of one forward (2: the conditional and unconditional CFG branches together).
        text_tokens: text tokens every block cross-attends to.
        in_channels, patch: latent channels and spatial patch size (the patch embedding's input).
        what: the pixel size and clip length the grid stands for.
    """

    name: str
    dim: int
    heads: int
    ffn: int
    layers: int
    grid: tuple[int, int, int]
    batch: int
    text_tokens: int
    in_channels: int = 16
    patch: int = 2
    what: str = ""

    @property
    def tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def with_layers(self, layers: int) -> RealShape:
        return dataclasses.replace(self, layers=layers)

    def describe(self, full_layers: int | None = None) -> str:
        f, h, w = self.grid
        layers = f"{self.layers} layers" if full_layers in (None, self.layers) else (
            f"{self.layers} of {full_layers} layers (time-boxed by --real-layers)"
        )  # fmt: skip
        return (
            f"{self.name}-shaped DiT stack, random weights: {layers}, dim {self.dim}, {self.heads} heads x "
            f"{self.head_dim}, FFN {self.ffn}; {f}x{h}x{w} = {self.tokens:,} tokens ({self.what}), batch "
            f"{self.batch}{' (CFG)' if self.batch == 2 else ''}, cross-attention to {self.text_tokens} text tokens"
        )


# Wan-2.1-T2V-1.3B (config of the diffusers checkpoint): 480p x 81 frames -> VAE 4x8x8 -> 21 x 60 x 104 latents
# -> patch (1, 2, 2) -> 21 x 30 x 52 tokens.
WAN_13B = RealShape(
    "Wan2.1-T2V-1.3B", dim=1536, heads=12, ffn=8960, layers=30, grid=(21, 30, 52), batch=2, text_tokens=512,
    what="832x480, 81 frames",
)  # fmt: skip


# ------------------------------------------------------------------------------------------------ the stack


class CrossAttention(nn.Module):
    """Wan's cross-attention: image tokens read the text tokens; dense SDPA (fastattn serves self-attention)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.q_norm = RMSNorm(dim)  # Wan normalizes q and k across heads
        self.k_norm = RMSNorm(dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """x: ``[B, S, dim]``, text: ``[B, T, dim]`` -> ``[B, S, dim]``."""
        b, s, dim = x.shape
        q = self.q_norm(self.q(x)).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(text).chunk(2, dim=-1)
        k = self.k_norm(k).view(b, -1, self.heads, self.head_dim).transpose(1, 2)
        v = v.reshape(b, -1, self.heads, self.head_dim).transpose(1, 2)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, dim))


class CrossBlock(Block):
    """The testbed block with Wan's cross-attention between self-attention and the MLP (Wan's order)."""

    def __init__(self, cfg: TestbedConfig, layer_index: int):
        super().__init__(cfg, layer_index)
        self.cross_norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.cross = CrossAttention(cfg.dim, cfg.heads)

    def forward(self, x, mod, cos, sin, ctx):
        m = (mod + self.modulation).unsqueeze(2)  # [B, 6, 1, dim]
        shift1, scale1, gate1, shift2, scale2, gate2 = m.unbind(1)
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1, cos, sin, ctx)
        x = x + self.cross(self.cross_norm(x), self.__dict__["_text"])
        x = x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)
        return x


class RealShapeDiT(TestbedDiT):
    """:class:`TestbedDiT` whose blocks are :class:`CrossBlock`; ``set_text`` gives every block the text
    tokens (kept out of the module's state: they are inputs, fixed for a run as a prompt's embeddings are)."""

    def __init__(self, cfg: TestbedConfig):
        super().__init__(cfg)
        self.blocks = nn.ModuleList([CrossBlock(cfg, i) for i in range(cfg.depth)])

    def set_text(self, text: torch.Tensor) -> None:
        for blk in self.blocks:
            blk.__dict__["_text"] = text


def stack_config(shape: RealShape) -> TestbedConfig:
    """The testbed config with ``shape``'s dims (one "class" plus the null class: the CFG branches)."""
    f, h, w = shape.grid
    cfg = TestbedConfig(
        dim=shape.dim, depth=shape.layers, heads=shape.heads, mlp_ratio=shape.ffn / shape.dim, patch=shape.patch,
        in_channels=shape.in_channels, num_classes=1, frames=f, size=(h * shape.patch, w * shape.patch),
        rope_theta=10000.0,
    )  # fmt: skip
    if int(cfg.dim * cfg.mlp_ratio) != shape.ffn:
        raise ValueError(f"FFN {shape.ffn} is not reachable as int(dim * ratio) for dim {shape.dim}")
    return cfg


def build_stack(shape: RealShape, device, dtype=torch.bfloat16, seed: int = 0) -> RealShapeDiT:
    """The stack with weights ~N(0, 0.02) in ``dtype``, built on ``device`` directly (meta build,
    ``to_empty``: no CPU copy of the weights), its text tokens set (random, ``[batch, text_tokens, dim]``)."""
    cfg = stack_config(shape)
    with torch.device("meta"):
        model = RealShapeDiT(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
        text = torch.randn(
            shape.batch, shape.text_tokens, shape.dim, generator=gen, device=device, dtype=dtype
        )
    model.set_text(text)
    return model.eval()


# ------------------------------------------------------------------------------------------------ timing


def dense_backends(device) -> dict:
    """The dense attention candidates (name -> context factory): PyTorch's default SDPA choice and, on CUDA,
    cuDNN first (the two dense baselines of ``bench/e2e.py``); the faster one is the baseline."""
    out = {"SDPA default": contextlib.nullcontext}
    if torch.device(device).type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH]  # fmt: skip
        out["cuDNN SDPA"] = lambda: sdpa_kernel(order, set_priority=True)
    return out


@torch.no_grad()
def run_schedule(model: RealShapeDiT, shape: RealShape, steps: int, first: int = 0, count: int | None = None,
                 seed: int = 0, cfg_scale: float = 5.0) -> list[float]:  # fmt: skip
    """Steps ``first .. first + count - 1`` of a ``steps``-step Euler schedule (flow matching, as the testbed's
    sampler; with batch 2 the CFG branches share one forward); returns each step's seconds (synchronized)."""
    count = steps - first if count is None else count
    device, dtype = model.patch_embed.weight.device, model.patch_embed.weight.dtype
    f, h, w = shape.grid
    g = torch.Generator().manual_seed(seed)
    rows = shape.batch // 2 if shape.batch % 2 == 0 else shape.batch
    x = torch.randn(rows, f, shape.in_channels, h * shape.patch, w * shape.patch, generator=g).to(device)
    y = torch.zeros(shape.batch, dtype=torch.long, device=device)
    if rows != shape.batch:
        y[rows:] = 1  # the unconditional ("null") class of the second half
    times = flow_times(steps)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    seconds = []
    for i in range(first, first + count):
        t, t_next = float(times[i]), float(times[i + 1])
        sync()
        t0 = time.perf_counter()
        inp = x if rows == shape.batch else torch.cat([x, x])
        tt = torch.full((shape.batch,), t, device=device)
        v = model(inp.to(dtype), tt, y, step_index=i, num_steps=steps, timestep=t).float()
        if rows != shape.batch:
            v_cond, v_uncond = v.chunk(2)
            v = v_uncond + cfg_scale * (v_cond - v_uncond)
        x = x + (t_next - t) * v
        sync()
        seconds.append(time.perf_counter() - t0)
    return seconds


def time_real_shape(shape: RealShape, plan, device="cuda", steps: int = 10, dtype=torch.bfloat16,
                    warmup_steps: int = 2) -> dict:  # fmt: skip
    """Time a whole ``steps``-step schedule of ``shape`` dense and with ``plan`` (the testbed runtime path).

    Dense: each candidate of :func:`dense_backends` gets one untimed forward and one timed forward (the
    warm-up); the faster runs the timed schedule, and the preset's own dense calls run under it too. Preset:
    the first ``warmup_steps`` steps of the schedule untimed (kernel compilation, autotuning, the first
    selection and residual capture), then the whole schedule timed from step 0 (a new run: its dense steps,
    residual captures and selections count as in any run of ``steps`` steps).

    Returns a dict: ``dense_s`` / ``preset_s`` (whole schedules), ``dense_step_s`` / ``preset_step_s`` (every
    step), ``speedup`` (dense_s / preset_s), ``density`` (attention work done, 1.0 = dense),
    ``kernel_backends`` and the rest of the handle's stats, ``dense_backend``, ``dense_probe_s`` (one forward
    per candidate), ``warmup_s``.
    """
    t0 = time.perf_counter()
    model = build_stack(shape, device, dtype)
    build_s = time.perf_counter() - t0
    try:
        probe, errors, warm = {}, {}, 0.0
        candidates = dense_backends(device)
        for name, ctx in candidates.items():
            try:
                with ctx():
                    warm += sum(run_schedule(model, shape, steps, count=1))
                    probe[name] = run_schedule(model, shape, steps, count=1)[0]
            except RuntimeError as e:  # a backend this GPU or build does not offer: not a candidate
                errors[name] = f"{type(e).__name__}: {e}"
        if not probe:
            raise RuntimeError(f"no dense attention backend ran the real-shape stack: {errors}")
        best = min(probe, key=probe.get)
        warm += sum(probe.values())
        with candidates[best]():
            dense = run_schedule(model, shape, steps)
            handle = enable(model, plan=plan)
            try:
                t1 = time.perf_counter()
                run_schedule(model, shape, steps, count=min(warmup_steps, steps))
                warm_preset = time.perf_counter() - t1
                handle.reset_stats()
                fast = run_schedule(model, shape, steps)
                stats = handle.stats()
            finally:
                handle.disable()
    finally:
        del model
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return {
        "shape": dataclasses.asdict(shape), "steps": steps, "dense_s": sum(dense), "preset_s": sum(fast),
        "dense_step_s": dense, "preset_step_s": fast, "speedup": sum(dense) / sum(fast),
        "density": stats["density"], "kernel_backends": stats["kernel_backends"], "stats": stats,
        "dense_backend": best, "dense_probe_s": probe, "dense_probe_errors": errors, "build_s": build_s,
        "warmup_s": {"dense": warm, "preset": warm_preset},
    }  # fmt: skip
