"""Every family's shipped presets, each scored with its own plan on the learned testbed DiT.

For each ``<family>/<preset>`` the plan file shipped in ``presets/plans/<family>-<preset>/`` (the plan
``fastattn.enable(..., preset=...)`` gives a model of that family; the run checks they are equal) is applied
unchanged to the testbed through ``fastattn.testbed.fast.enable(model, plan=...)``: its method, density,
quant, dense steps, dense layers, residual sharing and cache settings. What depends on the model is derived
by the runtime exactly as for any model: the mask reaching the plan's density is searched on the testbed's
token layout, a fractional ``dense_steps`` is a fraction of this run's steps, negative ``dense_layers`` count
from the testbed's last layer. Each row's ``adapted`` notes say what that means for this plan (a joint
text+image family's text rows and columns do not exist here, a 2-D image window becomes a 3-D one on the
testbed's 16 frames...), so nobody mistakes these figures for the family's own model.

Same held-out clips, seeds, sampler and metrics as ``bench/quality.py`` (8 clips of 16 frames of 64x64, 16
Euler steps, no CFG; PSNR / SSIM of the decoded frames against dense), through ``bench/caching_quality.py``'s
``Bench`` (one dense reference pass shared by every row). Targets: safe >= 35 dB, balanced >= 28 dB,
fast >= 24 dB. Plans that are identical on this run (e.g. ``wan/safe`` and ``cogvideox/safe``) are measured
once; the second row says ``measured_with``.

    python -m fastattn.bench.preset_quality              # GPU: bench/results/preset-quality-<gpu>.json (or $OUT/)
    python -m fastattn.bench.preset_quality --tiny       # CPU: a tiny random model, checks the logic in seconds
    python -m fastattn.bench.preset_quality --clips 1 --steps 8 --out /tmp/pq.json   # CPU, reduced (slow)

The testbed is ours and small (19.2M parameters, 4,096 tokens): fast-vs-dense fidelity of each plan on
learned attention, never FLUX or Wan quality.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
import warnings
from pathlib import Path

import torch
from fastattn.bench.caching_quality import HELDOUT, Bench
from fastattn.bench.quality import _versions

TARGETS = {"safe": 35.0, "balanced": 28.0, "fast": 24.0}
DEFINITION = {"clips": len(HELDOUT), "steps": 16}  # bench/quality.py's held-out set
JOINT_TEXT_IMAGE = ("flux", "flux2", "sd3", "qwen_image")  # joint text+image attention in their own models


# ---------------------------------------------------------------------------------------------- the plans


def _choose(text: str | None, valid: list[str], what: str) -> list[str]:
    """The comma-separated names of ``text`` (all of ``valid`` when None), refusing unknown ones."""
    if text is None:
        return list(valid)
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise SystemExit(f"unknown {what} {unknown or text!r}; valid: {valid}")
    return list(dict.fromkeys(names))


def shipped_families() -> list[str]:
    """Families with structural presets, in ``presets/structural.json``'s order."""
    from fastattn.presets import structural_presets

    return list(structural_presets())


def _sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def shipped_plan(family: str, preset: str) -> dict:
    """The plan in ``presets/plans/<family>-<preset>/`` and its identity (file hashes, equality with what
    ``enable(..., preset=preset)`` resolves for a model of ``family``)."""
    from fastattn.plans.build import make_plan
    from fastattn.plans.files import PLAN_JSON, PLAN_TENSORS, load_plan
    from fastattn.presets import PRESET_DIR

    directory = PRESET_DIR / "plans" / f"{family}-{preset}"
    if not (directory / PLAN_JSON).is_file():
        raise SystemExit(f"no shipped plan file for {family}/{preset} (expected {directory / PLAN_JSON})")
    loaded = load_plan(directory)
    return {
        "plan": loaded.plan,
        "dir": f"presets/plans/{directory.name}",
        "plan_json_sha256": _sha256(directory / PLAN_JSON),
        "plan_tensors_sha256": _sha256(directory / PLAN_TENSORS) if loaded.plan.heads is not None else None,
        "same_as_enable_preset": make_plan(family, preset) == loaded.plan,
        "doc": loaded.meta.doc,
    }


