"""Per family, a grid of candidate plans, each scored on the testbed AND timed as whole generations at the
family's real shape with the same plan object; per tier, the fastest candidate that meets the tier's PSNR.

Issue 16 asks of every family's ``safe`` / ``balanced`` / ``fast`` preset, with one plan: testbed PSNR vs dense
>= 35 / 28 / 24 dB (``bench/preset_quality.py``'s measure) and whole-schedule speed on random-weight real shapes
(``bench/e2e.py``'s builders; every step of 50, FLUX 28, dense steps included): ``balanced`` Wan-1.3B 480p >=
1.7x, Wan-14B 720p >= 2.2x, HunyuanVideo 720p >= 3.0x, FLUX 2048² >= 1.3x; ``fast`` 20% above each; nothing
slower than dense (FLUX 1024² included). This tool searches for such plans:

1. Candidates: a default grid per family kind (video: ``window3d`` 0.2/0.3/0.4, ``radial`` 0.15/0.25, ``dynamic``
   top-k 0.15/0.2/0.3 with ``reuse_steps=4``, with and without WA-RS ``residual_refresh=4``; image/joint
   families: ``window3d`` and ``arrow`` 0.25/0.4/0.6 and the same ``dynamic`` ones; all with ``dense_steps=0.1``),
   plus each method's middle density and the WA-RS dynamic ones with the cache presets ``balanced`` and ``fast``
   (a preset's cache is part of its plan, so cached candidates compete for every tier: the PSNR gate decides).
   ``--candidates FILE.json`` (a list of plan keyword objects, optional ``"name"``)
   replaces the grid. Each candidate becomes ONE plan through ``fastattn.make_plan`` (what ``fastattn.enable``
   builds); its sha256 (of ``plan.describe()``) is recorded by both measurements from the plan that ran.
2. Quality, all candidates first (cheap): ``bench/preset_quality.py``'s scoring (held-out testbed clips, one shared
   dense reference, ``fastattn.testbed.fast.enable(model, plan=plan)``).
3. Speed, only for candidates meeting the lowest tier's PSNR: for each tier the cheapest candidate meeting it
   first, then the others by testbed attention fraction (lowest first); a row whose estimated time no longer fits
   ``--budget-s`` is recorded skipped. Dense baseline: the fastest of diffusers' ``native`` / ``_native_cudnn``
   backends and fastattn's op on full block lists (as ``bench/caching.py``), timed the same way. Random weights
   cannot judge a content trigger: a cached candidate with ``blocks="auto"`` is timed as ``blocks="fixed"`` at the
   skip fraction its own testbed run produced (its last clip's block schedule), and the row says so.
4. Selection per tier: among candidates meeting the PSNR (and eligible for the tier), the highest measured
   speedup; whether the shape's speed target is met, and for ``fast`` whether it is >= 1.2x the chosen
   ``balanced``. ``--write-plans DIR`` writes each chosen plan as ``DIR/<family>-<tier>/`` (the format of
   ``presets/plans/``).

The JSON is saved after every row. ``--quality-from`` takes the quality of candidates (matched by plan sha) from an
earlier run of the same family, so a second shape of a family (Wan-14B after Wan-1.3B, FLUX 1024² after 2048²)
spends its GPU time on speed only.

    python -m fastattn.bench.preset_search --family wan                          # GPU, Wan-1.3B 480p
    python -m fastattn.bench.preset_search --family wan --shape wan14b_720p --quality-from W13.json
    python -m fastattn.bench.preset_search --family wan --tiny --targets 0,0,0   # CPU: the logic in seconds

The testbed is ours and small (19.2M parameters, 4,096 tokens): its PSNR is fast-vs-dense fidelity on learned
attention, never FLUX or Wan quality; the speed rows run random weights and measure speed only.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from fastattn.bench import caching, e2e, preset_quality
from fastattn.bench.caching_quality import HELDOUT, Bench
from fastattn.bench.quality import _versions

TIERS = tuple(preset_quality.TARGETS)  # safe, balanced, fast
FAST_OVER_BALANCED = 1.2  # issue 16: fast 20% above balanced
CREATOR = "fastattn.bench.preset_search"


# ---------------------------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class Shape:
    """A family's real shape as ``bench/e2e.py`` builds it; ``fraction``: the share of its blocks that run
    (time box, ``e2e._scaled``); ``balanced_x``: issue 16's balanced speed target (None: not slower than dense)."""

    model: str
    kind: str
    config: dict
    fraction: float
    spec: dict
    steps: int
    balanced_x: float | None


