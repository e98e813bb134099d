"""``fastattn eval``: a diffusers pipeline folder, dense vs fastattn configurations, a JSON/PNG/HTML report.

    fastattn eval ./Wan2.1-T2V-1.3B-Diffusers --prompts "a cat surfing" "a red car" --seeds 0 1 \\
        --steps 30 --height 480 --width 832 --num-frames 33 \\
        --preset balanced --preset fast --method window3d:0.3 --out eval-wan

``add_eval_parser(subparsers)`` adds the subcommand to the ``fastattn`` parser; ``main(argv)`` runs it
on its own (``python -m fastattn.evaluation.cli ...``).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

DTYPES = {
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "float32": "float32",
    "fp32": "float32",
}

EPILOG = """configurations (in the order given; each is compared with the same dense runs):
  --preset balanced                 the family's preset (safe, balanced, fast, family/level, or a .json)
  --preset balanced,quant=int8-fp8  a preset with knobs overridden
  --method window3d:0.3             a method at a block density
  --method 'window3d:0.3,dense_layers=[0,-1]'   method + knobs (any fastattn.enable keyword)
  --method dense                    fastattn's dense plan (must match dense exactly)
without any, --preset balanced.

writes OUT/report.json, OUT/report.png (speed-quality plot; needs matplotlib) and OUT/report.html."""


class _AppendConfig(argparse.Action):
    """``--preset`` / ``--method`` into one ordered list of ``(kind, spec)``."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, self.dest, None) or [])
        items.append((self.const, values))
        setattr(namespace, self.dest, items)


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.replace("[", "").replace("]", "").split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer indices like '0,-1', got {text!r}") from None


def _pipe_arg(text: str) -> tuple[str, object]:
    from .configs import _value

    key, eq, value = text.partition("=")
    if not eq or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. guidance_scale=5.0), got {text!r}")
    return key.strip(), _value(value.strip())


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pipeline", help="folder of a diffusers pipeline (holds model_index.json)")
    g = p.add_argument_group("what to compare")
    g.add_argument("--preset", dest="configs", action=_AppendConfig, const="preset", metavar="SPEC",
                   help="a preset, optionally with ,key=value knobs (repeatable)")  # fmt: skip
    g.add_argument("--method", dest="configs", action=_AppendConfig, const="method", metavar="SPEC",
                   help="NAME[:DENSITY][,key=value...], e.g. window3d:0.3 (repeatable)")  # fmt: skip
    g.add_argument(
        "--quant",
        default=None,
        help="quant for every config (none, int8, int8-fp8, fp8); a spec's own key=value wins",
    )
    g.add_argument(
        "--dense-steps",
        type=int,
        default=None,
        help="dense_steps for every config (also over a preset's own)",
    )
    g.add_argument(
        "--dense-layers", type=_layers, default=None, help="dense_layers for every config, e.g. 0,-1"
    )
    g.add_argument("--block-size", type=int, default=None,
                   help="mask block size (default 128, what the GPU kernel takes; smaller only on the CPU)")  # fmt: skip
    r = p.add_argument_group("what to run")
    r.add_argument(
        "--prompts", nargs="+", default=[], metavar="PROMPT", help="prompts (each with every seed)"
    )
    r.add_argument("--prompts-file", default=None, help="a text file with one prompt a line")
    r.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds (default: 0)")
    r.add_argument("--steps", type=int, default=None, help="num_inference_steps")
    r.add_argument("--height", type=int, default=None)
    r.add_argument("--width", type=int, default=None)
    r.add_argument("--num-frames", type=int, default=None, help="frames (video pipelines)")
    r.add_argument("--pipe-arg", type=_pipe_arg, action="append", default=[], metavar="KEY=VALUE",
                   help="another pipeline argument, e.g. guidance_scale=5.0 (repeatable)")  # fmt: skip
    r.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    r.add_argument(
        "--dtype", default="auto", help="bfloat16, float16 or float32 (default: bf16 on GPU, fp32 on CPU)"
    )
    m = p.add_argument_group("measurement and output")
    m.add_argument("--out", default="fastattn-eval", help="output folder (default: fastattn-eval)")
    m.add_argument("--attn-layers", type=int, default=4,
                   help="sparse attention calls measured per transformer forward (0: no attention error)")  # fmt: skip
    m.add_argument("--attn-rows", type=int, default=1024, help="query rows measured per call (0: all)")
    m.add_argument("--no-warmup", action="store_true", help="skip the untimed first run of each config")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``eval`` to the ``fastattn`` command's subparsers (sets ``func``)."""
    p = subparsers.add_parser(
        "eval",
        help="compare a diffusers pipeline dense vs fastattn presets/methods: quality, speed, report",
        description="Run a diffusers pipeline dense and with fastattn configurations on the same prompts "
        "and seeds; report PSNR/SSIM/rel-L2 of latents and decoded frames, per-step attention error, "
        "speedup, density and fallbacks.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(p)
    p.set_defaults(func=cmd_eval)
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastattn eval", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_arguments(p)
    p.set_defaults(func=cmd_eval)
    return p


# ------------------------------------------------------------------------------------------ loading


def read_prompts(prompts: list[str], prompts_file: str | None) -> list[str]:
    out = [p for p in prompts if p.strip()]
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise SystemExit(f"fastattn eval: no such prompts file: {prompts_file}")
        out += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not out:
        raise SystemExit(
            "fastattn eval: no prompts; give --prompts 'a cat' 'a dog' or --prompts-file FILE (one a line)"
        )
    return out


def resolve_device_dtype(device: str | None, dtype: str):
    import torch

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"fastattn eval: --device {device} but no CUDA device is available")
    if dtype == "auto":
        name = "bfloat16" if dev.type == "cuda" else "float32"
    else:
        name = DTYPES.get(dtype.lower())
        if name is None:
            raise SystemExit(
                f"fastattn eval: unknown --dtype {dtype!r}; choose from {sorted(set(DTYPES))} or auto"
            )
    return dev, getattr(torch, name)


