"""``evaluate_pipeline``: a diffusers pipeline dense and under fastattn configurations, on the same prompts
and seeds, with quality, per-step attention error, speed and what ran.

Example::

    from fastattn.evaluation import evaluate_pipeline, write_report

    report = evaluate_pipeline(pipe, ["balanced", "fast", "window3d:0.3"], prompts=["a cat"], seeds=[0, 1],
                               steps=30, height=480, width=832, num_frames=33)
    write_report(report, "fastattn-eval")   # report.json, report.png, report.html

For every configuration and every (prompt, seed) the output is compared with the dense output of the same
(prompt, seed):

- ``latents``: what the VAE decodes (captured at ``pipe.vae.decode``, i.e. the final latents after the
  pipeline's unscaling/unpacking), or the ``output_type="latent"`` output when the pipeline has no VAE:
  PSNR over the whole tensor (peak = the dense latents' range), SSIM where they are image-shaped, rel-L2.
- ``decoded``: the ``output_type="pt"`` frames/images in ``[0, 1]``: PSNR (mean over frames), SSIM, rel-L2.
- ``attention_error``: rel-L2 of the fast attention output against exact attention on the same q, k, v,
  per denoising step, on sampled calls and query rows (see :mod:`.probe`).
- time per pipeline call (CUDA synchronised), speedup against dense, the time spent in ``vae.decode``,
  the density achieved and every dense fallback with its reason (``handle.stats()``).

Dense runs are the unpatched pipeline. With ``warmup`` every configuration first runs prompt 0 / seed 0
once untimed; that run also measures the attention error, so the timed runs carry no probe.
"""

from __future__ import annotations

import inspect
import math
import platform
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime, timezone

import torch

from . import metrics
from .configs import EvalConfig, as_config, unique_labels
from .probe import AttentionErrorProbe

FORMAT = "fastattn-eval"
VERSION = 1


class EvalInputError(ValueError):
    """Bad input to an evaluation (prompts, configurations, pipeline arguments): a message for the user."""


# ------------------------------------------------------------------------------------ pipeline calls


