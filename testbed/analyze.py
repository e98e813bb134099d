"""How local, temporal or global is each head of the trained testbed? Statistics and a figure.

    python -m fastattn.testbed.analyze --weights testbed/weights            # writes into the weights folder

Runs the model on held-out clips noised to a few flow times with an attention function that, besides
returning exact SDPA, takes the softmax rows of a sample of query tokens (never the full S x S map) and
measures per head where the attention mass goes on the (F, H, W) grid:

* ``local_3x3x3``: mass on keys within one token in every axis (a 3-D neighbourhood);
* ``window_5x7x7``: mass within |df| <= 2, |dh| <= 3, |dw| <= 3 (the size of a structural window preset);
* ``same_frame``: mass in the query's frame (spatial attention);
* ``same_position``: mass on the query's (h, w) in any frame (temporal attention);
* ``mean_abs_df``, ``mean_spatial_dist``: expected distances in frames and in tokens;
* ``entropy``: normalised by log S (1 = uniform).

Each is reported with its value under uniform attention (``uniform``), and every head gets a coarse
``kind``: local, temporal, spatial or global. Output: ``attention_stats.json`` and ``attention_maps.png``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import SpriteVideos
from .model import AttentionCall, TestbedDiT
from .sample import load_testbed

STATS = (
    "local_3x3x3",
    "window_5x7x7",
    "same_frame",
    "same_position",
    "mean_abs_df",
    "mean_spatial_dist",
    "entropy",
)


def grid_coords(grid, device=None) -> torch.Tensor:
    """``[S, 3]`` (f, h, w) of every token in raster order."""
    f, h, w = grid
    axes = torch.meshgrid(*[torch.arange(n, device=device) for n in (f, h, w)], indexing="ij")
    return torch.stack([a.reshape(-1) for a in axes], dim=1)


def query_sample(grid, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` token indices: the centre token of the middle frame first, then random ones (seeded)."""
    f, h, w = grid
    s = f * h * w
    centre = (f // 2) * h * w + (h // 2) * w + w // 2
    rest = torch.randperm(s, generator=torch.Generator().manual_seed(seed))
    rest = rest[rest != centre][: max(n - 1, 0)]
    return torch.cat([torch.tensor([centre]), rest])


def head_stats(probs: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> dict[str, torch.Tensor]:
    """Locality statistics of attention rows.

    Args:
        probs: ``[B, H, Q, S]`` softmax rows (each sums to 1).
        q_pos: ``[Q, 3]`` grid coordinates of the queries; k_pos: ``[S, 3]`` of the keys.
    Returns:
        ``{stat: [H]}`` averaged over batch and queries.
    """
    d = (k_pos[None].float() - q_pos[:, None].float()).abs()  # [Q, S, 3]
    df, dh, dw = d.unbind(-1)
    masks = {
        "local_3x3x3": (df <= 1) & (dh <= 1) & (dw <= 1),
        "window_5x7x7": (df <= 2) & (dh <= 3) & (dw <= 3),
        "same_frame": df == 0,
        "same_position": (dh == 0) & (dw == 0),
    }
    out = {k: (probs * m.float()).sum(-1).mean((0, 2)) for k, m in masks.items()}
    out["mean_abs_df"] = (probs * df).sum(-1).mean((0, 2))
    out["mean_spatial_dist"] = (probs * (dh**2 + dw**2).sqrt()).sum(-1).mean((0, 2))
    ent = -(probs * probs.clamp_min(1e-30).log()).sum(-1) / math.log(probs.shape[-1])
    out["entropy"] = ent.mean((0, 2))
    return out


def classify(s: dict[str, float], uniform: dict[str, float]) -> str:
    """Coarse head type from its statistics (thresholds are deliberately simple)."""
    if s["local_3x3x3"] >= 0.4:
        return "local"
    if s["same_position"] >= max(0.3, 20 * uniform["same_position"]):
        return "temporal"
    if s["same_frame"] >= max(0.6, 4 * uniform["same_frame"]):
        return "spatial"
    return "global"


class AttentionProbe:
    """Attention function that returns exact SDPA and records statistics of sampled query rows."""

    def __init__(self, query_idx: torch.Tensor):
        self.query_idx = query_idx
        self.sums: dict[int, dict[str, torch.Tensor]] = {}
        self.calls: dict[int, int] = {}
        self.centre_maps: dict[int, torch.Tensor] = {}  # layer -> [H, S] attention of the centre query

    def __call__(self, q, k, v, ctx: AttentionCall):
        idx = self.query_idx.to(q.device)
        logits = q[:, :, idx].float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])
        probs = logits.softmax(-1)  # [B, H, Q, S]
        pos = grid_coords(ctx.grid, q.device)
        st = head_stats(probs, pos[idx], pos)
        acc = self.sums.setdefault(ctx.layer_index, {k_: torch.zeros_like(v_) for k_, v_ in st.items()})
        for name, val in st.items():
            acc[name] += val
        self.calls[ctx.layer_index] = self.calls.get(ctx.layer_index, 0) + 1
        cm = probs[:, :, 0].mean(0).cpu()
        self.centre_maps[ctx.layer_index] = self.centre_maps.get(ctx.layer_index, 0) + cm
        return F.scaled_dot_product_attention(q, k, v)

    def per_head(self) -> list[dict]:
        rows = []
        for layer in sorted(self.sums):
            n = self.calls[layer]
            for h in range(next(iter(self.sums[layer].values())).shape[0]):
                rows.append(
                    {"layer": layer, "head": h, **{k: float(v[h]) / n for k, v in self.sums[layer].items()}}
                )
        return rows