def load_pipeline(path: str, device, dtype):
    """``DiffusionPipeline.from_pretrained(path, dtype=dtype).to(device)`` with clear errors."""
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise SystemExit(f"fastattn eval: {path} is a file; give the folder holding model_index.json")
        if not (p / "model_index.json").is_file():
            raise SystemExit(
                f"fastattn eval: {path} has no model_index.json, so it is not a diffusers pipeline folder "
                "(write one with pipe.save_pretrained(folder))"
            )
    elif not re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        raise SystemExit(f"fastattn eval: no such pipeline folder: {path}")
    try:
        from diffusers import DiffusionPipeline
    except ImportError:
        raise SystemExit("fastattn eval needs diffusers: pip install 'fastattn[diffusers]'") from None
    try:
        pipe = DiffusionPipeline.from_pretrained(path, dtype=dtype)
    except Exception as e:  # any loading failure is the user's input, not our bug
        raise SystemExit(f"fastattn eval: could not load a diffusers pipeline from {path}: {e}") from None
    return pipe.to(device)


def check_out_dir(path: str) -> None:
    """Fail before loading anything when ``--out`` cannot become a writable folder. Checked without creating
    it (bad input must leave nothing behind); the first partial ``report.json``, written before the first
    pipeline call, is the real test (``os.access`` says yes to root everywhere, ``/proc`` included)."""
    p = Path(path).absolute()
    if p.exists() and not p.is_dir():
        raise SystemExit(f"fastattn eval: --out {path} is a file; give a folder")
    ancestor = p
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise SystemExit(f"fastattn eval: cannot write to --out {path}: {ancestor} is not a writable folder")


