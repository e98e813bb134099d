"""Fakes of ComfyUI's runtime contract for the Multi-GPU tests, importable by name in worker processes (the test
modules put this folder on ``sys.path``; workers get the parent's ``sys.path`` and unpickle these classes).

Written from the contract's description (``shared/reference/comfyui.md``), not from ComfyUI's code:

- ``optimized_attention`` with the ``wrap_attn`` dispatch: ``transformer_options["optimized_attention_override"]``
  is called as ``override(func, *args, **kwargs)`` at the outermost call (``_inside_attn_wrapper`` set);
- a diffusion model's ``forward`` runs its ``DIFFUSION_MODEL`` wrappers (``transformer_options["wrappers"]``)
  through an executor with ``class_obj``, ``original``, ``wrappers`` and ``idx``;
- before each transformer block the model looks up ``transformer_options["patches_replace"]["dit"][(kind, i)]``
  and calls ``entry(args, {"original_block": run})`` (``run(args) -> {"img", ["txt"]}``);
- ``Flux``: ``[txt, img]`` joint attention in ``(B, H, L, D)`` with a RoPE table ``pe`` ``[B, 1, S, D/2, 2, 2]``;
  double blocks keep the two streams apart, single blocks take the joined sequence.
- ``WanModel``: video-token self-attention in ``(B, L, H*D)`` with RoPE ``freqs`` ``[1, S, 1, D/2, 2, 2]``, text
  cross-attention, modulation ``e0`` ``[B, 1, 6, C]``.
- a ``ModelPatcher`` (``clone``, ``model_options``, wrappers / callbacks with keys, ``load_device``) and a sampler
  running ``ON_PRE_RUN`` / ``ON_CLEANUP`` around Euler steps with batched CFG.
"""

from __future__ import annotations

import copy
import os

import torch
import torch.nn.functional as F
from torch import nn

OVERRIDE = "optimized_attention_override"


def host_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
                   **kwargs):  # fmt: skip
    if skip_reshape:
        b, _, _, d = q.shape
    else:
        b, _, c = q.shape
        d = c // heads
        q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out if skip_output_reshape else out.transpose(1, 2).reshape(b, -1, heads * d)


def optimized_attention(*args, **kwargs):
    outer = "_inside_attn_wrapper" not in kwargs
    kwargs["_inside_attn_wrapper"] = True
    try:
        override = (kwargs.get("transformer_options") or {}).get(OVERRIDE) if outer else None
        if override is not None:
            return override(host_attention, *args, **kwargs)
        return host_attention(*args, **kwargs)
    finally:
        if outer:
            del kwargs["_inside_attn_wrapper"]


class Executor:
    """A wrapper chain around a bound method, as the contract describes it."""

    def __init__(self, original, class_obj, wrappers, idx=0):
        self.original, self.class_obj, self.wrappers, self.idx = original, class_obj, list(wrappers), idx

    def __call__(self, *args, **kwargs):
        return Executor(self.original, self.class_obj, self.wrappers, self.idx + 1).execute(*args, **kwargs)

    def execute(self, *args, **kwargs):
        if self.idx == len(self.wrappers):
            return self.original(*args, **kwargs)
        return self.wrappers[self.idx](self, *args, **kwargs)


def wrappers_of(transformer_options, kind="diffusion_model"):
    return [w for ws in (transformer_options or {}).get("wrappers", {}).get(kind, {}).values() for w in ws]


