"""End-to-end transformer step time with fastattn presets vs the best dense diffusers backend (GPU).

Random-weight, real-architecture diffusers transformers are built from their published configs straight
on the GPU (meta build, ``to_empty``, ``normal_(0, 0.02)``, bf16); one transformer forward is one
denoising step. For every model the baseline is the faster of diffusers' default backend (``native``)
and ``_native_cudnn`` in the same run. The headline (``headline_speedup``) is a whole generation: every step
of the model's usual schedule (FLUX 28, others 50; ``--schedule-steps``) timed for dense and for each plan with
its own dense steps, captures and refreshes. One sparse step is timed too, as a detail (``speedup``), with the
schedule estimate it implies (``schedule_speedup_estimate``). torch.profiler gives the share of GPU time spent
in attention kernels before and after.

    python bench/e2e.py                  # H100: writes bench/results/e2e-<gpu>.json (or $OUT/...)
    python bench/e2e.py --tiny           # CPU: tiny configs, checks the logic in seconds

Whole schedules make a full run long (Wan-1.3B 480p: about a minute per plan on an H200): use ``--only`` and
``--budget-s`` to split it over calls. Time-boxed: HunyuanVideo 720p x 129 frames runs 30% of its blocks (6 double +
12 single of 20 + 40; ~32 s per full dense forward otherwise) and ``step_ms_full_est`` scales it to the
full depth; every other model runs all its layers. Random weights give near-uniform attention maps: this
measures speed only, never quality.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    # Run as a script from the repository root (the root is the package `fastattn`, installed editable).
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parents[1]]

ATTN_KERNELS = re.compile(
    r"flash|fmha|attention|sdpa|cudnn.*(fprop|sdpa)|_attn_fwd|_quant_qk|_quant_v_fp8", re.I
)

WAN_13B = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
WAN_14B = dict(WAN_13B, num_attention_heads=40, ffn_dim=13824, num_layers=40)
HUNYUAN = dict(
    in_channels=16,
    out_channels=16,
    num_attention_heads=24,
    attention_head_dim=128,
    num_layers=20,
    num_single_layers=40,
    num_refiner_layers=2,
    mlp_ratio=4.0,
    patch_size=2,
    patch_size_t=1,
    qk_norm="rms_norm",
    guidance_embeds=True,
    text_embed_dim=4096,
    pooled_projection_dim=768,
    rope_theta=256.0,
    rope_axes_dim=(16, 56, 56),
)
FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)

# Tiny stand-ins with the same code paths (CPU logic check).
TINY = {
    "wan": dict(
        WAN_13B,
        num_attention_heads=2,
        attention_head_dim=16,
        text_dim=32,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        rope_max_seq_len=32,
    ),
    "hunyuan": dict(
        HUNYUAN,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=1,
        num_single_layers=2,
        num_refiner_layers=1,
        text_embed_dim=32,
        pooled_projection_dim=16,
        rope_axes_dim=(4, 6, 6),
    ),
    "flux": dict(
        FLUX_DEV,
        in_channels=8,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        axes_dims_rope=(4, 6, 6),
    ),
}


def cases(tiny: bool):
    """(name, class, config, layer fraction, inputs spec, presets)."""
    if tiny:
        return [
            (
                "Wan2.1-T2V-1.3B",
                "wan",
                TINY["wan"],
                1.0,
                dict(kind="wan", batch=2, frames=9, h=256, w=384, text=12),
                ["balanced", "fast"],
            ),
            (
                "HunyuanVideo",
                "hunyuan",
                TINY["hunyuan"],
                1.0,
                dict(kind="hunyuan", frames=9, h=256, w=384, text=10),
                ["balanced"],
            ),
            ("FLUX.1-dev", "flux", TINY["flux"], 1.0, dict(kind="flux", h=512, w=512, text=10), ["balanced"]),
        ]
    return [
        (
            "Wan2.1-T2V-1.3B",
            "wan",
            WAN_13B,
            1.0,
            dict(kind="wan", batch=2, frames=81, h=480, w=832, text=512),
            ["safe", "balanced", "fast"],
        ),
        (
            "FLUX.1-dev",
            "flux",
            FLUX_DEV,
            1.0,
            dict(kind="flux", h=1024, w=1024, text=512),
            ["safe", "balanced", "fast"],
        ),
        ("FLUX.1-dev", "flux", FLUX_DEV, 1.0, dict(kind="flux", h=2048, w=2048, text=512), ["balanced"]),
        (
            "Wan2.1-T2V-14B",
            "wan",
            WAN_14B,
            1.0,
            dict(kind="wan", batch=1, frames=81, h=720, w=1280, text=512),
            ["balanced"],
        ),
        (
            "HunyuanVideo",
            "hunyuan",
            HUNYUAN,
            0.3,
            dict(kind="hunyuan", frames=129, h=720, w=1280, text=256),
            ["balanced"],
        ),
    ]


# ------------------------------------------------------------------------------------------ models


def _classes():
    from diffusers import FluxTransformer2DModel, HunyuanVideoTransformer3DModel, WanTransformer3DModel

    return {
        "wan": WanTransformer3DModel,
        "hunyuan": HunyuanVideoTransformer3DModel,
        "flux": FluxTransformer2DModel,
    }


def _scaled(cfg: dict, fraction: float) -> dict:
    cfg = dict(cfg)
    for k in ("num_layers", "num_single_layers"):
        if k in cfg and fraction < 1.0:
            cfg[k] = max(1, round(cfg[k] * fraction))
    return cfg


def build(kind: str, cfg: dict, device, dtype):
    """Random weights without a CPU init: meta build, ``to_empty``, ``normal_(0, 0.02)``.

    Buffers computed in ``__init__`` (RoPE tables) would be garbage after ``to_empty``; they are copied from
    a one-layer CPU build of the same config (block buffers from its block 0).
    """
    cls = _classes()[kind]
    with torch.device("meta"):
        model = cls(**cfg)
    small = cls(
        **{**cfg, **{k: 1 for k in ("num_layers", "num_single_layers", "num_refiner_layers") if k in cfg}}
    )
    small_bufs = dict(small.named_buffers())
    model = model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
        for name, buf in model.named_buffers():
            src = small_bufs.get(name)
            if src is None:
                src = small_bufs.get(re.sub(r"\.\d+\.", ".0.", name))
            if src is not None and src.shape == buf.shape:
                buf.copy_(src)
    del small
    return model.to(dtype).eval()


def inputs_for(spec: dict, model, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device, dtype)
    kind = spec["kind"]
    if kind == "wan":
        b, f = spec.get("batch", 1), (spec["frames"] - 1) // 4 + 1
        return dict(
            hidden_states=rnd(b, 16, f, spec["h"] // 8, spec["w"] // 8),
            timestep=torch.full((b,), 900, device=device),
            encoder_hidden_states=rnd(b, spec["text"], model.config.text_dim),
            return_dict=False,
        )
    if kind == "hunyuan":
        f = (spec["frames"] - 1) // 4 + 1
        return dict(
            hidden_states=rnd(1, 16, f, spec["h"] // 8, spec["w"] // 8),
            timestep=torch.tensor([900], device=device),
            encoder_hidden_states=rnd(1, spec["text"], model.config.text_embed_dim),
            encoder_attention_mask=torch.ones(1, spec["text"], device=device, dtype=torch.long),
            pooled_projections=rnd(1, model.config.pooled_projection_dim),
            guidance=torch.tensor([6000.0], device=device, dtype=dtype),
            return_dict=False,
        )
    h, w = spec["h"] // 16, spec["w"] // 16
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return dict(
        hidden_states=rnd(1, h * w, model.config.in_channels),
        encoder_hidden_states=rnd(1, spec["text"], model.config.joint_attention_dim),
        pooled_projections=rnd(1, model.config.pooled_projection_dim),
        timestep=torch.tensor([0.9], device=device, dtype=dtype),
        img_ids=ids.reshape(-1, 3).to(device),
        txt_ids=torch.zeros(spec["text"], 3, device=device),
        guidance=torch.tensor([3.5], device=device, dtype=dtype),
        return_dict=False,
    )


# ------------------------------------------------------------------------------------------ timing


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_forward(model, inputs, warmup: int, iters: int) -> float:
    """Mean ms of one transformer forward (a denoising step), timesteps decreasing like a real run."""
    t0 = float(inputs["timestep"].float().max())
    with torch.no_grad():
        for i in range(warmup + iters):
            if i == warmup:
                _sync()
                start = time.perf_counter()
            step_inputs = dict(
                inputs, timestep=inputs["timestep"] * (1.0 - 0.01 * i) if t0 else inputs["timestep"]
            )
            model(**step_inputs)
        _sync()
    return (time.perf_counter() - start) * 1000.0 / iters


def usual_steps(model_name: str, tiny: bool) -> int:
    """The step count a user runs this model with (FLUX.1-dev 28, the video models 50); 4 in the CPU check."""
    if tiny:
        return 4
    return 28 if model_name.startswith("FLUX") else 50


def time_schedule(model, inputs, steps: int) -> float:
    """ms of a whole ``steps``-step schedule (timesteps falling linearly from the input's), so dense steps,
    residual captures/refreshes and selection reuse all count as they would in a real run."""
    t0 = inputs["timestep"]
    with torch.no_grad():
        _sync()
        start = time.perf_counter()
        for i in range(steps):
            model(**dict(inputs, timestep=t0 * (1.0 - i / steps)))
        _sync()
    return (time.perf_counter() - start) * 1000.0


def attention_share(model, inputs) -> float | None:
    """Fraction of GPU kernel time in attention kernels over one forward (torch.profiler)."""
    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(**inputs)
        _sync()
    total = attn = 0.0
    for ev in prof.key_averages():
        t = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0.0)
        if not t or ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        total += t
        if ATTN_KERNELS.search(ev.key):
            attn += t
    return attn / total if total else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny CPU configs: check the logic, no GPU")
    ap.add_argument("--only", default=None, help="regex on model names to run")
    ap.add_argument(
        "--budget-s", type=float, default=450.0, help="skip remaining cases after this many seconds"
    )
    ap.add_argument(
        "--schedule-steps", type=int, default=None,
        help="steps of the whole schedules timed for the headline (dense baseline and every plan with its own "
             "dense steps); default: each model's usual count (FLUX 28, others 50; 4 with --tiny); 0: per-step only",
    )  # fmt: skip
    ap.add_argument(
        "--extra-plans", default=None,
        help='JSON list of extra plans to time next to the presets, e.g. \'[{"name": "dyn0.2", "method": '
             '"dynamic", "min_density": 0.2, "max_density": 0.2, "dense_steps": 5, "residual": true, '
             '"residual_refresh": 4, "reuse_steps": 4}]\'',
    )  # fmt: skip
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    extra = json.loads(args.extra_plans) if args.extra_plans else []
    for e in extra:
        if "name" not in e:
            raise SystemExit(f"--extra-plans: every plan needs a 'name', got {e}")

    import diffusers
    import fastattn.api as fa
    import triton
    from fastattn.pipelines.backend import ORPHAN_FALLBACKS

    tiny = args.tiny or not torch.cuda.is_available()
    device = torch.device("cpu" if tiny else "cuda")
    dtype = torch.float32 if tiny else torch.bfloat16
    warmup, iters = (0, 1) if tiny else (1, 2)
    gpu = "cpu-tiny" if tiny else torch.cuda.get_device_name().replace(" ", "_").lower()
    dev_name = (platform.processor() or "cpu") if tiny else torch.cuda.get_device_name()
    t_start = time.perf_counter()
    records = []
    for name, kind, cfg, fraction, spec, presets in cases(tiny):
        resolution = f"{spec['w']}x{spec['h']}"
        if args.only and not re.search(args.only, name + " " + resolution):
            continue
        if time.perf_counter() - t_start > args.budget_s:
            records.append(dict(bench="e2e", model=name, resolution=resolution, skipped="time budget"))
            continue
        run_cfg = _scaled(cfg, fraction)
        model = build(kind, run_cfg, device, dtype)
        inputs = inputs_for(spec, model, device, dtype)
        # Dense baselines: diffusers' default and cuDNN, same run; the faster one is the baseline.
        base = {}
        for backend in ("native", "_native_cudnn"):
            try:
                model.set_attention_backend(backend)
                base[backend] = time_forward(model, inputs, warmup, iters)
            except Exception as e:  # cuDNN SDPA unavailable (CPU, old GPU)
                print(f"  {name}: backend {backend} failed: {type(e).__name__}: {e}", file=sys.stderr)
        best = min(base, key=base.get)
        model.set_attention_backend(best)
        share_dense = attention_share(model, inputs)
        n_steps = usual_steps(name, tiny) if args.schedule_steps is None else args.schedule_steps
        base_schedule_ms = time_schedule(model, inputs, n_steps) if n_steps else None
        layers = {k: run_cfg[k] for k in ("num_layers", "num_single_layers") if k in run_cfg}
        full_layers = {k: cfg[k] for k in layers}
        plans = [(p, dict(preset=p)) for p in presets]
        plans += [(e["name"], {k: v for k, v in e.items() if k != "name"}) for e in extra]
        for preset, plan_kwargs in plans:
            knobs = dict(dense_steps=0)  # time a sparse step; dense steps are reported via schedule_speedup
            if tiny:
                knobs["block_size"] = 16
            handle = fa.enable(model, **{**plan_kwargs, **knobs})
            plan = handle.plan
            try:
                step_ms = time_forward(model, inputs, warmup, iters)
                share_fast = attention_share(model, inputs)
                stats = handle.stats()
            finally:
                handle.disable()
            family = handle.models[0].adapter.family
            full_kwargs = {**plan_kwargs, **({"block_size": 16} if tiny else {})}
            est_steps = n_steps or usual_steps(name, tiny)
            dense_steps = fa.make_plan(
                family, **{k: v for k, v in full_kwargs.items() if k != "block_size"}
            ).dense_steps_for(est_steps)  # presets give dense_steps as a fraction of the run
            schedule = None
            if n_steps:
                # the plan as users run it: its own dense steps (a bare transformer needs the step count)
                handle = fa.enable(model, **full_kwargs, num_steps=n_steps)
                try:
                    sched_ms = time_schedule(model, inputs, n_steps)
                    sched_stats = handle.stats()
                finally:
                    handle.disable()
                schedule = dict(
                    steps=n_steps, ms=sched_ms, baseline_ms=base_schedule_ms,
                    speedup=base_schedule_ms / sched_ms, density=sched_stats["density"],
                    planned_dense=sched_stats["planned_dense"], fallbacks=sched_stats["fallbacks"],
                    selections=sched_stats.get("selections"), selection_reuses=sched_stats.get("selection_reuses"),
                )  # fmt: skip
            sched = est_steps * base[best] / (dense_steps * base[best] + (est_steps - dense_steps) * step_ms)
            rec = dict(
                bench="e2e",
                device=dev_name,
                torch=torch.__version__,
                triton=triton.__version__,
                diffusers=diffusers.__version__,
                model=name,
                resolution=resolution,
                frames=spec.get("frames", 1),
                batch=spec.get("batch", 1),
                steps_timed=iters,
                preset=preset,
                method=plan.method.name,
                density_target=getattr(plan.method, "density", None),
                density_achieved=stats["density"],
                quant=plan.quant,
                step_ms=step_ms,
                baseline="dense",
                baseline_backend=best,
                baseline_step_ms=base[best],
                dense_backends_ms=base,
                # The headline: a whole generation, every step timed (dense steps, captures, refreshes included).
                headline_speedup=schedule["speedup"] if schedule else None,
                headline=f"whole {n_steps}-step schedule, measured" if schedule else None,
                speedup=base[best] / step_ms,  # one sparse step: a detail
                attn_share_dense=share_dense,
                attn_share_fast=share_fast,
                dense_steps_in_preset=dense_steps,
                schedule_speedup_estimate=sched,  # from one sparse step and the dense steps, not measured
                schedule_steps_estimate=est_steps,
                schedule_measured=schedule,
                plan_kwargs=plan_kwargs,
                fallbacks=stats["fallbacks"],
                layers=layers,
                layers_full=full_layers,
            )
            if fraction < 1.0:
                scale = sum(full_layers.values()) / sum(layers.values())
                rec.update(
                    note=f"time-boxed: {layers} of {full_layers} blocks; *_full_est scale by block count",
                    step_ms_full_est=step_ms * scale,
                    baseline_step_ms_full_est=base[best] * scale,
                )
            records.append(rec)
            whole = f"whole {n_steps} steps x{schedule['speedup']:.2f}" if schedule else "whole schedule not timed"
            print(
                f"{name:18s} {resolution:>9s} {preset:8s} {plan.quant:8s} {whole}  |  per sparse step: dense "
                f"{base[best]:9.1f} ms ({best}) fast {step_ms:9.1f} ms x{rec['speedup']:.2f}  density "
                f"{stats['density']:.2f}  attn share {share_dense} -> {share_fast}",
                flush=True,
            )
        del model, inputs
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if ORPHAN_FALLBACKS:
        print(f"orphan fallbacks: {dict(ORPHAN_FALLBACKS)}", file=sys.stderr)
    out = args.out or str(Path(os.environ.get("OUT", "bench/results")) / f"e2e-{gpu}.json")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(records, indent=1))
    print(f"wrote {out} ({len(records)} records, {time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
