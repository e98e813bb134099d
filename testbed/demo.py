"""``fastattn demo``: the shipped testbed DiT sampled with dense and with fast attention, side by side.

Runs on the CPU by default at a reduced size (8 frames of 32x32 pixels, 512 tokens, 32-token blocks) and
on the GPU when there is one (16 frames of 64x64, 4,096 tokens, 128-token blocks). The fast run goes through
the product path: :func:`fastattn.testbed.fast.enable` with a ``testbed`` preset (``balanced`` by default:
dynamic top-k blocks with residual sharing, see ``presets/structural.json``) or a method and density.
Writes a PNG grid and a GIF (top row dense, bottom row fast) and prints time, speedup, the attention work
done and PSNR/SSIM of the fast clip against the dense one.

The testbed is ours and small: it measures fast-vs-dense fidelity on learned attention, never FLUX or Wan
quality.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..evaluation.metrics import summarize
from ..masks import TokenLayout
from .fast import enable
from .sample import load_testbed, sample


def _to_uint8(clip: torch.Tensor):
    """``[F, 3, H, W]`` in [0, 1] -> list of HxWx3 uint8 arrays."""
    return [(f.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy() for f in clip]


def write_grid(dense: torch.Tensor, fast: torch.Tensor, out: Path, scale: int = 3) -> tuple[Path, Path]:
    """PNG of all frames (row 1 dense, row 2 fast, one pair of rows per clip) and an animated GIF."""
    import numpy as np
    from PIL import Image

    rows_png, frames_gif = [], []
    for d, f in zip(dense, fast):
        dd, ff = _to_uint8(d), _to_uint8(f)
        rows_png += [np.concatenate(dd, 1), np.concatenate(ff, 1)]
        frames_gif.append([np.concatenate([a, b], 0) for a, b in zip(dd, ff)])
    png = Image.fromarray(np.concatenate(rows_png, 0))
    png = png.resize((png.width * scale, png.height * scale), Image.NEAREST)
    out.mkdir(parents=True, exist_ok=True)
    png_path, gif_path = out / "demo.png", out / "demo.gif"
    png.save(png_path)
    per_frame = [
        Image.fromarray(np.concatenate([clip[i] for clip in frames_gif], 1)) for i in range(len(dense[0]))
    ]
    per_frame = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in per_frame]
    per_frame[0].save(gif_path, save_all=True, append_images=per_frame[1:], duration=120, loop=0)
    return png_path, gif_path


def run_demo(
    out: str | Path = "fastattn-demo",
    labels=(0, 9, 14, 23),
    steps: int = 16,
    preset: str | None = "balanced",
    method: str | None = None,
    density: float | None = None,
    quant: str | None = None,
    device: str | None = None,
    seed: int = 0,
    frames: int | None = None,
    size: int | None = None,
) -> dict:
    from rich.console import Console
    from rich.table import Table

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.startswith("cuda")
    model = load_testbed(device=device, dtype=torch.bfloat16 if on_gpu else torch.float32).eval()
    # CPU: 8 frames of 32x32 (a size the testbed was trained at, 512 tokens), so the demo stays near a minute
    frames = frames or (model.cfg.frames if on_gpu else 8)
    size = size or (model.cfg.size if on_gpu else 32)
    grid = model.cfg.grid(frames, size)
    layout = TokenLayout.video(*grid)
    kw = dict(frames=frames, size=size, num_steps=steps, seed=seed, progress=True)
    console = Console(width=max(110, Console().width))  # the table's columns stay readable when piped
    console.print(f"testbed DiT on {device}: {len(labels)} clips, {frames} frames of {size}x{size}, "
                  f"{layout.seq_len} tokens, {steps} steps")  # fmt: skip

    def timed(fn):
        if on_gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = fn()
        if on_gpu:
            torch.cuda.synchronize()
        return r, time.perf_counter() - t0

    if on_gpu:  # warm-up outside the timed runs
        sample(model, labels[:1], **{**kw, "num_steps": 2, "progress": False})
    dense, t_dense = timed(lambda: sample(model, labels, **kw))
    if method is not None:
        preset = None
    handle = enable(
        model, preset, method=method, density=density, quant=quant, block_size=128 if on_gpu else 32
    )
    try:
        if on_gpu:  # compiles the kernels outside the timed run
            sample(model, labels[:1], **{**kw, "num_steps": 2, "progress": False})
            handle.reset_stats()
        fast, t_fast = timed(lambda: sample(model, labels, **kw))
        stats = handle.stats()
    finally:
        handle.disable()
    scores = summarize(fast.flatten(0, 1), dense.flatten(0, 1))
    png, gif = write_grid(dense, fast, Path(out))

    plan = stats["plan"]
    what = f"preset testbed/{preset}" if preset else plan["method"]
    table = Table(title="fastattn demo: testbed DiT, fast vs dense (same seed)")
    for col in ("run", "attention", "time (s)", "speedup", "attention work", "PSNR (dB)", "SSIM"):
        table.add_column(col)
    table.add_row("dense", "SDPA", f"{t_dense:.1f}", "1.00x", "1.00", "-", "-")
    table.add_row(
        "fast",
        f"{what}: {stats['sparse_calls']} sparse / {stats['dense_calls']} dense calls",
        f"{t_fast:.1f}",
        f"{t_dense / t_fast:.2f}x",
        f"{stats['density']:.2f}",
        f"{scores['psnr']:.2f}",
        f"{scores['ssim']:.4f}",
    )
    console.print(table)
    if not on_gpu:
        console.print(
            "[dim]CPU: the sparse path is the exact PyTorch reference, so the times say nothing about kernel "
            "speed; 'attention work' is the fraction of dense attention computed.[/]"
        )
    console.print(f"wrote {png} and {gif} (top row dense, bottom row fast)")
    return {"dense_s": t_dense, "fast_s": t_fast, "attention_density": stats["density"], **scores,
            "png": str(png), "gif": str(gif), "stats": stats}  # fmt: skip
