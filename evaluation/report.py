"""Writing an evaluation report: ``report.json``, ``report.png`` (speed-quality plot) and ``report.html``.

The JSON is strict (no ``NaN``/``Infinity``): an infinite PSNR (identical outputs) is written as ``null``,
and ``exact_runs`` says how many runs were bit-identical. matplotlib is optional: without it the JSON and
the HTML table are written and the plot is reported as skipped.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

from .evaluate import quality_point

COLUMNS = (
    "config",
    "density",
    "dense calls (fallbacks)",
    "time s",
    "speedup",
    "PSNR dB",
    "SSIM",
    "latent PSNR dB",
    "latent rel-L2",
    "attn rel-L2 mean / max",
)


def to_json_safe(x):
    """Plain JSON types: non-finite floats become ``None``, tuples lists, other objects strings."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    if isinstance(x, dict):
        return {str(k): to_json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_json_safe(v) for v in x]
    if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:
        return to_json_safe(x.item())
    return str(x)


def _fmt(x, spec: str, none: str = "-") -> str:
    if x is None:
        return none
    if isinstance(x, float) and math.isinf(x):
        return "inf (exact)"
    return format(x, spec)


def table_rows(report: dict) -> list[list[str]]:
    """One row per configuration (plus the dense baseline first), columns :data:`COLUMNS`."""
    d = report["dense"]
    rows = [["dense (baseline)", "1.00", "all", _fmt(d["time_s"], ".3f"), "1.00x", "-", "-", "-", "-", "-"]]
    for c in report["configs"]:
        if "error" in c:
            err = c["error"] if len(c["error"]) <= 90 else c["error"][:89] + "…"
            rows.append([c["label"], f"failed: {err}"] + [""] * (len(COLUMNS) - 2))
            continue
        dec, lat = c["mean"]["decoded"] or {}, c["mean"]["latents"] or {}
        att = c["attention_error"] or {}
        fb = c["fallback_calls"]
        rows.append(
            [
                c["label"],
                _fmt(c["density"], ".2f"),
                f"{c['dense_calls']}/{c['calls']} ({fb})",
                _fmt(c["time_s"], ".3f"),
                _fmt(c["speedup"], ".2f") + "x",
                _fmt(dec.get("psnr"), ".2f"),
                _fmt(dec.get("ssim"), ".4f"),
                _fmt(lat.get("psnr"), ".2f"),
                _fmt(lat.get("rel_l2"), ".2e"),
                f"{_fmt(att.get('mean'), '.2e')} / {_fmt(att.get('max'), '.2e')}",
            ]
        )
    return rows


