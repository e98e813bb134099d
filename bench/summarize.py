"""Markdown tables from benchmark JSON: ``python -m fastattn.bench.summarize bench/results/kernels-*.json``."""

from __future__ import annotations

import json
import sys


def kernel_table(records: list[dict]) -> str:
    """Speedup over cuDNN SDPA per shape, density and quant (no reordering), with the peers."""
    shapes = list(dict.fromkeys(r["shape"] for r in records))
    lines = [
        "| shape | density | fastattn bf16 | fastattn int8-fp8 | fastattn fp8 | bf16 + reorder | FlexAttention | rel-L2 bf16 / int8-fp8 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for shape in shapes:
        rs = [r for r in records if r["shape"] == shape]
        for dens in (1.0, 0.5, 0.25, 0.1):

            def pick(method, quant="none", reorder=False):
                for r in rs:
                    target = r.get("target_density", r["density"])
                    if r["method"] == method and r["quant"] == quant and r["reorder"] == reorder:
                        if abs(target - dens) < 0.03 or (
                            method == "flex_attention" and abs(r["density"] - dens) < 0.03
                        ):
                            return r
                return None

            cells = []
            for method, quant, reorder in (
                ("fastattn", "none", False),
                ("fastattn", "int8-fp8", False),
                ("fastattn", "fp8", False),
                ("fastattn", "none", True),
                ("flex_attention", "none", False),
            ):
                r = pick(method, quant, reorder)
                cells.append("—" if r is None else f"{r['speedup']:.2f}×")
            b, q = pick("fastattn"), pick("fastattn", "int8-fp8")
            err = "—" if b is None or q is None else f"{b['rel_l2']:.4f} / {q['rel_l2']:.4f}"
            lines.append(f"| {shape} | {dens} | " + " | ".join(cells) + f" | {err} |")
    return "\n".join(lines)


def comfyui_table(records: list[dict]) -> str:
    """ms per step inside ComfyUI's model code per case and variant, with the speed-up over ComfyUI's default."""
    lines = [
        "| model | size | variant | ms/step | vs default | attention density | output rel-L2 vs default | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        size = r["resolution"] + (f"×{r['frames']}" if r.get("frames", 1) > 1 else "")
        if r.get("skipped"):
            lines.append(f"| {r['model']} | {size} | {r['variant']} | — | — | — | — | skipped: {r['skipped']} |")
            continue
        density = f"{r['density']:.3f}" if r.get("density") is not None else "—"
        rel = "—" if r["variant"] == "default" else f"{r['out_rel_l2_vs_default']:.3f}"
        notes = []
        if "fallback_calls" in r:
            notes.append(f"fallbacks {r['fallback_calls']}")
        if "served_calls" in r:
            notes.append(f"calls served {r['served_calls']}")
        for reason, n in (r.get("host_calls") or {}).items():
            notes.append(f"to the host's attention {n}: {reason}")
        lines.append(
            f"| {r['model']} | {size} | {r['variant']} | {r['step_ms']:.1f} | {r['speedup_vs_default']:.2f}× "
            f"| {density} | {rel} | {', '.join(notes)} |"
        )
    return "\n".join(lines)


def caching_table(records: list[dict]) -> str:
    """Whole generations per model and configuration: time, speed-up over dense, compute share, peak memory."""
    lines = [
        "| model | size | steps | configuration | whole generation | vs dense | compute share | attention density "
        "| peak memory over dense |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    dense_peak = {(r["model"], r["resolution"]): r["peak_bytes"] for r in records if r["config"] == "dense"}
    for r in records:
        key = (r["model"], r["resolution"])
        size = r["resolution"] + (f"×{r['frames']}" if r.get("frames", 1) > 1 else "")
        extra = (r["peak_bytes"] - dense_peak[key]) / 2**20 if key in dense_peak else None
        extra_s = "—" if r["config"] == "dense" or extra is None else f"{extra:+.0f} MiB"
        density = f"{r['density']:.3f}" if r.get("density") is not None else "—"
        config = r["config"] + (f" ({r['baseline_backend']})" if r["config"] == "dense" else "")
        if r.get("time_boxed"):
            config += ", " + r["time_boxed"].split(" (")[0]
        lines.append(
            f"| {r['model']} | {size} | {r['steps']} | {config} | {r['ms'] / 1000:.2f} s | {r['speedup']:.2f}× "
            f"| {r['compute_fraction']:.2f} | {density} | {extra_s} |"
        )
    return "\n".join(lines)


def caching_source(meta: dict) -> str:
    """Where the cache rows' skip schedule came from (``--skip-fraction-from``), in one sentence."""
    src = meta.get("schedule_source")
    order = " with first-order extrapolation" if meta.get("order") else ""
    if not src:
        return f"cache rows: fixed schedule, skip fraction {meta['skip_fraction']:g}{order}"
    return (f"cache rows: the schedule testbed row '{src['row']}' ({src['file']}) produced: {len(src['skipped_steps'])} "
            f"of its {src['window_steps']} window steps skipped (skip fraction {src['skip_fraction']:.3f}){order}; "
            f"that row's testbed PSNR {src['testbed_psnr']:.2f} dB at compute {src['testbed_compute_fraction']:.2f}")  # fmt: skip


def preset_quality_table(record: dict) -> str:
    """``bench/preset_quality.py``: testbed PSNR vs dense of every family preset's own plan, target met or not."""
    levels = [p for p in ("safe", "balanced", "fast") if p in record["targets"]]
    head = " | ".join(f"{p} (≥ {record['targets'][p]:g} dB)" for p in levels)
    lines = [f"| family | {head} |", "|---|" + "---|" * len(levels)]
    rows = {(r["family"], r["preset"]): r for r in record["rows"]}
    for family in record["table"]:
        cells = []
        for p in levels:
            r = rows.get((family, p))
            if r is None:
                cells.append("—")
            elif "psnr" not in r:
                cells.append(f"not run: {(r.get('error') or r.get('skipped') or '')[:60]}")
            else:
                mark = "✓" if r["met"] else "✗"
                cells.append(f"{r['psnr']:.1f} {mark} (attn {r['attention_density']:.2f})")
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def kernel_peers_table(data: dict) -> str:
    """``bench/kernel_peers.py``: ratio over the run's baseline (cuDNN SDPA on a GPU) and rel-L2 against exact dense
    attention, per variant at its mask (rows) and shape (columns); then the issue's dense targets per shape, and per
    shape and mask ours against the peers doing the same work plus the sparse target (the rule stated below)."""
    shapes = list(data["shapes"])
    cells: dict[tuple, dict] = {}
    for r in data["records"]:
        if r["variant"] != "setup":
            cells[(r["variant"], r["mask"], r["shape"])] = r
    rows = list(dict.fromkeys((v, m) for v, m, _ in cells))
    lines = [f"| variant | mask | {' | '.join(shapes)} |", "|---|---|" + "---|" * len(shapes)]
    for variant, mask in rows:
        out = []
        for shape in shapes:
            r = cells.get((variant, mask, shape))
            if r is None:
                out.append("—")
            elif r["status"] == "unavailable":
                out.append("n/a")
            elif r["status"] != "ok":
                out.append(r["status"])
            else:
                ratio = f"{r['ratio']:.2f}×" if r.get("ratio") else f"{r['ms']:.2f} ms"
                rel = "" if r.get("rel_l2_dense") is None else f" ({r['rel_l2_dense']:.4f})"
                out.append(ratio + rel)
        lines.append(f"| {variant} | {mask or 'own'} | " + " | ".join(out) + " |")
    yes = lambda x: "—" if x is None else ("yes" if x else "no")  # noqa: E731
    fmt = lambda x: f"{yes(x['met'])} ({x['ratio']:.2f}×, {x['variant']})" if x["ratio"] else "—"  # noqa: E731
    lines += ["", "| shape | dense 16-bit ≥ 1.0× cuDNN | 8-bit ≥ 1.6× cuDNN |", "|---|---|---|"]
    for shape, s in data["summary"].items():
        t = s["targets"]
        lines.append(f"| {shape} | {fmt(t['dense_16bit_vs_cudnn'])} | {fmt(t['dense_8bit_vs_cudnn'])} |")
    for skipped in data.get("skipped_shapes", []):
        lines.append(f"| {skipped['shape']} | skipped: {skipped['reason']} | |")
    lines += [
        "",
        "| shape | mask | density | ours (fastest of ours) | fastest competitor | ours fastest | "
        "sparse ÷ our dense (16-bit) | needed 0.9/d |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for shape, s in data["summary"].items():
        for mask, m in s["per_mask"].items():
            sp = s["targets"]["sparse_vs_our_dense"].get(mask) or {}
            o, p = m.get("ours"), m.get("fastest_peer")
            mine = "—" if o is None else f"{o['variant']} {o['ms']:.2f} ms"
            rival = "none ran" if p is None else f"{p['variant']}@{p['mask'] or 'own'} {p['ms']:.2f} ms"
            dens = "—" if m.get("density") is None else f"{m['density']:.2f}"
            fac = "—"
            if sp.get("speedup") is not None:
                fac = (f"{sp['speedup']:.2f}× ({sp['our_sparse']['variant']} vs {sp['our_dense']['variant']}) "
                       f"{yes(sp['met'])}")  # fmt: skip
            need = f"{sp['target']:.2f}×" if sp.get("target") else "—"
            lines.append(f"| {shape} | {mask} | {dens} | {mine} | {rival} | {yes(m.get('ours_fastest'))} | {fac} "
                         f"| {need} |")  # fmt: skip
    rule = next((s.get("rule") for s in data["summary"].values() if s.get("rule")), None)
    if rule:  # results summarized before the rule was written down carry none
        lines += ["", f"Rule: {rule}"]
    return "\n".join(lines)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        recs = json.load(open(path))
        if isinstance(recs, dict) and recs.get("bench") == "kernel_peers":
            v = recs["versions"]
            print(f"{recs['device']}, torch {v['torch']}, triton {v['triton']}, flash-attn-4 {v['flash-attn-4']}, "
                  f"comfy-kitchen {v['comfy-kitchen']}, sageattention {v['sageattention']}; baseline "
                  f"{recs['baseline']} in the same run; cells: ratio (rel-L2 vs exact dense)\n")  # fmt: skip
            print(kernel_peers_table(recs))
            continue
        if isinstance(recs, dict) and recs.get("bench") == "preset-quality":
            reduced = "REDUCED run, " if recs["reduced"] else ""
            print(f"{reduced}{recs['device']}, torch {recs['torch']}; testbed {len(recs['heldout_clips'])} clips x "
                  f"{recs['steps']} steps, each family preset's own plan file\n")  # fmt: skip
            print(preset_quality_table(recs))
            continue
        if isinstance(recs, dict) and recs.get("meta", {}).get("bench") == "caching":
            m = recs["meta"]
            print(f"{m['device']}, torch {m['torch']}, diffusers {m['diffusers']}; baseline: the best dense backend; "
                  f"{caching_source(m)}\n")  # fmt: skip
            print(caching_table(recs["records"]))
            continue
        r0 = recs[0]
        if r0.get("bench") == "comfyui":
            print(
                f"{r0['device']}, torch {r0['torch']}, triton {r0['triton']}, ComfyUI {r0['comfyui']} "
                f"(default attention {r0['comfy_attention']}), comfy-kitchen {r0['comfy_kitchen']}\n"
            )
            print(comfyui_table(recs))
            continue
        print(
            f"{r0['device']}, torch {r0['torch']}, triton {r0['triton']}; baseline cuDNN SDPA in the same run\n"
        )
        print(kernel_table(recs))
