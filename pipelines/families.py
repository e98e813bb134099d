"""Per-family adapters: how each diffusers transformer lays out its tokens, read from the actual input.

Every adapter answers, from the arguments of one transformer forward: where the text tokens are (before
or after the image tokens, how many) and the latent token grid F x H x W after patching. Nothing is
hard-coded: sizes come from the input tensors, patch sizes from the model's config.

| family        | classes                                 | joint sequence       | attention path    |
|---------------|-----------------------------------------|----------------------|-------------------|
| flux, flux2   | FluxTransformer2DModel, Flux2...        | [txt, img]           | dispatcher        |
| wan           | WanTransformer3DModel (T2V, I2V, 2.2)   | video only (+ cross) | dispatcher        |
| hunyuan_video | HunyuanVideoTransformer3DModel          | [img, txt], masked   | dispatcher        |
| qwen_image    | QwenImageTransformer2DModel             | [txt, img], masked   | dispatcher        |
| ltx_video     | LTXVideoTransformer3DModel              | video only (+ cross) | dispatcher        |
| sd3           | SD3Transformer2DModel (SD3, SD3.5)      | [img, txt]           | direct SDPA: ours |
| cogvideox     | CogVideoXTransformer3DModel             | [txt, img]           | direct SDPA: ours |
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..masks.layout import TokenLayout

_PARAMS: dict[type, list[str]] = {}


def _arg(model, args, kwargs, name: str):
    """Argument ``name`` of ``model.forward`` from a hook's ``(args, kwargs)``."""
    if name in kwargs:
        return kwargs[name]
    params = _PARAMS.get(type(model))
    if params is None:
        params = _PARAMS[type(model)] = [
            p for p in inspect.signature(type(model).forward).parameters if p != "self"
        ]
    i = params.index(name) if name in params else -1
    return args[i] if 0 <= i < len(args) else None


def _tuple3(p) -> tuple[int, int, int]:
    if isinstance(p, int):
        return (1, p, p)
    p = tuple(int(x) for x in p)
    return p if len(p) == 3 else (1, *p[-2:])


def _text_len(model, args, kwargs) -> int:
    ehs = _arg(model, args, kwargs, "encoder_hidden_states")
    return 0 if ehs is None else int(ehs.shape[1])


def _layout(text_len: int, text_first: bool, grid) -> TokenLayout:
    f, h, w = (int(x) for x in grid)
    return TokenLayout(f * h * w + text_len, text_len, text_first, (f, h, w))


def _grid_from_ids(ids: torch.Tensor | None, n_img: int):
    """Latent grid from FLUX-style position ids ``[N, 3|4]`` (t, h, w[, l]) when they tile a box."""
    if ids is None:
        return None
    if ids.dim() == 3:
        ids = ids[0]
    h = int(ids[:, 1].max() - ids[:, 1].min()) + 1
    w = int(ids[:, 2].max() - ids[:, 2].min()) + 1
    f = n_img // (h * w) if h * w else 0
    return (f, h, w) if f >= 1 and f * h * w == n_img else None


# ---------------------------------------------------------------------------------------- layouts


