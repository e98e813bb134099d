"""Calibration on the learned testbed: calibrated per-head plans against dense and the best structural / dynamic
configuration at the same attention work, plus the cost table of our kernels on this GPU.

    python -m fastattn.bench.calibrate            # GPU: writes bench/results/calibrate-<gpu>.json (or $OUT/)
    python -m fastattn.bench.calibrate --tiny     # CPU: a tiny random model, checks the script runs
    python -m fastattn.bench.calibrate --costs-only   # GPU: only the cost table (calibrate-costs-<gpu>.json)

What it does:

1. Measures the cost table (kernel time per block density, bit-width and reordering against cuDNN dense,
   and the fixed cost of one kernel call at the testbed's size) unless ``--cost-table`` names one.
2. Calibrates the testbed (bf16) on the *tune* clips of ``bench/quality.py`` at each ``--targets`` attention
   work (timed), saving each plan under ``<out dir>/plans/testbed-calibrated-<work>/`` with its report.
3. Scores on the *held-out* clips of ``bench/quality.py`` (same metric: PSNR of decoded frames vs dense,
   same seeds): each calibrated plan, and a grid of 3-D window and dynamic configurations whose measured
   work is at most each target, and times the calibrated plans against dense at the testbed's full size.

The testbed is ours and small: fidelity figures on learned attention, not FLUX or Wan quality. Its
4,096-token calls are launch-bound on a GPU, so the wall-clock row says what our runtime costs there.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

TARGETS = {0.30: 32.0, 0.20: 28.0}  # attention work -> PSNR the issue asks for
MARGIN_DB = 3.0  # and this much above the best structural / dynamic configuration at the same work
TUNE = [(lab, 1000 + i) for i, lab in enumerate((1, 5, 10, 14, 19, 22))]
HELD = [(lab, i) for i, lab in enumerate((0, 3, 6, 9, 12, 15, 18, 21))]


def _versions() -> dict:
    from fastattn.bench.quality import _versions as v

    return v()


# ------------------------------------------------------------------------------------------ cost table


def measure_costs(device: str, tiny: bool) -> dict:
    """Our kernel's efficiency per block (vs cuDNN dense) by density, bit-width and reordering at a Wan-1.3B
    shape, and the fixed cost of one call at the testbed's shape; a ``fastattn-cost-table`` dict."""
    from fastattn.attn_kernels import sparse_attention
    from fastattn.masks import TokenLayout, head_permutations, patterns
    from triton.testing import do_bench

    if tiny:
        big = (2, TokenLayout.video(3, 8, 8))
        small = (2, TokenLayout.video(2, 4, 4))
        block, d, rep = 16, 64, 1
        quants, densities = ("none", "fp8"), (0.5, 1.0)
    else:
        big = (12, TokenLayout.video(21, 30, 52))  # Wan-1.3B 480p
        small = (6, TokenLayout.video(16, 16, 16))  # the testbed
        block, d, rep = 128, 128, 200
        quants, densities = ("none", "int8", "int8-fp8", "fp8"), (0.1, 0.2, 0.3, 0.5, 1.0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def inputs(heads, layout, dim):
        g = torch.Generator(device="cpu").manual_seed(0)
        return [torch.randn(1, heads, layout.seq_len, dim, generator=g).to(device, dtype) for _ in range(3)]

    def bench(fn):
        if device != "cuda":
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        return float(do_bench(fn, warmup=10, rep=rep, return_mode="median"))

    heads, layout = big
    q, k, v = inputs(heads, layout, d)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    cudnn_ms = bench(lambda: sdpa(q, k, v))
    perm = head_permutations(layout, ["HWF"] * heads).to(device)
    eff: dict = {}
    reorder: dict = {}
    records = []
    for quant in quants:
        for dens in densities:
            mask = patterns.band_for_density(layout, dens, block)
            bd = mask.block_density()
            ms = bench(lambda: sparse_attention(q, k, v, mask, quant=quant))
            ms_r = bench(lambda: sparse_attention(q, k, v, mask, quant=quant, perm=perm))
            eff.setdefault(quant, []).append([round(bd, 4), round(cudnn_ms * bd / ms, 4)])
            reorder.setdefault(quant, []).append(ms_r / ms)
            records.append(
                {"quant": quant, "block_density": bd, "ms": ms, "ms_reordered": ms_r, "cudnn_ms": cudnn_ms}
            )
    heads_s, layout_s = small
    qs, ks, vs = inputs(heads_s, layout_s, 64)
    sdpa_small = bench(lambda: sdpa(qs, ks, vs))
    over = []
    for dens in densities:
        mask = patterns.band_for_density(layout_s, dens, block)
        bd = mask.block_density()
        ms = bench(lambda: sparse_attention(qs, ks, vs, mask))
        over.append(max(0.0, ms - bd * sdpa_small))
    over.sort()
    return {
        "format": "fastattn-cost-table",
        "device": _versions()["device"],
        "source": f"measured by fastattn.bench.calibrate: efficiencies at B=1 H={heads} S={layout.seq_len} D={d} "
                  f"(diagonal bands, block {block}) against cuDNN SDPA dense ({cudnn_ms:.3f} ms); reorder factors "
                  "with an HWF permutation per head; call overhead = median of (kernel ms - density x SDPA ms) at "
                  f"the testbed shape H={heads_s} S={layout_s.seq_len} D=64 (SDPA {sdpa_small:.4f} ms); "
                  "group_overhead_ms: one more launch at the testbed shape is assumed to cost the same",
        "efficiency": {q_: sorted(v_) for q_, v_ in eff.items()},
        "reorder_factor": {q_: round(sorted(v_)[len(v_) // 2], 4) for q_, v_ in reorder.items()},
        "call_overhead_ms": round(over[len(over) // 2], 5),
        "group_overhead_ms": round(over[len(over) // 2], 5),
        "dense_tflops": float(f"{4 * heads * layout.seq_len**2 * d / (cudnn_ms * 1e-3) / 1e12:.4g}"),
        "dense_floor_ms": round(sdpa_small, 5),
        "records": records,
    }  # fmt: skip


# ------------------------------------------------------------------------------------------ real shapes


def real_shapes(heads: list[dict], device: str, tiny: bool) -> list[dict]:
    """A calibrated-shaped plan at real video geometry, timed against cuDNN dense and the structural window.

    Per-head densities and axis orders are drawn (evenly spaced quantiles, deterministic) from the window heads
    of a calibrated testbed plan (``heads``: its report rows), each rebuilt as a 3-D window of that density in
    that order on the target layout; the structural rival is the unreordered window at the same mean density.
    Kernel time only (one attention call, all heads): does reordering pay for itself at these shapes?
    """
    from fastattn.attn_kernels import sparse_attention
    from fastattn.masks import BlockMask, TokenLayout, head_permutations
    from fastattn.plans.methods import Window3DConfig, build_mask
    from triton.testing import do_bench

    drawn = sorted((round(r["density"] * 20) / 20, r["choice"].split()[-1]) for r in heads
                   if r["choice"].startswith("window3d") and r["density"] > 0)  # fmt: skip
    if not drawn:
        return [{"error": "the calibrated plan has no window heads to draw from"}]
    if tiny:
        shapes, block, d, rep = {"tiny_video": (4, TokenLayout.video(4, 8, 8))}, 32, 64, 1
    else:
        shapes = {"wan1.3b_480p_81f": (12, TokenLayout.video(21, 30, 52)),
                  "hunyuan_720p_129f": (24, TokenLayout.video(33, 45, 80))}  # fmt: skip
        block, d, rep = 128, 128, 100
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def bench(fn):
        if device != "cuda":
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        return float(do_bench(fn, warmup=5, rep=rep, return_mode="median"))

    out = []
    for name, (heads_n, layout) in shapes.items():
        picks = [drawn[round(i * (len(drawn) - 1) / max(heads_n - 1, 1))] for i in range(heads_n)]
        masks = {}
        for dens, order in set(picks):
            cfg = Window3DConfig(density=max(dens, 0.05), order=order, clamp_density=True)
            masks[(dens, order)] = build_mask(cfg, layout, block)
        per_head = BlockMask.stack_heads([masks[p] for p in picks])
        perm = head_permutations(layout, [o for _, o in picks]).to(device)
        mean = per_head.block_density()
        flat = build_mask(Window3DConfig(density=mean, clamp_density=True), layout, block)
        g = torch.Generator().manual_seed(0)
        q, k, v = (
            torch.randn(1, heads_n, layout.seq_len, d, generator=g).to(device, dtype) for _ in range(3)
        )
        dense_ms = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        ours_ms = bench(lambda: sparse_attention(q, k, v, per_head, perm=perm))
        flat_ms = bench(lambda: sparse_attention(q, k, v, flat))
        out.append({"shape": name, "heads": heads_n, "seq_len": layout.seq_len, "grid": list(layout.grid),
                    "per_head": [{"density": dd, "order": o} for dd, o in picks], "mean_block_density": mean,
                    "structural_block_density": flat.block_density(), "cudnn_dense_ms": dense_ms,
                    "calibrated_shaped_ms": ours_ms, "structural_ms": flat_ms,
                    "calibrated_vs_dense": dense_ms / ours_ms, "structural_vs_dense": dense_ms / flat_ms,
                    "reordering_pays": ours_ms <= flat_ms * (mean / max(flat.block_density(), 1e-9)) * 1.02})  # fmt: skip
        print(f"{name}: calibrated-shaped {dense_ms / ours_ms:.2f}x dense, structural {dense_ms / flat_ms:.2f}x "
              f"(block density {mean:.3f} / {flat.block_density():.3f})", flush=True)  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------ scoring


def score(runner, handle) -> dict:
    """Held-out clips under ``handle``'s plan (or dense when None) against the runner's dense clips."""
    from fastattn.evaluation.metrics import psnr, rel_l2, ssim

    try:
        runner._sample(runner.model, runner.labels[:1], **{**runner.kw, "num_steps": 2})  # warm-up
        handle.reset_stats()
        frames, lats, secs = runner.run_all()
        st = handle.stats()
    finally:
        handle.disable()
    f, ref = frames.flatten(0, 1).float(), runner.dense.flatten(0, 1).float()
    return {"attention_density": st["density"], "psnr": float(psnr(f, ref)), "ssim": float(ssim(f, ref)),
            "rel_l2_latents": float(rel_l2(lats.float(), runner.dense_lat.float())), "seconds": secs,
            "fallbacks": st["fallbacks"], "head_reuses": st.get("head_reuses")}  # fmt: skip


def baseline_grid(tiny: bool) -> list[dict]:
    """3-D windows and dynamic selection with few dense steps: configurations of low attention work."""
    dens = (0.15, 0.2, 0.3) if not tiny else (0.3,)
    out = []
    for d in dens:
        for ds in (0, 1, 2) if not tiny else (0,):
            out.append({"method": "window3d", "density": d, "dense_steps": ds, "clamp_density": True})
            out.append(
                {"method": "dynamic", "top_p": 1.0, "min_density": d, "max_density": d, "dense_steps": ds}
            )
            if not tiny:
                out.append({"method": "window3d", "density": d, "dense_steps": ds, "residual": True,
                            "clamp_density": True})  # fmt: skip
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny random model on the CPU (checks the script)")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--targets", type=float, nargs="+", default=sorted(TARGETS, reverse=True),
                    help="attention work to calibrate for (default 0.3 0.2)")  # fmt: skip
    ap.add_argument("--cost-table", default=None, help="use this cost table instead of measuring one")
    ap.add_argument("--costs-only", action="store_true", help="measure and write the cost table only")
    ap.add_argument("--configs", default=None,
                    help="JSON list of extra calibrate() keyword sets to compare (each is calibrated at every "
                         "target), e.g. '[{\"sensitivity_rounds\": 2}]'")  # fmt: skip
    ap.add_argument("--no-baselines", action="store_true", help="skip the structural / dynamic grid")
    ap.add_argument("--no-real-shapes", action="store_true",
                    help="skip timing a calibrated-shaped plan at Wan-1.3B 480p / HunyuanVideo 720p geometry")  # fmt: skip
    ap.add_argument("--real-shapes-from", default=None, metavar="JSON",
                    help="only time the calibrated-shaped plan, drawn from this earlier calibrate-<gpu>.json; "
                         "writes calibrate-real-shapes-<gpu>.json")  # fmt: skip
    ap.add_argument("--out", default=None, help="output folder (default $OUT or bench/results)")
    ap.add_argument("--plans-dir", default=None, help="where the calibrated plans go (default <out>/plans)")
    args = ap.parse_args(argv)

    from fastattn.bench.quality import Runner
    from fastattn.calibration import CalibrationError, CostModel, run_calibration
    from fastattn.calibration.select import BudgetError
    from fastattn.testbed.fast import enable
    from fastattn.testbed.model import TestbedConfig, TestbedDiT
    from fastattn.testbed.sample import load_testbed

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if device == "cpu" and not args.tiny:
        raise SystemExit(
            "the calibration benchmark needs a GPU (the CPU path is the exact reference); use --tiny"
        )
    base = (
        Path(args.out)
        if args.out
        else Path(os.environ["OUT"])
        if os.environ.get("OUT")
        else Path(__file__).parent / "results"
    )
    base.mkdir(parents=True, exist_ok=True)
    tag = "tiny" if args.tiny else _versions()["device"].lower().replace(" ", "_")
    t_start = time.time()

    if args.real_shapes_from:
        earlier = json.loads(Path(args.real_shapes_from).read_text())
        first = next(r for r in earlier["calibrated"] if not r["calibrate_kwargs"])
        shaped = real_shapes(first["heads"], device, args.tiny)
        path = base / f"calibrate-real-shapes-{tag}.json"
        path.write_text(json.dumps({"bench": "calibrate-real-shapes", **_versions(), "drawn_from": first["config"],
                                    "real_shapes": shaped}, indent=1))  # fmt: skip
        print(f"wrote {path}")
        return 0
    if args.cost_table:
        cost = CostModel.load(args.cost_table)
        cost_record = {"loaded": args.cost_table}
    else:
        table = measure_costs(device, args.tiny)
        path = base / f"calibrate-costs-{tag}.json"
        path.write_text(json.dumps(table, indent=1))
        print(f"wrote {path}")
        cost = CostModel.load(path)
        cost_record = {k: v for k, v in table.items() if k != "records"}
    if args.costs_only:
        return 0

    if args.tiny:
        torch.manual_seed(0)
        model = TestbedDiT(TestbedConfig.tiny()).eval()
        with torch.no_grad():  # adaLN-zero init leaves attention without effect: give every weight a value
            for p in model.parameters():
                p.normal_(0.0, 0.2)
        frames, size, block, steps = 2, 32, 16, 2
        tune, held = [(1, 100)], [(0, 0), (3, 1)]
    else:
        model = load_testbed(device=device, dtype=torch.bfloat16)
        frames, size, block, steps = model.cfg.frames, model.cfg.size, 128, args.steps
        tune, held = TUNE, HELD
    configs = [{}] + (json.loads(args.configs) if args.configs else [])
    out = base / f"calibrate-{tag}.json"
    head = {
        "bench": "calibrate",
        **_versions(),
        "frames": frames,
        "size": size,
        "steps": steps,
        "block_size": block,
    }

    def partial(**parts):  # what is done so far, in case a long run is cut short
        out.write_text(json.dumps({**head, "partial": True, **parts}, indent=1))

    runner = Runner(model, held, frames, size, steps, block, device)
    rows, plans = [], []
    for target in args.targets:
        for extra in configs:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            name = f"testbed-calibrated-{target:g}" + (f"-{len(plans)}" if extra else "")
            try:
                res = run_calibration(model, tune, target_density=target, steps=steps, block_size=block, seed=0,
                                      frames=frames, size=size, cost_table=cost, progress=False, **extra)  # fmt: skip
            except (CalibrationError, BudgetError) as e:  # e.g. a budget this config cannot meet: recorded, the others still run
                rows.append({"config": name, "target_work": target, "calibrate_kwargs": extra, "error": str(e)})
                plans.append(name)
                print(f"{name}: {e}", flush=True)
                continue
            calib_s = time.perf_counter() - t0
            # plan.json + plan.safetensors only (the report's summary and layers go into the JSON below)
            res.plan.save(Path(args.plans_dir or base / "plans") / name, res.meta)
            row = {"config": name, "target_work": target, "calibrate_kwargs": extra, "calibration_seconds": calib_s,
                   "expected_work": res.report["summary"]["expected_work"],
                   "estimated_error": res.report["summary"]["estimated_error"],
                   "report_summary": res.report["summary"], "per_layer": res.report["per_layer"],
                   "heads": res.report["heads"]}  # fmt: skip
            row.update(score(runner, enable(model, plan=res.plan)))
            row["speedup_vs_dense"] = runner.dense_s / row["seconds"]
            rows.append(row)
            plans.append(name)
            partial(calibrated=rows)
            print(f"{name}: work {row['attention_density']:.3f}  PSNR {row['psnr']:.2f}  calib {calib_s:.1f} s  "
                  f"{row['speedup_vs_dense']:.2f}x dense", flush=True)  # fmt: skip
    baselines = []
    if not args.no_baselines:
        for cfg in baseline_grid(args.tiny):
            kw = dict(cfg)
            try:
                h = enable(model, block_size=block, **kw)
            except ValueError as e:
                baselines.append({"args": cfg, "error": str(e)})
                continue
            r = score(runner, h)
            r["args"] = cfg
            baselines.append(r)
            partial(calibrated=rows, baselines=baselines)
            print(f"baseline {cfg}: work {r['attention_density']:.3f} PSNR {r['psnr']:.2f}", flush=True)
    shaped = []
    if rows and not args.no_real_shapes:
        first = next((r for r in rows if not r["calibrate_kwargs"] and "heads" in r), None)
        shaped = real_shapes(first["heads"], device, args.tiny) if first else []
    summary = {}
    for target in args.targets:
        # the best calibrate() keyword set at this work (default first, so it wins ties); its kwargs are recorded
        ours = [r for r in rows if r["target_work"] == target and r.get("attention_density", 1) <= target + 0.005]
        mine = max(ours, key=lambda r: r["psnr"]) if ours else None
        rivals = [b for b in baselines if "error" not in b and b["attention_density"] <= target + 0.005]
        best = max(rivals, key=lambda b: b["psnr"]) if rivals else None
        need = TARGETS.get(round(target, 2))
        summary[f"work<={target:g}"] = {
            "calibrated_config": mine and mine["config"], "calibrate_kwargs": mine and mine["calibrate_kwargs"],
            "calibrated_psnr": mine and mine["psnr"], "calibrated_work": mine and mine["attention_density"],
            "best_baseline": best and best["args"], "best_baseline_psnr": best and best["psnr"],
            "best_baseline_work": best and best["attention_density"],
            "psnr_target": need, "psnr_target_met": bool(mine and need is not None and mine["psnr"] >= need),
            "margin_db": (mine["psnr"] - best["psnr"]) if mine and best else None,
            "margin_met": bool(mine and best and mine["psnr"] - best["psnr"] >= MARGIN_DB),
            "calibration_seconds": mine and mine["calibration_seconds"],
            "wall_clock_vs_dense": mine and mine["speedup_vs_dense"],
        }  # fmt: skip
    record = {
        "bench": "calibrate", **_versions(),
        "model": "fastattn testbed video DiT (19.2M params, 10 layers x 6 heads x 64)" if not args.tiny
        else "tiny random TestbedDiT (script check only)",
        "frames": frames, "size": size, "steps": steps, "block_size": block, "tune_clips": tune, "heldout_clips": held,
        "metric_notes": "PSNR/SSIM of decoded frames in [0,1] vs dense on the held-out clips (as bench/quality.py); "
                        "attention_density = computed / total attention work over all calls (the runtime's stats); "
                        "wall-clock: the held-out sampling time, dense / plan, in the same run",
        "dense_seconds": runner.dense_s, "cost_table": cost_record, "summary": summary, "calibrated": rows,
        "baselines": baselines, "real_shapes": shaped, "plans": plans, "elapsed_s": round(time.time() - t_start, 1),
    }  # fmt: skip
    out.write_text(json.dumps(record, indent=1))
    print(json.dumps(summary, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
