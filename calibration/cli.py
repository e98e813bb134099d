"""``fastattn calibrate``: calibrate a per-head plan for the testbed or a diffusers pipeline folder.

    fastattn calibrate --testbed --prompts 1 5 10 --target-density 0.3 --out testbed-plan
    fastattn calibrate ./Wan2.1-T2V-1.3B-Diffusers --prompts "a cat surfing" "a red car" --steps 30 \\
        --height 480 --width 832 --arg num_frames=33 --target-density 0.3 --out wan-plan

Writes OUT/plan.json + OUT/plan.safetensors (load with ``fastattn.enable(pipe, preset="OUT")``), OUT/report.json
and OUT/head_map.png. ``--checkpoint DIR`` makes it resumable: run the same command again after an interruption.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

EPILOG = """prompts: text for a pipeline; class labels 0..23 (or label:seed) for --testbed.
budgets: --target-density (share of attention work kept, e.g. 0.3) and/or --error-budget (mean relative
squared error of a layer's attention output, e.g. 0.02)."""


def add_calibrate_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``calibrate`` to the ``fastattn`` command's subparsers (sets ``func``)."""
    p = subparsers.add_parser(
        "calibrate",
        help="calibrate a per-head attention plan (PARO / Sparse-vDiT / DiTFastAttn-v2) on a few prompts",
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("pipeline", nargs="?", help="folder (or Hub id) of a diffusers pipeline")
    src.add_argument("--testbed", action="store_true", help="the shipped testbed DiT (or --weights DIR)")
    p.add_argument("--weights", default=None, help="testbed weights folder (default: the shipped ones)")
    p.add_argument("--prompts", nargs="+", default=[], help="prompts (testbed: class labels or label:seed)")
    p.add_argument("--prompts-file", default=None, help="one prompt a line")
    b = p.add_argument_group("budget (one or both)")
    b.add_argument("--target-density", type=float, default=None, help="share of attention work to keep")
    b.add_argument("--error-budget", type=float, default=None, help="mean relative squared attention error")
    c = p.add_argument_group("calibration")
    c.add_argument("--steps", type=int, default=None, help="denoising steps per run (default: model's)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--methods", nargs="+", default=None,
                   help="families (paro, sparse_vdit, ditfastattn, structural) or method names")  # fmt: skip
    c.add_argument("--bits", nargs="+", default=None, help="bit-widths to consider (none int8-fp8 fp8)")
    c.add_argument(
        "--step-groups", type=int, default=None, help="step groups of the plan (default min(steps, 16))"
    )
    c.add_argument(
        "--block-size", type=int, default=None, help="mask block size (default 128; 16-64 on the CPU)"
    )
    c.add_argument("--rows-per-block", type=int, default=8, help="sampled query rows per query block")
    c.add_argument("--residual", action="store_true",
                   help="WA-RS on top of the plan: the first step runs exact and its residual corrects later "
                        "steps' approximate heads (counted in --target-density)")  # fmt: skip
    c.add_argument("--sensitivity-prompts", type=int, default=1,
                   help="prompts run to measure how much each step group's error costs (0: off)")  # fmt: skip
    c.add_argument("--cost-table", default=None, help="cost table JSON (default: the shipped one)")
    c.add_argument("--checkpoint", default=None, help="folder for resumable observations")
    r = p.add_argument_group("runs")
    r.add_argument("--height", type=int, default=None)
    r.add_argument("--width", type=int, default=None)
    r.add_argument("--frames", type=int, default=None, help="testbed: clip length; pipeline: num_frames")
    r.add_argument("--size", type=int, default=None, help="testbed: frame size in pixels")
    r.add_argument("--arg", action="append", default=[], type=_pipe_arg, metavar="KEY=VALUE",
                   help="extra pipeline argument (repeatable), e.g. guidance_scale=5.0")  # fmt: skip
    r.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    r.add_argument(
        "--dtype", default="auto", help="bfloat16, float16 or float32 (default: bf16 on GPU, fp32 on CPU)"
    )
    p.add_argument("--out", required=True, help="output folder for the plan and its report")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_calibrate)
    return p


def _pipe_arg(text: str):
    key, eq, value = text.partition("=")
    if not eq or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. guidance_scale=5.0), got {text!r}")
    import json

    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip(), parsed


