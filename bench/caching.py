"""Whole generations with caching: dense vs our sparse preset vs preset + cache vs diffusers' own caches (GPU).

Random-weight, real-architecture diffusers transformers (``bench/e2e.py``'s builders, bf16 on the GPU); a
generation is every step of an ``--steps``-step schedule (50; FLUX 28), timesteps falling linearly, each
forward under ``cache_context("cond", step_index=..., num_inference_steps=..., sigma=...)`` as the pipelines
call it; dense steps, refreshes and captures all count. Every configuration runs on the same inputs:

- ``dense``: the faster of diffusers' ``native`` and ``_native_cudnn`` backends (also the backend of every
  row below that is not ours);
- ``<preset>``: fastattn's sparse preset; ``<preset>+cache``: the same with block caching; ``dense+cache``:
  block caching alone;
- diffusers 0.42's ``FirstBlockCache``, ``MagCache``, ``TaylorSeer``, ``FasterCache``,
  ``PyramidAttentionBroadcast``.

Random weights cannot judge a content trigger (nothing in them says when an output stops changing). Our cache
therefore runs a fixed schedule: the blocks after the first are skipped on ``--skip-fraction`` of the steps
between ``first_steps`` and ``last_steps`` (``blocks="fixed"``: the work the ``auto`` trigger would save at
that skip fraction, probe block included). The peers run as configured: MagCache with flat ``mag_ratios`` (no
calibration) skips ``max_skip_steps`` in a row after its retention steps, TaylorSeer and PAB follow their
intervals, FirstBlockCache's trigger decides by itself; each row reports the fraction of forwards whose last
block actually ran (``compute_fraction``) so rows compare at equal compute. Peak GPU memory per row.

    python bench/caching.py                 # GPU: writes bench/results/caching-<gpu>.json (or $OUT/...)
    python bench/caching.py --tiny          # CPU: tiny configs and 4 steps, checks the logic in seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parents[1]]

from fastattn.bench import e2e  # noqa: E402

PEERS = ("FirstBlockCache", "MagCache", "TaylorSeer", "FasterCache", "PyramidAttentionBroadcast")
NOTE = ("random weights: content-adaptive triggers cannot be judged; fastattn's cache rows run a fixed schedule "
        "(blocks='fixed': the blocks after the first are skipped on skip_fraction of the steps between "
        "first_steps and last_steps); peers run their own rules (MagCache with flat mag_ratios, i.e. a fixed "
        "schedule; FirstBlockCache's trigger decides on random weights); compute_fraction: the share of forwards that "
        "computed the last block's self-attention")  # fmt: skip


def cases(tiny: bool):
    """(name, kind, config, layer fraction, inputs spec, steps)."""
    if tiny:
        return [
            ("Wan2.1-T2V-1.3B", "wan", e2e.TINY["wan"], 1.0, dict(kind="wan", batch=2, frames=5, h=64, w=96, text=8), 4),
            ("FLUX.1-dev", "flux", e2e.TINY["flux"], 1.0, dict(kind="flux", h=128, w=128, text=8), 4),
        ]  # fmt: skip
    return [
        ("FLUX.1-dev", "flux", e2e.FLUX_DEV, 1.0, dict(kind="flux", h=1024, w=1024, text=512), 28),
        ("Wan2.1-T2V-1.3B", "wan", e2e.WAN_13B, 1.0, dict(kind="wan", batch=2, frames=81, h=480, w=832, text=512), 50),
        ("FLUX.1-dev", "flux", e2e.FLUX_DEV, 1.0, dict(kind="flux", h=2048, w=2048, text=512), 28),
        ("Wan2.1-T2V-14B", "wan", e2e.WAN_14B, 1.0, dict(kind="wan", batch=1, frames=81, h=720, w=1280, text=512), 50),
        ("HunyuanVideo", "hunyuan", e2e.HUNYUAN, 0.3, dict(kind="hunyuan", frames=129, h=720, w=1280, text=256), 50),
    ]  # fmt: skip


def blocks_of(cfg: dict) -> dict:
    """The block counts of a transformer config (what a time box scales)."""
    return {k: cfg[k] for k in ("num_layers", "num_single_layers") if k in cfg}


def our_cache(skip_fraction: float, order: int = 0) -> dict:
    cache = {"blocks": "fixed", "skip_fraction": skip_fraction, "first_steps": 0.1, "last_steps": 1}
    return {**cache, "order": order} if order else cache


def testbed_schedule(spec: str) -> dict:
    """``JSON:ROW`` of ``bench/caching_quality.py``: the fraction of the cache window's steps that row skipped on
    the learned testbed (its last clip's schedule), and its cache order."""
    from fastattn.caching import CacheConfig

    path, _, label = spec.partition(":")
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--skip-fraction-from: cannot read {path!r}: {e}") from None
    row = next((r for r in data.get("rows", []) if r.get("config") == label), None)
    if row is None or "last_clip_schedule" not in row:
        known = [r.get("config") for r in data.get("rows", []) if "last_clip_schedule" in r]
        raise SystemExit(
            f"--skip-fraction-from: no row {label!r} with a block schedule in {path}; rows: {known}"
        )
    cfg = CacheConfig.from_value(row["enable"]["cache"])
    steps = data["meta"]["steps"]
    window = [s for s in range(steps) if cfg.in_window(s, steps)]
    skipped = [s for s in row["last_clip_schedule"] if s in window]
    return dict(file=Path(path).name, row=label, testbed_steps=steps, window_steps=len(window),
                skipped_steps=skipped, skip_fraction=len(skipped) / len(window), order=cfg.order,
                testbed_psnr=row.get("psnr"), testbed_compute_fraction=row.get("compute_fraction"))  # fmt: skip


def peer_config(name: str, steps: int, clock: dict, distilled: bool):
    """diffusers' own cache config ``name`` for a ``steps``-step run (``clock["t"]``: the current timestep)."""
    import diffusers.hooks as dh

    now = lambda: clock["t"]
    if name == "FirstBlockCache":
        return dh.FirstBlockCacheConfig(threshold=0.05)
    if name == "MagCache":
        return dh.MagCacheConfig(threshold=0.06, max_skip_steps=1, retention_ratio=0.1, num_inference_steps=steps,
                                 mag_ratios=[1.0] * steps)  # fmt: skip
    if name == "TaylorSeer":
        return dh.TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=max(1, steps // 10))
    if name == "FasterCache":
        return dh.FasterCacheConfig(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 681),
                                    current_timestep_callback=now, is_guidance_distilled=distilled,
                                    tensor_format="BCFHW" if not distilled else "BCHW")  # fmt: skip
    if name == "PyramidAttentionBroadcast":
        return dh.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                                  spatial_attention_timestep_skip_range=(100, 800),
                                                  current_timestep_callback=now)  # fmt: skip
    raise ValueError(f"unknown peer {name!r}; known: {PEERS}")