def resolved(plan, steps: int, num_layers: int) -> dict:
    """The plan as it acts on this run (dense steps in steps, dense layers as indices): equal for two plans
    that run identically here."""
    d = plan.describe()
    d["dense_steps"] = plan.dense_steps_for(steps)
    d["dense_layers"] = sorted({i % num_layers for i in plan.dense_layers})
    return d


def adapted_notes(family: str, plan, layout, steps: int, num_layers: int, block_size: int):
    """``(notes, mask_density)``: what applying ``family``'s plan to the testbed changes, and the block density
    of the plan's mask on the testbed's layout on the calls the method serves (None: chosen per call)."""
    from fastattn.plans.methods import DynamicConfig, build_mask

    f, h, w = layout.grid
    m = plan.method
    notes = []
    if family != "testbed":
        notes.append(
            f"plan made for {family}, applied unchanged; the runtime derives everything geometric from the "
            f"testbed's layout ({f}x{h}x{w} = {layout.seq_len} video tokens, no text, {num_layers} layers)"
        )
    if block_size != plan.block_size:
        notes.append(f"block_size {plan.block_size} -> {block_size} (tiny model only)")
    density = getattr(m, "density", None)
    mask_density = None
    if plan.heads is not None:
        notes.append("per-head table: each head's method from the table, on this layout")
    elif isinstance(m, DynamicConfig):
        notes.append("dynamic: key blocks chosen per call from q/k; nothing geometric to re-derive")
    elif m.name != "dense":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                mask_density = build_mask(m, layout, block_size).block_density()
            except ValueError as e:
                notes.append(f"no mask on this layout: {e}")
        notes += [f"warning: {c.message}" for c in caught]
        if m.name == "arrow":
            notes.append(
                f"arrow (image band + all text rows/columns): the testbed has no text, so only the image band "
                f"remains, widened over the {layout.seq_len} tokens in raster order until it reaches density "
                f"{density:g}"
            )
        elif m.name == "window3d" and family in JOINT_TEXT_IMAGE:
            notes.append(
                f"window3d: on {family}'s own layout (one image frame + text) a 2-D window with dense text "
                f"rows/columns; here no text, and the {f}-frame grid makes it a 3-D window reaching density "
                f"{density:g}"
            )
        elif m.name in ("window3d", "radial", "band") and density is not None:
            notes.append(f"{m.name}: window re-searched for density {density:g} on the {f}x{h}x{w} grid")
        if density is not None and mask_density is not None and mask_density > density + 0.02:
            notes.append(  # block granularity, or the method's smallest mask (clamp_density: see warnings)
                f"the least {m.name} mask reaching density {density:g} on this layout computes "
                f"{mask_density:.3f} of the blocks"
            )
    if isinstance(plan.dense_steps, float) and plan.dense_steps:
        notes.append(
            f"dense_steps {plan.dense_steps:g} (a fraction of the run) = {plan.dense_steps_for(steps)} of "
            f"{steps} steps here"
        )
    if plan.dense_layers:
        here = sorted({i % num_layers for i in plan.dense_layers})
        notes.append(f"dense_layers {list(plan.dense_layers)} = layers {here} of the testbed's {num_layers}")
    if plan.cache.enabled:
        notes.append(f"cache {plan.cache.describe()}: through the testbed's block cache / attention sharing")
    return notes, mask_density


# ---------------------------------------------------------------------------------------------- measuring

# last_clip_schedule: the steps whose blocks a plan's block cache skipped (plans with a cache only)
_MEASURED = ("attention_density", "flops_fraction", "attention_fraction", "compute_fraction", "psnr",
             "psnr_per_clip", "ssim", "rel_l2_latents", "seconds", "planned_dense", "fallbacks",
             "last_clip_schedule", "warnings", "error", "skipped")  # fmt: skip


