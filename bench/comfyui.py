"""End-to-end step time inside ComfyUI's own model code: the core's attention vs fastattn's node vs peers (GPU).

Random-weight ComfyUI diffusion models at their real sizes are built from their configurations with ComfyUI's
own classes (``comfy.model_detection.model_config_from_unet_config`` -> ``model_config.get_model`` -> a
``comfy.model_patcher.ModelPatcher``), straight on the GPU in bf16 (weights normal(0, 0.02), norm scales 1),
no checkpoint file. One step is one ``BaseModel.apply_model`` call with the ``transformer_options`` a sampler
gives it: the patcher's ``model_options["transformer_options"]`` with its wrappers merged in (as
``comfy.sampler_helpers.prepare_model_patcher`` does), ``sample_sigmas`` (the run's schedule from the model's
own ``model_sampling``), ``sigmas``, ``cond_or_uncond`` and ``uuids``; ``pre_run`` before and
``prepare_state`` per step, as the sampler calls them. Cases: Wan 2.1 T2V 1.3B at 832x480 x 81 frames (latent
21x60x104, 32760 tokens, batch 2 = cond + uncond, 512 text tokens), FLUX.1-dev at 1024^2 and 2048^2 (batch 1,
256 text tokens as ComfyUI's T5 tokenizer pads them).

Variants, timed in one run on the same inputs and the same steps:

- ``default``: the attention ComfyUI's core picks (``comfy.ldm.modules.attention.optimized_attention``:
  ``attention_pytorch``, SDPA with cuDNN first, on CUDA);
- ``fastattn-<preset>``: the Fast Attention node's logic (``fastattn.nodes.fast_attention.apply_fast_attention``
  on the patcher) with the family's preset; the timed steps sit in the middle of the schedule, past the
  preset's dense steps, so they are sparse steps (the record says so: ``timed_steps_sparse``);
- ``kitchen-int8``: comfy-kitchen's ``int8_attention`` (dense INT8 SDPA) for every unmasked attention call;
- ``kitchen-sol``: comfy-kitchen's ``sol_attn`` (training-free block-sparse Sol-Attn) for self-attention calls
  of at least ``--sol-min-tokens`` tokens, bf16, head_dim 128 (text tokens of a joint sequence are its sinks).

ComfyUI v0.3.64 has no node for either comfy-kitchen kernel, so both go in through the core's own hook, the
``optimized_attention_override`` in ``transformer_options`` on a ``clone()``, with the kernels called as their
documented signatures say; a call they cannot take runs the core's attention and is counted. A peer that is not
installed, or whose kernel does not run here, is recorded as skipped with the reason.

Per variant: ms per step (CUDA events over the timed steps after warm-up), speed-up vs ``default``, peak
memory, the output's relative L2 difference from ``default`` at the last timed step, and for fastattn the
report the Report node shows (density, fallbacks and their reasons, calls left to the host).

    COMFYUI_DIR=/path/to/ComfyUI python bench/comfyui.py          # GPU: $OUT/comfyui-<gpu>.json or bench/results/
    COMFYUI_DIR=/path/to/ComfyUI python bench/comfyui.py --tiny   # CPU: tiny configs, checks the logic in seconds

ComfyUI is GPL-3.0: none of its code is here; it is imported from ``COMFYUI_DIR`` at run time only. Random
weights give near-uniform attention: this measures speed, never quality. Time-boxed by ``--budget-s``.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import platform
import re
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    # Run as a script: the repository root is the package `fastattn`; keep it off sys.path (its modules would
    # shadow others) and the bench folder too (ComfyUI gets the front of sys.path).
    sys.path = [
        p for p in sys.path if Path(p or ".").resolve() not in (ROOT, Path(__file__).resolve().parent)
    ]

WAN_13B = dict(
    image_model="wan2.1", model_type="t2v", dim=1536, out_dim=16, num_heads=12, ffn_dim=8960, num_layers=30,
    patch_size=(1, 2, 2), freq_dim=256, window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6,
    in_dim=16,
)  # fmt: skip
FLUX_DEV = dict(
    image_model="flux", in_channels=16, patch_size=2, out_channels=16, vec_in_dim=768, context_in_dim=4096,
    hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56],
    theta=10000, qkv_bias=True, guidance_embed=True,
)  # fmt: skip
# Tiny stand-ins with the same classes and code paths (CPU logic check); head_dim stays 128.
TINY = {
    "wan": dict(WAN_13B, dim=256, num_heads=2, ffn_dim=512, num_layers=2, text_dim=64),
    "flux": dict(FLUX_DEV, hidden_size=256, num_heads=2, depth=1, depth_single_blocks=1, context_in_dim=64,
                 vec_in_dim=32),
}  # fmt: skip

PRESETS = ("balanced", "fast")
PEERS = ("kitchen-int8", "kitchen-sol")
VARIANTS = ("default", *(f"fastattn-{p}" for p in PRESETS), *PEERS)


def cases(tiny: bool) -> list[dict]:
    """One dict per measured shape; cases of the same ``model`` share one built model."""
    if tiny:
        return [
            dict(model="Wan2.1-T2V-1.3B", kind="wan", cfg=TINY["wan"], batch=2, frames=9, h=256, w=256, text=16,
                 steps=10),
            dict(model="FLUX.1-dev", kind="flux", cfg=TINY["flux"], batch=1, frames=1, h=512, w=512, text=32,
                 steps=10),
        ]  # fmt: skip
    return [
        dict(model="Wan2.1-T2V-1.3B", kind="wan", cfg=WAN_13B, batch=2, frames=81, h=480, w=832, text=512,
             steps=30),
        dict(model="FLUX.1-dev", kind="flux", cfg=FLUX_DEV, batch=1, frames=1, h=1024, w=1024, text=256, steps=20),
        dict(model="FLUX.1-dev", kind="flux", cfg=FLUX_DEV, batch=1, frames=1, h=2048, w=2048, text=256, steps=20),
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------ imports


def import_fastattn():
    """``fastattn`` as installed, else this checkout registered under that name (the root is the package)."""
    try:
        import fastattn  # noqa: F401
    except ImportError:
        spec = importlib.util.spec_from_file_location(
            "fastattn", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["fastattn"] = module
        spec.loader.exec_module(module)
    import fastattn

    return fastattn


def import_comfy(comfy_dir: str, cpu: bool):
    """ComfyUI's modules from ``comfy_dir``, set up for a headless run (its CLI defaults, ``--cpu`` for tiny)."""
    if not comfy_dir or not os.path.isfile(os.path.join(comfy_dir, "comfy", "model_base.py")):
        raise SystemExit(
            f"COMFYUI_DIR={comfy_dir!r} is not a ComfyUI source checkout (no comfy/model_base.py); set COMFYUI_DIR"
        )
    comfy_dir = os.path.abspath(comfy_dir)
    if comfy_dir not in sys.path:
        sys.path.insert(0, comfy_dir)
    import comfy.options  # noqa: F401  (argument parsing stays off: the defaults of main.py's flags)
    from comfy.cli_args import args

    args.cpu = bool(cpu)
    args.disable_api_nodes = True
    import comfy.ldm.modules.attention as attention
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    import comfy.patcher_extension

    version = None
    try:
        spec = importlib.util.spec_from_file_location(
            "comfyui_version", os.path.join(comfy_dir, "comfyui_version.py")
        )
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        version = mod.__version__
    except Exception:  # older checkouts have no version file
        pass
    return dict(
        attention=attention,
        model_detection=comfy.model_detection,
        model_management=comfy.model_management,
        model_patcher=comfy.model_patcher,
        patcher_extension=comfy.patcher_extension,
        version=version,
    )