def _wan_layout(model, args, kwargs):
    hs = _arg(model, args, kwargs, "hidden_states")  # [B, C, F, H, W]
    pt, ph, pw = _tuple3(model.config.patch_size)
    _, _, f, h, w = hs.shape
    return _layout(0, True, (f // pt, h // ph, w // pw))


def _flux_layout(model, args, kwargs):
    hs = _arg(model, args, kwargs, "hidden_states")  # [B, N, C], packed 2x2 patches
    n_img, n_txt = int(hs.shape[1]), _text_len(model, args, kwargs)
    grid = _grid_from_ids(_arg(model, args, kwargs, "img_ids"), n_img)
    return TokenLayout(n_img + n_txt, n_txt, True, grid)


def _qwen_layout(model, args, kwargs):
    hs = _arg(model, args, kwargs, "hidden_states")  # [B, N, C]
    n_img, n_txt = int(hs.shape[1]), _text_len(model, args, kwargs)
    shapes = _arg(model, args, kwargs, "img_shapes")
    grid = None
    if shapes:
        first = shapes[0]
        if isinstance(first, (list, tuple)) and len(first) == 1 and isinstance(first[0], (list, tuple)):
            first = first[0]  # [[(F, H, W)]] per batch item
        if isinstance(first, (list, tuple)) and len(first) == 3 and all(isinstance(x, int) for x in first):
            if first[0] * first[1] * first[2] == n_img:
                grid = tuple(first)
    return TokenLayout(n_img + n_txt, n_txt, True, grid)


def _hunyuan_video_layout(model, args, kwargs):
    hs = _arg(model, args, kwargs, "hidden_states")  # [B, C, F, H, W]
    p, pt = int(model.config.patch_size), int(model.config.patch_size_t)
    _, _, f, h, w = hs.shape
    return _layout(_text_len(model, args, kwargs), False, (f // pt, h // p, w // p))


def _sd3_layout(model, args, kwargs):
    hs = _arg(model, args, kwargs, "hidden_states")  # [B, C, H, W]
    p = int(model.config.patch_size)
    return _layout(_text_len(model, args, kwargs), False, (1, hs.shape[-2] // p, hs.shape[-1] // p))


def _cogvideox_layout(model, args, kwargs):
    hs = _arg(model, args, kwargs, "hidden_states")  # [B, F, C, H, W]
    p = int(model.config.patch_size)
    pt = int(getattr(model.config, "patch_size_t", None) or 1)
    _, f, _, h, w = hs.shape
    return _layout(_text_len(model, args, kwargs), True, (f // pt, h // p, w // p))


def _ltx_layout(model, args, kwargs):
    hs = _arg(model, args, kwargs, "hidden_states")  # [B, N, C], already patchified
    f, h, w = (_arg(model, args, kwargs, k) for k in ("num_frames", "height", "width"))
    n = int(hs.shape[1])
    if None in (f, h, w):
        return TokenLayout(n)
    p, pt = int(model.config.patch_size), int(model.config.patch_size_t)
    for grid in ((f, h, w), (f // pt, h // p, w // p)):
        if grid[0] * grid[1] * grid[2] == n:
            return _layout(0, True, grid)
    return TokenLayout(n)


# ---------------------------------------------------------------------------------------- adapters


@dataclass(frozen=True)
class FamilyAdapter:
    """What fastattn needs to know about one model family.

    Args:
        family: preset key (``presets/structural.json``).
        classes: transformer class names of the family.
        layout: ``(model, args, kwargs) -> TokenLayout`` of the joint self-attention sequence.
        self_attention: predicate on processor paths (``"blocks.0.attn1.processor"``) that are self-attention
            (their count is the number of layers per forward).
        replace: processor class name -> our math-identical dispatcher processor class name, for families
            whose processors call SDPA directly.
        one_key_mask: the family's self-attention calls of one forward all get the same key-padding mask values,
            as a new tensor per call (``ForwardContext.one_key_mask``: the runtime reads the first one only).
    """

    family: str
    classes: tuple[str, ...]
    layout: Callable
    self_attention: Callable[[str], bool] = lambda path: True
    replace: dict = field(default_factory=dict)
    one_key_mask: bool = False

    def timestep(self, model, args, kwargs) -> float | None:
        t = _arg(model, args, kwargs, "timestep")
        if t is None:
            return None
        if isinstance(t, torch.Tensor):
            # max: Wan 2.2 TI2V passes per-token timesteps with the first frame at 0.
            return float(t.detach().float().max()) if t.numel() else None
        return float(t)


ADAPTERS: tuple[FamilyAdapter, ...] = (
    FamilyAdapter("flux", ("FluxTransformer2DModel",), _flux_layout),
    FamilyAdapter("flux2", ("Flux2Transformer2DModel",), _flux_layout),
    FamilyAdapter(
        "wan",
        ("WanTransformer3DModel",),
        _wan_layout,
        self_attention=lambda path: ".attn1." in path,
    ),
    FamilyAdapter(
        "hunyuan_video",
        ("HunyuanVideoTransformer3DModel",),
        _hunyuan_video_layout,
        self_attention=lambda path: path.startswith(("transformer_blocks.", "single_transformer_blocks.")),
    ),
    # Qwen-Image's processor builds its joint mask in every layer from the forward's encoder_hidden_states_mask
    FamilyAdapter("qwen_image", ("QwenImageTransformer2DModel",), _qwen_layout, one_key_mask=True),
    FamilyAdapter(
        "ltx_video",
        ("LTXVideoTransformer3DModel",),
        _ltx_layout,
        self_attention=lambda path: ".attn1." in path,
    ),
    FamilyAdapter(
        "sd3",
        ("SD3Transformer2DModel",),
        _sd3_layout,
        replace={"JointAttnProcessor2_0": "FastJointAttnProcessor"},
    ),
    FamilyAdapter(
        "cogvideox",
        ("CogVideoXTransformer3DModel",),
        _cogvideox_layout,
        replace={"CogVideoXAttnProcessor2_0": "FastCogVideoXAttnProcessor"},
    ),
)

FAMILIES = {a.family: a for a in ADAPTERS}


def adapter_for(model) -> FamilyAdapter | None:
    """The adapter of ``model``'s class (or of its nearest supported base class)."""
    for cls in type(model).__mro__:
        for a in ADAPTERS:
            if cls.__name__ in a.classes:
                return a
    return None


def supported_classes() -> list[str]:
    return [c for a in ADAPTERS for c in a.classes]
