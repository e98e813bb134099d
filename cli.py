"""The ``fastattn`` command line: ``fastattn demo``, ``fastattn eval``, ``fastattn calibrate``, ``fastattn bench`` and
``fastattn preset``."""

from __future__ import annotations

import argparse
import os
import sys
import time

EXIT_USAGE = 2  # bad input, as argparse exits for a malformed command line


class UsageError(Exception):
    """Bad input to a ``fastattn`` command: :func:`main` prints it as one line and exits with status 2."""


def fail(command: str, message) -> SystemExit:
    """Print ``fastattn COMMAND: error: MESSAGE`` as one line on stderr; the ``SystemExit(2)`` to raise."""
    text = " ".join(str(message).split())  # one line, whatever the message held
    prefix = f"fastattn {command}: "
    text = text[len(prefix) :] if text.startswith(prefix) else text
    text = text[len("error: ") :] if text.startswith("error: ") else text
    print(f"{prefix}error: {text}", file=sys.stderr)
    return SystemExit(EXIT_USAGE)


def _use_interpreter_without_gpu() -> None:
    """Run the Triton kernels in Triton's interpreter when there is no GPU (set before triton loads)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def cpu_smoke(seed: int = 0) -> list[dict]:
    """Every kernel variant on a small video problem: Triton kernel vs the PyTorch reference."""
    _use_interpreter_without_gpu()
    import torch
    from rich.console import Console
    from rich.table import Table

    from .attn_kernels import attention_reference, sparse_attention
    from .masks import TokenLayout, head_permutations, patterns

    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    layout = TokenLayout.video(3, 6, 8, text_len=10)  # 154 tokens, text prefix, ragged blocks
    block = 128 if device == "cuda" else 16
    g = torch.Generator().manual_seed(seed)
    q, k, v = (
        torch.randn(1, 2, layout.seq_len, 64, generator=g).to(device, torch.bfloat16) for _ in range(3)
    )
    cases = [
        ("dense", patterns.dense(layout, block)),
        ("window3d", patterns.window3d(layout, (1, 2, 2), block)),
        ("radial", patterns.radial(layout, (4, 4), block_size=block)),
        ("arrow", patterns.arrow(layout, 4, block)),
    ]
    perm = head_permutations(layout, ["HWF", "WFH"]).to(device)
    rows = []
    total = len(cases) * 3 * 2
    # The interpreter takes seconds per case: say what runs, so a long silence is never mistaken for a hang.
    print(f"fastattn bench --cpu-smoke: {total} kernel cases on {device}", file=sys.stderr, flush=True)
    for name, mask in cases:
        for quant in ("none", "int8", "int8-fp8"):
            for p in (None, perm):
                print(f"  [{len(rows) + 1}/{total}] {name}, quant {quant}" + (", reordered" if p is not None else ""),
                      file=sys.stderr, flush=True)  # fmt: skip
                t0 = time.perf_counter()
                out = sparse_attention(q, k, v, mask, quant=quant, perm=p, backend="triton")
                ms = (time.perf_counter() - t0) * 1e3
                ref, _ = attention_reference(q.float(), k.float(), v.float(), mask, perm=p)
                err = float((out.float() - ref).norm() / ref.norm())
                rows.append(
                    {"pattern": name, "density": mask.block_density(), "quant": quant, "reorder": p is not None,
                     "ms": ms, "rel_l2": err}
                )  # fmt: skip
    table = Table(title=f"fastattn kernels, smoke test on {device}"
                  + (" (Triton interpreter: timings are not performance)" if device == "cpu" else ""))  # fmt: skip
    for col in ("pattern", "block density", "quant", "reorder", "ms", "rel-L2 vs fp32 reference"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["pattern"], f"{r['density']:.2f}", r["quant"], str(r["reorder"]), f"{r['ms']:.1f}",
                      f"{r['rel_l2']:.4f}")  # fmt: skip
    Console().print(table)
    worst = {q: max(r["rel_l2"] for r in rows if r["quant"] == q) for q in ("none", "int8", "int8-fp8")}
    bars = {"none": 1e-2, "int8": 3e-2, "int8-fp8": 6e-2}
    failed = [q for q in worst if worst[q] > bars[q]]
    if failed:  # a failed check, not bad input: exit status 1
        print(f"fastattn bench: kernel error above bar for {failed}: {worst}", file=sys.stderr)
        raise SystemExit(1)
    return rows


BENCHMARKS = {
    "kernels": "fastattn.bench.kernel_speed",  # kernel speed and accuracy vs cuDNN / FA2 / FlexAttention (GPU)
    "e2e": "fastattn.bench.e2e",  # diffusers transformers at real shapes, random weights (GPU)
    "quality": "fastattn.bench.quality",  # presets and methods on the learned testbed (GPU; --tiny on CPU)
    "calibrate": "fastattn.bench.calibrate",  # calibrated per-head plans on the testbed (GPU; --tiny on CPU)
    "kvcache-quality": "fastattn.bench.kvcache_quality",  # quantized KV cache on real SmolLM2 (CPU)
    "kvcache-speed": "fastattn.bench.kvcache_speed",  # decode speed, 7B-class Llama (GPU; --tiny on CPU)
    "kvcache-prefix": "fastattn.bench.kvcache_prefix",  # text-encoder template prefix cache, real SmolLM2 (CPU)
}


def cmd_bench(args: argparse.Namespace) -> None:
    if args.cpu_smoke or args.what is None:
        cpu_smoke()
        return
    import importlib

    rc = importlib.import_module(BENCHMARKS[args.what]).main(args.rest)
    if rc:
        raise SystemExit(rc)


def cmd_demo(args: argparse.Namespace) -> None:
    _use_interpreter_without_gpu()
    from .testbed.demo import check_demo_args, run_demo

    kw = dict(out=args.out, steps=args.steps, preset=args.preset, method=args.method, density=args.density,
              quant=args.quant, device=args.device, frames=args.frames, size=args.size, clips=args.clips,
              real_shape=args.real_shape, real_steps=args.real_steps, real_layers=args.real_layers)  # fmt: skip
    try:  # every argument checked before the model loads or anything is sampled
        check_demo_args(**kw)
    except ValueError as e:
        raise UsageError(e) from None
    run_demo(**kw)


def cmd_preset(args: argparse.Namespace) -> None:
    """``fastattn preset list | inspect | validate | pull | push``: structural presets and plan files."""
    import json
    import shutil
    from pathlib import Path

    from .plans import files, hub
    from .plans.meta import ModelFingerprint
    from .presets import structural_presets

    if args.action == "list":
        for family, levels in structural_presets().items():
            for level, p in levels.items():
                knobs = ", ".join(f"{k}={p[k]}" for k in ("density", "quant", "dense_steps") if k in p)
                print(f"{family}/{level}: {p['method']} ({knobs})")
        for d in files.shipped_plans():
            print(f"plan file: {d}")
        return
    if args.action == "push":
        try:
            loaded = files.load_plan(args.source)
        except (ValueError, OSError) as e:
            raise UsageError(e) from None
        address = hub.push_plan(loaded.plan, args.repo_id, subdir=args.subdir, token=args.token, meta=loaded.meta,
                                private=args.private or None, revision=args.revision)  # fmt: skip
        print(f"pushed {args.source} to {address}")
        return
    fingerprint = None
    if getattr(args, "family", None):
        fingerprint = ModelFingerprint(args.family, None, args.layers, args.heads, args.head_dim)
    try:
        loaded = files.load_plan(args.source, fingerprint=fingerprint)
    except (ValueError, OSError) as e:
        if args.action != "validate":
            raise UsageError(e) from None
        print(f"invalid: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    if args.action == "validate":
        print(f"ok: {args.source}" + (f" (commit {loaded.commit})" if loaded.commit else ""))
    elif args.action == "inspect":
        out = {"source": loaded.source, "commit": loaded.commit, "plan": loaded.plan.describe(),
               "meta": loaded.meta.to_dict()}  # fmt: skip
        print(json.dumps(out, indent=1))
    elif args.action == "pull":
        addr = hub.parse_hf_address(args.source)
        names = [files.PLAN_JSON] + ([files.PLAN_TENSORS] if loaded.plan.heads is not None else [])
        paths = [hub.fetch_plan_file(addr, n, revision=loaded.commit)[0] for n in names]
        if args.to:
            Path(args.to).mkdir(parents=True, exist_ok=True)
            for path in paths:
                shutil.copyfile(path, Path(args.to) / path.name)
            files.load_plan(args.to)  # the copy is a valid plan directory
        print(f"pulled {args.source} (commit {loaded.commit}) to {args.to or paths[0].parent}")


def _add_preset_parser(sub) -> None:
    p = sub.add_parser("preset", help="list structural presets; inspect, validate, pull and push plan files")
    actions = p.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="the shipped structural presets per family and shipped plan files")
    src = "a plan directory, its plan.json, or hf://owner/repo[/subdir][@revision]"
    for name, text in (("inspect", "print a plan file's settings, head table summary and meta as JSON"),
                       ("validate", "load a plan file strictly; exit status 1 with the reason if invalid")):  # fmt: skip
        a = actions.add_parser(name, help=text)
        a.add_argument("source", help=src)
        if name == "validate":
            a.add_argument("--family", help="check it fits a model of this family ...")
            a.add_argument("--layers", type=int, help="... with this many self-attention layers")
            a.add_argument("--heads", type=int, help="... attention heads")
            a.add_argument("--head-dim", type=int, help="... and head_dim")
    a = actions.add_parser("pull", help="download a plan from the Hub into the Hub cache (and --to DIR)")
    a.add_argument("source", help="hf://owner/repo[/subdir][@revision]")
    a.add_argument("--to", default=None, help="also copy plan.json (+ plan.safetensors) into this directory")
    a = actions.add_parser("push", help="upload a plan directory to a Hub model repo (created if missing)")
    a.add_argument("source", help="a plan directory (or its plan.json)")
    a.add_argument("repo_id", help="owner/name of the model repo")
    a.add_argument("--subdir", default=None, help="folder in the repo (several plans per repo)")
    a.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the stored login)")
    a.add_argument("--revision", default=None, help="an existing branch (default: main)")
    a.add_argument("--private", action="store_true", help="create the repo private")
    p.set_defaults(func=cmd_preset)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    ap = argparse.ArgumentParser(prog="fastattn", description="Fast attention for diffusion transformers.")
    ap.add_argument("--version", action="version", version=f"fastattn {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser(
        "demo", help="sample the shipped testbed DiT dense and fast; write a side-by-side GIF/PNG"
    )
    d.add_argument("--out", default="fastattn-demo", help="folder for demo.html, demo.png and demo.gif")
    d.add_argument("--steps", type=int, default=16, help="sampling steps")
    d.add_argument("--preset", default="balanced", help="testbed preset: safe, balanced or fast")
    d.add_argument(
        "--method", default=None, help="a method instead of the preset (window3d, dynamic, band...)"
    )
    d.add_argument("--density", type=float, default=None, help="the method's block density")
    d.add_argument("--quant", default=None, help="none, int8, int8-fp8, fp8 (default: the preset's)")
    d.add_argument("--frames", type=int, default=None, help="clip length (default: 16)")
    d.add_argument("--size", type=int, default=None, help="frame size in pixels (default: 64)")
    d.add_argument("--clips", type=int, default=None, help="clips to sample (default: 1 on CPU, 4 on GPU)")
    d.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    d.add_argument(
        "--real-shape", action=argparse.BooleanOptionalAction, default=None,
        help="also time a Wan-2.1-1.3B-shaped layer stack (random weights, 32,760 tokens) dense and fast, where "
             "sparse attention pays (default: on with a GPU; GPU only)",
    )  # fmt: skip
    d.add_argument("--real-steps", type=int, default=10, help="real-shape schedule's steps (default: 10)")
    d.add_argument(
        "--real-layers", type=int, default=None, help="real-shape layers, to time-box (default: all 30)"
    )
    d.set_defaults(func=cmd_demo)
    from .evaluation.cli import add_eval_parser

    add_eval_parser(sub)
    b = sub.add_parser(
        "bench", help="the benchmarks (JSON under bench/results/), or a CPU smoke test of the kernels"
    )
    b.add_argument("what", nargs="?", choices=sorted(BENCHMARKS), help="which benchmark")
    b.add_argument("--cpu-smoke", action="store_true", help="run every kernel variant on a small problem")
    b.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    b.set_defaults(func=cmd_bench)
    _add_preset_parser(sub)
    from .calibration.cli import add_calibrate_parser

    add_calibrate_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> None:
    """Run one command. Bad input (a :class:`UsageError`, or a command's own ``SystemExit("message")``) is
    printed as one line without a traceback and exits with status 2, as argparse does for its own errors."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UsageError as e:
        raise fail(args.command, e) from None
    except SystemExit as e:
        if isinstance(e.code, str):
            raise fail(args.command, e.code) from None
        raise


if __name__ == "__main__":
    main(sys.argv[1:])