# ------------------------------------------------------------------------------------------ models


def build(comfy: dict, cfg: dict, device, dtype):
    """A ModelPatcher around a ComfyUI model built from ``cfg`` (a ``unet_config``) with random weights; every
    parameter keeps the dtype ComfyUI gives it (Wan's patch embedding stays fp32, as in the core)."""
    unet_config = {k: (list(v) if isinstance(v, list) else v) for k, v in cfg.items()}
    model_config = comfy["model_detection"].model_config_from_unet_config(unet_config)
    if model_config is None:
        raise RuntimeError(f"ComfyUI has no supported model for {cfg}")
    model_config.set_inference_dtype(dtype, None)
    torch.manual_seed(0)
    model = model_config.get_model({}, "", device=device)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.fill_(0.0 if name.endswith("bias") else 1.0)
            else:
                p.normal_(0.0, 0.02)
    patcher = comfy["model_patcher"].ModelPatcher(model, load_device=device, offload_device=device)
    return patcher, type(model_config).__name__


def make_inputs(case: dict, patcher, device, dtype) -> dict:
    """Latent, conditioning and the run's sigma schedule, as a sampler would hand them to apply_model."""
    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    cfg, b = case["cfg"], case["batch"]
    lh, lw = case["h"] // 8, case["w"] // 8
    ms = patcher.model.model_sampling
    steps = case["steps"]
    # The schedule: the model's own sigmas at evenly spaced fractions of the run, ending in 0.
    sched = torch.tensor([float(ms.percent_to_sigma(i / steps)) for i in range(steps)] + [0.0])
    if case["kind"] == "wan":
        frames = (case["frames"] - 1) // 4 + 1
        x = rnd(b, 16, frames, lh, lw)
        context = rnd(b, case["text"], cfg.get("text_dim", 4096)).to(dtype)
        extra = {}
        tokens = frames * (lh // 2) * (lw // 2)
        text_first = 0  # cross-attention text: no text in the self-attention sequence
    else:
        x = rnd(b, 16, lh, lw)
        context = rnd(b, case["text"], cfg["context_in_dim"]).to(dtype)
        extra = dict(y=rnd(b, cfg["vec_in_dim"]).to(dtype), guidance=torch.full((b,), 3.5))
        tokens = (lh // 2) * (lw // 2) + case["text"]
        text_first = case["text"]
    cond_or_uncond = [0, 1] if b == 2 else [0] * b
    return dict(
        x=x.to(device),
        context=context.to(device),
        extra={k: v.to(device) for k, v in extra.items()},
        sched=sched,
        cond_or_uncond=cond_or_uncond,
        tokens=tokens,
        text_first=text_first,
        batch=b,
    )


# ------------------------------------------------------------------------------------------ peers


class PeerOverride:
    """An ``optimized_attention_override`` that serves the calls ``accept`` takes with ``kernel`` (q, k, v as
    ``[B, S, H, D]`` -> ``[B, S, H, D]``) and passes every other call, with the caller's arguments, to the core's
    attention (counted by reason). A kernel error stops it serving (counted, kept in ``error``)."""

    def __init__(self, name: str, accept, kernel):
        from fastattn.nodes.host.calls import HostCall

        self.name, self.accept, self.kernel, self._parse = name, accept, kernel, HostCall.parse
        self.served = 0
        self.host_calls: Counter = Counter()
        self.error: str | None = None

    def __deepcopy__(self, memo):  # ModelPatcher.clone() deep-copies model_options
        return self

    def __call__(self, func, *args, **kwargs):
        call = self._parse(args, kwargs, lambda: func(*args, **kwargs))
        reason = self.accept(call) if self.error is None else "kernel error earlier in the run"
        if reason is not None:
            self.host_calls[reason] += 1
            return func(*args, **kwargs)
        try:
            out = self.kernel(call)
        except Exception as e:  # noqa: BLE001  (recorded; the step still runs on the core's attention)
            self.error = f"{type(e).__name__}: {e}"[:500]
            self.host_calls["kernel error"] += 1
            return func(*args, **kwargs)
        self.served += 1
        return call.to_host(out)

    def summary(self) -> dict:
        return dict(served_calls=self.served, host_calls=dict(self.host_calls), error=self.error)


def kitchen_status(device) -> tuple[object | None, dict]:
    """``(comfy_kitchen or None, {variant: reason it cannot run})``."""
    try:
        import comfy_kitchen as ck
    except Exception as e:  # noqa: BLE001
        reason = f"comfy_kitchen not importable ({type(e).__name__}: {e})"
        return None, {p: reason for p in PEERS}
    skip = {}
    try:
        from comfy_kitchen.backends import cuda as ck_cuda

        ext_error = getattr(ck_cuda, "_EXT_ERROR", None)
    except Exception:  # noqa: BLE001
        ext_error = None
    if device.type != "cuda":
        skip["kitchen-int8"] = "comfy_kitchen's int8_attention has CUDA/HIP kernels only (no CPU backend)"
    elif not ck.int8_attention_is_available(device):
        skip["kitchen-int8"] = (
            f"comfy_kitchen int8_attention unavailable on this GPU ({ext_error or 'no kernel'})"
        )
    if device.type == "cuda" and not ck.sol_attn_is_available(device):
        skip["kitchen-sol"] = f"comfy_kitchen sol_attn unavailable on this GPU ({ext_error or 'no kernel'})"
    # One small call each: a kernel that is there but cannot run (driver, architecture) is found here.
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.randn(1, 256, 1, 128, device=device, dtype=dt)
    probes = {
        "kitchen-int8": lambda: ck.int8_attention(*(t.transpose(1, 2) for t in (q, q, q))),
        "kitchen-sol": lambda: ck.sol_attn(q, q, q, tau=1.0),
    }
    for name, probe in probes.items():
        if name in skip:
            continue
        try:
            out = probe()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if not torch.isfinite(out.float()).all():
                skip[name] = "probe call returned non-finite values"
        except Exception as e:  # noqa: BLE001
            skip[name] = f"probe call failed: {type(e).__name__}: {e}"[:500]
    return ck, skip


def kitchen_int8_override(ck) -> PeerOverride:
    """comfy-kitchen's dense INT8 attention for every unmasked call (self- and cross-attention)."""

    def accept(call):
        if call.shape_problem():
            return call.shape_problem()
        if call.mask is not None:
            return "attention mask"
        if not call.q.is_cuda:
            return "not on CUDA"
        if call.q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or call.head_dim in (None, 0):
            return f"dtype {call.q.dtype} / head_dim {call.head_dim}"
        if call.head_dim > 256:
            return f"head_dim {call.head_dim} > 256"
        return None

    def kernel(call):
        q, k, v = (t.transpose(1, 2) for t in call.bshd())  # [B, H, S, D] views, last dim contiguous
        return ck.int8_attention(q, k, v, scale=call.scale).transpose(1, 2)

    return PeerOverride("kitchen-int8", accept, kernel)


def kitchen_sol_override(ck, text_first: int, min_tokens: int, tau: float) -> PeerOverride:
    """comfy-kitchen's Sol-Attn for long self-attention (``text_first`` leading text tokens are exact sinks)."""
    sinks = [0, math.ceil(text_first / 64)] if text_first else None

    def accept(call):
        if call.shape_problem():
            return call.shape_problem()
        if call.q_len != call.k_len:
            return "cross-attention (q and k lengths differ)"
        if call.mask is not None:
            return "attention mask"
        if call.q_len < min_tokens:
            return f"{call.q_len} tokens < min_tokens {min_tokens}"
        if call.head_dim != 128:
            return f"head_dim {call.head_dim} (sol_attn takes 128)"
        if call.q.is_cuda and call.q.dtype not in (torch.float16, torch.bfloat16):
            return f"dtype {call.q.dtype} (sol_attn's kernels take bf16/fp16)"
        return None

    def aligned(t):
        ok = t.stride(-1) == 1 and t.data_ptr() % 16 == 0
        ok = ok and all(t.stride(d) % 8 == 0 for d in range(3) if t.shape[d] > 1)
        return t if ok else t.contiguous()

    def kernel(call):
        q, k, v = (aligned(t) for t in call.bshd())
        return ck.sol_attn(q, k, v, tau=tau, scale=call.scale, sink_blocks=sinks, sink_q=sinks)

    return PeerOverride("kitchen-sol", accept, kernel)


# ------------------------------------------------------------------------------------------ one step


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(comfy: dict, patcher, inputs: dict, first_step: int, warmup: int, iters: int, device):
    """Mean ms per step over ``iters`` steps after ``warmup`` steps, from step ``first_step`` on, plus the
    output of the last step. Each step is one ``apply_model`` with a sampler's ``transformer_options``."""
    pe = comfy["patcher_extension"]
    model_options = comfy["model_patcher"].create_model_options_clone(patcher.model_options)
    to_base = model_options.setdefault("transformer_options", {})
    # what comfy.sampler_helpers.prepare_model_patcher and CFGGuider do before sampling
    pe.merge_nested_dicts(to_base.setdefault("wrappers", {}), patcher.wrappers, copy_dict1=False)
    pe.merge_nested_dicts(to_base.setdefault("callbacks", {}), patcher.callbacks, copy_dict1=False)
    sched = inputs["sched"]
    to_base["sample_sigmas"] = sched.to(device)
    b = inputs["batch"]
    model = patcher.model
    patcher.pre_run()
    out = None
    cuda = device.type == "cuda"
    try:
        with torch.inference_mode():
            for i in range(warmup + iters):
                if i == warmup:
                    _sync(device)
                    if cuda:
                        start, end = (
                            torch.cuda.Event(enable_timing=True),
                            torch.cuda.Event(enable_timing=True),
                        )
                        start.record()
                    else:
                        t0 = time.perf_counter()
                step = first_step + i
                sigma = torch.full((b,), float(sched[step]), device=device)
                to = dict(to_base)
                # the sampler's sigma per latent (one latent here; cond and uncond are its two batch chunks)
                to.update(cond_or_uncond=list(inputs["cond_or_uncond"]), uuids=[f"bench-{j}" for j in range(b)],
                          sigmas=sigma[:1])  # fmt: skip
                patcher.prepare_state(sigma)
                out = model.apply_model(inputs["x"], sigma, c_crossattn=inputs["context"], transformer_options=to,
                                        **inputs["extra"])  # fmt: skip
            if cuda:
                end.record()
                end.synchronize()
                ms = start.elapsed_time(end) / iters
            else:
                ms = (time.perf_counter() - t0) * 1000.0 / iters
    finally:
        patcher.cleanup()
    steps_timed = list(range(first_step + warmup, first_step + warmup + iters))
    return ms, out, steps_timed


def rel_err(out, ref) -> float | None:
    if out is None or ref is None:
        return None
    d = (out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)
    return float(d)


# ------------------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny CPU configs: check the logic, no GPU")
    ap.add_argument("--only", default=None, help="regex on 'model WxH' of the cases to run")
    ap.add_argument("--variants", default=None, help=f"comma list out of {','.join(VARIANTS)} (default: all)")
    ap.add_argument(
        "--budget-s", type=float, default=300.0, help="skip remaining work after this many seconds"
    )
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant (default 1)")
    ap.add_argument("--iters", type=int, default=None, help="timed steps per variant (default 3 GPU, 1 tiny)")
    ap.add_argument(
        "--sol-tau", type=float, default=1.0, help="kitchen-sol routing threshold (its default 1.0)"
    )
    ap.add_argument("--sol-min-tokens", type=int, default=None,
                    help="kitchen-sol serves self-attention of at least this many tokens (default 12288; 0 tiny)")  # fmt: skip
    ap.add_argument("--comfyui-dir", default=os.environ.get("COMFYUI_DIR"), help="default: $COMFYUI_DIR")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    variants = (
        VARIANTS if not args.variants else tuple(v.strip() for v in args.variants.split(",") if v.strip())
    )
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"--variants: unknown {sorted(unknown)}; choose from {list(VARIANTS)}")
    if "default" not in variants:
        variants = ("default", *variants)  # every ratio needs it

    tiny = args.tiny or not torch.cuda.is_available()
    t_start = time.perf_counter()
    comfy = import_comfy(args.comfyui_dir, cpu=tiny)
    import_fastattn()
    from fastattn.nodes.fast_attention import apply_fast_attention
    from fastattn.nodes.host import find_patch

    device = torch.device("cpu") if tiny else comfy["model_management"].get_torch_device()
    dtype = torch.float32 if tiny else torch.bfloat16
    warmup = 1 if args.warmup is None else args.warmup
    iters = args.iters or (1 if tiny else 3)
    min_tokens = args.sol_min_tokens if args.sol_min_tokens is not None else (0 if tiny else 12288)
    gpu = "cpu-tiny" if tiny else torch.cuda.get_device_name(device).replace(" ", "_").lower()
    dev_name = (platform.processor() or "cpu") if tiny else torch.cuda.get_device_name(device)
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    ck, kitchen_skip = kitchen_status(device) if any(v in PEERS for v in variants) else (None, {})
    default_fn = comfy["attention"].optimized_attention
    env = dict(
        bench="comfyui", device=dev_name, torch=torch.__version__, triton=triton_version,
        python=platform.python_version(), comfyui=comfy["version"],
        comfy_attention=getattr(default_fn, "__name__", repr(default_fn)),
        comfy_kitchen=getattr(ck, "__version__", None) or _dist_version("comfy-kitchen"),
    )  # fmt: skip
    print(f"ComfyUI {env['comfyui']} ({args.comfyui_dir}), default attention {env['comfy_attention']}, "
          f"torch {env['torch']}, comfy_kitchen {env['comfy_kitchen']}, {dev_name}", flush=True)  # fmt: skip
    for name, why in kitchen_skip.items():
        if name in variants:
            print(f"  {name}: skipped: {why}", flush=True)

    records = []
    built = {}  # model name -> (patcher, model config class)
    for case in cases(tiny):
        resolution = f"{case['w']}x{case['h']}"
        label = f"{case['model']} {resolution}"
        base = dict(
            env, model=case["model"], resolution=resolution, frames=case["frames"], batch=case["batch"]
        )
        if args.only and not re.search(args.only, label):
            continue
        if time.perf_counter() - t_start > args.budget_s:
            records += [dict(base, variant=v, skipped="time budget") for v in variants]
            continue
        if case["model"] not in built:
            for other in list(built):  # one model on the GPU at a time
                del built[other]
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            t0 = time.perf_counter()
            built[case["model"]] = build(comfy, case["cfg"], device, dtype)
            print(
                f"{case['model']}: built {built[case['model']][1]} in {time.perf_counter() - t0:.1f} s",
                flush=True,
            )
        patcher, config_name = built[case["model"]]
        inputs = make_inputs(case, patcher, device, dtype)
        steps = case["steps"]
        first = steps // 2 - warmup  # timed steps in the middle of the run: past every preset's dense steps
        base.update(model_config=config_name, tokens=inputs["tokens"], schedule_steps=steps)
        default_ms = default_out = None
        for variant in variants:
            rec = dict(base, variant=variant)
            if variant in kitchen_skip:
                records.append(dict(rec, skipped=kitchen_skip[variant]))
                continue
            if time.perf_counter() - t_start > args.budget_s:
                records.append(dict(rec, skipped="time budget"))
                continue
            if variant == "default":
                run, override = patcher, None
            elif variant.startswith("fastattn-"):
                run, override = apply_fast_attention(patcher, preset=variant.split("-", 1)[1]), None
            else:
                override = (
                    kitchen_int8_override(ck)
                    if variant == "kitchen-int8"
                    else kitchen_sol_override(ck, inputs["text_first"], min_tokens, args.sol_tau)
                )
                run = patcher.clone()
                run.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = (
                    override
                )
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                ms, out, steps_timed = run_variant(comfy, run, inputs, first, warmup, iters, device)
            except Exception as e:  # noqa: BLE001  (recorded; the other variants still run)
                records.append(dict(rec, error=f"{type(e).__name__}: {e}"[:1000]))
                print(f"{label:28s} {variant:18s} ERROR {type(e).__name__}: {e}", flush=True)
                continue
            rec.update(
                step_ms=ms,
                steps_timed=steps_timed,
                sigmas_timed=[round(float(inputs["sched"][s]), 6) for s in steps_timed],
                warmup=warmup,
                peak_mem_gb=(torch.cuda.max_memory_allocated(device) / 2**30)
                if device.type == "cuda"
                else None,
                finite=bool(torch.isfinite(out).all()),
            )
            if variant == "default":
                default_ms, default_out = ms, out
            rec.update(
                default_step_ms=default_ms,
                speedup_vs_default=default_ms / ms if default_ms else None,
                ms_vs_default=ms / default_ms if default_ms else None,
                out_rel_l2_vs_default=rel_err(out, default_out) if variant != "default" else 0.0,
            )
            if variant.startswith("fastattn-"):
                r = find_patch(run).report() or {}
                rec.update(
                    preset=variant.split("-", 1)[1],
                    plan=r.get("plan"),
                    density=r.get("density"),
                    fallbacks=r.get("fallbacks"),
                    fallback_calls=r.get("fallback_calls"),
                    planned_dense=r.get("planned_dense"),
                    host_calls=r.get("host_calls"),
                    calls=r.get("calls"),
                    sparse_calls=r.get("sparse_calls"),
                    sparse_steps=r.get("sparse_steps"),
                    timed_steps_sparse=set(steps_timed) <= set(r.get("sparse_steps") or ()),
                    notes=r.get("notes"),
                )
            elif override is not None:
                rec.update(
                    override.summary(),
                    driver="bench override from comfy_kitchen's documented signature (no core node in "
                    f"ComfyUI {env['comfyui']})",
                )
                if variant == "kitchen-sol":
                    rec.update(sol_tau=args.sol_tau, sol_min_tokens=min_tokens,
                               sol_sinks_tokens=inputs["text_first"],
                               sol_backend="cuda" if device.type == "cuda" else "eager (CPU reference)")  # fmt: skip
                if override.error:
                    rec["note"] = "kernel raised; the calls after it ran the core's attention"
            records.append(rec)
            extra = ""
            if "density" in rec:
                extra = f"density {rec['density']:.3f} fallbacks {rec['fallback_calls']} sparse {rec['timed_steps_sparse']}"
            elif override is not None:
                extra = f"served {override.served} host {sum(override.host_calls.values())}" + (
                    f" ERROR {override.error}" if override.error else ""
                )
            print(
                f"{label:28s} {variant:18s} {ms:9.1f} ms  {_x(rec['speedup_vs_default'])}  {extra}",
                flush=True,
            )
            del run, out
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del inputs, default_out
    built.clear()
    gc.collect()

    out_path = args.out or str(
        Path(os.environ.get("OUT") or ROOT / "bench" / "results") / f"comfyui-{gpu}.json"
    )
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(json.dumps(records, indent=1, default=str))
    print(f"wrote {out_path} ({len(records)} records, {time.perf_counter() - t_start:.0f} s)")
    print_table(records)
    return 0


def _dist_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return None


def _x(speedup) -> str:
    return "x?" if speedup is None else f"x{speedup:.2f}"


def print_table(records: list[dict]) -> None:
    """The short table, last: ms per step and speed-up vs the core's attention per case and variant."""
    print(f"\n{'case':28s} {'variant':18s} {'ms/step':>9s} {'vs default':>10s} {'density':>8s}  notes")
    for r in records:
        label = f"{r['model']} {r['resolution']}"
        if "step_ms" not in r:
            why = r.get("skipped") or r.get("error") or "?"
            print(f"{label:28s} {r['variant']:18s} {'-':>9s} {'-':>10s} {'-':>8s}  {why[:90]}")
            continue
        dens = r.get("density")
        if dens is None and r.get("served_calls") is not None:
            notes = f"served {r['served_calls']}, host {sum(r['host_calls'].values())}" + (
                " ERROR" if r.get("error") else ""
            )
        elif dens is not None:
            fb = r.get("fallback_calls") or 0
            notes = f"fallbacks {fb}" + ("" if r.get("timed_steps_sparse") else " (timed steps NOT sparse)")
        else:
            notes = ""
        err = r.get("out_rel_l2_vs_default")
        if err:
            notes += f", rel diff {err:.3f}"
        dens_s = f"{dens:8.3f}" if dens is not None else f"{'':8s}"
        print(
            f"{label:28s} {r['variant']:18s} {r['step_ms']:9.1f} {_x(r['speedup_vs_default']):>10s} {dens_s}  {notes}"
        )


if __name__ == "__main__":
    raise SystemExit(main())
