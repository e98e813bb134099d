"""``fastattn demo``: the shipped testbed DiT sampled with dense and with fast attention, side by side.

The fast run goes through the product path: :func:`fastattn.testbed.fast.enable` with a ``testbed``
preset (``balanced`` by default: dynamic top-k blocks with residual sharing, see
``presets/structural.json``) or a method and density. Both runs are timed warm: one short run of each
comes first (kernel compilation and autotuning on a GPU, first-call costs on the CPU) and its time is
reported on its own line.

Sizes: on a GPU 4 clips of 16 frames of 64x64 pixels (4,096 tokens, the size the testbed was trained at,
128-token blocks). On the CPU one clip at that size (16 frames of 64x64, 4,096 tokens): sparse
attention pays only where attention is a large part of the work; at 2,048 tokens the gain was within the
timing noise of a shared 2-core machine (1.02-1.17x), and at 512 tokens the testbed's MLPs and
projections dominate (dense attention is under a tenth of a forward there; ``balanced`` measured 1.05x
and 24.6 dB at 32-token blocks). The CPU's sparse path computes only the listed blocks
(:mod:`fastattn.attn_kernels.cpu_sparse`); dense attention is PyTorch's SDPA.

Writes ``demo.png`` (all frames; per clip one row dense, one row fast), ``demo.gif`` (the same, animated)
and ``demo.html`` (both images, the table, and where the numbers come from), and prints the table: time,
speedup, attention work done and PSNR/SSIM of the fast clip against the dense one, then the GPU figures
to expect, read from the benchmark JSON committed in ``bench/results/``.

The testbed is ours and small: it measures fast-vs-dense fidelity on learned attention, never FLUX or Wan
quality.

On a GPU a second panel follows (``--real-shape``, on by default there): at 4,096 tokens a GPU is bound by
the host and sparse presets run slower than dense, so the demo also times the same plan on a
Wan-2.1-1.3B-shaped layer stack with random weights (32,760 tokens, batch 2 for CFG; see
:mod:`fastattn.testbed.real_shape`) over a whole ``--real-steps`` schedule (default 10), dense against the
preset: speed only, no image. ``--real-layers`` time-boxes it (fewer of the 30 layers; the output says so).
On the CPU the panel is skipped, with one line saying why.
"""

from __future__ import annotations

import html
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..evaluation.metrics import summarize
from ..masks import TokenLayout
from .fast import FAMILY, enable
from .real_shape import WAN_13B, time_real_shape
from .sample import WEIGHTS_DIR, load_testbed, sample

RESULTS_DIR = Path(__file__).resolve().parent.parent / "bench" / "results"
GPU_RESULTS = ("e2e-nvidia_h200.json", "quality-nvidia_h200.json")  # the GPU figures the demo quotes
# whole-schedule timings of plans given as settings (the testbed presets' dynamic plans among them) on real
# diffusers Wan-1.3B: the real-shape panel's expectation
REAL_SHAPE_RESULTS = ("e2e-dynamic-wan13-nvidia_h200.json",)
REAL_STEPS = 10  # steps of the real-shape panel's schedule (about 10 s dense on an H200)
REAL_SKIP_CPU = (
    "skipped: it needs a CUDA GPU (a Wan-1.3B-shaped step at 32,760 tokens is about 0.56 PFLOP: hours on a "
    "CPU); on the CPU the testbed run above is where sparse attention pays."
)

LABELS = (0, 9, 14, 23)


@dataclass(frozen=True)
class DemoSize:
    clips: int
    frames: int
    size: int  # frame size in pixels
    block_size: int  # tokens per attention block


# GPU: the testbed's training size, four clips. CPU: one clip of that size, the demo about 90 s on 2 cores
# (README, "fastattn demo", has the measured figures).
GPU_SIZE = DemoSize(clips=4, frames=16, size=64, block_size=128)
CPU_SIZE = DemoSize(clips=1, frames=16, size=64, block_size=128)