def uniform_baseline(grid, query_idx) -> dict[str, float]:
    """Each statistic under uniform attention over all keys (the reference to read the values against)."""
    s = math.prod(grid)
    pos = grid_coords(grid)
    probs = torch.full((1, 1, len(query_idx), s), 1.0 / s)
    return {k: float(v[0]) for k, v in head_stats(probs, pos[query_idx], pos).items()}


@torch.no_grad()
def analyze(model: TestbedDiT, times=(0.3, 0.7), clips: int = 2, queries: int = 128, seed: int = 2**31 - 1):
    """Run the probe; returns ``(stats dict, probe)``."""
    cfg = model.cfg
    device = next(model.parameters()).device
    grid = cfg.grid()
    qidx = query_sample(grid, queries)
    x, y = SpriteVideos(cfg.size, device)(clips, cfg.frames, seed=seed)
    x0 = (x * 2 - 1).to(next(model.parameters()).dtype)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed % 9973)).to(x0)
    probe = AttentionProbe(qidx)
    model.set_attention_fn(probe)
    try:
        for t in times:
            for i in range(clips):  # one clip at a time: bounded memory at 4k tokens
                xt = (1 - t) * x0[i : i + 1] + t * noise[i : i + 1]
                model(xt, torch.tensor([t], device=device), y[i : i + 1])
    finally:
        model.reset_attention_fn()
    uniform = uniform_baseline(grid, qidx)
    heads = probe.per_head()
    for h in heads:
        h["kind"] = classify(h, uniform)
    kinds = {}
    for h in heads:
        kinds[h["kind"]] = kinds.get(h["kind"], 0) + 1
    per_layer = {
        str(layer): {k: sum(h[k] for h in heads if h["layer"] == layer) / cfg.heads for k in STATS}
        for layer in range(cfg.depth)
    }
    stats = {
        "grid": list(grid),
        "tokens": math.prod(grid),
        "times": list(times),
        "clips": clips,
        "queries_per_clip": len(qidx),
        "uniform": uniform,
        "kinds": kinds,
        "per_layer_mean": per_layer,
        "heads": heads,
    }
    return stats, probe