SHAPES = {
    "wan1.3b_480p": Shape("Wan2.1-T2V-1.3B", "wan", e2e.WAN_13B, 1.0,
                          dict(kind="wan", batch=2, frames=81, h=480, w=832, text=512), 50, 1.7),
    "wan14b_720p": Shape("Wan2.1-T2V-14B", "wan", e2e.WAN_14B, 0.1,
                         dict(kind="wan", batch=1, frames=81, h=720, w=1280, text=512), 50, 2.2),
    "hunyuan_720p": Shape("HunyuanVideo", "hunyuan", e2e.HUNYUAN, 0.05,
                          dict(kind="hunyuan", frames=129, h=720, w=1280, text=256), 50, 3.0),
    "flux_2048": Shape("FLUX.1-dev", "flux", e2e.FLUX_DEV, 1.0, dict(kind="flux", h=2048, w=2048, text=512), 28, 1.3),
    "flux_1024": Shape("FLUX.1-dev", "flux", e2e.FLUX_DEV, 1.0, dict(kind="flux", h=1024, w=1024, text=512), 28, None),
}  # fmt: skip
FAMILY_SHAPES = {"wan": ("wan1.3b_480p", "wan14b_720p"), "hunyuan_video": ("hunyuan_720p",),
                 "flux": ("flux_2048", "flux_1024")}  # fmt: skip
TINY_SPECS = {"wan": dict(kind="wan", batch=2, frames=5, h=64, w=96, text=8),
              "hunyuan": dict(kind="hunyuan", frames=5, h=64, w=96, text=8),
              "flux": dict(kind="flux", h=128, w=128, text=8)}  # fmt: skip


def tiny(shape: Shape) -> Shape:
    """The same code paths at CPU size: ``bench/e2e.py``'s tiny config, a few tokens, 4 steps, every block."""
    return dataclasses.replace(shape, config=e2e.TINY[shape.kind], fraction=1.0, spec=TINY_SPECS[shape.kind],
                               steps=4)  # fmt: skip


def speed_targets(shape: Shape | None) -> dict:
    """Whole-schedule speedup each tier must reach on ``shape``: balanced its target, fast 20% above, and never
    slower than dense."""
    if shape is None:
        return {}
    balanced = shape.balanced_x or 1.0
    fast = FAST_OVER_BALANCED * shape.balanced_x if shape.balanced_x else 1.0
    return {"safe": 1.0, "balanced": balanced, "fast": fast}


# ---------------------------------------------------------------------------------------------- candidates