def rope(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Rotation matrices ``[..., dim/2, 2, 2]`` for integer ``positions`` (one axis)."""
    freqs = 1.0 / (100.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angle = positions.double()[..., None] * freqs
    cos, sin = torch.cos(angle), torch.sin(angle)
    return torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2).float()


def apply_rope(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    pairs = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    out = pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]
    return out.reshape(*x.shape).type_as(x)


def call_block(transformer_options, kind, i, args, run):
    dit = (transformer_options.get("patches_replace") or {}).get("dit") or {}
    if (kind, i) in dit:
        return dit[(kind, i)](args, {"original_block": run})
    return run(args)


class Modulation(nn.Module):
    def __init__(self, dim, n):
        super().__init__()
        self.lin = nn.Linear(dim, n * dim)
        self.n = n

    def forward(self, vec):
        return self.lin(F.silu(vec))[:, None].chunk(self.n, -1)


class DoubleBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        for s in ("img", "txt"):
            setattr(self, f"{s}_mod", Modulation(dim, 4))
            setattr(self, f"{s}_qkv", nn.Linear(dim, 3 * dim))
            setattr(self, f"{s}_proj", nn.Linear(dim, dim))
            setattr(
                self, f"{s}_mlp", nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
            )

    def forward(self, img, txt, vec, pe, attn_mask=None, transformer_options=None):
        b, h = img.shape[0], self.heads
        mods, qkvs = {}, []
        for name, x in (("txt", txt), ("img", img)):
            shift, scale, gate, mlp_gate = getattr(self, f"{name}_mod")(vec)
            mods[name] = (gate, mlp_gate)
            y = F.layer_norm(x, x.shape[-1:]) * (1 + scale) + shift
            qkvs.append(getattr(self, f"{name}_qkv")(y).view(b, x.shape[1], 3, h, -1).permute(2, 0, 3, 1, 4))
        q, k, v = (torch.cat([qkvs[0][i], qkvs[1][i]], 2) for i in range(3))
        q, k = apply_rope(q, pe), apply_rope(k, pe)
        attn = optimized_attention(q, k, v, h, skip_reshape=True, mask=attn_mask,
                                   transformer_options=transformer_options)  # fmt: skip
        out = {}
        for name, x, part in (("txt", txt, attn[:, : txt.shape[1]]), ("img", img, attn[:, txt.shape[1] :])):
            gate, mlp_gate = mods[name]
            x = x + gate * getattr(self, f"{name}_proj")(part)
            out[name] = x + mlp_gate * getattr(self, f"{name}_mlp")(F.layer_norm(x, x.shape[-1:]))
        return out["img"], out["txt"]


class SingleBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.mod = Modulation(dim, 3)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, vec, pe, attn_mask=None, transformer_options=None):
        b = x.shape[0]
        shift, scale, gate = self.mod(vec)
        y = F.layer_norm(x, x.shape[-1:]) * (1 + scale) + shift
        q, k, v = self.qkv(y).view(b, x.shape[1], 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, pe), apply_rope(k, pe)
        attn = optimized_attention(q, k, v, self.heads, skip_reshape=True, mask=attn_mask,
                                   transformer_options=transformer_options)  # fmt: skip
        return x + gate * self.out(attn)  # (B, L, H*D): the host's output layout without skip_output_reshape


class Flux(nn.Module):
    """A small Flux: patch 2, ``[txt, img]`` joint attention through double then single blocks."""

    def __init__(self, channels=4, heads=4, head_dim=8, context_dim=8, double=2, single=2, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        dim = heads * head_dim
        self.patch_size, self.num_heads, self.hidden_size, self.head_dim = 2, heads, dim, head_dim
        self.img_in = nn.Linear(channels * 4, dim)
        self.txt_in = nn.Linear(context_dim, dim)
        self.time_in = nn.Linear(16, dim)
        self.double_blocks = nn.ModuleList(DoubleBlock(dim, heads) for _ in range(double))
        self.single_blocks = nn.ModuleList(SingleBlock(dim, heads) for _ in range(single))
        self.final = nn.Linear(dim, channels * 4)

    def forward(self, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,
                transformer_options=None, **kwargs):  # fmt: skip
        return Executor(self._forward, self, wrappers_of(transformer_options)).execute(
            x, timestep, context, y, guidance, ref_latents, control, transformer_options, **kwargs
        )

    def _forward(self, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,
                 transformer_options=None, **kwargs):  # fmt: skip
        b, c, h, w = x.shape
        img = self.img_in(
            x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * 4)
        )
        txt = self.txt_in(context)
        t = timestep.float()[:, None] * torch.arange(1, 17, dtype=torch.float32) / 16
        vec = self.time_in(torch.sin(t))
        n_txt, n_img = txt.shape[1], img.shape[1]
        # positions: text at 0, image tokens by row-major index after it (enough to be position dependent)
        pos = torch.cat([torch.zeros(n_txt), 1 + torch.arange(n_img)])
        pe = rope(pos, self.head_dim)[None, None].expand(b, 1, -1, -1, -1, -1)
        to = transformer_options or {}
        mask = kwargs.get("attention_mask")
        for i, block in enumerate(self.double_blocks):

            def run(a, block=block):
                im, tx = block(
                    a["img"], a["txt"], a["vec"], a["pe"], a.get("attn_mask"), a["transformer_options"]
                )
                return {"img": im, "txt": tx}

            out = call_block(to, "double_block", i,
                             {"img": img, "txt": txt, "vec": vec, "pe": pe, "attn_mask": mask,
                              "transformer_options": to}, run)  # fmt: skip
            img, txt = out["img"], out["txt"]
            if control is not None and i < len(control.get("input", [])):
                img = img + control["input"][i]  # a per-token addition between blocks (ControlNet-like)
        seq = torch.cat([txt, img], 1)
        for i, block in enumerate(self.single_blocks):

            def run(a, block=block):
                return {
                    "img": block(a["img"], a["vec"], a["pe"], a.get("attn_mask"), a["transformer_options"])
                }

            seq = call_block(to, "single_block", i,
                             {"img": seq, "vec": vec, "pe": pe, "attn_mask": mask, "transformer_options": to},
                             run)["img"]  # fmt: skip
        out = self.final(seq[:, n_txt:])
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


class WanBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) * 0.1)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.cq, self.ck, self.cv, self.co = (nn.Linear(dim, dim) for _ in range(4))
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, e, freqs, context, transformer_options=None):
        b, s, c = x.shape
        h, d = self.heads, c // self.heads
        e = (self.modulation.unsqueeze(0) + e).unbind(2)
        y = F.layer_norm(x, (c,)) * (1 + e[1]) + e[0]
        q = apply_rope(self.q(y).view(b, s, h, d), freqs).view(b, s, c)
        k = apply_rope(self.k(y).view(b, s, h, d), freqs).view(b, s, c)
        x = x + e[2] * self.o(
            optimized_attention(q, k, self.v(y), heads=h, transformer_options=transformer_options)
        )
        y = F.layer_norm(x, (c,))
        x = x + self.co(optimized_attention(self.cq(y), self.ck(context), self.cv(context), heads=h,
                                            transformer_options=transformer_options))  # fmt: skip
        return x + e[5] * self.ffn(F.layer_norm(x, (c,)) * (1 + e[4]) + e[3])


class WanModel(nn.Module):
    """A small Wan: patch (1, 2, 2), video-token self-attention, text cross-attention."""

    def __init__(self, channels=4, heads=4, head_dim=8, context_dim=8, layers=2, seed=1):
        super().__init__()
        torch.manual_seed(seed)
        dim = heads * head_dim
        self.patch_size, self.num_heads, self.dim, self.head_dim = (1, 2, 2), heads, dim, head_dim
        self.patch_embedding = nn.Linear(channels * 4, dim)
        self.text_embedding = nn.Linear(context_dim, dim)
        self.time_projection = nn.Linear(16, 6 * dim)
        self.blocks = nn.ModuleList(WanBlock(dim, heads) for _ in range(layers))
        self.head = nn.Linear(dim, channels * 4)
        self.home_pid = os.getpid()
        self.fail_elsewhere = False  # tests: raise in any other process (a worker) than the one that built it

    def forward(
        self, x, timestep, context, clip_fea=None, time_dim_concat=None, transformer_options=None, **kwargs
    ):
        return Executor(self._forward, self, wrappers_of(transformer_options)).execute(
            x, timestep, context, clip_fea, time_dim_concat, transformer_options, **kwargs
        )

    def _forward(self, x, timestep, context, clip_fea=None, time_dim_concat=None, transformer_options=None,
                 **kwargs):  # fmt: skip
        if self.fail_elsewhere and os.getpid() != self.home_pid:
            raise RuntimeError("out of memory (a failure on this worker only)")
        b, c, f, h, w = x.shape
        tokens = x.reshape(b, c, f, h // 2, 2, w // 2, 2).permute(0, 2, 3, 5, 1, 4, 6).reshape(b, -1, c * 4)
        x = self.patch_embedding(tokens)
        t = timestep.float()[:, None] * torch.arange(1, 17, dtype=torch.float32) / 16
        e0 = self.time_projection(torch.sin(t)).view(b, 1, 6, -1)
        context = self.text_embedding(context)
        freqs = rope(torch.arange(x.shape[1]), self.head_dim)[None, :, None]
        to = transformer_options or {}
        for i, block in enumerate(self.blocks):

            def run(a, block=block):
                return {"img": block(a["img"], a["vec"], a["pe"], a["txt"], a["transformer_options"])}

            x = call_block(to, "double_block", i,
                           {"img": x, "txt": context, "vec": e0, "pe": freqs, "transformer_options": to}, run)["img"]  # fmt: skip
        out = self.head(x)
        return out.view(b, f, h // 2, w // 2, c, 2, 2).permute(0, 4, 1, 2, 5, 3, 6).reshape(b, c, f, h, w)


class NextDiT(nn.Module):  # a model Multi-GPU does not cut
    def forward(self, x, *args, **kwargs):
        return x


class BaseModel:
    def __init__(self, diffusion_model):
        self.diffusion_model = diffusion_model
        self.current_weight_patches_uuid = None
        self.model_lowvram = False

    def apply_model(self, x, t, c_crossattn=None, control=None, transformer_options=None, **kwargs):
        wrappers = wrappers_of(transformer_options, "apply_model")
        return Executor(self._apply_model, self, wrappers).execute(
            x, t, None, c_crossattn, control, transformer_options, **kwargs
        )

    def _apply_model(self, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        if control is not None:
            kwargs["control"] = control
        return self.diffusion_model(x, t, c_crossattn, transformer_options=transformer_options, **kwargs)


class ModelPatcher:
    def __init__(self, model, load_device="cpu"):
        self.model = model
        self.load_device = torch.device(load_device)
        self.model_options = {"transformer_options": {}}
        self.wrappers: dict = {}
        self.callbacks: dict = {}

    def clone(self):
        n = ModelPatcher(self.model, self.load_device)
        n.model_options = copy.deepcopy(self.model_options)
        n.wrappers = {t: {k: list(v) for k, v in d.items()} for t, d in self.wrappers.items()}
        n.callbacks = {t: {k: list(v) for k, v in d.items()} for t, d in self.callbacks.items()}
        return n

    def get_model_object(self, name):
        return getattr(self.model, name)

    def add_wrapper_with_key(self, kind, key, fn):
        self.wrappers.setdefault(kind, {}).setdefault(key, []).append(fn)

    def remove_wrappers_with_key(self, kind, key):
        self.wrappers.get(kind, {}).pop(key, None)

    def add_callback_with_key(self, kind, key, fn):
        self.callbacks.setdefault(kind, {}).setdefault(key, []).append(fn)

    def remove_callbacks_with_key(self, kind, key):
        self.callbacks.get(kind, {}).pop(key, None)

    def callbacks_of(self, kind):
        return [c for cs in self.callbacks.get(kind, {}).values() for c in cs]

    def detach(self):
        for cb in self.callbacks_of("on_detach_after"):
            cb(self, True)


def sample(patcher, x, context, steps=3, cfg=2.0, **conds):
    """Euler steps on flow sigmas with batched CFG (cond + zeroed uncond), under inference mode."""
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    with torch.inference_mode():
        for cb in patcher.callbacks_of("on_pre_run"):
            cb(patcher)
        try:
            for i in range(steps):
                to = dict(patcher.model_options["transformer_options"])
                to.update(wrappers=patcher.wrappers, sample_sigmas=sigmas, sigmas=sigmas[i].expand(2),
                          cond_or_uncond=[0, 1])  # fmt: skip
                ctx = torch.cat([context, torch.zeros_like(context)])
                t = sigmas[i].expand(2) * 1000
                out = patcher.model.apply_model(torch.cat([x, x]), t, ctx, transformer_options=to, **conds)
                cond, uncond = out.chunk(2)
                x = x + (sigmas[i + 1] - sigmas[i]) * (uncond + cfg * (cond - uncond))
        finally:
            for cb in patcher.callbacks_of("on_cleanup"):
                cb(patcher)
    return x


def flux(**kw):
    return ModelPatcher(BaseModel(Flux(**kw)))


def wan(**kw):
    return ModelPatcher(BaseModel(WanModel(**kw)))


def flux_inputs(text=6, side=8, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, side, side, generator=g), torch.randn(1, text, 8, generator=g)


def wan_inputs(frames=2, side=8, text=5, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, frames, side, side, generator=g), torch.randn(1, text, 8, generator=g)


def max_rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
