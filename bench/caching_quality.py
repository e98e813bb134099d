"""Quality at equal compute on the learned testbed: fastattn's caches (alone and with sparse attention) against
diffusers' own ``FirstBlockCache``, ``MagCache``, ``TaylorSeer``, ``FasterCache`` and ``PyramidAttentionBroadcast``.

Same held-out clips, seeds, sampler and metric as ``bench/quality.py`` (the testbed's 8 held-out clips of 16 frames
of 64x64, 16 Euler steps, no CFG; PSNR / SSIM of the decoded frames against dense, all frames pooled). Every row
samples every clip under one configuration, after one untimed warm-up clip:

- ``dense``; the testbed presets (``fast``, ``balanced``, ``safe``: sparse attention); a preset plus our cache
  (``fastattn.testbed.fast.enable(..., cache=...)``: block skipping ``fixed`` / ``auto`` / ``delta``, the same
  ``CacheConfig`` as diffusers and ComfyUI); ``dense+cache`` (our cache alone);
- diffusers 0.42's caches, the real hooks (``bench/testbed_peers.py`` makes the testbed acceptable to them from the
  bench side), each at several settings. MagCache runs with ratios from its own calibration mode on the *tune*
  clips of ``bench/quality.py`` (never the held-out ones). Without CFG, FasterCache runs as guidance-distilled
  (there is no unconditional branch to approximate): its attention reuse with extrapolation is what is measured.

Each row records its measured compute: ``compute_fraction`` (the share of forwards whose last block computed its
self-attention: block skips and attention reuse both leave it out), ``flops_fraction`` (transformer-block
multiply-adds executed, projections / attention / MLP counted per call, sparse attention at its density, over
dense) and the wall-clock of the pass (warm; GPU). The summary compares, at matched ``compute_fraction`` (within
``--match-tol``), our best cache + sparsity row against the best diffusers cache, and ``fast`` + cache against
``fast`` (PSNR, speed-up).

    python -m fastattn.bench.caching_quality            # GPU: bench/results/caching-quality-<gpu>.json (or $OUT/)
    python -m fastattn.bench.caching_quality --tiny     # CPU: a tiny random model, checks the logic in seconds
    python -m fastattn.bench.caching_quality --preview  # CPU: the learned model on 2 frames, 2 clips (quality only)

The testbed is ours and small: fast-vs-dense fidelity on learned attention, never FLUX or Wan quality; its
wall-clock is host-bound (4,096 tokens) and says nothing of the kernels at real sizes.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from pathlib import Path

import torch
from fastattn.bench.quality import _versions
from fastattn.bench.testbed_peers import PEERS, PeerCache, calibrate_mag_ratios

# bench/quality.py's held-out and tune clips: (class label, seed)
HELDOUT = [(lab, i) for i, lab in enumerate((0, 3, 6, 9, 12, 15, 18, 21))]
TUNE = [(lab, 1000 + i) for i, lab in enumerate((1, 5, 10, 14, 19, 22))]
TARGETS = {"margin_db": 1.0, "fast_cache_psnr": 24.0, "fast_cache_speedup": 1.3}


# ---------------------------------------------------------------------------------------------- the rows


def fixed(skip_fraction: float, first_steps=0.1, order: int = 0) -> dict:
    cache = {"blocks": "fixed", "skip_fraction": skip_fraction, "first_steps": first_steps, "last_steps": 1}
    return {**cache, "order": order} if order else cache


def auto(threshold: float, max_skips: int = 2, order: int = 0) -> dict:
    cache = {
        "blocks": "auto",
        "threshold": threshold,
        "max_skips": max_skips,
        "first_steps": 0.1,
        "last_steps": 1,
    }
    return {**cache, "order": order} if order else cache


def ast(interval: int) -> dict:
    return {"attn_share_interval": interval, "first_steps": 0.1, "last_steps": 1}


def _cache_label(cache: dict | str) -> str:
    if isinstance(cache, str):  # a cache preset by name (CACHE_PRESETS)
        return f"preset {cache}"
    if cache.get("attn_share_interval"):
        return f"AST k={cache['attn_share_interval']}"
    order = f" o{cache['order']}" if cache.get("order") else ""  # order 1: residual extrapolated from two
    if cache["blocks"] == "fixed":
        extra = f" first={cache['first_steps']:g}" if cache["first_steps"] != 0.1 else ""
        return f"fixed s={cache['skip_fraction']:g}{extra}{order}"
    if cache["blocks"] == "auto":
        return f"auto t={cache['threshold']:g} k={cache['max_skips']}{order}"
    return f"delta i={cache.get('interval', 2)} span={cache.get('span', 0.5):g}"


def our_rows(tiny: bool) -> list[dict]:
    """``{"label", "kind": "ours", "sparse", "enable"}``, by priority (a run cut by the time budget keeps the first)."""
    if tiny:
        presets = {"fast": [fixed(0.5), fixed(0.5, order=1)]}
        alone = [fixed(0.5)]
    else:
        presets = {
            "fast": [fixed(0.25), fixed(0.4), fixed(0.5), fixed(0.6), auto(0.15), auto(0.3, 3),
                     {"blocks": "delta", "interval": 2, "span": 0.5, "first_steps": 0.1, "last_steps": 1}, ast(2),
                     fixed(0.5, order=1), fixed(0.6, order=1), fixed(0.7, order=1), auto(0.3, 3, order=1),
                     auto(0.5, 4, order=1)],
            "safe": [fixed(0.4), fixed(0.5), fixed(0.6), fixed(0.5, 0.2), ast(2), fixed(0.5, order=1),
                     fixed(0.5, 0.2, order=1), fixed(0.6, order=1), fixed(0.7, order=1), fixed(0.8, order=1)],
            "balanced": [fixed(0.4), fixed(0.5), fixed(0.6), fixed(0.5, order=1), fixed(0.6, order=1),
                         fixed(0.7, order=1), fixed(0.8, order=1)],
        }  # fmt: skip
        alone = [fixed(0.25), fixed(0.5), fixed(0.6), auto(0.15), auto(0.3, 3), fixed(0.6, order=1),
                 fixed(0.7, order=1)]  # fmt: skip
    if not tiny:  # the cache presets as shipped, on every sparse preset
        for caches in presets.values():
            caches[:0] = ["safe", "balanced", "fast"]
    rows = []
    for preset, caches in presets.items():
        rows.append(
            {"label": preset, "kind": "ours", "sparse": True, "enable": {"preset": f"testbed/{preset}"}}
        )
        for cache in caches:
            rows.append({"label": f"{preset}+cache {_cache_label(cache)}", "kind": "ours", "sparse": True,
                         "enable": {"preset": f"testbed/{preset}", "cache": cache}})  # fmt: skip
    if not tiny:  # quantized dense attention (not sparsity) with our cache, for comparison
        for cache in (fixed(0.5), fixed(0.6)):
            rows.append({"label": f"int8+cache {_cache_label(cache)}", "kind": "ours", "sparse": False,
                         "enable": {"method": "dense", "quant": "int8", "cache": cache}})  # fmt: skip
    for cache in alone:
        rows.append({"label": f"dense+cache {_cache_label(cache)}", "kind": "ours", "sparse": False,
                     "enable": {"method": "dense", "cache": cache}})  # fmt: skip
    return rows


def peer_rows(tiny: bool, steps: int) -> list[dict]:
    """``{"label", "kind": "peer", "peer", "settings"}``: each diffusers cache at settings spanning its compute
    (MagCache's ``mag_ratios`` are added once calibrated)."""
    every_block = [r"^blocks\.\d+$"]  # TaylorSeer on whole blocks instead of its default attention modules
    if tiny:
        grid = {
            "FirstBlockCache": [dict(threshold=0.2)],
            "MagCache": [dict(threshold=0.5, max_skip_steps=2)],
            "TaylorSeer": [dict(cache_interval=2, disable_cache_before_step=1)],
            "FasterCache": [dict(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 901))],
            "PyramidAttentionBroadcast": [dict(spatial_attention_block_skip_range=2,
                                               spatial_attention_timestep_skip_range=(0, 950))],
        }  # fmt: skip
    else:
        grid = {
            "FirstBlockCache": [dict(threshold=t) for t in (0.05, 0.1, 0.2, 0.3)],
            "MagCache": [dict(threshold=t, max_skip_steps=k) for t, k in ((0.03, 2), (0.06, 2), (0.12, 3), (0.24, 4))],
            "TaylorSeer": [dict(cache_interval=n, disable_cache_before_step=2, **ids)
                           for ids in ({}, {"cache_identifiers": every_block}) for n in (2, 3)],
            "FasterCache": [dict(spatial_attention_block_skip_range=r, spatial_attention_timestep_skip_range=rng)
                            for r, rng in ((2, (-1, 681)), (2, (-1, 901)), (3, (-1, 901)))],
            "PyramidAttentionBroadcast": [dict(spatial_attention_block_skip_range=r, spatial_attention_timestep_skip_range=rng)
                                          for r, rng in ((2, (100, 800)), (2, (0, 950)), (3, (100, 800)), (4, (100, 800)))],
        }  # fmt: skip
    for settings in grid["MagCache"]:
        settings.update(retention_ratio=0.2, num_inference_steps=steps)
    for settings in grid["FasterCache"]:
        settings["is_guidance_distilled"] = True  # no CFG: no unconditional branch to approximate
    rows = []
    for name in PEERS:
        for settings in grid[name]:
            shown = {k: v for k, v in settings.items() if k != "num_inference_steps"}
            label = f"{name} " + " ".join(f"{k}={v}" for k, v in shown.items())
            rows.append({"label": label, "kind": "peer", "peer": name, "settings": settings})
    return rows


