"""ComfyUI model families: which diffusion model a MODEL holds, and the token layout of its self-attention.

The family is read from ``model.diffusion_model``'s class (its nearest known base class), never assumed.
The token layout of each forward comes from that forward's inputs: the latent ``x`` (``[B, C, H, W]`` or
``[B, C, T, H, W]``) cut by the model's patch size (padded up, as ComfyUI pads), and the text tokens of the
conditioning (``c_crossattn``) for joint-attention families. Where the inputs hold tokens the layout does
not describe (reference latents, concatenated frames) the layout is ``None`` with the reason, and every
self-attention call of that forward runs the host's attention, counted with that reason.

| family        | ComfyUI classes                                   | self-attention sequence          |
|---------------|---------------------------------------------------|----------------------------------|
| flux          | Flux, Chroma, ChromaRadiance                      | [txt, img]                       |
| wan           | WanModel (+ VACE, camera, S2V, HuMo subclasses)   | video only (cross-attn: host)    |
| hunyuan_video | HunyuanVideo                                      | [img, txt] (refiner: host)       |
| qwen_image    | QwenImageTransformer2DModel                       | [txt, img]                       |
| sd3           | OpenAISignatureMMDITWrapper (SD3, SD3.5)          | [txt, img] (+ image-only attn2)  |
| ltx_video     | LTXVModel                                         | video only (cross-attn: host)    |
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ...masks.layout import TokenLayout

NOT_YET = {  # families present in ComfyUI that pass through for now, with the reason in the report
    "NextDiT": "lumina2", "HiDreamImageTransformer2DModel": "hidream", "MiniTrainDIT": "cosmos",
    "GeneralDIT": "cosmos", "UNetModel": "unet (SD1.x/SDXL)",
}  # fmt: skip


@dataclass(frozen=True)
class ComfyFamily:
    """What the adapter needs to know about one ComfyUI diffusion model.

    Args:
        family: preset family (``presets/structural.json``): ``"flux"``, ``"wan"``...
        model_class: the diffusion model's class name (``"Flux"``, ``"Chroma"``, ``"WanModel"``...).
        patch: latent cells per token ``(pt, ph, pw)``.
        joint_text: self-attention runs over text and image tokens together.
        text_first: the text tokens come first in the joint sequence.
        text_extra: tokens the model adds to the text (SD3's register tokens).
        extra_token_inputs: conditioning inputs that add tokens the layout does not describe.
        num_layers: self-attention calls per forward (None: unknown).
        num_heads, head_dim: per self-attention layer (None: unknown).
    """

    family: str
    model_class: str
    patch: tuple[int, int, int]
    joint_text: bool
    text_first: bool = True
    text_extra: int = 0
    extra_token_inputs: tuple[str, ...] = ()
    num_layers: int | None = None
    num_heads: int | None = None
    head_dim: int | None = None

    def fingerprint(self):
        from ...plans.meta import ModelFingerprint

        return ModelFingerprint(self.family, self.model_class, self.num_layers, self.num_heads, self.head_dim)

    def layout(self, x, context, conds: dict) -> tuple[TokenLayout | None, str | None]:
        """``(layout, None)`` of one forward's joint self-attention sequence, or ``(None, reason)``.

        ``x``: the latent as ``apply_model`` receives it; ``context``: ``c_crossattn`` (``[B, T, C]`` or None);
        ``conds``: the other model inputs (``ref_latents``, ``clip_fea``...).
        """
        for name in self.extra_token_inputs:
            if conds.get(name) is not None:
                return None, f"{name} adds tokens the token layout does not describe yet"
        shape = getattr(x, "shape", None)
        if shape is None or len(shape) not in (4, 5):
            return None, f"latent of shape {None if shape is None else tuple(shape)} (expected 4-D or 5-D)"
        pt, ph, pw = self.patch
        frames = math.ceil(shape[2] / pt) if len(shape) == 5 else 1
        grid = (frames, math.ceil(shape[-2] / ph), math.ceil(shape[-1] / pw))
        n_img = grid[0] * grid[1] * grid[2]
        n_txt = _tokens(context)
        if self.joint_text:
            text = n_txt + self.text_extra + sum(_tokens(conds.get(k)) for k in ("txt_byt5",))
            return TokenLayout(n_img + text, text, self.text_first, grid), None
        cross = {n_txt, n_txt + _tokens(conds.get("clip_fea"))} - {0}
        if n_img in cross:  # a cross-attention call would look like self-attention: refuse to guess
            return None, f"{n_img} image tokens equal the text length (self/cross-attention ambiguous)"
        return TokenLayout(n_img, 0, True, grid), None


def _tokens(t) -> int:
    shape = getattr(t, "shape", None)
    return int(shape[-2]) if shape is not None and len(shape) >= 2 else 0


def _len(module, *names) -> int:
    return sum(len(getattr(module, n, None) or ()) for n in names)


def _int(v) -> int | None:
    return int(v) if isinstance(v, int) and not isinstance(v, bool) else None


def _patch3(p) -> tuple[int, int, int]:
    if isinstance(p, int):
        return (1, p, p)
    p = tuple(int(x) for x in p)
    return p if len(p) == 3 else (1, *p[-2:])


def _flux(dm, name):
    heads = _int(getattr(dm, "num_heads", None))
    hidden = _int(getattr(dm, "hidden_size", None))
    return dict(patch=_patch3(dm.patch_size), joint_text=True, text_first=True,
                extra_token_inputs=("ref_latents",), num_layers=_len(dm, "double_blocks", "single_blocks"),
                num_heads=heads, head_dim=hidden // heads if heads and hidden else None)  # fmt: skip


def _hunyuan(dm, name):
    fields = _flux(dm, name)
    fields.update(text_first=False, extra_token_inputs=("ref_latent",))
    return fields


def _wan(dm, name):
    heads, dim = _int(getattr(dm, "num_heads", None)), _int(getattr(dm, "dim", None))
    return dict(patch=_patch3(dm.patch_size), joint_text=False,
                extra_token_inputs=("reference_latent", "time_dim_concat"),
                num_layers=_len(dm, "blocks", "vace_blocks"), num_heads=heads,
                head_dim=dim // heads if heads and dim else None)  # fmt: skip


def _block_heads(block, attr):
    attn = getattr(block, attr, None)
    return _int(getattr(attn, "heads", None)), _int(getattr(attn, "dim_head", None))


def _qwen(dm, name):
    blocks = getattr(dm, "transformer_blocks", None) or ()
    heads, head_dim = _block_heads(blocks[0], "attn") if len(blocks) else (None, None)
    return dict(patch=_patch3(dm.patch_size), joint_text=True, text_first=True,
                extra_token_inputs=("ref_latents",), num_layers=len(blocks), num_heads=heads, head_dim=head_dim)  # fmt: skip


def _sd3(dm, name):
    blocks = getattr(dm, "joint_blocks", None) or ()
    extra = sum(bool(getattr(getattr(b, "x_block", None), "x_block_self_attn", False)) for b in blocks)
    heads, hidden = _int(getattr(dm, "num_heads", None)), _int(getattr(dm, "hidden_size", None))
    patch = getattr(getattr(dm, "x_embedder", None), "patch_size", None) or dm.patch_size
    return dict(patch=_patch3(patch), joint_text=True, text_first=True,
                text_extra=_int(getattr(dm, "register_length", 0)) or 0, num_layers=len(blocks) + extra,
                num_heads=heads, head_dim=hidden // heads if heads and hidden else None)  # fmt: skip


def _ltxv(dm, name):
    blocks = getattr(dm, "transformer_blocks", None) or ()
    heads, head_dim = _block_heads(blocks[0], "attn1") if len(blocks) else (None, None)
    patch = getattr(getattr(dm, "patchifier", None), "patch_size", None) or (1, 1, 1)
    return dict(patch=_patch3(patch), joint_text=False, num_layers=len(blocks), num_heads=heads,
                head_dim=head_dim)  # fmt: skip


CLASSES = {  # class name -> (preset family, how to read the model)
    "Flux": ("flux", _flux), "Chroma": ("flux", _flux), "ChromaRadiance": ("flux", _flux),
    "WanModel": ("wan", _wan), "HunyuanVideo": ("hunyuan_video", _hunyuan),
    "QwenImageTransformer2DModel": ("qwen_image", _qwen), "OpenAISignatureMMDITWrapper": ("sd3", _sd3),
    "LTXVModel": ("ltx_video", _ltxv),
}  # fmt: skip


def detect_family(diffusion_model) -> tuple[ComfyFamily | None, str | None]:
    """``(family, None)`` for a supported model (its class or nearest known base class), else
    ``(None, reason)`` naming the class and why it passes through."""
    name = type(diffusion_model).__name__
    for cls in type(diffusion_model).__mro__:
        if cls.__name__ in CLASSES:
            family, read = CLASSES[cls.__name__]
            try:
                return ComfyFamily(family=family, model_class=name, **read(diffusion_model, name)), None
            except (AttributeError, TypeError, ValueError) as e:
                return None, f"{name}: could not read its patch size / blocks ({e})"
        if cls.__name__ in NOT_YET:
            return None, f"family not supported yet: {NOT_YET[cls.__name__]} ({name})"
    return None, f"family not supported yet: {name} is not a diffusion transformer fastattn knows"