def call_parameters(pipe) -> tuple[set[str], bool]:
    """Names ``pipe.__call__`` takes, and whether it takes ``**kwargs``."""
    params = inspect.signature(pipe.__call__).parameters
    names = {n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return names, any(p.kind == p.VAR_KEYWORD for p in params.values())


def has_vae(pipe) -> bool:
    vae = getattr(pipe, "vae", None)
    return vae is not None and callable(getattr(vae, "decode", None))


def build_call_kwargs(
    pipe,
    steps: int | None = None,
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
    extra: dict | None = None,
) -> tuple[dict, list[str]]:
    """``(kwargs every call gets, names left out because __call__ does not take them)``.

    ``steps``/``height``/``width``/``num_frames`` are passed only where ``__call__`` takes them; ``extra``
    keys it does not take raise :class:`EvalInputError`.
    """
    names, var_kw = call_parameters(pipe)
    accepts = lambda n: n in names or var_kw
    if "output_type" not in names and not var_kw:
        raise EvalInputError(f"{type(pipe).__name__}.__call__ takes no output_type; fastattn eval needs it")
    kwargs, ignored = {}, []
    for name, value in (
        ("num_inference_steps", steps),
        ("height", height),
        ("width", width),
        ("num_frames", num_frames),
    ):
        if value is None:
            continue
        if accepts(name):
            kwargs[name] = value
        else:
            ignored.append(name)
    for name, value in (extra or {}).items():
        if not accepts(name):
            raise EvalInputError(
                f"{type(pipe).__name__}.__call__ takes no argument {name!r}; it takes: {sorted(names)}"
            )
        kwargs[name] = value
    kwargs["output_type"] = "pt" if has_vae(pipe) else "latent"
    if accepts("return_dict"):
        kwargs["return_dict"] = False
    return kwargs, ignored


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class _DecodeCapture:
    """Wraps ``pipe.vae.decode`` on the instance: records its input latents and the time it takes."""

    def __init__(self, pipe):
        self.vae = pipe.vae if has_vae(pipe) else None
        self.inputs: list[torch.Tensor] = []
        self.seconds = 0.0
        self._had_own = False

    def __enter__(self):
        if self.vae is None:
            return self
        self._had_own = "decode" in self.vae.__dict__
        original = self.vae.decode

        def decode(*args, **kwargs):
            z = args[0] if args else kwargs.get("z", next(iter(kwargs.values()), None))
            if isinstance(z, torch.Tensor):
                self.inputs.append(z.detach())
            _sync()
            t0 = time.perf_counter()
            out = original(*args, **kwargs)
            _sync()
            self.seconds += time.perf_counter() - t0
            return out

        decode.__wrapped__ = original
        self._original = original
        self.vae.decode = decode
        return self

    def __exit__(self, *exc):
        if self.vae is None:
            return
        if self._had_own:
            self.vae.decode = self._original
        else:
            self.vae.__dict__.pop("decode", None)

    def reset(self) -> None:
        self.inputs, self.seconds = [], 0.0

    def latents(self) -> torch.Tensor | None:
        if not self.inputs:
            return None
        if len(self.inputs) > 1 and all(z.shape[1:] == self.inputs[0].shape[1:] for z in self.inputs):
            return torch.cat(self.inputs)
        return self.inputs[-1]


class _QuietPipeline:
    """Turns the pipeline's own progress bar off for the evaluation, restoring its setting after."""

    def __init__(self, pipe):
        self.pipe = pipe

    def __enter__(self):
        self._had = "_progress_bar_config" in self.pipe.__dict__
        self._old = self.pipe.__dict__.get("_progress_bar_config")
        if hasattr(self.pipe, "set_progress_bar_config"):
            self.pipe.set_progress_bar_config(disable=True)
        return self

    def __exit__(self, *exc):
        if self._had:
            self.pipe._progress_bar_config = self._old
        else:
            self.pipe.__dict__.pop("_progress_bar_config", None)


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (list, tuple)) and x and all(isinstance(t, torch.Tensor) for t in x):
        return torch.stack(list(x))
    try:
        import numpy as np

        if isinstance(x, np.ndarray):
            return torch.from_numpy(x)
    except ImportError:
        pass
    raise TypeError(
        f"the pipeline returned {type(x).__name__}; expected a tensor (output_type 'pt'/'latent')"
    )


def _run_once(pipe, kwargs: dict, capture: _DecodeCapture) -> dict:
    """One pipeline call: ``{"latents", "decoded", "time_s", "decode_s"}`` (tensors on the CPU)."""
    capture.reset()
    _sync()
    t0 = time.perf_counter()
    out = pipe(**kwargs)
    _sync()
    seconds = time.perf_counter() - t0
    main = out[0] if isinstance(out, (tuple, list)) or hasattr(out, "to_tuple") else out
    main = _as_tensor(main).detach()
    if kwargs.get("output_type") == "latent":
        latents, decoded = main, None
    else:
        latents, decoded = capture.latents(), main.float().clamp(0, 1)
    return {
        "latents": None if latents is None else latents.to("cpu", copy=True),
        "decoded": None if decoded is None else decoded.to("cpu", copy=True),
        "time_s": seconds,
        "decode_s": capture.seconds if capture.vae is not None else None,
    }


# ------------------------------------------------------------------------------------------ metrics


def _ssim_window(h: int, w: int) -> int | None:
    n = min(11, h, w)
    n = n if n % 2 else n - 1
    return n if n >= 3 else None


def _images(x: torch.Tensor, kind: str) -> torch.Tensor | None:
    """``x`` as ``[..., C, H, W]`` images: decoded ``[B, C, H, W]`` / ``[B, F, C, H, W]`` as they are;
    latents ``[B, C, F, H, W]`` frame-major; anything else (packed token latents) is not an image."""
    if kind == "latents" and x.dim() == 5:
        return x.permute(0, 2, 1, 3, 4)
    return x if x.dim() in (4, 5) else None