def _prompts(args, testbed: bool) -> list:
    items = [p for p in args.prompts if p.strip()]
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise SystemExit(f"no such prompts file: {args.prompts_file}")
        items += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not items:
        raise SystemExit("no prompts; give --prompts ... or --prompts-file FILE (one a line)")
    if not testbed:
        return items
    out = []
    for p in items:
        m = re.fullmatch(r"(\d+)(?::(\d+))?", p)
        if not m:
            raise SystemExit(f"testbed prompt {p!r}: a class label (e.g. 3) or label:seed (e.g. 3:100)")
        out.append((int(m[1]), int(m[2])) if m[2] else int(m[1]))
    return out


def _device_dtype(device, dtype):
    import torch

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device} but no CUDA device is available")
    names = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
             "half": "float16", "fp32": "float32", "float32": "float32"}  # fmt: skip
    name = ("bfloat16" if dev.type == "cuda" else "float32") if dtype == "auto" else names.get(dtype.lower())
    if name is None:
        raise SystemExit(f"unknown --dtype {dtype!r}; choose from {sorted(names)} or auto")
    return dev, getattr(torch, name)


def _load_pipeline(path: str, device, dtype):
    p = Path(path)
    if p.exists() and not (p.is_dir() and (p / "model_index.json").is_file()):
        raise SystemExit(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    if not p.exists() and not re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        raise SystemExit(f"no such pipeline folder: {path}")
    try:
        from diffusers import DiffusionPipeline
    except ImportError:
        raise SystemExit(
            "calibrating a pipeline needs diffusers: pip install 'fastattn[diffusers]'"
        ) from None
    try:
        pipe = DiffusionPipeline.from_pretrained(path, dtype=dtype)
    except Exception as e:  # any loading failure is the user's input
        raise SystemExit(f"could not load a diffusers pipeline from {path}: {e}") from None
    return pipe.to(device)


def cmd_calibrate(args: argparse.Namespace) -> None:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from . import BudgetError, CalibrationError, CalibrationInterrupted, run_calibration

    if args.target_density is None and args.error_budget is None:
        raise SystemExit("give --target-density (e.g. 0.3) and/or --error-budget (e.g. 0.02)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--out {args.out} is a file; give a folder")
    prompts = _prompts(args, args.testbed)
    device, dtype = _device_dtype(args.device, args.dtype)
    run = dict(args.arg)
    if args.testbed:
        from ..testbed.sample import load_testbed

        if args.height or args.width:
            raise SystemExit("--height/--width are pipeline arguments; the testbed takes --frames and --size")
        try:
            model = load_testbed(args.weights, device=device, dtype=dtype)
        except FileNotFoundError as e:
            raise SystemExit(str(e)) from None
        target = model
        for k in ("frames", "size"):
            if getattr(args, k) is not None:
                run[k] = getattr(args, k)
    else:
        if args.size is not None:
            raise SystemExit("--size is a testbed argument; a pipeline takes --height and --width")
        target = _load_pipeline(args.pipeline, device, dtype)
        for k, v in (("height", args.height), ("width", args.width), ("num_frames", args.frames)):
            if v is not None:
                run[k] = v
    kwargs = {k: v for k, v in (("methods", args.methods), ("bits", args.bits), ("step_groups", args.step_groups),
                                ("cost_table", args.cost_table), ("checkpoint_dir", args.checkpoint)) if v is not None}  # fmt: skip
    kwargs["block_size"] = args.block_size or (128 if device.type == "cuda" else 32)
    try:
        result = run_calibration(
            target, prompts, target_density=args.target_density, error_budget=args.error_budget, steps=args.steps,
            seed=args.seed, rows_per_block=args.rows_per_block, sensitivity_prompts=args.sensitivity_prompts,
            residual=args.residual, progress=not args.no_progress, **kwargs, **run,
        )  # fmt: skip
    except CalibrationInterrupted as e:
        print(f"fastattn calibrate: {e}", file=sys.stderr)
        raise SystemExit(130) from None
    except (CalibrationError, BudgetError, ValueError, TypeError, FileNotFoundError) as e:
        raise SystemExit(str(e)) from None
    result.save(out)
    s = result.report["summary"]
    print(
        f"wrote {out}: expected attention work {s['expected_work']:.3f}, estimated error {s['estimated_error']:.2e}, "
        f"estimated attention time {s['estimated_attention_time_vs_dense']:.2f}x dense; families {s['families']}"
    )
