"""Euler sampler for the flow-matching testbed, and loading of the shipped weights.

Flow time runs from ``t = 1`` (pure noise) to ``t = 0`` (data); with velocity ``v = noise - x0``,
``dx/dt = v`` so each Euler step is ``x <- x + (t_next - t) * v``. The step index reaches every attention
function through ``AttentionCall.step_index`` / ``num_steps``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from .model import TestbedConfig, TestbedDiT

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_FILE = "testbed_video.safetensors"


def flow_times(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """``num_steps + 1`` decreasing times from 1 to 0; ``shift > 1`` spends more steps at high noise
    (SD3/Wan's ``t' = s t / (1 + (s - 1) t)``)."""
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).float()


def initial_noise(shape, seed: int, device="cpu") -> torch.Tensor:
    """Seeded Gaussian noise, drawn on the CPU so a seed means the same noise on every device."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(*shape, generator=g).to(device)


@torch.no_grad()
def sample(
    model: TestbedDiT,
    labels,
    *,
    frames: int | None = None,
    size: int | None = None,
    num_steps: int = 20,
    cfg_scale: float = 1.0,
    shift: float = 1.0,
    seed: int = 0,
    noise: torch.Tensor | None = None,
    return_latents: bool = False,
    callback: Callable[[int, torch.Tensor], None] | None = None,
    progress: bool = False,
):
    """Generate clips with ``num_steps`` Euler steps.

    Args:
        model: a :class:`TestbedDiT` (its current attention functions are used).
        labels: class ids ``[B]`` (or an int).
        frames, size: clip length (1 = image mode) and frame size in pixels; default: the model's native.
        cfg_scale: classifier-free guidance scale; 1 disables CFG (one forward per step). With CFG the
            conditional and unconditional branches run as one batch of ``2B`` (conditional first).
        shift: timestep shift (see :func:`flow_times`).
        seed: seed of the initial noise (ignored when ``noise`` is given).
        noise: explicit initial noise ``[B, F, 3, H, W]``.
        return_latents: also return the final model-space sample (``[-1, 1]`` scale, unclipped).
        callback: called as ``callback(step_index, x)`` after each step.
    Returns:
        frames ``[B, F, 3, H, W]`` float32 in ``[0, 1]`` (and the latents if asked).
    """
    cfg: TestbedConfig = model.cfg
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    labels = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
    frames = cfg.frames if frames is None else frames
    size = cfg.size if size is None else size
    if noise is None:
        noise = initial_noise((labels.numel(), frames, cfg.in_channels, size, size), seed, device)
    x = noise.to(device=device, dtype=torch.float32)
    b = x.shape[0]
    labels = labels.expand(b)
    null = torch.full_like(labels, cfg.num_classes)
    times = flow_times(num_steps, shift)
    steps = range(num_steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="sampling", leave=False)
    for i in steps:
        t, t_next = float(times[i]), float(times[i + 1])
        tt = torch.full((b,), t, device=device)
        kw = dict(step_index=i, num_steps=num_steps, timestep=t)
        if cfg_scale != 1.0:
            v = model(
                torch.cat([x, x]).to(dtype), torch.cat([tt, tt]), torch.cat([labels, null]), **kw
            ).float()
            v_cond, v_uncond = v.chunk(2)
            v = v_uncond + cfg_scale * (v_cond - v_uncond)
        else:
            v = model(x.to(dtype), tt, labels, **kw).float()
        x = x + (t_next - t) * v
        if callback is not None:
            callback(i, x)
    out = ((x + 1) / 2).clamp(0, 1)
    return (out, x) if return_latents else out


def load_testbed(path: str | Path | None = None, device="cpu", dtype=torch.float32) -> TestbedDiT:
    """Load the testbed model from a weights folder (``config.json`` + safetensors) or a safetensors file.

    Default: the weights shipped in ``fastattn/testbed/weights``. Weights are stored in bf16; they are cast
    to ``dtype`` (float32 by default, the right choice on the CPU).
    """
    from safetensors.torch import load_file

    path = Path(path) if path is not None else WEIGHTS_DIR
    file = path / WEIGHTS_FILE if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(
            f"no testbed weights at {file}; train them with `python -m fastattn.testbed.train --out {file.parent}`"
        )
    meta = json.loads((file.parent / "config.json").read_text())
    model = TestbedDiT(TestbedConfig.from_dict(meta["model"]))
    state = load_file(str(file))
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    return model.to(device=device, dtype=dtype).eval()