def _ssim_chunked(a: torch.Tensor, b: torch.Tensor, peak: float, window: int, chunk: int = 8) -> float:
    """Mean SSIM of images ``[..., C, H, W]``, ``chunk`` images at a time (bounded float64 memory)."""
    a, b = a.reshape(-1, *a.shape[-3:]), b.reshape(-1, *b.shape[-3:])
    vals = [
        metrics.ssim(a[i : i + chunk], b[i : i + chunk], data_range=peak, window=window, reduction="none")
        for i in range(0, a.shape[0], chunk)
    ]
    return float(torch.cat(vals).mean())


def compare(x: torch.Tensor, ref: torch.Tensor, kind: str) -> dict:
    """PSNR, SSIM, rel-L2, max |diff| of ``x`` against ``ref`` (``kind``: ``"latents"`` or ``"decoded"``).

    Decoded outputs are in ``[0, 1]`` (peak 1, PSNR averaged over frames/images); latents use the dense
    latents' range as the peak and one PSNR over the whole tensor. PSNR is ``inf`` for identical outputs.
    SSIM needs image-shaped tensors (``None`` for packed token latents) and uses an 11-pixel Gaussian
    window, or the largest odd one that fits smaller latents.
    """
    if x.shape != ref.shape:
        raise ValueError(f"{kind}: shape {tuple(x.shape)} differs from the dense run's {tuple(ref.shape)}")
    x, ref = x.double(), ref.double()
    a, b = _images(x, kind), _images(ref, kind)
    if kind == "decoded":
        peak = 1.0
    else:
        peak = float(ref.max() - ref.min()) or 1.0
    if kind == "decoded" and a is not None:
        psnr = float(metrics.psnr(a, b, data_range=peak))
    else:
        psnr = float(metrics.psnr(x.reshape(1, 1, 1, -1), ref.reshape(1, 1, 1, -1), data_range=peak))
    ssim = window = None
    if a is not None:
        window = _ssim_window(a.shape[-2], a.shape[-1])
        if window is not None:
            ssim = _ssim_chunked(a, b, peak, window)
    diff = float((x - ref).abs().max())
    return {
        "psnr": psnr,
        "ssim": ssim,
        "rel_l2": float(metrics.rel_l2(x.reshape(1, -1), ref.reshape(1, -1))),
        "max_abs": diff,
        "exact": diff == 0.0,
        "peak": peak,
        "ssim_window": window,
        "shape": list(x.shape),
    }


def _mean_metrics(rows: list[dict | None]) -> dict | None:
    rows = [r for r in rows if r is not None]
    if not rows:
        return None
    out = {}
    for key in ("psnr", "ssim", "rel_l2", "max_abs"):
        vals = [r[key] for r in rows if r.get(key) is not None]
        out[key] = sum(vals) / len(vals) if vals else None
    out["exact_runs"] = sum(bool(r["exact"]) for r in rows)
    out["runs"] = len(rows)
    return out


def _mean(vals) -> float | None:
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None


# -------------------------------------------------------------------------------------- environment


