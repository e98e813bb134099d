"""The calibration report: what each head got, the totals expected, and a PNG map of the heads.

``report.json`` holds a summary (expected attention work, estimated error and time, bit-widths, how many
heads each family took, PARO orders), one row per layer and one per (step group, layer, head).
``head_map.png`` draws the choices: one row per layer, one column per head within each step group,
coloured by family, with each head's block density in a second panel (matplotlib; skipped with a note in
the report when it is not installed).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from ..masks.layout import AXIS_ORDERS
from .build import describe_choice

FAMILY_COLORS = {"dense": "#d9d9d9", "paro": "#1f77b4", "structural": "#2ca02c", "sparse_vdit": "#ff7f0e",
                 "ditfastattn": "#9467bd"}  # fmt: skip
BITS = {"none": 16, "int8": 8, "int8-fp8": 8, "fp8": 8, "int4": 4, "int4-fp8": 4}


def build_report(options, sel, cs, obs, bits, layout, settings, cost, elapsed_s, *, target_density,
                 error_budget) -> dict:  # fmt: skip
    heads = describe_choice(options, sel, cs, bits, layout)
    g, l, h = sel.choice.shape
    w = options.problem.weights
    fam = Counter()
    choice = Counter()
    bits_weighted = 0.0
    bits_weight = 0.0
    for r in heads:
        share = float(w[r["group"]]) / (l * h)
        fam[r["family"]] += share
        choice[r["choice"]] += share
        if r["density"] > 0:
            bits_weighted += share * r["density"] * BITS[r["bits"]]
            bits_weight += share * r["density"]
    conc = (obs.concentration / obs.calls.clamp_min(1)[..., None, None]).mean(dim=(0, 1, 2))
    per_layer = []
    for li in range(l):
        rows = [r for r in heads if r["layer"] == li]
        per_layer.append({
            "layer": li,
            "density": sum(float(w[r["group"]]) * r["density"] for r in rows) / h,
            "error": sum(float(w[r["group"]]) * r["error"] for r in rows),
            "families": dict(Counter(r["family"] for r in rows)),
        })  # fmt: skip
    best_order = (obs.concentration / obs.calls.clamp_min(1)[..., None, None]).argmin(-1)  # [G, L, H]
    reordered = [r for r in heads if " " in r["choice"] and r["choice"].split()[-1] in AXIS_ORDERS[1:]]
    agree = sum(1 for r in reordered if AXIS_ORDERS[int(best_order[r["group"], r["layer"], r["head"]])]
                == r["choice"].split()[-1])  # fmt: skip
    summary = {
        "target_density": target_density,
        "error_budget": error_budget,
        "expected_work": sel.work,
        "estimated_error": sel.error,
        "estimated_attention_time_vs_dense": sel.time,
        "mean_bits": (bits_weighted / bits_weight) if bits_weight else None,
        "families": {k: round(v, 4) for k, v in sorted(fam.items())},
        "top_choices": {k: round(v, 4) for k, v in choice.most_common(12)},
        "dense_rows": int(sel.dense_rows.sum()),
        "reused_heads": sum(1 for r in heads if r["choice"] == "reuse"),
        "skipped_heads": sum(1 for r in heads if r["choice"] == "skip"),
        "reordered_heads": len(reordered),
        "reordered_in_most_concentrated_order": agree,
        "mass_concentration_by_order": {o: float(c) for o, c in zip(AXIS_ORDERS, conc)},
        "calibration_seconds": round(elapsed_s, 2),
        "calls_observed": int(obs.calls.sum()),
        "candidates": len(cs.candidates),
        "multipliers": sel.multipliers,
    }
    return {
        "format": "fastattn-calibration-report",
        "summary": summary,
        "layout": {"seq_len": layout.seq_len, "text_len": layout.text_len, "grid": list(layout.grid or [])},
        "settings": settings,
        "cost_table": {"source": cost.source, "device": cost.device},
        "metric_notes": "error: a head's share of its layer's relative squared attention-output error "
                        "(sum_rows |o_c - o|^2 / sum over the layer's heads of sum_rows |o|^2), from sampled query "
                        "rows of the observed runs; work: block density; totals average over steps (by step "
                        "group share) and layers; time: cost-model estimate, 1.0 = dense SDPA",
        "per_layer": per_layer,
        "heads": heads,
    }  # fmt: skip


def write_report(report: dict, directory) -> list[Path]:
    """``report.json`` and ``head_map.png`` (when matplotlib is installed) in ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    png = d / "head_map.png"
    try:
        head_map(report, png)
        paths.append(png)
    except ImportError:
        report = dict(report, head_map="not drawn: matplotlib is not installed")
    (d / "report.json").write_text(json.dumps(report, indent=1, allow_nan=False))
    return [d / "report.json", *paths]


def head_map(report: dict, path) -> None:
    """Per layer (rows) and (step group, head) (columns): the family chosen and the block density."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import ListedColormap

    heads = report["heads"]
    g = 1 + max(r["group"] for r in heads)
    l = 1 + max(r["layer"] for r in heads)
    h = 1 + max(r["head"] for r in heads)
    names = list(FAMILY_COLORS)
    fam = np.zeros((l, g * h))
    dens = np.zeros((l, g * h))
    for r in heads:
        col = r["group"] * h + r["head"]
        fam[r["layer"], col] = names.index(r["family"])
        dens[r["layer"], col] = r["density"]
    fig, axes = plt.subplots(2, 1, figsize=(max(6, g * h * 0.18 + 2), 2 * (l * 0.3 + 1.2)), squeeze=False)
    ax = axes[0, 0]
    ax.imshow(fam, cmap=ListedColormap([FAMILY_COLORS[n] for n in names]), vmin=0, vmax=len(names) - 1,
              aspect="auto", interpolation="nearest")  # fmt: skip
    ax.set_title("method family per head (columns: step groups x heads)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=FAMILY_COLORS[n]) for n in names]
    ax.legend(handles, names, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
    ax2 = axes[1, 0]
    im = ax2.imshow(dens, cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax2.set_title(f"block density per head (expected work {report['summary']['expected_work']:.3f})")
    fig.colorbar(im, ax=ax2, fraction=0.03)
    for a in (ax, ax2):
        a.set_ylabel("layer")
        a.set_xticks([i * h for i in range(g)])
        a.set_xticklabels([str(i) for i in range(g)], fontsize=6)
        for i in range(1, g):
            a.axvline(i * h - 0.5, color="white", lw=0.6)
    ax2.set_xlabel("step group")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