class LastBlockCounter:
    """Counts forwards in which the model's last transformer block computed its self-attention (the first
    Linear of its first attention module ran): skipped blocks (block caches) and reused attention (TaylorSeer,
    PAB, FasterCache) both leave it out."""

    def __init__(self, model):
        lists = [getattr(model, n) for n in ("single_transformer_blocks", "transformer_blocks", "blocks")
                 if isinstance(getattr(model, n, None), torch.nn.ModuleList) and len(getattr(model, n))]  # fmt: skip
        attn = next(m for n, m in lists[0][-1].named_modules() if n.startswith("attn"))
        layer = next(m for m in attn.modules() if isinstance(m, torch.nn.Linear))
        self.count = 0
        self._handle = layer.register_forward_pre_hook(lambda *_: self._hit())

    def _hit(self):
        self.count += 1

    def remove(self):
        self._handle.remove()


def generation(model, inputs, steps: int, clock: dict) -> float:
    """ms of one whole ``steps``-step generation (timesteps falling linearly from the input's)."""
    t0 = inputs["timestep"]
    scale = 1000.0 if float(t0.float().max()) > 1.5 else 1.0
    has_context = hasattr(model, "cache_context")
    with torch.no_grad():
        e2e._sync()
        start = time.perf_counter()
        for i in range(steps):
            t = t0 * (1.0 - i / steps)
            clock["t"] = float(t.float().max()) * (1000.0 / scale)
            kwargs = dict(step_index=i, num_inference_steps=steps, sigma=clock["t"] / 1000.0)
            if has_context:
                with model.cache_context("cond", **kwargs):
                    model(**dict(inputs, timestep=t))
            else:
                model(**dict(inputs, timestep=t))
        e2e._sync()
    return (time.perf_counter() - start) * 1000.0