def environment(pipe=None) -> dict:
    """Device, library versions and the pipeline's placement."""
    from importlib import metadata

    import fastattn

    def version(pkg):
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    device = _pipe_device(pipe) if pipe is not None else torch.device("cpu")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{device.type} ({platform.processor() or platform.machine()})"
    return {
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": version("triton"),
        "diffusers": version("diffusers"),
        "transformers": version("transformers"),
        "fastattn": fastattn.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _pipe_device(pipe) -> torch.device:
    for attr in ("_execution_device", "device"):
        try:
            dev = getattr(pipe, attr)
        except Exception:
            continue
        if isinstance(dev, torch.device):
            return dev
    return torch.device("cpu")


def pipeline_info(pipe, source: str | None = None) -> dict:
    from ..pipelines.families import adapter_for
    from ..pipelines.integration import find_transformers

    models, _ = find_transformers(pipe)
    components = getattr(pipe, "components", {}) or {}
    dtype = next((p.dtype for p in models[0].parameters()), None) if models else None
    return {
        "class": type(pipe).__name__,
        "source": source,
        "components": {k: type(v).__name__ for k, v in components.items() if v is not None},
        "transformers": [{"class": type(m).__name__, "family": adapter_for(m).family} for m in models],
        "dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
        "device": str(_pipe_device(pipe)),
        "vae": has_vae(pipe),
    }


# -------------------------------------------------------------------------------------- validation


def validate_configs(pipe, configs: Sequence[EvalConfig]) -> None:
    """Build every configuration's plan for every transformer of ``pipe`` before anything runs; errors
    are fastattn's own (they list the valid presets / methods), prefixed with the configuration."""
    from ..pipelines.families import adapter_for
    from ..pipelines.integration import find_transformers
    from ..plans.build import make_plan

    try:
        models, _ = find_transformers(pipe)
    except ValueError as e:
        raise EvalInputError(str(e)) from None
    for c in configs:
        kw = dict(c.enable_kwargs)
        kw.pop("num_steps", None)
        preset, method, density, plan = (kw.pop(k, None) for k in ("preset", "method", "density", "plan"))
        if preset is None and method is None and plan is None:
            preset = "balanced"
        for m in models:
            try:
                make_plan(adapter_for(m).family, preset, method, density, plan, **kw)
            except (ValueError, TypeError) as e:
                raise EvalInputError(f"configuration {c.label!r}: {e}") from None


def _check_inputs(pipe, configs, prompts, seeds) -> tuple[list[EvalConfig], list[str], list[int]]:
    if not callable(pipe) or not hasattr(pipe, "components"):
        raise EvalInputError(f"expected a diffusers pipeline, got {type(pipe).__name__}")
    if getattr(pipe, "_fastattn_handle", None) is not None:
        raise EvalInputError(
            "fastattn is already enabled on this pipeline; call pipe.disable_fast_attention() first so the "
            "dense baseline is the unpatched model"
        )
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = [p for p in (prompts or []) if isinstance(p, str) and p.strip()] if prompts else []
    if not prompts:
        raise EvalInputError(
            "no prompts: give at least one (--prompts 'a cat' 'a dog' or --prompts-file FILE)"
        )
    if isinstance(seeds, int):
        seeds = [seeds]
    seeds = [int(s) for s in (seeds or [])]
    if not seeds:
        raise EvalInputError("no seeds: give at least one (--seeds 0 1)")
    if isinstance(configs, (str, dict, EvalConfig)):
        configs = [configs]
    try:
        configs = unique_labels([as_config(c) for c in (configs or [])])
    except (ValueError, TypeError) as e:
        raise EvalInputError(str(e)) from None
    if not configs:
        raise EvalInputError(
            "no configurations: give presets or method specs, e.g. ['balanced', 'window3d:0.3']"
        )
    return configs, prompts, seeds


# ------------------------------------------------------------------------------------------- stats


def _model_stats(handle) -> list[dict]:
    """``handle.stats()`` as one dict per enabled transformer (it returns the dict itself for one)."""
    stats = handle.stats()
    return [stats] if "models" not in stats else list(stats["models"])


def _stats_summary(handle) -> dict:
    """What ran under ``handle`` since its last ``reset_stats()``, from ``handle.stats()`` alone.

    ``handle.stats()`` folds in the device-side work of dynamic masks, so its density is the one to report.
    Counters are summed over the transformers; ``density`` is theirs weighted by attention work where the
    stats give it (``work_total``), else by calls (exact when the transformers share shapes, e.g. Wan 2.2's
    two experts). ``fallbacks`` are every dense fallback with its reason, the kernel's own prefixed
    ``kernel:``; ``models`` keeps each transformer's full stats.
    """
    models = _model_stats(handle)
    fallbacks, planned, notes = Counter(), Counter(), Counter()
    for m in models:
        fallbacks.update(m.get("fallbacks", {}))
        planned.update(m.get("planned_dense", {}))
        notes.update(m.get("notes", {}))
    calls = sum(m["calls"] for m in models)
    sparse = sum(m["sparse_calls"] for m in models)
    if len(models) == 1:
        density = models[0]["density"]
    else:
        weight = "work_total" if all("work_total" in m for m in models) else "calls"
        total = sum(m[weight] for m in models)
        density = sum(m["density"] * m[weight] for m in models) / total if total else 1.0
    return {
        "density": density,
        "calls": calls,
        "sparse_calls": sparse,
        "dense_calls": calls - sparse,
        "planned_dense": dict(planned),
        "fallbacks": dict(fallbacks),
        "fallback_calls": sum(fallbacks.values()),
        "notes": dict(notes),
        "plan": [m.get("plan") for m in models],
        "models": models,
    }


# -------------------------------------------------------------------------------------------- main


def evaluate_pipeline(
    pipe,
    configs,
    prompts: Sequence[str] | str | None = None,
    seeds: Sequence[int] | int = (0,),
    *,
    steps: int | None = None,
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
    call_kwargs: dict | None = None,
    call_kwargs_fn: Callable[[str, int], dict] | None = None,
    defaults: dict | None = None,
    attn_layers: int | None = 4,
    attn_rows: int | None = 1024,
    warmup: bool = True,
    progress: bool = True,
    stop_on_error: bool = False,
    source: str | None = None,
    on_update: Callable[[dict], None] | None = None,
) -> dict:
    """Run ``pipe`` dense and under each configuration on every (prompt, seed); return the report dict.

    Args:
        pipe: a diffusers pipeline with a transformer fastattn supports (not already enabled).
        configs: spec strings (``"balanced"``, ``"window3d:0.3,quant=int8"``, see :mod:`.configs`), dicts
            of ``fastattn.enable`` keywords, or :class:`EvalConfig`; each is compared with the same dense
            outputs.
        prompts, seeds: every prompt runs with every seed (a CPU ``torch.Generator`` per run).
        steps, height, width, num_frames: passed as ``num_inference_steps``/... only where
            ``pipe.__call__`` takes them (the others are listed in the report's ``ignored_args``).
        call_kwargs: more keywords for every call (e.g. ``guidance_scale``); an error if not accepted.
        call_kwargs_fn: ``(prompt, seed) -> dict`` merged into each call's keywords (e.g. precomputed
            ``prompt_embeds``; then ``prompt`` is not passed).
        defaults: ``fastattn.enable`` keywords for every configuration that does not set them
            (``{"block_size": 8, "quant": "int8"}``).
        attn_layers, attn_rows: attention-error sampling per transformer forward and per call
            (``attn_layers=0`` switches the probe off; ``None``: every call / every row).
        warmup: run prompt 0 / seed 0 once untimed first, dense and per configuration.
        progress: a tqdm bar over all runs.
        stop_on_error: re-raise when a configuration fails; by default its error and traceback are
            recorded in its entry (``"error"``) and the other configurations still run.
        source: where the pipeline came from (recorded in the report).
        on_update: called with the report so far once everything is validated (before the first pipeline
            call), after the dense runs and after each configuration; ``fastattn eval`` writes it as a
            partial ``report.json`` there, so a run stopped midway keeps what it measured.

    Raises:
        EvalInputError: bad prompts, seeds, configurations (fastattn's message with the valid choices) or
            pipeline arguments; raised before anything runs.
    """
    from tqdm.auto import tqdm

    configs, prompts, seeds = _check_inputs(pipe, configs, prompts, seeds)
    if attn_layers is not None and (not isinstance(attn_layers, int) or attn_layers < 0):
        raise EvalInputError(
            f"attn_layers must be a number of calls per forward >= 0 or None, got {attn_layers!r}"
        )
    if attn_rows is not None and (not isinstance(attn_rows, int) or attn_rows < 1):
        raise EvalInputError(f"attn_rows must be a number of query rows >= 1 or None, got {attn_rows!r}")
    configs = [c.with_defaults(defaults or {}) for c in configs]
    validate_configs(pipe, configs)
    base, ignored = build_call_kwargs(pipe, steps, height, width, num_frames, call_kwargs)
    names, var_kw = call_parameters(pipe)
    runs = [(p, s) for p in prompts for s in seeds]

    def kwargs_for(prompt: str, seed: int) -> dict:
        kw = dict(base)
        if "prompt" in names or var_kw:
            kw["prompt"] = prompt
        if "generator" in names or var_kw:
            kw["generator"] = torch.Generator("cpu").manual_seed(seed)
        if call_kwargs_fn is not None:
            extra = dict(call_kwargs_fn(prompt, seed) or {})
            if "prompt_embeds" in extra and "prompt" not in extra:
                kw.pop("prompt", None)
            kw.update(extra)
        return kw

    probe_on = attn_layers is None or attn_layers > 0
    per_config = len(runs) + (1 if warmup or probe_on else 0)
    total = (len(runs) + (1 if warmup else 0)) + len(configs) * per_config
    report: dict = {
        "format": FORMAT,
        "version": VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "env": environment(pipe),
        "pipeline": pipeline_info(pipe, source),
        "settings": {
            "prompts": prompts,
            "seeds": seeds,
            "call_args": {k: v for k, v in base.items()},
            "ignored_args": ignored,
            "defaults": dict(defaults or {}),
            "warmup": warmup,
            "attn_layers": attn_layers,
            "attn_rows": attn_rows,
            "metrics": {
                "latents": "what vae.decode receives (or the output_type='latent' output without a VAE); "
                "PSNR peak = dense latents' range",
                "decoded": "output_type='pt' frames/images in [0, 1]; PSNR averaged over frames",
                "psnr_null": "null PSNR means identical outputs (infinite PSNR); see exact_runs",
            },
        },
    }
    if report["env"]["device_type"] == "cpu":
        report["settings"]["timing_note"] = (
            "on the CPU fastattn runs its exact PyTorch reference, not the GPU kernel: times and speedups "
            "here say nothing about performance"
        )
    results: list[dict] = []
    report["configs"] = results  # filled as configurations finish (partial reports show them)
    if on_update is not None:
        on_update(report)
    bar = tqdm(total=total, desc="dense", unit="run", disable=not progress)
    with torch.no_grad(), _QuietPipeline(pipe), _DecodeCapture(pipe) as capture:
        # ---------------------------------------------------------------- dense baseline
        warm = _run_once(pipe, kwargs_for(*runs[0]), capture) if warmup else None
        if warmup:
            bar.update()
        dense = []
        for p, s in runs:
            dense.append(_run_once(pipe, kwargs_for(p, s), capture))
            bar.update()
        dense_time = _mean(r["time_s"] for r in dense)
        dense_decode = _mean(r["decode_s"] for r in dense)
        report["dense"] = {
            "time_s": dense_time,
            "decode_s": dense_decode,
            "runs": [
                {"prompt": p, "seed": s, "time_s": r["time_s"], "decode_s": r["decode_s"]}
                for (p, s), r in zip(runs, dense)
            ],
            # The same dense run twice: the noise floor of the comparison (0 / null PSNR when repeatable).
            "repeat": _compare_run(warm, dense[0]) if warm is not None else None,
        }
        del warm
        if on_update is not None:
            on_update(report)
        # ---------------------------------------------------------------- each configuration
        for config in configs:
            bar.set_description(config.label)
            done_before = bar.n
            try:
                results.append(
                    _evaluate_config(
                        pipe,
                        config,
                        runs,
                        dense,
                        kwargs_for,
                        capture,
                        bar,
                        warmup,
                        probe_on,
                        attn_layers,
                        attn_rows,
                        report["dense"],
                    )  # fmt: skip
                )
            except Exception as e:  # one failing configuration must not lose the others' results
                if stop_on_error:
                    raise
                warnings.warn(f"fastattn eval: configuration {config.label!r} failed: {e}", stacklevel=2)
                results.append(
                    {
                        "label": config.label,
                        "enable": dict(config.enable_kwargs),
                        "error": f"{type(e).__name__}: {e}",
                        "traceback": traceback.format_exc(),
                    }
                )
                bar.update(max(0, done_before + per_config - bar.n))
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.empty_cache()
            if on_update is not None:
                on_update(report)
    bar.close()
    return report


def _evaluate_config(
    pipe,
    config,
    runs,
    dense,
    kwargs_for,
    capture,
    bar,
    warmup,
    probe_on,
    attn_layers,
    attn_rows,
    dense_report,
) -> dict:
    """One configuration: enable, (probed warm-up), timed runs compared with ``dense``, stats, disable."""
    import fastattn

    handle = fastattn.enable(pipe, **config.enable_kwargs)
    try:
        probe = AttentionErrorProbe(handle.runtimes, attn_layers, attn_rows) if probe_on else None
        first = None
        if warmup:  # untimed; it also measures the attention error, so timed runs carry no probe
            first = _probed(pipe, kwargs_for(*runs[0]), capture, probe)
            bar.update()
        handle.reset_stats()
        timed, first_timed = [], None
        for i, ((p, s), ref) in enumerate(zip(runs, dense)):
            out = _run_once(pipe, kwargs_for(p, s), capture)
            if i == 0:
                first_timed = out
            row = {"prompt": p, "seed": s, "time_s": out["time_s"], "decode_s": out["decode_s"]}
            row.update(_compare_run(out, ref))
            timed.append(row)
            bar.update()
        stats = _stats_summary(handle)
        if not warmup and probe is not None:  # after the timed runs, for the same reason
            first = _probed(pipe, kwargs_for(*runs[0]), capture, probe)
            bar.update()
        # The untimed run (with the probe) and the timed run of prompt 0 / seed 0: bit-identical?
        repeatable = _identical(first, first_timed) if first is not None else None
        del first, first_timed
    finally:
        handle.disable()
    dense_time, dense_decode = dense_report["time_s"], dense_report["decode_s"]
    t = _mean(r["time_s"] for r in timed)
    dec = _mean(r["decode_s"] for r in timed)
    denoise_fast = t - dec if dec is not None else t
    denoise_dense = dense_time - dense_decode if dense_decode is not None else dense_time
    return {
        "label": config.label,
        "enable": dict(config.enable_kwargs),
        "runs": timed,
        "mean": {
            "latents": _mean_metrics([r["latents"] for r in timed]),
            "decoded": _mean_metrics([r["decoded"] for r in timed]),
        },
        "time_s": t,
        "decode_s": dec,
        "speedup": dense_time / t if t else None,
        "denoise_speedup": denoise_dense / denoise_fast if denoise_fast else None,
        "repeatable": repeatable,
        "attention_error": probe.summary() if probe is not None else None,
        **stats,
    }


def _probed(pipe, kwargs, capture, probe) -> dict:
    if probe is None:
        return _run_once(pipe, kwargs, capture)
    with probe:
        return _run_once(pipe, kwargs, capture)


def _identical(a: dict, b: dict) -> bool:
    for key in ("latents", "decoded"):
        x, y = a[key], b[key]
        if (x is None) != (y is None) or (x is not None and not torch.equal(x, y)):
            return False
    return True


def _compare_run(out: dict, ref: dict) -> dict:
    return {
        "latents": compare(out["latents"], ref["latents"], "latents")
        if out["latents"] is not None and ref["latents"] is not None
        else None,
        "decoded": compare(out["decoded"], ref["decoded"], "decoded")
        if out["decoded"] is not None and ref["decoded"] is not None
        else None,
    }


def quality_point(config_result: dict) -> tuple[str, float | None]:
    """``(which, mean PSNR)`` a configuration is plotted at: decoded PSNR where there is one, else latent."""
    for which in ("decoded", "latents"):
        m = config_result["mean"].get(which)
        if m is not None and m.get("psnr") is not None:
            return which, m["psnr"]
    return "latents", None


def finite_or_none(x):
    """JSON-safe floats: ``inf``/``nan`` become ``None``."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