def measure(bench: Bench, label: str, plan) -> dict:
    """One plan's row from ``bench`` (errors and budget skips recorded, never raised)."""
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec = bench.score({"label": label, "kind": "ours", "sparse": True, "enable": {"plan": plan}})
    out = {k: rec[k] for k in _MEASURED if k in rec}
    if "density" in rec:
        out["attention_density"] = rec["density"]  # computed / total attention work, dense steps included
    out["warnings"] = sorted({str(c.message)[:300] for c in caught})
    out["wall_s"] = round(time.perf_counter() - t0, 2)
    return out


def _model(tiny: bool, device: str):
    from fastattn.testbed.model import TestbedConfig, TestbedDiT
    from fastattn.testbed.sample import load_testbed

    if tiny:
        torch.manual_seed(0)
        model = TestbedDiT(TestbedConfig.tiny()).eval()
        with torch.no_grad():  # adaLN-zero init leaves attention without effect: give every weight a value
            for p in model.parameters():
                p.normal_(0.0, 0.2)
        return model, 2, 32, 16
    model = load_testbed(device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    return model, model.cfg.frames, model.cfg.size, None  # the plan's own block size


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=None, help="comma-separated families (default: every shipped one)")
    ap.add_argument("--presets", default=None, help="comma-separated presets (default: safe,balanced,fast)")
    ap.add_argument("--tiny", action="store_true", help="tiny random model on the CPU (checks the logic)")
    ap.add_argument("--clips", type=int, default=None,
                    help=f"the first N held-out clips (default all {DEFINITION['clips']}; fewer: a reduced run)")  # fmt: skip
    ap.add_argument("--steps", type=int, default=None,
                    help=f"sampling steps (default {DEFINITION['steps']}; --tiny 4; other: a reduced run)")  # fmt: skip
    ap.add_argument(
        "--budget-s", type=float, default=600.0, help="rows after this many seconds are recorded skipped"
    )
    ap.add_argument("--out", default=None, help="output JSON (default $OUT/ or bench/results/)")
    args = ap.parse_args(argv)

    from fastattn.masks.layout import TokenLayout
    from fastattn.presets import LEVELS

    families = _choose(args.families, shipped_families(), "famil(y/ies)")
    presets = _choose(args.presets, list(LEVELS), "preset(s)")
    if args.clips is not None and not 1 <= args.clips <= len(HELDOUT):
        raise SystemExit(f"--clips must be in 1..{len(HELDOUT)}, got {args.clips}")
    if args.steps is not None and args.steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {args.steps}")
    plans = {(f, p): shipped_plan(f, p) for f in families for p in presets}

    t_start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    model, frames, size, block_size = _model(args.tiny, device)
    steps = args.steps or (4 if args.tiny else DEFINITION["steps"])
    clips = HELDOUT[: args.clips or (2 if args.tiny else len(HELDOUT))]
    num_layers = len(model.blocks)
    layout = TokenLayout.video(*model.cfg.grid(frames, size))
    reduced = not args.tiny and (len(clips), steps) != (DEFINITION["clips"], DEFINITION["steps"])
    tag = (
        "tiny"
        if args.tiny
        else _versions()["device"].lower().replace(" ", "_") + ("-reduced" if reduced else "")
    )
    print(f"testbed {layout.grid} ({layout.seq_len} tokens), {steps} steps, {len(clips)} clips, {device}: "
          f"{len(plans)} family presets", flush=True)  # fmt: skip

    knobs = {"block_size": block_size} if block_size else {}
    bench = Bench(
        model, clips, frames, size, steps, device, knobs, warmup=device == "cuda", budget_s=args.budget_s
    )
    rows, measured = [], {}
    for (family, preset), shipped in plans.items():
        plan = shipped["plan"]
        notes, mask_density = adapted_notes(
            family, plan, layout, steps, num_layers, block_size or plan.block_size
        )
        row = {"family": family, "preset": preset, "plan_dir": shipped["dir"],
               "plan_json_sha256": shipped["plan_json_sha256"], "plan_tensors_sha256": shipped["plan_tensors_sha256"],
               "same_as_enable_preset": shipped["same_as_enable_preset"], "method": plan.method.name,
               "knobs": plan.to_dict(), "dense_steps_here": plan.dense_steps_for(steps),
               "dense_layers_here": sorted({i % num_layers for i in plan.dense_layers}),
               "mask_density": mask_density, "adapted": notes, "target_db": TARGETS[preset]}  # fmt: skip
        key = json.dumps([resolved(plan, steps, num_layers), row["plan_tensors_sha256"]], sort_keys=True)
        if key in measured:
            first = measured[key]
            row.update({k: first[k] for k in _MEASURED + ("wall_s",) if k in first})
            row["measured_with"] = f"{first['family']}/{first['preset']}"
        else:
            row.update(measure(bench, f"{family}/{preset}", plan))
            row["measured_with"] = None
            measured[key] = row
        row["met"] = bool("psnr" in row and row["psnr"] >= row["target_db"])
        rows.append(row)
        _print(row)

    table = {f: {r["preset"]: {"psnr": r.get("psnr"), "met": r["met"]} for r in rows if r["family"] == f}
             for f in families}  # fmt: skip
    record = {
        "bench": "preset-quality",
        "model": "tiny random TestbedDiT (logic check only)" if args.tiny else
                 "fastattn testbed video DiT (19.2M params, 10 layers x 6 heads x 64)",  # fmt: skip
        **_versions(),
        "frames": frames, "size": size, "grid": list(layout.grid), "tokens": layout.seq_len, "steps": steps,
        "heldout_clips": clips, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "definition": DEFINITION, "reduced": reduced, "targets": TARGETS,
        "sampler": "Euler, flow matching, no CFG",
        "notes": [
            "each row applies the shipped plan file of its family preset unchanged (fastattn.testbed.fast.enable("
            "model, plan=...)); 'adapted' lists what the runtime derives differently on the testbed's layout",
            "PSNR/SSIM of decoded frames in [0,1] vs dense (same seeds), all frames of all clips pooled; one dense "
            "reference pass shared by every row",
            "attention_density: computed / total attention work over all calls (dense steps and layers included); "
            "mask_density: the plan's mask on this layout on the calls its method serves",
            "rows whose plan acts identically on this run are measured once ('measured_with' names the row)",
        ] + (["REDUCED run: fewer clips and/or steps than bench/quality.py's definition (8 clips, 16 steps); "
              "fractional dense_steps resolve against this run's steps"] if reduced else []),  # fmt: skip
        "dense_seconds": bench.dense_s,
        "rows": rows,
        "table": table,
        "elapsed_s": round(time.perf_counter() - t_start, 1),
    }  # fmt: skip
    out = Path(args.out) if args.out else None
    if out is None:
        base = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).parent / "results"
        out = base / f"preset-quality-{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    title = "REDUCED run: " if reduced else ""
    print(f"\n{title}PSNR vs dense (dB), {len(clips)} clips x {steps} steps; targets safe/balanced/fast "
          f"{TARGETS['safe']:g}/{TARGETS['balanced']:g}/{TARGETS['fast']:g}")  # fmt: skip
    print(f"{'family':14s}" + "".join(f"{p:>18s}" for p in presets))
    for f, cells in table.items():
        print(f"{f:14s}" + "".join(f"{_cell(cells.get(p)):>18s}" for p in presets))
    print(f"wrote {out} ({time.perf_counter() - t_start:.0f} s)")
    return 0


def _cell(c: dict | None) -> str:
    if c is None or c["psnr"] is None:
        return "-"
    return f"{c['psnr']:.2f} {'met' if c['met'] else 'MISS'}"


def _print(row: dict) -> None:
    name = f"{row['family']}/{row['preset']}"
    if "psnr" not in row:
        print(f"{name:26s} {row.get('error') or row.get('skipped')}", flush=True)
        return
    shared = f"  (= {row['measured_with']})" if row["measured_with"] else f"  {row['wall_s']:.0f} s"
    print(f"{name:26s} {row['method']:9s} PSNR {row['psnr']:6.2f} (target {row['target_db']:g}: "
          f"{'met' if row['met'] else 'MISS'})  attention {row['attention_density']:.3f}{shared}", flush=True)  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
