"""Small random-weight checkpoints in ComfyUI's own file layout, for real-host tests of the node pack.

ComfyUI's ``UNETLoader`` infers a diffusion model's family and configuration from the names and shapes of the
tensors in the file. This module writes, for each family, a ``.safetensors`` file whose key names and shapes are
those of the family's original (non-diffusers) checkpoints, at the smallest configuration the host's detection
accepts, with seeded random weights (normal(0, 0.02); norm scales 1, norm biases 0). The key lists are written
here from the published checkpoint layouts and were checked against ComfyUI a125cd84 (v0.3.64) by loading each
file with the host's loader (no key missing, none left over). No ComfyUI code is used or needed here: only
torch and safetensors.

What the host's detection fixes and what it reads from the shapes (v0.3.64):

==============  =====================================  ================================================
family          read from shapes                       fixed by the host
==============  =====================================  ================================================
flux (schnell)  blocks counted, in_channels, vec dim   hidden 3072, 24 heads x 128, context 4096
sd3 (mmdit)     depth = x_embedder width / 64 (hidden   head_dim 64, one joint block per depth unit
                64*depth, depth heads), context and y   (the last one ``pre_only``)
                dims, pos_embed size
wan 2.1 t2v     dim, ffn_dim, layers, in/out channels   heads = dim / 128, text dim 4096, freq dim 256
hunyuan_video   hidden, context dim, patch, blocks      heads = hidden / 128, vec dim 768, 2 refiner
                                                        blocks, mlp ratio 4
==============  =====================================  ================================================

So Flux cannot be small in width: ``tiny_flux`` is one double and one single block at the real width (535 M
parameters, about 1.1 GB in bf16); the others are a few MB.

Conditioning without a real text encoder: ``random_clip_l.safetensors`` is a CLIP-L text model (ComfyUI's
fixed CLIP-L configuration, 124 M parameters) with random weights. Loaded with the core ``CLIPLoader`` as
``type="sd3"`` it yields SD3-style conditioning: a (1, 77, 4096) context (CLIP-L features zero-padded to 4096)
and a 2048-wide pooled vector (CLIP-L's 768 + 1280 zeros for the absent CLIP-G). That fits all four families:
Flux and HunyuanVideo read the first 768 pooled values, SD3 takes all 2048, Wan takes no pooled vector.

Usage: ``python -m tests.comfy_checkpoints DIR`` or ``write_checkpoints(DIR)``; files already there with the
same spec hash are kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch

SEED = 1234
STD = 0.02
DTYPE = torch.bfloat16

# Core graph ingredients per family: the file, the empty-latent node and its inputs, the KSampler settings.
# Sizes keep each sampling run to seconds on 2 CPU cores; ``tokens`` is the number of image/video tokens of
# the default latent (after the 2x2 patchify).
FAMILIES: dict[str, dict] = {
    "flux": {
        "file": "tiny_flux.safetensors",
        "latent": ("EmptySD3LatentImage", {"width": 128, "height": 128, "batch_size": 1}),
        "channels": 16,
        "tokens": 64,
    },
    "sd3": {
        "file": "tiny_sd3.safetensors",
        "latent": ("EmptySD3LatentImage", {"width": 256, "height": 256, "batch_size": 1}),
        "channels": 16,
        "tokens": 256,
    },
    "wan": {
        "file": "tiny_wan.safetensors",
        "latent": ("EmptyHunyuanLatentVideo", {"width": 128, "height": 128, "length": 9, "batch_size": 1}),
        "channels": 16,
        "tokens": 3 * 8 * 8,
    },
    "hunyuan_video": {
        "file": "tiny_hunyuan_video.safetensors",
        "latent": ("EmptyHunyuanLatentVideo", {"width": 128, "height": 128, "length": 9, "batch_size": 1}),
        "channels": 16,
        "tokens": 3 * 8 * 8,
    },
}
CLIP_FILE = "random_clip_l.safetensors"
CLIP_TYPE = "sd3"

# Each spec entry: (key, shape, init) with init "w" (normal(0, STD)), "one" or "zero".
Spec = list[tuple[str, tuple[int, ...], str]]


def _linear(spec: Spec, name: str, out_f: int, in_f: int, bias: bool = True) -> None:
    spec.append((f"{name}.weight", (out_f, in_f), "w"))
    if bias:
        spec.append((f"{name}.bias", (out_f,), "w"))


def _norm(spec: Spec, name: str, dim: int, bias: bool = True, param: str = "weight") -> None:
    spec.append((f"{name}.{param}", (dim,), "one"))
    if bias:
        spec.append((f"{name}.bias", (dim,), "zero"))


def _mlp_embedder(spec: Spec, name: str, in_dim: int, hidden: int) -> None:
    _linear(spec, f"{name}.in_layer", hidden, in_dim)
    _linear(spec, f"{name}.out_layer", hidden, hidden)


def _flux_double_block(spec: Spec, p: str, hidden: int, head_dim: int, mlp: int) -> None:
    for stream in ("img", "txt"):
        _linear(spec, f"{p}.{stream}_mod.lin", 6 * hidden, hidden)
        _linear(spec, f"{p}.{stream}_attn.qkv", 3 * hidden, hidden)
        _norm(spec, f"{p}.{stream}_attn.norm.query_norm", head_dim, bias=False, param="scale")
        _norm(spec, f"{p}.{stream}_attn.norm.key_norm", head_dim, bias=False, param="scale")
        _linear(spec, f"{p}.{stream}_attn.proj", hidden, hidden)
        _linear(spec, f"{p}.{stream}_mlp.0", mlp, hidden)
        _linear(spec, f"{p}.{stream}_mlp.2", hidden, mlp)


def _flux_single_block(spec: Spec, p: str, hidden: int, head_dim: int, mlp: int) -> None:
    _linear(spec, f"{p}.linear1", 3 * hidden + mlp, hidden)
    _linear(spec, f"{p}.linear2", hidden, hidden + mlp)
    _norm(spec, f"{p}.norm.query_norm", head_dim, bias=False, param="scale")
    _norm(spec, f"{p}.norm.key_norm", head_dim, bias=False, param="scale")
    _linear(spec, f"{p}.modulation.lin", 3 * hidden, hidden)


def flux_spec(depth: int = 1, depth_single: int = 1) -> Spec:
    """FLUX.1-schnell layout (no ``guidance_in``): hidden 3072 and 24 heads of 128 are fixed by the host."""
    hidden, head_dim, mlp, channels, patch = 3072, 128, 4 * 3072, 16, 2
    spec: Spec = []
    _linear(spec, "img_in", hidden, channels * patch * patch)
    _mlp_embedder(spec, "time_in", 256, hidden)
    _mlp_embedder(spec, "vector_in", 768, hidden)
    _linear(spec, "txt_in", hidden, 4096)
    for i in range(depth):
        _flux_double_block(spec, f"double_blocks.{i}", hidden, head_dim, mlp)
    for i in range(depth_single):
        _flux_single_block(spec, f"single_blocks.{i}", hidden, head_dim, mlp)
    _linear(spec, "final_layer.linear", patch * patch * channels, hidden)
    _linear(spec, "final_layer.adaLN_modulation.1", 2 * hidden, hidden)
    return spec


def sd3_spec(depth: int = 2, pos_embed_max_size: int = 32) -> Spec:
    """SD3-medium MMDiT layout: hidden 64*depth, ``depth`` heads of 64, ``depth`` joint blocks."""
    hidden, channels, patch, mlp = 64 * depth, 16, 2, 4 * 64 * depth
    spec: Spec = [("pos_embed", (1, pos_embed_max_size**2, hidden), "w")]
    spec.append(("x_embedder.proj.weight", (hidden, channels, patch, patch), "w"))
    spec.append(("x_embedder.proj.bias", (hidden,), "w"))
    _linear(spec, "t_embedder.mlp.0", hidden, 256)
    _linear(spec, "t_embedder.mlp.2", hidden, hidden)
    _linear(spec, "y_embedder.mlp.0", hidden, 2048)
    _linear(spec, "y_embedder.mlp.2", hidden, hidden)
    _linear(spec, "context_embedder", hidden, 4096)
    for i in range(depth):
        last = i == depth - 1
        for part in ("context_block", "x_block"):
            p = f"joint_blocks.{i}.{part}"
            pre_only = last and part == "context_block"  # the last context block has no output half
            _linear(spec, f"{p}.attn.qkv", 3 * hidden, hidden)
            if not pre_only:
                _linear(spec, f"{p}.attn.proj", hidden, hidden)
                _linear(spec, f"{p}.mlp.fc1", mlp, hidden)
                _linear(spec, f"{p}.mlp.fc2", hidden, mlp)
            _linear(spec, f"{p}.adaLN_modulation.1", (2 if pre_only else 6) * hidden, hidden)
    _linear(spec, "final_layer.linear", patch * patch * channels, hidden)
    _linear(spec, "final_layer.adaLN_modulation.1", 2 * hidden, hidden)
    return spec


def wan_spec(dim: int = 256, ffn_dim: int = 512, layers: int = 2) -> Spec:
    """Wan 2.1 text-to-video layout: ``dim / 128`` heads of 128, text dim 4096, patch (1, 2, 2)."""
    channels = 16
    spec: Spec = [
        ("patch_embedding.weight", (dim, channels, 1, 2, 2), "w"),
        ("patch_embedding.bias", (dim,), "w"),
    ]
    _linear(spec, "text_embedding.0", dim, 4096)
    _linear(spec, "text_embedding.2", dim, dim)
    _linear(spec, "time_embedding.0", dim, 256)
    _linear(spec, "time_embedding.2", dim, dim)
    _linear(spec, "time_projection.1", 6 * dim, dim)
    for i in range(layers):
        p = f"blocks.{i}"
        spec.append((f"{p}.modulation", (1, 6, dim), "w"))
        for attn in ("self_attn", "cross_attn"):
            for proj in ("q", "k", "v", "o"):
                _linear(spec, f"{p}.{attn}.{proj}", dim, dim)
            _norm(spec, f"{p}.{attn}.norm_q", dim, bias=False)
            _norm(spec, f"{p}.{attn}.norm_k", dim, bias=False)
        _norm(spec, f"{p}.norm3", dim)
        _linear(spec, f"{p}.ffn.0", ffn_dim, dim)
        _linear(spec, f"{p}.ffn.2", dim, ffn_dim)
    spec.append(("head.modulation", (1, 2, dim), "w"))
    _linear(spec, "head.head", 4 * channels, dim)
    return spec


def hunyuan_video_spec(hidden: int = 256, depth: int = 1, depth_single: int = 1) -> Spec:
    """HunyuanVideo layout (guidance-distilled, with ``vector_in``): ``hidden / 128`` heads of 128."""
    head_dim, mlp, channels, context = 128, 4 * hidden, 16, 4096
    spec: Spec = [
        ("img_in.proj.weight", (hidden, channels, 1, 2, 2), "w"),
        ("img_in.proj.bias", (hidden,), "w"),
    ]
    _mlp_embedder(spec, "time_in", 256, hidden)
    _mlp_embedder(spec, "vector_in", 768, hidden)
    _mlp_embedder(spec, "guidance_in", 256, hidden)
    _linear(spec, "txt_in.input_embedder", hidden, context)
    _mlp_embedder(spec, "txt_in.t_embedder", 256, hidden)
    _mlp_embedder(spec, "txt_in.c_embedder", context, hidden)
    for i in range(2):  # the token refiner's depth is fixed by the host
        p = f"txt_in.individual_token_refiner.blocks.{i}"
        _linear(spec, f"{p}.adaLN_modulation.1", 2 * hidden, hidden)
        _norm(spec, f"{p}.norm1", hidden)
        _linear(spec, f"{p}.self_attn.qkv", 3 * hidden, hidden)
        _linear(spec, f"{p}.self_attn.proj", hidden, hidden)
        _norm(spec, f"{p}.norm2", hidden)
        _linear(spec, f"{p}.mlp.0", mlp, hidden)
        _linear(spec, f"{p}.mlp.2", hidden, mlp)
    for i in range(depth):
        _flux_double_block(spec, f"double_blocks.{i}", hidden, head_dim, mlp)
    for i in range(depth_single):
        _flux_single_block(spec, f"single_blocks.{i}", hidden, head_dim, mlp)
    _linear(spec, "final_layer.linear", 4 * channels, hidden)
    _linear(spec, "final_layer.adaLN_modulation.1", 2 * hidden, hidden)
    return spec


def clip_l_spec(layers: int = 12, width: int = 768, vocab: int = 49408, positions: int = 77) -> Spec:
    """A CLIP-L text model (Hugging Face ``CLIPTextModel`` names), the configuration ComfyUI fixes for CLIP-L."""
    spec: Spec = [
        ("text_model.embeddings.token_embedding.weight", (vocab, width), "w"),
        ("text_model.embeddings.position_embedding.weight", (positions, width), "w"),
    ]
    for i in range(layers):
        p = f"text_model.encoder.layers.{i}"
        _norm(spec, f"{p}.layer_norm1", width)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _linear(spec, f"{p}.self_attn.{proj}", width, width)
        _norm(spec, f"{p}.layer_norm2", width)
        _linear(spec, f"{p}.mlp.fc1", 4 * width, width)
        _linear(spec, f"{p}.mlp.fc2", width, 4 * width)
    _norm(spec, "text_model.final_layer_norm", width)
    _linear(spec, "text_projection", width, width, bias=False)
    return spec


SPECS = {
    "flux": flux_spec,
    "sd3": sd3_spec,
    "wan": wan_spec,
    "hunyuan_video": hunyuan_video_spec,
    "clip_l": clip_l_spec,
}


def _spec_hash(spec: Spec, seed: int) -> str:
    h = hashlib.sha256(json.dumps([spec, seed, STD, str(DTYPE)]).encode())
    return h.hexdigest()[:16]


def make_state_dict(spec: Spec, seed: int = SEED) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape, init in spec:
        if init == "w":
            t = torch.empty(shape, dtype=torch.float32).normal_(0.0, STD, generator=gen)
        elif init == "one":
            t = torch.ones(shape, dtype=torch.float32)
        elif init == "zero":
            t = torch.zeros(shape, dtype=torch.float32)
        else:
            raise ValueError(f"unknown init {init!r} for {key}")
        out[key] = t.to(DTYPE).contiguous()
    return out


def write_file(path: str, spec: Spec, seed: int = SEED) -> bool:
    """Writes ``spec`` to ``path`` unless a file with the same spec hash is there. Returns whether it wrote."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    digest = _spec_hash(spec, seed)
    if os.path.isfile(path):
        try:
            with safe_open(path, "pt") as f:
                if (f.metadata() or {}).get("fastattn_test_spec") == digest:
                    return False
        except Exception:  # a partial or foreign file: write it anew
            pass
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(make_state_dict(spec, seed), tmp, metadata={"fastattn_test_spec": digest})
    os.replace(tmp, path)
    return True