def plot(report: dict, path: Path) -> str | None:
    """Speed-quality scatter (speedup on x, PSNR on y, one point per config) and the per-step attention
    error; returns ``None`` when written, else why it was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): plot skipped"
    configs = [c for c in report["configs"] if "error" not in c]
    points = [(c["label"], c["speedup"], *quality_point(c)) for c in configs]
    finite = [p for _, _, _, p in points if p is not None and math.isfinite(p)]
    top = (max(finite) + 6.0) if finite else 60.0
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = [f"C{i % 10}" for i in range(len(configs))]
    for (label, speedup, _, psnr), color in zip(points, colors):
        if speedup is None or psnr is None:
            continue
        exact = not math.isfinite(psnr)
        y = top if exact else psnr
        ax.scatter([speedup], [y], marker="^" if exact else "o", s=60, zorder=3, color=color)
        ax.annotate(
            f"{label}{' (exact)' if exact else ''}",
            (speedup, y),
            textcoords="offset points",
            xytext=(6, 4),
            fontsize=8,
        )
    ax.axvline(1.0, color="0.6", lw=1, ls="--")
    ax.set_xlabel("speedup vs dense (pipeline wall-clock)")
    which = {w for _, _, w, _ in points}
    ax.set_ylabel("PSNR vs dense, dB (" + ("decoded" if which == {"decoded"} else "decoded / latents") + ")")
    ax.set_title("speed vs quality")
    ax.grid(alpha=0.3)
    if any(not math.isfinite(p) for _, _, _, p in points if p is not None):
        ax.axhline(top, color="0.8", lw=1, ls=":")
    for c, color in zip(configs, colors):
        per_step = [r for r in (c["attention_error"] or {}).get("per_step") or [] if r["step"] is not None]
        if per_step:
            steps = [r["step"] for r in per_step]
            ax2.plot(steps, [r["mean"] for r in per_step], marker="o", label=c["label"], color=color)
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.set_xlabel("denoising step")
    ax2.set_ylabel("attention-output rel-L2 vs exact (sampled calls)")
    ax2.set_title("per-step attention error")
    if ax2.lines:
        ax2.set_yscale("log")
        ax2.legend(fontsize=8)
    else:
        ax2.text(0.5, 0.5, "no sparse calls measured", ha="center", va="center", transform=ax2.transAxes)
    ax2.grid(alpha=0.3)
    p = report["pipeline"]
    fig.suptitle(f"fastattn eval: {p['class']} on {report['env']['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _html(report: dict, png: Path | None, note: str | None) -> str:
    e = html.escape
    env, pipe, st = report["env"], report["pipeline"], report["settings"]
    head = "".join(f"<th>{e(c)}</th>" for c in COLUMNS)
    body = "".join(
        f'<tr><td>{e(row[0])}</td><td colspan="{len(row) - 1}" style="text-align:left">{e(row[1])}</td></tr>'
        if row[1].startswith("failed:")
        else "<tr>" + "".join(f"<td>{e(v)}</td>" for v in row) + "</tr>"
        for row in table_rows(report)
    )
    img = ""
    if png is not None and png.exists():
        data = base64.b64encode(png.read_bytes()).decode()
        img = f'<img alt="speed-quality plot" src="data:image/png;base64,{data}">'
    elif note:
        img = f"<p><em>{e(note)}</em></p>"
    fallbacks = "".join(
        f"<li>{e(c['label'])}: "
        + (", ".join(f"{e(r)}: {n}" for r, n in c["fallbacks"].items()) or "none")
        + "</li>"
        for c in report["configs"]
        if "error" not in c
    )
    versions = ", ".join(
        f"{k} {e(str(env[k]))}" for k in ("torch", "triton", "diffusers", "fastattn") if env.get(k)
    )
    prompts = "".join(f"<li>{e(p)}</li>" for p in st["prompts"])
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>fastattn eval: {e(pipe["class"])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1300px; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>fastattn eval: {e(pipe["class"])}</h1>
<p>{e(env["device"])}, {versions}; dtype {e(str(pipe["dtype"]))};
seeds {e(str(st["seeds"]))}; pipeline arguments {e(json.dumps(to_json_safe(st["call_args"])))}.</p>
{f"<p><strong>{e(st['timing_note'])}</strong></p>" if st.get("timing_note") else ""}
{img}
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<p>PSNR/SSIM against the dense output of the same prompt and seed; "inf (exact)" means identical outputs.
Density is the attention work computed over all self-attention calls; dense calls include planned ones
(dense steps/layers). Attention rel-L2 is measured on sampled calls and query rows against exact float32
attention on the same q, k, v.</p>
<h2>Dense fallbacks</h2><ul>{fallbacks}</ul>
<h2>Prompts</h2><ol>{prompts}</ol>
<p>Full data: <a href="report.json">report.json</a>.</p>
</body></html>
"""


def write_partial(report: dict, out_dir) -> str:
    """Write the report so far as ``out_dir/report.json`` with ``"partial": true`` (the folder is created);
    :func:`write_report` replaces it when the run completes. Returns the path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.json"
    tmp = out / "report.json.tmp"  # written whole, then renamed: a kill mid-write never leaves half a file
    tmp.write_text(json.dumps(to_json_safe({**report, "partial": True}), indent=1, allow_nan=False) + "\n")
    tmp.replace(path)
    return str(path)


def write_report(report: dict, out_dir) -> dict:
    """Write ``report.json``, ``report.png`` and ``report.html`` under ``out_dir``; returns
    ``{"json": path, "png": path or None, "html": path, "plot_skipped": reason or None}`` (also stored in
    the report's ``files``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = out / "report.png"
    note = plot(report, png)
    files = {
        "json": str(out / "report.json"),
        "png": None if note else str(png),
        "html": str(out / "report.html"),
        "plot_skipped": note,
    }
    report["files"] = files
    (out / "report.json").write_text(json.dumps(to_json_safe(report), indent=1, allow_nan=False) + "\n")
    (out / "report.html").write_text(_html(report, None if note else png, note))
    return files