# ---------------------------------------------------------------------------------------------- measuring


class ComputeMeter:
    """What a pass computed, counted where a skip leaves a trace: each block's attention projections (its ``qkv``
    Linear), attention core (its attention function; a call fastattn's runtime served from a cached output does
    not count) and MLP (first Linear). Skipped blocks and skipped attention modules never reach them."""

    def __init__(self, model, runtime=None):
        self.model, self.runtime = model, runtime
        depth = len(model.blocks)
        self.forwards, self.tokens = 0, 0
        self.proj, self.core, self.mlp = [0] * depth, [0] * depth, [0] * depth
        self._handles = [model.register_forward_pre_hook(self._forward)]
        for i, blk in enumerate(model.blocks):
            self._handles.append(
                blk.attn.qkv.register_forward_pre_hook(functools.partial(self._hit, self.proj, i))
            )
            self._handles.append(
                blk.mlp[0].register_forward_pre_hook(functools.partial(self._hit, self.mlp, i))
            )
        self._fns = [blk.attn.attention_fn for blk in model.blocks]
        self._wrappers = [self._counting(i, fn) for i, fn in enumerate(self._fns)]
        for blk, w in zip(model.blocks, self._wrappers):
            blk.attn.set_attention_fn(w)

    def _forward(self, module, args):
        self.forwards += 1
        x = args[0]
        p = module.cfg.patch
        self.tokens = x.shape[1] * (x.shape[3] // p) * (x.shape[4] // p)

    @staticmethod
    def _hit(counts, i, *_):
        counts[i] += 1

    def _counting(self, i, fn):
        def attention(q, k, v, ctx):
            before = self.runtime.stats.reused_calls if self.runtime is not None else 0
            out = fn(q, k, v, ctx)
            if self.runtime is None or self.runtime.stats.reused_calls == before:
                self.core[i] += 1
            return out

        return attention

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for blk, fn, w in zip(self.model.blocks, self._fns, self._wrappers):
            if blk.attn.attention_fn is w:
                blk.attn.set_attention_fn(fn)

    def result(self, density: float | None = None, calls: int | None = None) -> dict:
        """The fractions of the pass. For fastattn's rows, ``density`` and ``calls`` are its runtime's: the
        computed share of the attention work of all ``calls`` it served (sparse, dense or from a cache)."""
        cfg, n = self.model.cfg, self.forwards * len(self.model.blocks)
        if not n:
            raise RuntimeError("the meter saw no forward")
        s, d, hidden = self.tokens, cfg.dim, int(cfg.dim * cfg.mlp_ratio)
        macs = {
            "proj": 4 * s * d * d,
            "core": 2 * s * s * d,
            "mlp": 2 * s * d * hidden,
        }  # per block call, B = 1
        core_done = sum(self.core) if density is None else density * calls
        done = sum(self.proj) * macs["proj"] + core_done * macs["core"] + sum(self.mlp) * macs["mlp"]
        return {
            "forwards": self.forwards,
            "compute_fraction": self.core[-1] / self.forwards,
            "flops_fraction": done / (n * sum(macs.values())),
            "attention_fraction": core_done / n,
            "blocks_fraction": sum(self.mlp) / n,
            "last_block_attention_runs": self.core[-1],
        }


class Bench:
    """Samples the clips dense once, then under each row, and scores every row against dense."""

    def __init__(self, model, clips, frames, size, steps, device, knobs: dict, warmup: bool, budget_s: float):
        from fastattn.testbed.sample import sample

        self.model, self.clips, self.device, self.knobs, self.warmup = model, clips, device, knobs, warmup
        self.kw = dict(frames=frames, size=size, num_steps=steps)
        self._sample = sample
        self.budget_s, self.t0 = budget_s, time.perf_counter()
        if warmup:  # the first pass on a fresh GPU would time CUDA's start-up
            self.generate(*clips[0])
        self.dense, self.dense_lat, self.dense_s = self.run_all(lambda: None)

    def _sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def generate(self, label, seed):
        return self._sample(self.model, [label], seed=seed, return_latents=True, **self.kw)

    def run_all(self, after_each):
        frames, lats = [], []
        self._sync()
        start = time.perf_counter()
        for label, seed in self.clips:
            f, lat = self.generate(label, seed)
            frames.append(f)
            lats.append(lat)
            after_each()  # what a pipeline does at the end of a call (reset of diffusers' stateful hooks)
        self._sync()
        return torch.cat(frames), torch.cat(lats), time.perf_counter() - start

    def setup(self, row: dict):
        """``(undo, after_each, stats, runtime)`` for one row."""
        if row["kind"] == "ours":
            from fastattn.testbed.fast import enable

            kw = dict(row["enable"])
            preset = kw.pop("preset", None)
            handle = enable(self.model, preset, **kw, **self.knobs)
            return handle.disable, lambda: None, lambda: _our_stats(handle), handle.runtime
        if row["kind"] == "peer":
            peer = PeerCache(self.model, row["peer"], **row["settings"])
            return peer.remove, peer.reset, dict, None
        return (lambda: None), (lambda: None), dict, None

    def score(self, row: dict) -> dict:
        rec = {"config": row["label"], "kind": row["kind"]}
        rec.update({k: row[k] for k in ("enable", "peer", "sparse") if k in row})
        if "settings" in row:
            rec["settings"] = {k: v for k, v in row["settings"].items() if k != "mag_ratios"}
        if "error" in row:
            rec["error"] = row["error"]
            return rec
        if time.perf_counter() - self.t0 > self.budget_s:
            rec["skipped"] = f"time budget ({self.budget_s:.0f} s) spent before this row"
            return rec
        try:
            rec.update(self._measure(row))
        except Exception as e:  # recorded, never dropped: the run goes on with the next row
            rec["error"] = f"{type(e).__name__}: {e}"[:400]
        return rec

    def _measure(self, row: dict) -> dict:
        from fastattn.evaluation.metrics import psnr, rel_l2, ssim

        undo, after_each, stats, runtime = self.setup(row)
        meter = None
        try:
            if self.warmup:  # compiles, autotunes and builds masks outside the timing
                self.generate(*self.clips[0])
                after_each()
            if runtime is not None:
                runtime.reset_stats()
            meter = ComputeMeter(self.model, runtime)
            if self.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            frames, lats, secs = self.run_all(after_each)
            peak = int(torch.cuda.max_memory_allocated()) if self.device == "cuda" else None
            st = stats()
            meter.remove()
            out = meter.result(st.get("density"), st.get("attention_calls"))
        finally:
            if meter is not None:
                meter.remove()
            undo()
        f, ref = frames.flatten(0, 1).float(), self.dense.flatten(0, 1).float()
        out.update(st)
        out.update({
            "psnr": float(psnr(f, ref)),
            "psnr_per_clip": [float(psnr(a.float(), b.float())) for a, b in zip(frames, self.dense)],
            "ssim": float(ssim(f, ref)),
            "rel_l2_latents": float(rel_l2(lats.float(), self.dense_lat.float())),
            "seconds": secs,
            "peak_bytes": peak,
        })  # fmt: skip
        return out


def _our_stats(handle) -> dict:
    st = handle.stats()
    cache = st.get("cache") or {}
    blocks = cache.get("blocks") or {}
    out = {"density": st["density"], "attention_calls": st["calls"], "reused_calls": st["reused_calls"],
           "planned_dense": st["planned_dense"], "fallbacks": st["fallbacks"]}  # fmt: skip
    if blocks:
        out.update(blocks_skipped=blocks["blocks_skipped"], skipping_forwards=blocks["skipping_forwards"],
                   block_recomputes=blocks["recomputes"],
                   last_clip_schedule=[s for s, _, k in blocks["schedule"] if k])  # fmt: skip
    if cache:
        out["cache_peak_bytes"] = cache["memory"]["peak_bytes"]
    return out


# ---------------------------------------------------------------------------------------------- summary


def _versus(r: dict, rivals: list[dict], key: str) -> dict:
    best = max(rivals, key=lambda p: p["psnr"]) if rivals else None
    return {"ours": r["config"], "ours_psnr": r["psnr"], f"ours_{key}": r[key], "peer": best and best["config"],
            "peer_psnr": best and best["psnr"], f"peer_{key}": best and best[key],
            "margin_db": (r["psnr"] - best["psnr"]) if best else None}  # fmt: skip


def compare(ours: list[dict], peers: list[dict], key: str, tol: float, conservative: bool = False):
    """Each of ``ours`` against the best peer whose ``key`` (``compute_fraction`` or ``flops_fraction``) is within
    ``tol`` of it (``conservative``: every peer that computes no more than it, plus ``tol``); returns the
    comparisons and the one with the largest margin (None when no row has a rival)."""
    out = []
    for r in ours:
        if conservative:
            rivals = [p for p in peers if p[key] <= r[key] + tol]
        else:
            rivals = [p for p in peers if abs(p[key] - r[key]) <= tol]
        out.append(_versus(r, rivals, key))
    scored = [m for m in out if m["margin_db"] is not None]
    return out, max(scored, key=lambda m: m["margin_db"], default=None)


def summarize(rows: list[dict], tol: float) -> dict:
    ok = [r for r in rows if "psnr" in r]
    peers = [r for r in ok if r["kind"] == "peer"]
    cached = [r for r in ok if r["kind"] == "ours" and "cache" in (r.get("enable") or {})]
    ours = [r for r in cached if r.get("sparse")]  # the target's rows: cache + sparsity
    matched, best_matched = compare(ours, peers, "compute_fraction", tol)
    _, best_cons = compare(ours, peers, "compute_fraction", tol, conservative=True)
    _, best_flops = compare(ours, peers, "flops_fraction", tol)
    _, best_any = compare(cached, peers, "compute_fraction", tol)  # cache alone or with int8 included

    fast = next((r for r in ok if r["config"] == "fast"), None)
    fast_cache = []
    for r in ok:
        if fast is not None and r["config"].startswith("fast+cache"):
            fast_cache.append({"config": r["config"], "psnr": r["psnr"], "compute_fraction": r["compute_fraction"],
                               "speedup_vs_fast": fast["seconds"] / r["seconds"]})  # fmt: skip
    good = [x for x in fast_cache if x["psnr"] >= TARGETS["fast_cache_psnr"]]
    best_fast = max(good, key=lambda x: x["speedup_vs_fast"]) if good else None
    return {
        "match_tol": tol,
        "best_matched": best_matched,
        "best_conservative": best_cons,
        "best_matched_flops": best_flops,
        "best_matched_any_cache": best_any,
        "matched": matched,
        "fast_psnr": fast and fast["psnr"],
        "fast_seconds": fast and fast["seconds"],
        "fast_cache": fast_cache,
        "best_fast_cache": best_fast,
        "targets": TARGETS,
        "targets_met": {
            "cache+sparsity >= best peer + 1 dB at matched compute": bool(
                best_matched and best_matched["margin_db"] >= TARGETS["margin_db"]
            ),
            "fast+cache >= 24 dB and >= 1.3x fast": bool(
                best_fast and best_fast["speedup_vs_fast"] >= TARGETS["fast_cache_speedup"]
            ),
        },
    }


# ---------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--tiny", action="store_true", help="tiny random model on the CPU (checks the logic)")
    mode.add_argument("--preview", action="store_true",
                      help="the learned model on the CPU, 2 frames, 2 held-out clips, no warm-up (quality only)")  # fmt: skip
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default 16; --tiny 5)")
    ap.add_argument("--match-tol", type=float, default=0.05, help="compute_fraction tolerance of a match")
    ap.add_argument(
        "--budget-s", type=float, default=270.0, help="rows after this many seconds are recorded skipped"
    )
    ap.add_argument("--only", default=None, help="regex on row labels to run (dense always runs)")
    ap.add_argument("--out", default=None, help="output JSON (default $OUT/ or bench/results/)")
    args = ap.parse_args(argv)
    if not 0.0 <= args.match_tol < 1.0:
        raise SystemExit(f"--match-tol must be in [0, 1), got {args.match_tol}")

    import re

    from fastattn.testbed.model import TestbedConfig, TestbedDiT
    from fastattn.testbed.sample import load_testbed

    t_start = time.perf_counter()
    knobs: dict = {}
    if args.tiny:
        torch.manual_seed(0)
        model = TestbedDiT(TestbedConfig.tiny()).eval()
        with torch.no_grad():  # adaLN-zero init leaves attention without effect: give every weight a value
            for p in model.parameters():
                p.normal_(0.0, 0.2)
        device, frames, size, steps = "cpu", 2, 32, args.steps or 5
        held, tune, knobs, tag = HELDOUT[:2], TUNE[:1], {"block_size": 16}, "tiny"
    else:
        device = "cpu" if args.preview else "cuda"
        if device == "cuda" and not torch.cuda.is_available():
            raise SystemExit(
                "the caching quality benchmark needs a GPU; use --tiny (logic) or --preview (CPU)"
            )
        model = load_testbed(device=device, dtype=torch.float32 if args.preview else torch.bfloat16)
        frames = 2 if args.preview else model.cfg.frames
        size, steps = model.cfg.size, args.steps or 16
        held, tune = (HELDOUT[:2], TUNE[:1]) if args.preview else (HELDOUT, TUNE[:2])
        tag = "cpu-preview" if args.preview else torch.cuda.get_device_name().lower().replace(" ", "_")
    import diffusers

    meta = {"bench": "caching-quality", **_versions(), "diffusers": diffusers.__version__,
            "model": "tiny random TestbedDiT (logic check only)" if args.tiny else
                     "fastattn testbed video DiT (19.2M params, 10 layers x 6 heads x 64)",
            "frames": frames, "size": size, "steps": steps, "heldout_clips": held, "tune_clips": tune,
            "sampler": "Euler, flow matching, no CFG", "match_tol": args.match_tol,
            "notes": [
                "PSNR/SSIM of decoded frames in [0,1] vs dense (same seeds), all frames of all held-out clips pooled",
                "compute_fraction: share of forwards whose last block computed its self-attention (the qkv "
                "projection and attention core ran; fastattn's runtime serving a cached output does not count)",
                "flops_fraction: block multiply-adds executed (qkv+proj, attention core at fastattn's density, MLP) "
                "over dense",
                "seconds: wall-clock of the whole held-out pass after one untimed warm-up clip; the testbed is "
                "host-bound at 4,096 tokens",
                "diffusers' caches run unchanged; bench/testbed_peers.py registers the testbed block in "
                "TransformerBlockRegistry, gives SelfAttention the AttentionModuleMixin base for FasterCache/PAB, "
                "and sets the CacheContext per forward as a pipeline does",
                "FasterCache without CFG runs guidance-distilled (no unconditional branch): attention reuse with "
                "extrapolation only",
                "MagCache ratios from MagCacheConfig(calibrate=True) on the tune clips",
            ]}  # fmt: skip
    if args.preview:
        meta["notes"].append(
            "CPU preview: 2 frames, 2 clips, float32, no warm-up; seconds are not GPU timings"
        )
    out = Path(args.out) if args.out else None
    if out is None:
        base = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).parent / "results"
        out = base / f"caching-quality-{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def save(summary=None):
        record = {"meta": {**meta, "elapsed_s": round(time.perf_counter() - t_start, 1)}, "rows": rows}
        if summary is not None:
            record["summary"] = summary
        out.write_text(json.dumps(record, indent=1))

    bench = Bench(model, held, frames, size, steps, device, knobs, warmup=not (args.tiny or args.preview),
                  budget_s=args.budget_s)  # fmt: skip
    rows.append({"config": "dense", "kind": "dense", "psnr": float("inf"), "seconds": bench.dense_s,
                 "compute_fraction": 1.0, "flops_fraction": 1.0})  # fmt: skip

    todo = our_rows(args.tiny) + peer_rows(args.tiny, steps)
    if args.only:
        todo = [r for r in todo if re.search(args.only, r["label"])]
    mags = [r for r in todo if r.get("peer") == "MagCache"]
    if mags:
        try:  # MagCache's own calibration, on clips the scores never see
            clips = iter(tune)
            ratios = calibrate_mag_ratios(model, lambda: bench.generate(*next(clips)), steps, runs=len(tune))
            meta["mag_ratios"] = ratios
            for r in mags:
                r["settings"]["mag_ratios"] = list(ratios)
        except Exception as e:  # every MagCache row says so
            meta["mag_calibration"] = f"{type(e).__name__}: {e}"[:400]
            for r in mags:
                r["error"] = f"MagCache calibration failed: {meta['mag_calibration']}"
    for row in todo:
        rec = bench.score(row)
        rows.append(rec)
        save()
        _print(rec)
    again = bench.run_all(lambda: None)[2]  # dense timed again at the end: the machine may have warmed up
    rows[0]["seconds_again"] = again
    dense_s = min(bench.dense_s, again)
    for r in rows:
        if "seconds" in r:
            r["speedup_vs_dense"] = dense_s / r["seconds"]
    summary = summarize(rows, args.match_tol)
    summary["dense_seconds_best"] = dense_s
    save(summary)
    print(json.dumps({k: summary[k] for k in ("best_matched", "best_conservative", "best_fast_cache", "targets_met")},
                     indent=1))  # fmt: skip
    print(f"wrote {out} ({len(rows)} rows, {time.perf_counter() - t_start:.0f} s)")
    return 0


def _print(rec: dict) -> None:
    if "psnr" not in rec:
        print(f"{rec['config']:58s} {rec.get('error') or rec.get('skipped')}", flush=True)
        return
    print(f"{rec['config']:58s} PSNR {rec['psnr']:6.2f}  compute {rec['compute_fraction']:.3f}  "
          f"flops {rec['flops_fraction']:.3f}  {rec['seconds']:7.2f} s", flush=True)  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