def default_candidates(family: str, tiny: bool) -> list[dict]:
    """The grid (module docstring): plan keywords as ``make_plan`` takes them."""
    steps = {"dense_steps": 0.1}

    def structural(method, density):  # clamp: a layout that cannot go this low uses its least mask, reported
        return {"method": method, "density": density, "clamp_density": True, **steps}

    def dynamic(density, residual):
        d = {
            "method": "dynamic",
            "top_p": 1.0,
            "min_density": density,
            "max_density": density,
            "reuse_steps": 4,
        }
        return {**d, **steps, **({"residual": True, "residual_refresh": 4} if residual else {})}

    if tiny:  # a trigger that skips on the tiny random model too (every other step), so the path is exercised
        return [
            structural("window3d", 0.5),
            {**dynamic(0.3, True), "cache": {"preset": "fast", "threshold": 1e3, "max_skips": 1}},
        ]
    if family in preset_quality.JOINT_TEXT_IMAGE:
        grid = {"window3d": (0.25, 0.4, 0.6), "arrow": (0.25, 0.4, 0.6)}
    else:
        grid = {"window3d": (0.2, 0.3, 0.4), "radial": (0.15, 0.25)}
    out = [structural(m, d) for m, densities in grid.items() for d in densities]
    out += [dynamic(d, r) for d in (0.15, 0.2, 0.3) for r in (False, True)]
    # caching lowers PSNR: it is paired with each method's middle density, which has room for it
    middle = [structural(m, ds[len(ds) // 2]) for m, ds in grid.items()] + [
        dynamic(0.2, False),
        dynamic(0.2, True),
        dynamic(0.3, True),
    ]
    out += [{**c, "cache": cache} for c in middle for cache in ("balanced", "fast")]
    return out


def read_candidates(path: str) -> list[dict]:
    """A ``--candidates`` file: a non-empty JSON list of plan keyword objects."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--candidates: cannot read {path!r} as JSON: {e}") from None
    if not isinstance(data, list) or not data or not all(isinstance(c, dict) for c in data):
        raise SystemExit(
            f"--candidates: {path} must hold a non-empty JSON list of plan keyword objects, e.g. "
            '[{"method": "window3d", "density": 0.3, "dense_steps": 0.1}]'
        )
    return data


def label(kwargs: dict) -> str:
    """A short name: the ``name`` given, else method, density, residual sharing, cache."""
    if kwargs.get("name"):
        return str(kwargs["name"])
    parts = [str(kwargs.get("preset") or kwargs.get("method"))]
    density = kwargs.get("density", kwargs.get("max_density"))
    if density is not None:
        parts.append(f"d={density:g}")
    if kwargs.get("residual"):
        parts.append(f"WA-RS/{kwargs.get('residual_refresh', 0)}")
    if kwargs.get("cache"):
        parts.append(f"+cache {kwargs['cache'] if isinstance(kwargs['cache'], str) else 'custom'}")
    return " ".join(parts)


def plan_sha(plan) -> str:
    """Identity of a plan object: sha256 of its canonical description (method, settings, head table)."""
    return hashlib.sha256(json.dumps(plan.describe(), sort_keys=True).encode()).hexdigest()


def build(family: str, kwargs_list: list[dict], tiny: bool) -> list[dict]:
    """One plan per candidate through ``make_plan`` (tiny: ``block_size=16``, the CPU model's); clear errors name
    the candidate. Identical plans are refused."""
    from fastattn.plans.build import make_plan

    out, seen = [], {}
    for i, given in enumerate(kwargs_list):
        kwargs = {k: v for k, v in given.items() if k != "name"}
        if tiny:
            kwargs.setdefault("block_size", 16)
        try:
            plan = make_plan(family, **kwargs)
        except (TypeError, ValueError) as e:
            raise SystemExit(f"candidate {i} {given}: {e}") from None
        sha = plan_sha(plan)
        if sha in seen:
            raise SystemExit(f"candidates {seen[sha]} and {i} build the same plan ({plan.describe()})")
        seen[sha] = i
        tiers = list(TIERS)  # a cached plan is one plan: its testbed PSNR decides its tier
        out.append(
            {"label": label(given), "kwargs": kwargs, "plan": plan, "plan_sha256": sha, "tiers": tiers}
        )
    return out


# ---------------------------------------------------------------------------------------------- quality


class _Bench(Bench):
    """``Bench`` that keeps the plan the testbed's handle actually ran (its sha goes in the row)."""

    ran_plan = None

    def setup(self, row):
        undo, after_each, stats, runtime = super().setup(row)
        self.ran_plan = self.model.__dict__["_fastattn_handle"].plan
        return undo, after_each, stats, runtime


def testbed_definition(tiny: bool) -> dict:
    """What the quality of a plan depends on besides the plan: bench/preset_quality.py's held-out definition."""
    if tiny:
        return {"tiny": True, "steps": 4, "clips": HELDOUT[:2]}
    return {"tiny": False, "steps": preset_quality.DEFINITION["steps"], "clips": HELDOUT}


def quality_phase(family, cands, rows, args, save, t_start, reused: dict) -> dict:
    """Score every candidate on the testbed (or take its row from ``reused``); returns the testbed's definition."""
    from fastattn.masks.layout import TokenLayout

    device = "cpu" if args.tiny else "cuda"
    model, frames, size, block_size = preset_quality._model(args.tiny, device)
    testbed = testbed_definition(args.tiny)
    steps, clips = testbed["steps"], testbed["clips"]
    layout = TokenLayout.video(*model.cfg.grid(frames, size))
    num_layers = len(model.blocks)
    testbed.update(grid=list(layout.grid), layers=num_layers)
    bench = None
    for cand, row in zip(cands, rows):
        plan = cand["plan"]
        if cand["plan_sha256"] in reused:
            row["quality"] = {**reused[cand["plan_sha256"]], "reused_from": args.quality_from}
        else:
            if bench is None:  # the dense reference pass, once, only when something is measured here
                left = args.budget_s - (time.perf_counter() - t_start)
                bench = _Bench(
                    model, clips, frames, size, steps, device, {}, warmup=device == "cuda", budget_s=left
                )
            bench.ran_plan = None
            q = preset_quality.measure(bench, cand["label"], plan)
            q["plan_sha256"] = plan_sha(bench.ran_plan) if bench.ran_plan is not None else None
            notes, mask_density = preset_quality.adapted_notes(
                family, plan, layout, steps, num_layers, block_size or plan.block_size
            )
            q.update(adapted=notes, mask_density=mask_density, dense_steps_here=plan.dense_steps_for(steps))
            row["quality"] = q
        save()
        _print_quality(row)
    del model, bench
    _free()
    return testbed


def psnr(row: dict) -> float | None:
    return row.get("quality", {}).get("psnr")


def cost(row: dict) -> float:
    """Expected cost from the testbed: attention work done over dense, block skips included."""
    q = row["quality"]
    return q.get("attention_fraction", q.get("attention_density", 1.0))


# ---------------------------------------------------------------------------------------------- speed


def speed_order(rows: list[dict], targets_db: dict) -> list[dict]:
    """Rows worth timing (meeting the lowest tier's PSNR): per tier the cheapest meeting it first (so each tier
    gets a measured candidate before the budget runs out), then the rest, cheapest first."""
    floor = min(targets_db.values())
    ok = sorted((r for r in rows if psnr(r) is not None and psnr(r) >= floor), key=cost)
    first = []
    for tier in ("fast", "balanced", "safe"):
        pick = next((r for r in ok if tier in r["tiers"] and psnr(r) >= targets_db[tier]), None)
        if pick is not None and pick not in first:
            first.append(pick)
    return first + [r for r in ok if r not in first]


def timed_plan(plan, quality: dict, testbed_steps: int):
    """``(plan to time, note)``: the plan itself, or for a content-triggered block cache (``blocks="auto"``) the
    same plan with ``blocks="fixed"`` at the skip fraction its testbed run produced (random weights cannot judge a
    content trigger)."""
    cfg = plan.cache
    if cfg.blocks != "auto":
        return plan, None
    window = [s for s in range(testbed_steps) if cfg.in_window(s, testbed_steps)]
    skipped = [s for s in quality.get("last_clip_schedule") or () if s in window]
    if not window:
        raise ValueError(f"the cache window is empty on the testbed's {testbed_steps} steps")
    fraction = len(skipped) / len(window)
    if fraction >= 1.0:
        raise ValueError(
            "the testbed run skipped every step of the cache window: no fixed schedule equals it"
        )
    fixed = plan.replace(cache=dataclasses.replace(cfg, blocks="fixed", skip_fraction=fraction))
    note = (f"blocks='auto' timed as blocks='fixed' at skip_fraction {fraction:.3f}: the testbed run skipped steps "
            f"{skipped} of its {len(window)}-step cache window (last clip); random weights cannot judge the trigger")  # fmt: skip
    return fixed, note


def _speed_stats(handle) -> dict:
    st = handle.stats()
    out = caching._our_stats(st)
    out.update(planned_dense=st["planned_dense"], selections=st.get("selections"),
               selection_reuses=st.get("selection_reuses"), timed_plan_sha256=plan_sha(handle.plan),
               family_of_model=handle.models[0].adapter.family)  # fmt: skip
    return out


def dense_baseline(model, inputs, steps: int, clock: dict, tiny: bool) -> dict:
    """The fastest dense attention here (one warm step each): diffusers' ``native`` and ``_native_cudnn``
    backends, and on the GPU fastattn's op on full block lists; then that one's whole schedule, timed like every
    candidate (``bench/caching.py``'s ``run_config``). The model keeps the fastest diffusers backend, which the
    candidates' dense steps use."""
    import fastattn.api as fa

    step_ms, best_diffusers = {}, None
    for backend in ("native", "_native_cudnn"):
        try:
            model.set_attention_backend(backend)
            caching.generation(model, inputs, 1, clock)  # warm-up
            step_ms[backend] = caching.generation(model, inputs, 1, clock)
            if best_diffusers is None or step_ms[backend] < step_ms[best_diffusers]:
                best_diffusers = backend
        except Exception as e:  # cuDNN SDPA unavailable (CPU, old GPU)
            print(f"  dense backend {backend} failed: {type(e).__name__}: {e}", file=sys.stderr)
    model.set_attention_backend(best_diffusers)
    best, setup = best_diffusers, lambda: (lambda: None, dict)
    full = dict(method="band", density=1.0, dense_steps=0)  # every block: dense attention through our op
    if not tiny:
        try:
            h = fa.enable(model, num_steps=1, **full)
            try:
                caching.generation(model, inputs, 1, clock)  # warm-up: FlashAttention-4 compiles per shape
                ms = caching.generation(model, inputs, 1, clock)
                served = h.stats().get("kernel_backends") or {}
            finally:
                h.disable()
            name = f"fastattn op, full block lists ({'/'.join(sorted(served)) or 'no kernel'})"
            step_ms[name] = ms
            if served and "dense" not in served and ms < step_ms[best]:
                best = name

                def setup():
                    h = fa.enable(model, num_steps=steps, **full)
                    return h.disable, lambda: {"kernel_backends": h.stats().get("kernel_backends")}
        except Exception as e:
            print(f"  dense through fastattn's op failed: {type(e).__name__}: {e}", file=sys.stderr)
    rec = caching.run_config(model, inputs, steps, clock, setup)
    return {"backend": best, "diffusers_backend": best_diffusers, "step_ms_candidates": step_ms, **rec}


def speed_phase(family, shape: Shape, rows, cands, args, save, t_start, testbed_steps, record) -> None:
    """Time the dense baseline once, then each worthwhile candidate's whole schedule (``speed_order``)."""
    import fastattn.api as fa

    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    run_cfg = e2e._scaled(shape.config, shape.fraction)
    model = e2e.build(shape.kind, run_cfg, device, dtype)
    inputs = e2e.inputs_for(shape.spec, model, device, dtype)
    clock = {"t": 1000.0}
    record["blocks"] = {k: run_cfg[k] for k in ("num_layers", "num_single_layers") if k in run_cfg}
    record["blocks_full"] = {k: shape.config[k] for k in record["blocks"]}
    base = dense_baseline(model, inputs, shape.steps, clock, args.tiny)
    record["dense"] = base
    save()
    print(
        f"dense {base['ms']:.0f} ms for {shape.steps} steps ({base['backend']}); step ms {base['step_ms_candidates']}"
    )
    plans = {id(r): c["plan"] for r, c in zip(rows, cands)}
    todo = speed_order(rows, record["targets_db"])
    for r in rows:
        if r not in todo:
            r["speed"] = {"skipped": "not timed: testbed PSNR below every tier's target (or not measured)"}
    for row in todo:
        plan = plans[id(row)]
        speed = {"plan_sha256": row["plan_sha256"]}
        estimate = base["ms"] / 1000.0 * (min(1.2, 0.45 + 0.7 * cost(row)) + 2.0 / shape.steps)
        estimate += 0.0 if args.tiny else 10.0  # kernel compiles and autotuning in the warm-up steps
        left = args.budget_s - (time.perf_counter() - t_start)
        if estimate > left:
            row["speed"] = {
                **speed,
                "skipped": f"time budget: ~{estimate:.0f} s estimated, {left:.0f} s left",
            }
            save()
            _print_speed(row)
            continue
        try:
            timed, note = timed_plan(plan, row["quality"], testbed_steps)

            def setup(timed=timed, model=model):
                h = fa.enable(model, plan=timed, num_steps=shape.steps)
                return h.disable, lambda: _speed_stats(h)

            speed.update(caching.run_config(model, inputs, shape.steps, clock, setup))
            speed["speedup"] = base["ms"] / speed["ms"]
            if note:
                speed["timed_as"] = note
            if speed["family_of_model"] != family:
                raise RuntimeError(
                    f"the {shape.model} model is family {speed['family_of_model']!r}, not {family!r}"
                )
        except Exception as e:  # recorded, never dropped: the next candidate runs
            speed["error"] = f"{type(e).__name__}: {e}"[:400]
        row["speed"] = speed
        save()
        _print_speed(row)
    del model, inputs
    _free()


# ---------------------------------------------------------------------------------------------- selection


def select(rows: list[dict], targets_db: dict, targets_x: dict) -> dict:
    """Per tier, among rows eligible for it and meeting its PSNR, the highest measured speedup (without a real
    shape for the family: the lowest testbed attention fraction, said so)."""
    out = {}
    for tier in TIERS:
        meets = [
            r for r in rows if tier in r["tiers"] and psnr(r) is not None and psnr(r) >= targets_db[tier]
        ]
        timed = [r for r in meets if "speedup" in r.get("speed", {})]
        entry = {"target_db": targets_db[tier], "meeting_psnr": len(meets), "timed": len(timed)}
        if timed:
            best = max(timed, key=lambda r: r["speed"]["speedup"])
            entry["chosen_by"] = "highest measured whole-schedule speedup"
        elif meets and not targets_x:
            best = min(meets, key=cost)
            entry["chosen_by"] = "lowest testbed attention fraction (no real shape to time for this family)"
        else:
            best = None
            entry["reason"] = (f"{len(meets)} candidate(s) reached {targets_db[tier]:g} dB but none was timed"
                               if meets else f"no candidate reached {targets_db[tier]:g} dB")  # fmt: skip
        if best is not None:
            speedup = best.get("speed", {}).get("speedup")
            entry.update(label=best["label"], plan_sha256=best["plan_sha256"], kwargs=best["kwargs"],
                         psnr=psnr(best), speedup=speedup)  # fmt: skip
            if targets_x:
                entry.update(
                    target_x=targets_x[tier], target_x_met=speedup is not None and speedup >= targets_x[tier]
                )
        out[tier] = entry
    fast, balanced = out["fast"].get("speedup"), out["balanced"].get("speedup")
    if fast is not None and balanced is not None:
        out["fast"]["over_balanced"] = fast / balanced
        out["fast"]["over_balanced_met"] = fast / balanced >= FAST_OVER_BALANCED
    return out


def write_plans(directory: Path, family: str, cands, selection: dict, shape_name, out_name: str) -> list[str]:
    """Each chosen plan as ``directory/<family>-<tier>/`` (``plans/files.py``'s writer), its measurements in
    ``meta.doc``."""
    from fastattn.plans.files import QUANT_BITS, save_plan
    from fastattn.plans.meta import ModelFingerprint, PlanMeta

    by_sha = {c["plan_sha256"]: c for c in cands}
    written = []
    for tier, sel in selection.items():
        if "plan_sha256" not in sel:
            continue
        cand = by_sha[sel["plan_sha256"]]
        plan = cand["plan"]
        speed = (f"whole-schedule {sel['speedup']:.2f}x vs dense at {shape_name}" if sel["speedup"] is not None
                 else "speed not measured")  # fmt: skip
        doc = (f"{CREATOR} {family}/{tier}: {cand['label']}; testbed PSNR {sel['psnr']:.2f} dB vs dense (target "
               f"{sel['target_db']:g}), {speed}; {out_name}")  # fmt: skip
        density = getattr(plan.method, "density", None) or getattr(plan.method, "max_density", None)
        meta = PlanMeta(model=ModelFingerprint(family=family), creator=CREATOR, creator_params=dict(cand["kwargs"]),
                        density=density or None, bits=QUANT_BITS[plan.quant], doc=doc)  # fmt: skip
        written.append(str(save_plan(plan, directory / f"{family}-{tier}", meta)))
    return written


# ---------------------------------------------------------------------------------------------- main


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _targets(text: str) -> dict:
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        values = []
    if len(values) != len(TIERS):
        raise SystemExit(f"--targets must be {len(TIERS)} numbers (dB for {','.join(TIERS)}), got {text!r}")
    return dict(zip(TIERS, values))


def _reused_quality(path: str | None, tiny: bool) -> dict:
    """``{plan sha: quality part}`` from an earlier run of this tool on the same testbed definition. Any family: the
    testbed's PSNR depends on the plan alone (two families' identical plans have one sha)."""
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--quality-from: cannot read {path!r} as JSON: {e}") from None
    if not isinstance(data, dict) or data.get("bench") != "preset-search":
        raise SystemExit(f"--quality-from: {path} is not a preset_search result")
    want = testbed_definition(tiny)
    theirs = {k: (data.get("testbed") or {}).get(k) for k in want}
    if json.loads(json.dumps(want)) != theirs:
        raise SystemExit(
            f"--quality-from: {path} scored another testbed definition ({theirs}; this run: {want})"
        )
    return {r["quality"]["plan_sha256"]: {k: v for k, v in r["quality"].items() if k != "reused_from"}
            for r in data.get("rows", []) if "psnr" in r.get("quality", {})}  # fmt: skip


def main(argv=None) -> int:
    t_start = time.perf_counter()  # --budget-s counts from here
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--family", required=True, help="the family whose plans are searched (presets/structural.json)"
    )
    ap.add_argument("--shape", default=None,
                    help=f"real shape to time (default: the family's first): {dict(FAMILY_SHAPES)}")  # fmt: skip
    ap.add_argument(
        "--candidates", default="default", help="'default' (the grid) or a JSON list of plan kwargs"
    )
    ap.add_argument(
        "--targets", default=None, help="PSNR targets in dB for safe,balanced,fast (default 35,28,24)"
    )
    ap.add_argument("--fraction", type=float, default=None,
                    help="time box: the share of the model's blocks that run (default: the shape's own)")  # fmt: skip
    ap.add_argument(
        "--quality-from", default=None, help="an earlier run's JSON (same family): reuse its quality"
    )
    ap.add_argument(
        "--budget-s", type=float, default=540.0, help="rows that no longer fit are recorded skipped"
    )
    ap.add_argument("--out", default=None, help="output JSON (default $OUT/ or bench/results/)")
    ap.add_argument(
        "--write-plans", default=None, metavar="DIR", help="write each tier's chosen plan folder here"
    )
    ap.add_argument(
        "--tiny", action="store_true", help="tiny random testbed and diffusers configs on the CPU"
    )
    args = ap.parse_args(argv)

    families = preset_quality.shipped_families()
    if args.family not in families:
        raise SystemExit(f"unknown family {args.family!r}; valid: {families}")
    shapes = FAMILY_SHAPES.get(args.family, ())
    if args.shape is not None and args.shape not in shapes:
        raise SystemExit(f"unknown shape {args.shape!r} for family {args.family!r}; valid: {list(shapes)}")
    shape_name = args.shape or (shapes[0] if shapes else None)
    shape = SHAPES[shape_name] if shape_name else None
    if shape is not None and args.tiny:
        shape = tiny(shape)
    if args.fraction is not None:
        if not 0.0 < args.fraction <= 1.0:
            raise SystemExit(f"--fraction must be in (0, 1], got {args.fraction}")
        shape = shape and dataclasses.replace(shape, fraction=args.fraction)
    targets_db = _targets(args.targets) if args.targets else dict(preset_quality.TARGETS)
    kwargs_list = default_candidates(args.family, args.tiny) if args.candidates == "default" else read_candidates(
        args.candidates)  # fmt: skip
    cands = build(args.family, kwargs_list, args.tiny)
    reused = _reused_quality(args.quality_from, args.tiny)
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("preset_search measures on a GPU; use --tiny on the CPU (checks the logic)")

    import diffusers

    tag = "tiny" if args.tiny else _versions()["device"].lower().replace(" ", "_")
    out = Path(args.out) if args.out else None
    if out is None:
        base = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).parent / "results"
        out = base / f"preset-search-{args.family}-{shape_name or 'testbed'}-{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    targets_x = speed_targets(shape)
    rows = [{k: c[k] for k in ("label", "kwargs", "plan_sha256", "tiers")} | {"plan": c["plan"].to_dict()}
            for c in cands]  # fmt: skip
    record = {
        "bench": "preset-search", **_versions(), "diffusers": diffusers.__version__, "family": args.family,
        "shape": shape_name, "shape_spec": shape and {**shape.spec, "model": shape.model, "steps": shape.steps,
                                                      "fraction": shape.fraction},
        "targets_db": targets_db, "targets_db_lowered": targets_db != preset_quality.TARGETS,
        "targets_x": targets_x, "candidates": args.candidates, "budget_s": args.budget_s,
        "notes": [
            "quality: bench/preset_quality.py's scoring on the learned testbed (PSNR/SSIM of decoded frames vs dense, "
            "held-out clips); speed: whole schedules on random weights at the real shape (bench/e2e.py's builders, "
            "bench/caching.py's run_config: 2 warm-up steps, then every step under the pipeline's cache_context)",
            "plan_sha256: sha256 of plan.describe() of the plan object each measurement ran (quality: the testbed "
            "handle's; speed: the candidate's, and timed_plan_sha256 the handle's: equal unless 'timed_as' says)",
            "speed stats (density, fallbacks, kernel_backends) include the 2 warm-up steps",
            "cached candidates compete for every tier (the cache is part of the plan; the PSNR gate decides)",
        ],
    }  # fmt: skip
    if shape is not None and shape.fraction < 1.0:
        record["notes"].append(f"time-boxed: {shape.fraction:.0%} of the blocks run; speedups compare rows of this "
                               "run, and block caching gains less (its probe block is a larger share)")  # fmt: skip

    def save():
        record.update(rows=rows, elapsed_s=round(time.perf_counter() - t_start, 1))
        out.write_text(json.dumps(record, indent=1))

    print(
        f"{args.family}: {len(cands)} candidates; shape {shape_name}; targets {targets_db} dB, {targets_x}",
        flush=True,
    )
    record["testbed"] = quality_phase(args.family, cands, rows, args, save, t_start, reused)
    if shape is None:
        for r in rows:
            r["speed"] = {
                "skipped": f"no real shape for family {args.family!r} in this tool (bench/e2e.py builders)"
            }
    else:
        speed_phase(args.family, shape, rows, cands, args, save, t_start, record["testbed"]["steps"], record)
    record["selection"] = select(rows, targets_db, targets_x)
    if args.write_plans:
        record["written_plans"] = write_plans(Path(args.write_plans), args.family, cands, record["selection"],
                                              shape_name, out.name)  # fmt: skip
    save()
    _print_table(record)
    print(f"wrote {out} ({time.perf_counter() - t_start:.0f} s)")
    return 0


# ---------------------------------------------------------------------------------------------- printing


def _print_quality(row: dict) -> None:
    q = row["quality"]
    if "psnr" not in q:
        print(f"  {row['label']:34s} quality: {q.get('error') or q.get('skipped')}", flush=True)
        return
    print(f"  {row['label']:34s} PSNR {q['psnr']:6.2f}  attention {cost(row):.3f}"
          f"{'  (reused)' if 'reused_from' in q else ''}", flush=True)  # fmt: skip


def _print_speed(row: dict) -> None:
    s = row["speed"]
    if "speedup" not in s:
        print(f"  {row['label']:34s} speed: {s.get('error') or s.get('skipped')}", flush=True)
        return
    print(f"  {row['label']:34s} {s['ms']:10.0f} ms  x{s['speedup']:.2f}  density {s['density']:.3f}"
          f"{'  (timed as fixed cache)' if 'timed_as' in s else ''}", flush=True)  # fmt: skip


def _print_table(record: dict) -> None:
    print(f"\n{record['family']} at {record['shape']}, fastest first (attn: testbed attention fraction)")
    print(f"  {'candidate':34s} {'PSNR':>7s} {'attn':>6s} {'speedup':>8s}")
    for r in sorted(record["rows"], key=lambda r: -(r.get("speed", {}).get("speedup") or 0)):
        p, s = psnr(r), r.get("speed", {}).get("speedup")
        print(f"  {r['label']:34s} {p if p is None else round(p, 2)!s:>7s} "
              f"{cost(r) if 'quality' in r and 'psnr' in r['quality'] else float('nan'):6.3f} "
              f"{'-' if s is None else f'{s:.2f}x':>8s}")  # fmt: skip
    for tier, sel in record["selection"].items():
        if "label" not in sel:
            print(f"{tier:9s} none: {sel['reason']}")
            continue
        x = "-" if sel["speedup"] is None else f"{sel['speedup']:.2f}x"
        goal = (
            f" (target {sel['target_x']:.2f}x: {'met' if sel['target_x_met'] else 'MISS'})"
            if "target_x" in sel
            else ""
        )
        extra = (f", {sel['over_balanced']:.2f}x balanced ({'met' if sel['over_balanced_met'] else 'MISS'})"
                 if "over_balanced" in sel else "")  # fmt: skip
        print(
            f"{tier:9s} {sel['label']:34s} PSNR {sel['psnr']:.2f} (>= {sel['target_db']:g}) {x}{goal}{extra}"
        )


if __name__ == "__main__":
    raise SystemExit(main())