def pick_heads(heads: list[dict], n: int = 8) -> list[tuple[int, int]]:
    """Heads worth showing: the most local, temporal, spatial and global ones, then fill by layer spread."""
    chosen: list[tuple[int, int]] = []
    keys = [
        ("local_3x3x3", True),
        ("same_position", True),
        ("same_frame", True),
        ("entropy", True),
        ("mean_abs_df", True),
        ("window_5x7x7", False),
    ]
    for key, largest in keys:
        for h in sorted(heads, key=lambda r: r[key], reverse=largest):
            if (h["layer"], h["head"]) not in chosen:
                chosen.append((h["layer"], h["head"]))
                break
    for h in sorted(heads, key=lambda r: (r["head"], r["layer"])):
        if len(chosen) >= n:
            break
        if (h["layer"], h["head"]) not in chosen and h["layer"] % 3 == 0:
            chosen.append((h["layer"], h["head"]))
    return chosen[:n]


def plot(stats: dict, probe: AttentionProbe, path: Path, depth: int, heads: int) -> None:
    """Heat maps of the per-head statistics, and the centre query's attention for a few heads."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    f, gh, gw = stats["grid"]
    shown = pick_heads(stats["heads"])
    panels = [
        ("local_3x3x3", "mass in 3x3x3 neighbourhood"),
        ("same_frame", "mass in own frame"),
        ("same_position", "mass on own (h, w), any frame"),
        ("entropy", "entropy / log S"),
    ]
    fig = plt.figure(figsize=(16, 9.5), layout="constrained")
    sub = fig.subfigures(2, 1, height_ratios=[1, 1.25])
    axes = sub[0].subplots(1, 4)
    for ax, (key, title) in zip(axes, panels):
        m = torch.zeros(depth, heads)
        for h in stats["heads"]:
            m[h["layer"], h["head"]] = h[key]
        im = ax.imshow(m.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(f"{title}\n(uniform: {stats['uniform'][key]:.3f})", fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(heads))
        ax.set_yticks(range(depth))
        sub[0].colorbar(im, ax=ax, fraction=0.046)
    cols = int(math.ceil(math.sqrt(f)))
    rows = int(math.ceil(f / cols))
    axes = sub[1].subplots(2, (len(shown) + 1) // 2, squeeze=False).reshape(-1)
    s = f * gh * gw
    for ax, (layer, head) in zip(axes, shown):
        amap = probe.centre_maps[layer][head].reshape(f, gh, gw)
        mosaic = torch.full((rows * (gh + 1), cols * (gw + 1)), float("nan"))
        for i in range(f):  # frames tiled left-to-right, top-to-bottom, 1-token gaps
            r, c = divmod(i, cols)
            mosaic[r * (gh + 1) : r * (gh + 1) + gh, c * (gw + 1) : c * (gw + 1) + gw] = amap[i]
        ax.imshow(
            mosaic.numpy(), norm=LogNorm(vmin=0.1 / s, vmax=max(float(amap.max()), 1.0 / s)), cmap="magma"
        )
        r, c = divmod(f // 2, cols)
        ax.plot(c * (gw + 1) + gw // 2, r * (gh + 1) + gh // 2, "c+", ms=6)
        kind = next(h["kind"] for h in stats["heads"] if h["layer"] == layer and h["head"] == head)
        ax.set_title(f"layer {layer} head {head} ({kind})", fontsize=9)
        ax.axis("off")
    for ax in axes[len(shown) :]:
        ax.axis("off")
    sub[1].suptitle(
        f"attention of the centre query (+, frame {f // 2}) over all {f} frames, log scale", fontsize=10
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=None, help="weights folder (default: the shipped weights)")
    ap.add_argument("--out", default=None, help="output folder (default: the weights folder)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--times", type=float, nargs="+", default=[0.3, 0.7])
    ap.add_argument("--clips", type=int, default=2)
    ap.add_argument("--queries", type=int, default=128)
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_testbed(args.weights, device=device)
    from .sample import WEIGHTS_DIR

    out = Path(args.out or args.weights or WEIGHTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    stats, probe = analyze(model, tuple(args.times), args.clips, args.queries)
    (out / "attention_stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    if not args.no_plot:
        plot(stats, probe, out / "attention_maps.png", model.cfg.depth, model.cfg.heads)
    print(
        f"head kinds: {stats['kinds']}; per-layer 3x3x3 mass: "
        + " ".join(f"{v['local_3x3x3']:.2f}" for v in stats["per_layer_mean"].values())
        + f" -> {out}"
    )
    return stats


if __name__ == "__main__":
    main()