class _PartialWriter:
    """``on_update`` for :func:`evaluate_pipeline`: the report so far as ``OUT/report.json``. The first write
    comes before any pipeline call, so a folder that cannot be written stops the run before it starts; later
    failures (disk full, folder removed) only warn, the run goes on and its end tries again."""

    def __init__(self, out: str):
        self.out, self.writes, self.warned = out, 0, False

    def __call__(self, report: dict) -> None:
        from .report import write_partial

        try:
            write_partial(report, self.out)
        except OSError as e:
            if self.writes == 0:
                raise SystemExit(
                    f"fastattn eval: cannot write to --out {self.out}: {e.strerror or e}"
                ) from None
            if not self.warned:
                print(
                    f"fastattn eval: warning: could not update {self.out}/report.json: {e}", file=sys.stderr
                )
                self.warned = True
            return
        self.writes += 1


def _save_somewhere(report: dict, out: str, error: OSError) -> str:
    """The final report could not be written to ``out``: put its JSON in the temp folder instead."""
    import json
    import tempfile

    from .report import to_json_safe

    fd, path = tempfile.mkstemp(prefix="fastattn-eval-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(to_json_safe(report), indent=1, allow_nan=False) + "\n")
    return (
        f"fastattn eval: could not write the report to {out} ({error.strerror or error}); saved it as {path}"
    )


def _failed_configs(report: dict) -> str | None:
    """One line naming the configurations that failed, or None."""
    failed = [c for c in report["configs"] if "error" in c]
    if not failed:
        return None
    first = failed[0]
    more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
    return f"fastattn eval: configuration {first['label']!r} failed: {first['error']}{more}"


# ------------------------------------------------------------------------------------------ command


def cmd_eval(args: argparse.Namespace) -> dict:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # as `fastattn demo`: set before triton loads

    from .configs import parse_spec
    from .evaluate import EvalInputError, evaluate_pipeline
    from .report import write_report

    prompts = read_prompts(args.prompts, args.prompts_file)
    try:
        configs = [parse_spec(spec, kind) for kind, spec in (args.configs or [("preset", "balanced")])]
    except ValueError as e:
        raise SystemExit(f"fastattn eval: {e}") from None
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    check_out_dir(args.out)
    pipe = load_pipeline(args.pipeline, device, dtype)
    defaults = {
        "quant": args.quant,
        "dense_steps": args.dense_steps,
        "dense_layers": args.dense_layers,
        "block_size": args.block_size,
    }
    try:
        report = evaluate_pipeline(
            pipe,
            configs,
            prompts,
            args.seeds,
            steps=args.steps,
            height=args.height,
            width=args.width,
            num_frames=args.num_frames,
            call_kwargs=dict(args.pipe_arg),
            defaults={k: v for k, v in defaults.items() if v is not None},
            attn_layers=args.attn_layers,
            attn_rows=args.attn_rows or None,
            warmup=not args.no_warmup,
            progress=not args.no_progress,
            source=args.pipeline,
            on_update=_PartialWriter(args.out),
        )
    except EvalInputError as e:
        raise SystemExit(f"fastattn eval: {e}") from None
    try:
        files = write_report(report, args.out)
    except OSError as e:
        raise SystemExit(_save_somewhere(report, args.out, e)) from None
    print_summary(report)
    print(f"wrote {files['json']}, {files['html']}" + (f", {files['png']}" if files["png"] else ""))
    for note in (files["plot_skipped"], report["settings"].get("timing_note")):
        if note:
            print(note)
    failed = _failed_configs(report)
    if failed:  # the others' results are written; the exit status still says something was rejected
        raise SystemExit(f"{failed}; the other results are in {files['json']}")
    return report


def print_summary(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from .report import COLUMNS, table_rows

    env, pipe = report["env"], report["pipeline"]
    table = Table(title=f"fastattn eval: {pipe['class']} on {env['device']} ({pipe['dtype']})")
    for i, col in enumerate(COLUMNS):
        table.add_column(col, no_wrap=i == 0)
    for row in table_rows(report):
        table.add_row(*row)
    Console(width=None if sys.stdout.isatty() else 200).print(table)  # logs: never cut the labels


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
