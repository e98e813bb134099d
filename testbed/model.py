"""A small class-conditional video diffusion transformer (the fastattn testbed).

Style of Wan / HunyuanVideo, reduced to what matters for attention research:

* pixel-space "latents": RGB frames ``[B, F, 3, H, W]`` in ``[-1, 1]`` are cut into ``p x p`` patches
  (one frame per token in time), giving a token grid ``(F, H/p, W/p)`` in raster order;
* 3-D rotary positions over ``(F, H, W)``, applied to q and k after a per-head RMS norm (QK-norm);
* self-attention only (no text tokens): the class label and the timestep condition every block through
  adaLN modulation (shift/scale/gate), Wan-style: one shared projection plus a learned per-block offset;
* flow matching (rectified flow): ``x_t = (1 - t) x0 + t noise`` and the model predicts the velocity
  ``noise - x0``.

The integration point for fastattn is :class:`SelfAttention`: every layer computes ``q, k, v`` as
``[B, H, S, D]`` (RoPE applied) and calls ``self.attention_fn(q, k, v, ctx)``; ``ctx`` is an
:class:`AttentionCall` telling the function which layer, which sampling step and which token grid it is.
:meth:`TestbedDiT.set_attention_fn` swaps the function of every layer at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------------------------------------
# configuration and attention context


@dataclass
class TestbedConfig:
    """Architecture of :class:`TestbedDiT`; stored next to the weights as ``config.json``.

    ``frames`` and ``size`` are the native video length and frame size (pixels) the model was trained at;
    the model runs at other sizes too (RoPE extends), e.g. a single frame (image mode).
    """

    __test__ = False  # not a pytest test class despite the name

    dim: int = 384
    depth: int = 10
    heads: int = 6
    mlp_ratio: float = 4.0
    patch: int = 4
    in_channels: int = 3
    num_classes: int = 24
    frames: int = 16
    size: int = 64
    rope_theta: float = 256.0
    freq_dim: int = 256

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def grid(
        self, frames: int | None = None, size: int | tuple[int, int] | None = None
    ) -> tuple[int, int, int]:
        """Token grid ``(F, H, W)`` for a clip of ``frames`` frames of ``size`` pixels (default: native)."""
        frames = self.frames if frames is None else frames
        size = self.size if size is None else size
        h, w = (size, size) if isinstance(size, int) else size
        if h % self.patch or w % self.patch:
            raise ValueError(f"frame size {(h, w)} is not a multiple of the patch size {self.patch}")
        return frames, h // self.patch, w // self.patch

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TestbedConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def tiny(cls) -> TestbedConfig:
        """A CPU-sized model for tests and smoke runs (2 layers, 2 heads of 64, 4 frames of 32 px)."""
        return cls(dim=128, depth=2, heads=2, mlp_ratio=2.0, frames=4, size=32)


@dataclass(frozen=True)
class AttentionCall:
    """What an attention function is told about the call it serves.

    Attributes:
        layer_index: transformer block index, ``0 .. num_layers - 1``.
        step_index: sampling step (0-based) when the caller (e.g. the sampler) says so, else ``None``.
        num_steps: total sampling steps when known, else ``None``.
        grid: token grid ``(F, H, W)``; tokens are in raster order, ``S = F * H * W``, no text tokens.
        num_layers: number of transformer blocks.
        timestep: flow-matching time ``t`` in ``[0, 1]`` of the first batch element, if known.
    """

    layer_index: int
    step_index: int | None
    num_steps: int | None
    grid: tuple[int, int, int]
    num_layers: int
    timestep: float | None = None


AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionCall], torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionCall) -> torch.Tensor:
    """Default attention: exact dense ``softmax(q k^T / sqrt(D)) v``. q, k, v, out: ``[B, H, S, D]``."""
    return F.scaled_dot_product_attention(q, k, v)


# ----------------------------------------------------------------------------------------------------------
# 3-D rotary positions


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels of each head given to the (F, H, W) axes; each even. Wan's split: time gets the rest.

    head_dim 64 -> (24, 20, 20).
    """
    hw = 2 * (head_dim // 6)
    t = head_dim - 2 * hw
    if t <= 0 or t % 2 or hw % 2:
        raise ValueError(f"head_dim {head_dim} cannot be split into even 3-D RoPE parts")
    return t, hw, hw


def rope_angles(grid: tuple[int, int, int], head_dim: int, theta: float, device=None) -> torch.Tensor:
    """Rotation angle of every (token, channel pair): ``[S, head_dim // 2]`` float32, raster order.

    Pair ``j`` of the axis with ``d`` channels rotates at frequency ``theta ** (-2j / d)`` per step along
    that axis, so the angle difference of two tokens depends only on their position difference.
    """
    parts = []
    axes = torch.meshgrid(*[torch.arange(n, device=device, dtype=torch.float32) for n in grid], indexing="ij")
    for pos, d in zip(axes, rope_axis_dims(head_dim)):
        freqs = theta ** (-torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)  # [d/2]
        parts.append(pos.reshape(-1, 1) * freqs)  # [S, d/2]
    return torch.cat(parts, dim=1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs ``(i, i + D/2)`` of ``x [B, H, S, D]`` by the angles behind ``cos, sin [S, D/2]``.

    Computed in float32 (bf16 angles lose relative positions), returned in x's dtype.
    """
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# blocks


class RMSNorm(nn.Module):
    """RMS norm over the last dim with a learned gain (used as QK-norm, per head)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention whose core is the swappable ``attention_fn(q, k, v, ctx)``."""

    def __init__(self, dim: int, heads: int, layer_index: int):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.layer_index = layer_index
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)
        self.reset_attention_fn()

    # Stored in __dict__, not as an attribute nn.Module tracks: an attention function that happens to be an
    # nn.Module must not become a sub-module (its state would leak into state_dict()).
    @property
    def attention_fn(self) -> AttentionFn:
        return self.__dict__["_attention_fn"]

    def set_attention_fn(self, fn: AttentionFn) -> None:
        self.__dict__["_attention_fn"] = fn

    def reset_attention_fn(self) -> None:
        self.__dict__["_attention_fn"] = sdpa_attention

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionCall
    ) -> torch.Tensor:
        """x: ``[B, S, dim]`` -> ``[B, S, dim]``."""
        b, s, _ = x.shape
        qkv = self.qkv(x).view(b, s, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [3, B, H, S, D]
        q, k, v = qkv.unbind(0)
        q = apply_rope(self.q_norm(q), cos, sin).to(v.dtype)
        k = apply_rope(self.k_norm(k), cos, sin).to(v.dtype)
        o = self.attention_fn(q, k, v, ctx)  # [B, H, S, D]
        return self.proj(o.transpose(1, 2).reshape(b, s, -1))


class Block(nn.Module):
    """Pre-norm transformer block with adaLN modulation (6 vectors: shift/scale/gate for attn and MLP)."""

    def __init__(self, cfg: TestbedConfig, layer_index: int):
        super().__init__()
        dim = cfg.dim
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, cfg.heads, layer_index)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        # Per-block offset added to the shared conditional modulation (Wan's design: cheap in parameters).
        self.modulation = nn.Parameter(torch.zeros(6, dim))

    def forward(self, x, mod, cos, sin, ctx):
        """x: ``[B, S, dim]``; mod: ``[B, 6, dim]`` shared modulation from the conditioning."""
        m = (mod + self.modulation).unsqueeze(2)  # [B, 6, 1, dim]
        shift1, scale1, gate1, shift2, scale2, gate2 = m.unbind(1)
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1, cos, sin, ctx)
        x = x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)
        return x


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of ``t [B]`` in ``[0, 1]`` (scaled to 0..1000) -> ``[B, dim]`` float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


# ----------------------------------------------------------------------------------------------------------
# the model


class TestbedDiT(nn.Module):
    """Class-conditional flow-matching video DiT.

    ``forward(x [B, F, C, H, W], t [B], y [B]) -> velocity [B, F, C, H, W]``. ``y`` holds class ids in
    ``0 .. num_classes - 1``; ``num_classes`` is the "null" class used for classifier-free guidance.
    """

    __test__ = False

    def __init__(self, cfg: TestbedConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or TestbedConfig()
        dim, pdim = cfg.dim, cfg.in_channels * cfg.patch**2
        self.patch_embed = nn.Linear(pdim, dim)
        self.t_embed = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.y_embed = nn.Embedding(cfg.num_classes + 1, dim)
        self.mod_proj = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.depth)])
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.out = nn.Linear(dim, pdim)
        self._rope_cache: dict = {}
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        nn.init.normal_(self.t_embed[0].weight, std=0.02)
        nn.init.normal_(self.t_embed[2].weight, std=0.02)
        # adaLN-zero: every residual branch and the output start at zero, so the initial model is the
        # identity on the residual stream and training starts stable.
        for lin in (self.mod_proj[1], self.final_mod[1], self.out):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    # -- attention routing ----------------------------------------------------------------------------------

    def set_attention_fn(self, fn: AttentionFn) -> None:
        """Route every layer's attention through ``fn(q, k, v, ctx) -> [B, H, S, D]``."""
        for blk in self.blocks:
            blk.attn.set_attention_fn(fn)

    def reset_attention_fn(self) -> None:
        """Back to dense ``F.scaled_dot_product_attention`` in every layer."""
        for blk in self.blocks:
            blk.attn.reset_attention_fn()

    # -- tokens ---------------------------------------------------------------------------------------------

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, F, C, H, W] -> [B, F*(H/p)*(W/p), C*p*p]``, tokens in raster (F, H, W) order."""
        b, f, c, h, w = x.shape
        p = self.cfg.patch
        x = x.reshape(b, f, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4, 6)
        return x.reshape(b, f * (h // p) * (w // p), c * p * p)

    def unpatchify(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Inverse of :meth:`patchify`: ``[B, S, C*p*p] -> [B, F, C, H, W]``."""
        b = tokens.shape[0]
        f, gh, gw = grid
        p, c = self.cfg.patch, self.cfg.in_channels
        x = tokens.reshape(b, f, gh, gw, c, p, p).permute(0, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, f, c, gh * p, gw * p)

    def rope(self, grid: tuple[int, int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached ``cos, sin [S, head_dim/2]`` float32 for a token grid."""
        key = (tuple(grid), str(device))
        if key not in self._rope_cache:
            ang = rope_angles(grid, self.cfg.head_dim, self.cfg.rope_theta, device=device)
            self._rope_cache[key] = (ang.cos(), ang.sin())
        return self._rope_cache[key]

    # -- forward --------------------------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        step_index: int | None = None,
        num_steps: int | None = None,
        timestep: float | None = None,
    ) -> torch.Tensor:
        """Predict the flow velocity.

        Args:
            x: noisy clip ``[B, F, C, H, W]`` (``F = 1`` is image mode); H, W multiples of the patch size.
            t: flow time ``[B]`` in ``[0, 1]`` (1 = pure noise), or a float.
            y: class ids ``[B]`` (``num_classes`` = unconditional).
            step_index, num_steps, timestep: passed to the attention functions through
                :class:`AttentionCall` (not read from ``t`` here: that would sync the GPU every forward).
        Returns:
            velocity ``[B, F, C, H, W]`` (dtype of the computation; float32 under no autocast).
        """
        b, f, c, h, w = x.shape
        p = self.cfg.patch
        grid = (f, h // p, w // p)
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32).reshape(-1).expand(b)
        y = torch.as_tensor(y, device=x.device, dtype=torch.long).reshape(-1).expand(b)

        cond = self.t_embed(timestep_embedding(t, self.cfg.freq_dim).to(self.t_embed[0].weight.dtype))
        cond = cond + self.y_embed(y)  # [B, dim]
        mod = self.mod_proj(cond).view(b, 6, -1)  # [B, 6, dim]
        cos, sin = self.rope(grid, x.device)

        tokens = self.patch_embed(self.patchify(x))  # [B, S, dim]
        for i, blk in enumerate(self.blocks):
            ctx = AttentionCall(i, step_index, num_steps, grid, len(self.blocks), timestep)
            tokens = blk(tokens, mod, cos, sin, ctx)

        shift, scale = self.final_mod(cond).unsqueeze(1).chunk(2, dim=-1)
        tokens = self.out(self.final_norm(tokens) * (1 + scale) + shift)
        return self.unpatchify(tokens, grid)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