def _peak_reset():
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak() -> int | None:
    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def run_config(model, inputs, steps, clock, setup) -> dict:
    """Warm up once, then time one generation under ``setup()`` (returns its undo and a stats function)."""
    counter = LastBlockCounter(model)
    undo, stats = setup()
    try:
        generation(model, inputs, min(steps, 2), clock)  # warm-up: kernels, masks, autotune
        if hasattr(model, "_reset_stateful_cache"):
            model._reset_stateful_cache()
        counter.count = 0
        gc.collect()
        _peak_reset()
        ms = generation(model, inputs, steps, clock)
        rec = dict(ms=ms, ms_per_step=ms / steps, peak_bytes=_peak(), compute_fraction=counter.count / steps)
        rec.update(stats())
        return rec
    finally:
        undo()
        counter.remove()
        if hasattr(model, "_reset_stateful_cache"):
            model._reset_stateful_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--tiny", action="store_true", help="tiny CPU configs and 4 steps: check the logic, no GPU"
    )
    ap.add_argument("--only", default=None, help="regex on 'model resolution' to run")
    ap.add_argument(
        "--steps", type=int, default=None, help="steps per generation (default: 28 FLUX, 50 others)"
    )
    ap.add_argument("--preset", default="fast", help="fastattn preset of the sparse rows")
    ap.add_argument(
        "--skip-fraction", type=float, default=0.5, help="steps of the cache window that skip blocks"
    )
    ap.add_argument(
        "--skip-fraction-from", default=None, metavar="JSON:ROW",
        help="take the skip fraction from the schedule a row of bench/caching_quality.py's JSON skipped on the "
             "learned testbed (e.g. 'caching-quality-nvidia_h200.json:fast+cache auto t=0.3 k=3 o1'); the cache "
             "rows then also take that row's cache order",
    )  # fmt: skip
    ap.add_argument(
        "--fraction", type=float, default=None,
        help="time-box: run this fraction of every selected model's blocks (default: HunyuanVideo 0.3, others all)",
    )  # fmt: skip
    ap.add_argument(
        "--peers", default=",".join(PEERS), help="diffusers caches to time (comma separated; '' none)"
    )
    ap.add_argument(
        "--budget-s", type=float, default=540.0, help="skip remaining cases after this many seconds"
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    peers = [p for p in args.peers.split(",") if p]
    for p in peers:
        if p not in PEERS:
            raise SystemExit(f"--peers: unknown cache {p!r}; known: {', '.join(PEERS)}")
    if not 0.0 <= args.skip_fraction < 1.0:
        raise SystemExit(f"--skip-fraction must be in [0, 1), got {args.skip_fraction}")
    if args.fraction is not None and not 0.0 < args.fraction <= 1.0:
        raise SystemExit(f"--fraction must be in (0, 1], got {args.fraction}")
    source = testbed_schedule(args.skip_fraction_from) if args.skip_fraction_from else None
    skip_fraction = source["skip_fraction"] if source else args.skip_fraction
    order = source["order"] if source else 0

    import diffusers
    import fastattn.api as fa

    tiny = args.tiny or not torch.cuda.is_available()
    device = torch.device("cpu" if tiny else "cuda")
    dtype = torch.float32 if tiny else torch.bfloat16
    gpu = "cpu-tiny" if tiny else torch.cuda.get_device_name().replace(" ", "_").lower()
    knobs = {"block_size": 16} if tiny else {}
    t_start = time.perf_counter()
    records = []
    out = args.out or str(Path(os.environ.get("OUT", "bench/results")) / f"caching-{gpu}.json")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    meta = dict(bench="caching", device=gpu, torch=torch.__version__, diffusers=diffusers.__version__,
                preset=args.preset, skip_fraction=skip_fraction, order=order, schedule_source=source,
                note=NOTE)  # fmt: skip

    def save():  # after every row: a run cut short keeps what it measured
        Path(out).write_text(json.dumps(dict(meta=meta, records=records), indent=1))

    for name, kind, cfg, fraction, spec, default_steps in cases(tiny):
        resolution = f"{spec['w']}x{spec['h']}"
        if args.only and not re.search(args.only, f"{name} {resolution}"):
            continue
        if time.perf_counter() - t_start > args.budget_s:
            records.append(dict(model=name, resolution=resolution, skipped="time budget"))
            continue
        steps = args.steps or default_steps
        fraction = args.fraction if args.fraction is not None else fraction
        run_cfg = e2e._scaled(cfg, fraction)
        model = e2e.build(kind, run_cfg, device, dtype)
        inputs = e2e.inputs_for(spec, model, device, dtype)
        clock = {"t": 1000.0}
        best, best_ms, candidates = None, None, {}  # one warm step of each dense candidate, ms
        for backend in ("native", "_native_cudnn"):
            try:
                model.set_attention_backend(backend)
                generation(model, inputs, 1, clock)  # warm-up
                ms = generation(model, inputs, 1, clock)
                candidates[backend] = ms
                if best is None or ms < best_ms:
                    best, best_ms = backend, ms
            except Exception as e:  # cuDNN SDPA unavailable (CPU, old GPU)
                print(f"  {name}: backend {backend} failed: {type(e).__name__}: {e}", file=sys.stderr)
        model.set_attention_backend(best)
        dense_setup = lambda: (lambda: None, dict)  # noqa: E731
        # our op on full block lists (every block: dense attention), FlashAttention-4 where it is installed
        if not tiny:
            full = dict(method="band", density=1.0, dense_steps=0)
            try:
                h = fa.enable(model, num_steps=1, **full)
                generation(model, inputs, 1, clock)  # warm-up: FlashAttention-4 compiles per shape
                ms = generation(model, inputs, 1, clock)
                served = h.stats().get("kernel_backends") or {}
                h.disable()
                print(
                    f"  {name}: dense through fastattn's op {ms:.1f} ms ({served}) vs {best} {best_ms:.1f} ms"
                )
                label = f"fastattn op, full block lists ({'/'.join(sorted(served)) or 'no kernel'})"
                candidates[label] = ms
                if served and "dense" not in served and ms < best_ms:
                    best, best_ms = label, ms

                    def dense_setup(model=model):
                        h = fa.enable(model, num_steps=steps, **full)
                        return h.disable, lambda: dict(kernel_backends=h.stats().get("kernel_backends"))
            except Exception as e:
                print(
                    f"  {name}: dense through fastattn's op failed: {type(e).__name__}: {e}", file=sys.stderr
                )
        cache = our_cache(skip_fraction, order)
        rows = [("dense", dense_setup)]

        def ours(model=model, **kw):
            def setup():
                h = fa.enable(model, num_steps=steps, **kw, **knobs)
                return h.disable, lambda: _our_stats(h.stats())

            return setup

        rows += [(args.preset, ours(preset=args.preset)), (f"{args.preset}+cache", ours(preset=args.preset, cache=cache)),
                 ("dense+cache", ours(method="dense", cache=cache))]  # fmt: skip
        for peer in peers:

            def setup(peer=peer, model=model):
                model.enable_cache(peer_config(peer, steps, clock, distilled=kind != "wan"))
                return model.disable_cache, dict

            rows.append((peer, setup))
        base = None
        for label, setup in rows:
            rec = dict(bench="caching", model=name, resolution=resolution, frames=spec.get("frames", 1),
                       batch=spec.get("batch", 1), steps=steps, config=label, baseline_backend=best, dense_candidates_ms=candidates,
                       layers=run_cfg.get("num_layers"), note=NOTE)  # fmt: skip
            if fraction < 1.0:
                rec["time_boxed"] = (
                    f"{fraction:.0%} of the blocks ({blocks_of(run_cfg)} of {blocks_of(cfg)}); compare rows, not "
                    "absolute time: with fewer "
                    "blocks the probe block that always runs is a larger share, so block caching gains less"
                )
            if label.endswith("cache"):
                rec["cache"] = cache
            try:
                rec.update(run_config(model, inputs, steps, clock, setup))
            except Exception as e:
                rec["error"] = f"{type(e).__name__}: {e}"[:300]
                print(f"  {name} {label}: {rec['error']}", file=sys.stderr)
                records.append(rec)
                save()
                continue
            if label == "dense":
                base = rec
            if base is not None:
                rec["speedup"] = base["ms"] / rec["ms"]
                if rec["peak_bytes"] is not None and base["peak_bytes"] is not None:
                    rec["peak_over_dense_bytes"] = rec["peak_bytes"] - base["peak_bytes"]
            records.append(rec)
            save()
            print(f"{name:16s} {resolution:>9s} {label:28s} {rec['ms']:10.1f} ms  x{rec.get('speedup', 0):.2f}  "
                  f"compute {rec['compute_fraction']:.2f}  peak {rec['peak_bytes']}", flush=True)  # fmt: skip
        del model, inputs
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    save()
    print(f"wrote {out} ({len(records)} records, {time.perf_counter() - t_start:.0f} s)")
    return 0


def _our_stats(st: dict) -> dict:
    cache = st.get("cache") or {}
    blocks = cache.get("blocks") or {}
    return dict(density=st["density"], fallbacks=st["fallbacks"], blocks_skipped=blocks.get("blocks_skipped"),
                block_work_skipped=blocks.get("block_work_skipped"), extrapolated=blocks.get("extrapolated"),
                kernel_backends=st.get("kernel_backends"),
                cache_peak_bytes=(cache.get("memory") or {}).get("peak_bytes"))  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