def write_checkpoints(directory: str, families=None, clip: bool = True) -> dict[str, str]:
    """Writes the diffusion checkpoints (and the CLIP-L text encoder) into ``directory``; returns name -> path."""
    os.makedirs(directory, exist_ok=True)
    paths = {}
    for i, family in enumerate(families or FAMILIES):
        path = os.path.join(directory, FAMILIES[family]["file"])
        write_file(path, SPECS[family](), seed=SEED + i)
        paths[family] = path
    if clip:
        path = os.path.join(directory, CLIP_FILE)
        write_file(path, clip_l_spec(), seed=SEED + 100)
        paths["clip_l"] = path
    return paths


def install_into_comfy_base(base: str, families=None, cache: str | None = None) -> dict[str, str]:
    """Puts the files where a ComfyUI ``--base-directory`` looks: models/diffusion_models and models/text_encoders.

    Files are written once into ``cache`` (default: ``FASTATTN_COMFY_CKPT_CACHE`` when set, else a folder in
    ``base``) and hard-linked (or copied) from there.
    """
    cache = cache or os.environ.get("FASTATTN_COMFY_CKPT_CACHE")
    src_dir = cache or os.path.join(base, "fastattn-checkpoints")
    paths = write_checkpoints(src_dir, families=families)
    dest = {}
    for name, path in paths.items():
        sub = "text_encoders" if name == "clip_l" else "diffusion_models"
        target_dir = os.path.join(base, "models", sub)
        os.makedirs(target_dir, exist_ok=True)
        target = os.path.join(target_dir, os.path.basename(path))
        if os.path.abspath(target) != os.path.abspath(path):
            if os.path.exists(target):
                os.remove(target)
            try:
                os.link(path, target)
            except OSError:
                import shutil

                shutil.copy2(path, target)
        dest[name] = target
    return dest


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.comfy_checkpoints DIR")
    for name, p in write_checkpoints(sys.argv[1]).items():
        print(f"{name}: {p} ({os.path.getsize(p) / 2**20:.1f} MiB)")