@dataclass(frozen=True)
class DemoSettings:
    """Checked demo arguments (:func:`check_demo_args`)."""

    out: Path
    device: str
    steps: int
    labels: tuple[int, ...]
    frames: int
    size: int
    block_size: int
    plan: object  # the AttentionPlan the fast run uses
    what: str  # how the table names it
    real_shape: bool = False  # time the Wan-1.3B-shaped stack too (GPU only)
    real_steps: int = REAL_STEPS
    real_layers: int = WAN_13B.layers
    real_skip: str = ""  # why the real-shape panel does not run (one line), when it does not


def _testbed_config() -> dict:
    """The shipped weights' model config (read without loading the weights)."""
    return json.loads((WEIGHTS_DIR / "config.json").read_text())["model"]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_demo_args(
    out="fastattn-demo",
    steps: int = 16,
    preset: str | None = "balanced",
    method: str | None = None,
    density: float | None = None,
    quant: str | None = None,
    device: str | None = None,
    frames: int | None = None,
    size: int | None = None,
    clips: int | None = None,
    labels=LABELS,
    real_shape: bool | None = None,
    real_steps: int = REAL_STEPS,
    real_layers: int | None = None,
) -> DemoSettings:
    """Every demo argument checked before anything is loaded or sampled; ``ValueError`` says what was
    expected. Creates ``out`` (it must be a writable folder)."""
    from ..attn_kernels import QUANT_MODES
    from ..plans.build import make_plan

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"--device must be 'cpu' or 'cuda[:N]', got {device!r}") from e
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be 'cpu' or 'cuda[:N]', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is available here (use --device cpu)")
    default = GPU_SIZE if dev.type == "cuda" else CPU_SIZE
    steps = _positive_int("--steps", steps)
    frames = _positive_int("--frames", default.frames if frames is None else frames)
    size = _positive_int("--size", default.size if size is None else size)
    clips = _positive_int("--clips", default.clips if clips is None else clips)
    real_steps = _positive_int("--real-steps", real_steps)
    real_layers = _positive_int("--real-layers", WAN_13B.layers if real_layers is None else real_layers)
    if real_layers > WAN_13B.layers:
        raise ValueError(
            f"--real-layers must be at most {WAN_13B.layers} (Wan-1.3B's layers), got {real_layers}"
        )
    if real_shape and dev.type != "cuda":
        raise ValueError(
            "--real-shape needs a CUDA GPU (--device cuda): the panel times 32,760-token attention"
        )
    cfg = _testbed_config()
    if size % cfg["patch"]:
        raise ValueError(f"--size must be a multiple of the testbed's patch size {cfg['patch']}, got {size}")
    labels = tuple(int(x) for x in labels)
    if not labels or any(not 0 <= x < cfg["num_classes"] for x in labels):
        raise ValueError(f"labels must be class ids in [0, {cfg['num_classes']}), got {labels}")
    labels = (labels * clips)[:clips]
    if density is not None and not (isinstance(density, (int, float)) and 0.0 < density <= 1.0):
        raise ValueError(
            f"--density must be a fraction in (0, 1] of the key blocks to compute, got {density!r}"
        )
    if quant is not None and quant not in QUANT_MODES:
        raise ValueError(f"--quant must be one of {', '.join(QUANT_MODES)}, got {quant!r}")
    if method is not None:
        preset = None
    if preset is None and method is None:
        raise ValueError("give --preset (safe, balanced, fast) or --method")
    block_size = default.block_size  # the GPU kernel takes 128-token blocks
    if dev.type == "cpu":  # short CPU clips (tests) keep at least 16 blocks a side, so some can be skipped
        block_size = min(block_size, max(16, frames * (size // cfg["patch"]) ** 2 // 16))
    plan = make_plan(FAMILY, preset, method, density, None, quant=quant, block_size=block_size)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot create the folder ({e.strerror or e})") from None
    if not out.is_dir() or not os.access(out, os.W_OK):
        raise ValueError(f"--out {out}: not a writable folder")
    what = f"preset testbed/{preset}" if preset else plan.method.name
    if real_shape is None:
        real_shape = dev.type == "cuda"
    skip = "" if real_shape else REAL_SKIP_CPU if dev.type != "cuda" else "skipped (--no-real-shape)."
    return DemoSettings(out, device, steps, labels, frames, size, block_size, plan, what,
                        real_shape, real_steps, real_layers, skip)  # fmt: skip


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


def gpu_expectations(preset: str | None, results_dir: Path = RESULTS_DIR, plan=None) -> list[str]:
    """Lines quoting the committed GPU benchmarks for ``preset``: end-to-end speed on real model shapes
    (``e2e-*.json``), testbed quality at full size (``quality-*.json``) and, where a real diffusers Wan run
    timed the same plan settings, the real-shape panel's expectation (:func:`real_shape_expectations`;
    ``plan``: the demo's plan, default the preset's). Empty when none is there."""
    lines = []
    e2e_path, quality_path = (results_dir / name for name in GPU_RESULTS)
    if preset and e2e_path.exists():
        for r in json.loads(e2e_path.read_text()):
            if r.get("preset") != preset or "speedup" not in r:
                continue
            measured = r.get("schedule_measured")
            if isinstance(measured, dict) and "speedup" in measured:
                speed = f"{measured['speedup']:.2f}x over a whole {measured.get('steps', '?')}-step schedule"
            else:
                speed = f"{r['speedup']:.2f}x per sparse step"
            lines.append(
                f"{r['model']} {r.get('resolution', '')}: {speed} ({r.get('method')}, quant {r.get('quant')}; "
                f"{r.get('device', 'GPU')}, {e2e_path.name})"
            )
    if preset and quality_path.exists():
        q = json.loads(quality_path.read_text())
        for r in q.get("heldout", []):
            if r.get("config") == f"preset testbed/{preset}":
                lines.append(
                    f"testbed {q.get('tokens')} tokens, {q.get('steps')} steps: {r['psnr']:.1f} dB PSNR at "
                    f"{r['attention_density']:.2f} of dense attention work ({q.get('device', 'GPU')}, "
                    f"{len(q.get('heldout_clips', []))} held-out clips, {quality_path.name})"
                )
    if preset and plan is None:
        from ..plans.build import make_plan

        plan = make_plan(FAMILY, preset, block_size=GPU_SIZE.block_size)
    return lines + (real_shape_expectations(plan, results_dir) if plan is not None else [])


def real_shape_expectations(plan, results_dir: Path = RESULTS_DIR) -> list[str]:
    """Whole-schedule speed of ``plan``'s settings on real diffusers Wan-1.3B from the committed e2e JSON: rows
    whose ``plan_kwargs`` (and quant) equal the plan's, ``dense_steps`` aside (quoted when it differs)."""
    mine = plan.to_dict()
    lines = []
    for name in REAL_SHAPE_RESULTS:
        path = results_dir / name
        if not path.exists():
            continue
        for r in json.loads(path.read_text()):
            kw, measured = r.get("plan_kwargs") or {}, r.get("schedule_measured")
            if (
                not isinstance(measured, dict)
                or "speedup" not in measured
                or kw.get("method") != mine["method"]
            ):
                continue
            if r.get("quant", "none") != mine["quant"]:
                continue
            if any(mine.get(k) != v for k, v in kw.items() if k not in ("dense_steps", "quant")):
                continue
            ds = kw.get("dense_steps", 0)
            same = "the same settings" if ds == mine["dense_steps"] else (
                f"the same settings but dense_steps {ds:g} (here {mine['dense_steps']:g})"
            )  # fmt: skip
            lines.append(
                f"real-shape: {r['model']} {r.get('resolution', '')} x {r.get('frames', '?')} frames (diffusers, "
                f"random weights): {measured['speedup']:.2f}x over a whole {measured.get('steps', '?')}-step "
                f"schedule, {r['speedup']:.2f}x per sparse step ({r.get('preset')}: {same}; "
                f"{r.get('device', 'GPU')}, {path.name})"
            )
    return lines


@dataclass
class RealShapePanel:
    """The real-shape panel as printed and written: a title, then a table and notes, or one skip line."""

    title: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str]
    skip: str = ""


def real_shape_panel(
    result: dict | None, what: str, skip: str = "", full_layers: int = WAN_13B.layers
) -> RealShapePanel:
    """Table and notes of :func:`~fastattn.testbed.real_shape.time_real_shape`'s ``result`` for the fast run
    named ``what``; with ``result=None``, the panel that says it was ``skip``-ped."""
    title = f"real-shape speed panel: a {WAN_13B.name}-shaped layer stack (GPU)"
    if result is None:
        return RealShapePanel(title, [], [], [], skip)
    from .real_shape import RealShape

    shape = RealShape(**result["shape"])
    n, st = result["steps"], result["stats"]
    ms = lambda xs: " ".join(f"{1000 * x:.0f}" for x in xs)  # noqa: E731
    backends = ", ".join(f"{k} {v}" for k, v in sorted(st["kernel_backends"].items())) or "none"
    probe = ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in result["dense_probe_s"].items())
    header = ["run", "attention", "per step (ms)", f"whole {n} steps (s)", "speedup", "attention work"]
    rows = [
        ["dense", f"PyTorch {result['dense_backend']}", f"{1000 * result['dense_s'] / n:.0f}",
         f"{result['dense_s']:.1f}", "1.00x", "1.00"],
        [
            "fast",
            f"{what}: {st['sparse_calls']} sparse / {st['dense_calls']} dense calls; kernels: {backends}",
            f"{1000 * result['preset_s'] / n:.0f}",
            f"{result['preset_s']:.1f}",
            f"{result['speedup']:.2f}x",
            f"{result['density']:.2f}",
        ],
    ]  # fmt: skip
    planned = ", ".join(f"{k} {v}" for k, v in st["planned_dense"].items()) or "none"
    notes = [
        f"Speed only: random weights (~N(0, 0.02)) make no image; quality is the testbed panel's. "
        f"{shape.describe(full_layers)}.",
        f"Whole {n}-step schedule, every step timed (synchronized), dense and {what}; the plan decides its "
        f"own dense work for a {n}-step run and it is included: dense-by-plan calls: {planned}; "
        f"{st['selections']} block selections, {st['selection_reuses']} reused; fallbacks: "
        f"{st['fallbacks'] or 'none'}.",
        f"Per step (ms): dense {ms(result['dense_step_s'])}; fast {ms(result['preset_step_s'])}.",
        f"Dense baseline: the faster per forward of {probe} (bench/e2e.py's two baselines); the fast run's "
        f"dense calls use it too.",
        f"Warm: untimed first, dense {result['warmup_s']['dense']:.1f} s (each candidate's warm-up and timed "
        f"forward), fast {result['warmup_s']['preset']:.1f} s (its first steps: kernel compilation, autotuning); "
        f"stack built on the GPU in {result['build_s']:.1f} s.",
    ]
    return RealShapePanel(title, header, rows, notes)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    esc = html.escape
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{''.join(f'<th>{esc(c)}</th>' for c in header)}</tr>{body}</table>"


def write_html(
    out: Path, header: list[str], rows: list[list[str]], notes: list[str], gpu: list[str],
    real: RealShapePanel | None = None,
) -> Path:  # fmt: skip
    """``demo.html``: the side-by-side GIF and PNG, the table, the real-shape panel (or its skip line), and
    where the numbers come from."""
    esc = html.escape
    items = lambda lines: "".join(f"<li>{esc(x)}</li>" for x in lines)  # noqa: E731
    real_html = ""
    if real is not None:
        body = f"<p>{esc(real.skip)}</p>" if real.skip else _html_table(real.header, real.rows) + (
            f"<ul>{items(real.notes)}</ul>"
        )  # fmt: skip
        real_html = f"<h2>{esc(real.title)}</h2>{body}"
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>fastattn demo</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}} table{{border-collapse:collapse}}
td,th{{border:1px solid #bbb;padding:4px 10px}} img{{image-rendering:pixelated;max-width:100%}}</style>
</head><body>
<h1>fastattn demo: testbed DiT, fast vs dense attention (same seed)</h1>
<p>Top row of each pair: dense attention. Bottom row: fastattn.</p>
<p><img src="demo.gif" alt="dense (top) and fast (bottom) clips, animated"></p>
{_html_table(header, rows)}
<h2>Where these numbers come from</h2><ul>{items(notes)}</ul>
{real_html}
<h2>GPU figures to expect</h2><ul>{items(gpu) or "<li>no committed GPU results found</li>"}</ul>
<h2>All frames</h2><p><img src="demo.png" alt="all frames: dense rows above fast rows"></p>
</body></html>
"""
    path = out / "demo.html"
    path.write_text(page)
    return path


def run_demo(
    out: str | Path = "fastattn-demo",
    labels=LABELS,
    steps: int = 16,
    preset: str | None = "balanced",
    method: str | None = None,
    density: float | None = None,
    quant: str | None = None,
    device: str | None = None,
    seed: int = 0,
    frames: int | None = None,
    size: int | None = None,
    clips: int | None = None,
    real_shape: bool | None = None,
    real_steps: int = REAL_STEPS,
    real_layers: int | None = None,
) -> dict:
    """Sample ``clips`` clips dense and fast, print and return the comparison; on a GPU time the real-shape
    panel too (see the module doc)."""
    from rich.console import Console
    from rich.table import Table

    s = check_demo_args(out, steps, preset, method, density, quant, device, frames, size, clips, labels,
                        real_shape, real_steps, real_layers)  # fmt: skip
    on_gpu = s.device.startswith("cuda")
    console = Console(width=max(110, Console().width))  # the table's columns stay readable when piped

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        r = fn()
        sync()
        return r, time.perf_counter() - t0

    model = load_testbed(device=s.device, dtype=torch.bfloat16 if on_gpu else torch.float32).eval()
    layout = TokenLayout.video(*model.cfg.grid(s.frames, s.size))
    console.print(f"testbed DiT on {s.device}: {len(s.labels)} clip(s), {s.frames} frames of {s.size}x{s.size}, "
                  f"{layout.seq_len} tokens, {s.steps} steps, {s.block_size}-token blocks")  # fmt: skip
    kw = dict(frames=s.frames, size=s.size, num_steps=s.steps, seed=seed, progress=True)
    # One short run of each first, untimed: on a GPU at full size (kernel compilation and autotuning); on the
    # CPU first-call costs (imports, op registration) do not depend on the size, so two frames do.
    warm = {**kw, "num_steps": 2, "progress": False, **({} if on_gpu else {"frames": min(2, s.frames)})}
    _, t_warm = timed(lambda: sample(model, s.labels[:1], **warm))
    dense, t_dense = timed(lambda: sample(model, s.labels, **kw))
    handle = enable(model, plan=s.plan)
    try:
        _, t_warm_fast = timed(lambda: sample(model, s.labels[:1], **warm))
        handle.reset_stats()
        fast, t_fast = timed(lambda: sample(model, s.labels, **kw))
        stats = handle.stats()
    finally:
        handle.disable()
    scores = summarize(fast.flatten(0, 1), dense.flatten(0, 1))
    png, gif = write_grid(dense, fast, s.out)

    header = ["run", "attention", "time (s)", "speedup", "attention work", "PSNR (dB)", "SSIM"]
    dense_impl = "PyTorch SDPA" + ("" if on_gpu else " (CPU, float32)")
    fast_impl = "Triton kernel" if on_gpu else "CPU sparse path: listed blocks only (float32)"
    rows = [
        ["dense", dense_impl, f"{t_dense:.1f}", "1.00x", "1.00", "-", "-"],
        [
            "fast",
            f"{s.what}, {fast_impl}: {stats['sparse_calls']} sparse / {stats['dense_calls']} dense calls",
            f"{t_fast:.1f}",
            f"{t_dense / t_fast:.2f}x",
            f"{stats['density']:.2f}",
            f"{scores['psnr']:.2f}",
            f"{scores['ssim']:.4f}",
        ],
    ]
    table = Table(title="fastattn demo: testbed DiT, fast vs dense (same seed)")
    for col in header:
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    notes = [
        f"Measured now on {_device_name(s.device)} ({torch.get_num_threads()} threads) with torch {torch.__version__}: "
        f"{len(s.labels)} clip(s) of {layout.seq_len} tokens, {s.steps} steps, both runs warm "
        f"(untimed warm-up first: {t_warm:.1f} s dense, {t_warm_fast:.1f} s fast, "
        + ("kernel compilation and autotuning included)." if on_gpu else "first-call costs).")
        + " Times are whole sampling runs, model and sampler included.",
        "attention work: the fraction of dense attention's score entries computed over all calls; dense "
        "steps and residual refreshes count as dense, block selection's sampled rows are not counted.",
        "PSNR/SSIM: fast frames against the dense frames of the same seed (all frames pooled).",
        "The testbed DiT is a small model trained for this purpose: it measures fidelity on learned "
        "attention, not FLUX or Wan quality.",
    ]
    gpu = gpu_expectations(preset if method is None else None, plan=s.plan)
    console.print("[bold]Where these numbers come from[/]")
    for line in notes:
        console.print(f"  - {line}")
    real, real_panel = _real_shape(s, console)
    console.print("[bold]GPU figures to expect[/] (committed benchmark JSON, bench/results/)")
    for line in gpu or ["no committed GPU results for this preset"]:
        console.print(f"  - {line}")
    page = write_html(s.out, header, rows, notes, gpu, real_panel)
    console.print(f"wrote {page}, {png} and {gif} (top row dense, bottom row fast)")
    return {"dense_s": t_dense, "fast_s": t_fast, "warmup_s": t_warm + t_warm_fast, "speedup": t_dense / t_fast,
            "attention_density": stats["density"], **scores, "png": str(png), "gif": str(gif), "html": str(page),
            "stats": stats, "gpu_expectations": gpu, "real_shape": real, "real_shape_skip": s.real_skip}  # fmt: skip


def _real_shape(s: DemoSettings, console) -> tuple[dict | None, RealShapePanel]:
    """Run (on a GPU) and print the real-shape panel, or print its one skip line."""
    from rich.table import Table

    if not s.real_shape:
        panel = real_shape_panel(None, s.what, s.real_skip)
        console.print(f"[bold]{panel.title}[/]: {panel.skip}", soft_wrap=True)  # one line, unwrapped
        return None, panel
    shape = WAN_13B.with_layers(s.real_layers)
    console.print(f"[bold]{real_shape_panel(None, s.what).title}[/]: timing {s.real_steps} steps dense and "
                  f"{s.what} ({shape.describe(WAN_13B.layers)}; about a minute on an H200)...")  # fmt: skip
    result = time_real_shape(shape, s.plan, device=s.device, steps=s.real_steps)
    panel = real_shape_panel(result, s.what, full_layers=WAN_13B.layers)
    table = Table(title=panel.title)
    for col in panel.header:
        table.add_column(col)
    for row in panel.rows:
        table.add_row(*row)
    console.print(table)
    for line in panel.notes:
        console.print(f"  - {line}")
    return result, panel


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    import platform

    return f"the CPU ({platform.processor() or platform.machine()})"
