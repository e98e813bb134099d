"""``fastattn.calibrate``: observe a few real denoising runs, choose per head, return a per-head plan.

    import fastattn
    plan = fastattn.calibrate(pipe, ["a red fox in snow", "a city at night"], target_density=0.3, steps=30)
    plan.save("my-plan")                         # plan.json + plan.safetensors
    fastattn.enable(pipe, plan=plan)

Steps:

1. The model runs each prompt under an *observation plan* (every self-attention call through the kernel
   with a full mask: exact attention, the dense trajectory) with a
   :class:`~fastattn.calibration.observe.CalibrationObserver` registered on the runtime
   (``runtime.add_observer``: nothing is monkeypatched). Per (step group, layer, head) it accumulates the
   error of every candidate from sampled query rows.
2. After each prompt the observations are checkpointed (``checkpoint_dir``); a run interrupted later
   resumes from there with the same arguments.
3. :mod:`~fastattn.calibration.select` chooses per head under ``target_density`` or ``error_budget`` with
   the cost model of our kernels; :mod:`~fastattn.calibration.build` writes the plan.

The model is restored before anything is returned or raised.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..masks.layout import TokenLayout
from ..plans.meta import PlanMeta
from ..plans.methods import StripesConfig, describe, method_from_name
from ..plans.schema import AttentionPlan
from . import build as B
from .candidates import DEFAULT_METHODS, Candidate, CandidateSet, resolve_methods
from .costs import CostModel
from .observe import CalibrationObserver, Observations
from .select import BudgetError, Selection, _totals, select

CHECKPOINT_FORMAT = "fastattn-calibration-checkpoint"
CHECKPOINT_VERSION = 3  # 2: reuse errors per distance (observe.MAX_REUSE); 3: pooled block mass (blockmap)
DEFAULT_BITS = ("none", "int8-fp8", "fp8")
# the observation plan: every key of every query (text rows/columns dense), served by the kernel
OBSERVE_METHOD = StripesConfig(key_ranges=((0.0, 1.0),))


class CalibrationError(ValueError):
    """Bad input to calibration, or a run that gave nothing to calibrate from."""


class CalibrationInterrupted(KeyboardInterrupt):
    """Calibration stopped before every prompt ran (Ctrl-C); the message says what was saved."""


@dataclass
class CalibrationResult:
    """What :func:`run_calibration` returns: the plan, its file meta, the report, and the raw material (the
    observations, and the candidates and options the selection chose among)."""

    plan: AttentionPlan
    meta: PlanMeta
    report: dict
    selection: Selection
    observations: Observations
    candidates: CandidateSet | None = None
    options: B.Options | None = None

    def save(self, directory) -> Path:
        """Plan directory (``plan.json`` + ``plan.safetensors``) plus ``report.json`` and ``head_map.png``."""
        from .report import write_report

        d = self.plan.save(directory, self.meta)
        write_report(self.report, d)
        return d


TARGET_PROTOCOL = ("fingerprint", "num_layers", "num_heads", "head_dim", "default_steps", "normalize_prompts",
                   "describe_run", "enable", "run")  # fmt: skip


def target_for(obj, run_kwargs: dict):
    """The host adapter calibration runs ``obj`` through: the testbed model, a diffusers pipeline, or a
    ready target of another host (an object with every name of ``TARGET_PROTOCOL``, e.g. the ComfyUI node's:
    ``enable(plan)`` returns a handle with ``runtimes``, ``stats()`` and ``disable()``; ``run(prompt, steps,
    seed)`` runs one denoising and returns its output tensor or None)."""
    from ..testbed.model import TestbedDiT

    if all(hasattr(obj, name) for name in TARGET_PROTOCOL):
        if run_kwargs:
            raise CalibrationError(f"a calibration target takes no run arguments, got {sorted(run_kwargs)}")
        return obj

    if isinstance(obj, TestbedDiT):
        from .host_testbed import TestbedTarget

        return TestbedTarget(obj, run_kwargs)
    from .host_diffusers import DiffusersTarget, is_pipeline

    if is_pipeline(obj) or hasattr(obj, "attn_processors"):
        try:
            import diffusers  # noqa: F401
        except ImportError:
            raise CalibrationError("calibrating a diffusers model needs diffusers installed") from None
        return DiffusersTarget(obj, run_kwargs)
    raise CalibrationError(
        f"calibration has no adapter for {type(obj).__name__}: pass a diffusers pipeline (a supported "
        "transformer family), the fastattn testbed model, or use the ComfyUI 'Fast Attention Calibrate' node"
    )


def _check_budget(target_density, error_budget) -> None:
    if target_density is None and error_budget is None:
        raise CalibrationError(
            "give target_density= (share of attention work to keep, e.g. 0.3) or error_budget= (e.g. 0.02)"
        )
    for name, v, hi in (("target_density", target_density, 1.0), ("error_budget", error_budget, None)):
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or (hi is not None and v > hi):
            rng = "in (0, 1]" if hi else "> 0"
            raise CalibrationError(f"{name} must be a number {rng}, got {v!r}")


def run_calibration(
    pipe_or_model,
    prompts,
    *,
    target_density: float | None = None,
    error_budget: float | None = None,
    methods=DEFAULT_METHODS,
    steps: int | None = None,
    seed: int = 0,
    step_groups: int | None = None,
    bits=DEFAULT_BITS,
    quant_tolerance: float = 1e-4,
    block_size: int = 128,
    rows_per_block: int = 8,
    residual: bool = False,
    cost_table=None,
    checkpoint_dir=None,
    sensitivity_prompts: int = 1,
    sensitivity_rounds: int = 1,
    progress: bool = True,
    on_progress=None,
    **run_kwargs,
) -> CalibrationResult:
    """Calibrate a per-head plan; see :func:`calibrate` for the arguments. Returns the plan with its meta
    and report (``result.save(dir)`` writes all three)."""
    t_start = time.perf_counter()
    _check_budget(target_density, error_budget)
    try:
        names = resolve_methods(methods)
    except (TypeError, ValueError) as e:
        raise CalibrationError(str(e)) from None
    bits = _check_bits(bits)
    for name, v in (("steps", steps), ("step_groups", step_groups), ("block_size", block_size),
                    ("rows_per_block", rows_per_block)):  # fmt: skip
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise CalibrationError(f"{name} must be a positive int, got {v!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise CalibrationError(f"seed must be an int, got {seed!r}")
    if not isinstance(residual, bool):
        raise CalibrationError(f"residual must be True or False, got {residual!r}")
    cost = cost_table if isinstance(cost_table, CostModel) else CostModel.load(cost_table)
    try:
        target = target_for(pipe_or_model, run_kwargs)
        prompts = target.normalize_prompts(prompts)
    except (TypeError, ValueError) as e:
        raise CalibrationError(str(e)) from None
    if not prompts:
        raise CalibrationError("no prompts: calibration needs at least one prompt to observe")
    steps = steps or target.default_steps
    groups = min(step_groups or min(steps, 16), steps)
    bounds = B.step_bounds(groups)
    if target.num_layers is None or target.num_heads is None:
        raise CalibrationError(
            f"cannot tell the layers and heads of {type(pipe_or_model).__name__} from its config"
        )
    settings = {
        "model": dataclasses.asdict(target.fingerprint), "prompts": _jsonable(prompts), "steps": steps, "seed": seed,
        "step_groups": groups, "bits": list(bits), "methods": list(names), "block_size": block_size,
        "rows_per_block": rows_per_block, "run": _jsonable(target.describe_run()),
    }  # fmt: skip
    ckpt = _Checkpoint(checkpoint_dir, settings) if checkpoint_dir is not None else None
    observer = CalibrationObserver(names, target.num_layers, target.num_heads, bounds, steps, bits, block_size,
                                   rows_per_block, seed, candidates=ckpt.candidates if ckpt else None)  # fmt: skip
    total_obs = _observe(target, prompts, steps, seed, observer, ckpt, progress, on_progress)
    layout = observer.layout
    cs = observer.candidate_set(layout)
    dense_ms = cost.dense_head_ms(layout.seq_len, target.head_dim or 64, 1, target.num_heads)
    weights = B.step_weights(bounds, steps)
    exact_share = 1.0 / steps if residual else 0.0  # WA-RS: the first step captures with an exact call
    if residual:
        weights = weights.clone()
        weights[0] = (weights[0] - exact_share).clamp_min(0.0)
    quant_in_solve = error_budget is not None
    try:
        options = B.make_problem(total_obs, cs, bits, weights, cost, dense_ms, quant_in_solve=quant_in_solve)
    except ValueError as e:
        raise CalibrationError(str(e)) from None
    options.problem.exact_share = exact_share

    def choose():
        try:
            sel = select(options.problem, target_density=target_density, error_budget=error_budget)
        except BudgetError as e:
            raise BudgetError(str(e)) from None
        if not quant_in_solve:
            sel.choice = B.lower_bits(options, sel, cs, bits, quant_tolerance, cost)
            tot = _totals(options.problem, sel.choice, sel.reuse, sel.dense_rows)
            sel.work, sel.error, sel.time = tot["work"], tot["err"], tot["time"]
        return B.with_capture_step(sel, options.problem.weights) if residual else sel

    sel = choose()
    gains = None
    base_err, base_reuse = options.problem.err.clone(), options.problem.reuse_err.clone()
    for _ in range(sensitivity_rounds if sensitivity_prompts and groups > 1 else 0):
        probe_prompts = list(enumerate(prompts))[: int(sensitivity_prompts)]
        g = _sensitivity(
            target, probe_prompts, steps, seed, options, sel, cs, bits, bounds, block_size, progress
        )
        if g is None:
            break
        gains = g if gains is None else gains * g
        options.problem.err = base_err * gains[:, :, None, None]
        options.problem.reuse_err = base_reuse * gains[:, :, None, None]
        sel = choose()
    plan = B.make_plan(options, sel, cs, bits, bounds, block_size, residual=residual)
    elapsed = time.perf_counter() - t_start
    from .. import __version__
    from .report import build_report

    report = build_report(options, sel, cs, total_obs, bits, layout, settings, cost, elapsed,
                          target_density=target_density, error_budget=error_budget)  # fmt: skip
    report["summary"]["residual"] = residual
    report["summary"]["step_sensitivity"] = (
        None if gains is None else [round(float(x), 4) for x in gains[:, 0]]
    )
    quant_bits = {"none": 16, "int8": 8, "int8-fp8": 8, "fp8": 8, "int4": 4, "int4-fp8": 4}
    meta = PlanMeta(
        model=target.fingerprint, layout=layout, steps=steps, creator="fastattn.calibrate",
        creator_params={k: v for k, v in settings.items() if k not in ("model",)}
        | {"target_density": target_density, "error_budget": error_budget, "quant_tolerance": quant_tolerance,
           "residual": residual,
           "cost_table": cost.source[:200]},
        density=max(min(sel.work, 1.0), 1e-6), bits=report["summary"]["mean_bits"] or quant_bits["none"],
        doc=f"calibrated per head on {len(prompts)} prompt(s): expected attention work {sel.work:.3f}, "
            f"estimated error {sel.error:.2e}", fastattn_version=__version__,
    )  # fmt: skip
    return CalibrationResult(plan, meta, report, sel, total_obs, cs, options)


def calibrate(
    pipe_or_model,
    prompts,
    *,
    target_density: float | None = None,
    error_budget: float | None = None,
    methods=DEFAULT_METHODS,
    steps: int | None = None,
    seed: int = 0,
    out=None,
    **kwargs,
) -> AttentionPlan:
    """Calibrate a per-head attention plan on ``prompts``; returns an :class:`~fastattn.plans.AttentionPlan`.

    Args:
        pipe_or_model: a diffusers pipeline with a supported transformer, or the fastattn testbed model.
        prompts: strings or dicts of pipeline arguments (diffusers); class labels or ``(label, seed)`` pairs
            (testbed).
        target_density: share of the attention work to keep (the runtime's ``density``, dense steps and
            layers included): the plan with the least estimated error doing at most that much.
        error_budget: mean relative squared error of a layer's attention output (over steps and layers)
            the plan may make: the fastest plan by the cost model within it. Give either or both.
        methods: candidate families (``"paro"``, ``"sparse_vdit"``, ``"ditfastattn"``, ``"structural"``) or
            method names (``"window3d"``, ``"window3d_reordered"``, ``"blockmap"`` (PARO's per-head block
            maps, thresholded from the observed attention; part of ``"paro"``), ``"band"``,
            ``"multi_diagonal"``, ``"stripes"``, ``"skip"``, ``"arrow"``, ``"reuse"``, ``"radial"``); dense is
            always a candidate.
        steps: denoising steps of each observed run (default: the testbed's 16 / the pipeline's default).
        seed: seed of the runs (prompt ``i`` uses ``seed + i``) and of the sampled query rows; the same seed
            gives the same plan.
        out: a directory: the plan (``plan.json`` + ``plan.safetensors``), ``report.json`` and
            ``head_map.png`` are written there.
        **kwargs: ``step_groups`` (default ``min(steps, 16)``), ``bits`` (bit-widths to consider, default
            ``("none", "int8-fp8", "fp8")``), ``quant_tolerance`` (with ``target_density`` alone: a head drops
            to a lower bit-width when that adds at most this much to its error; default 1e-4), ``block_size``
            (128), ``rows_per_block`` (sampled query rows per query block, 8), ``cost_table`` (a JSON path or
            :class:`~fastattn.calibration.costs.CostModel`), ``checkpoint_dir`` (resumable observations),
            ``residual`` (DiTFastAttn's WA-RS on top of the plan: the first step runs exact and keeps
            ``R = exact - approximate`` per layer, later steps add it to their approximate heads; its exact step
            counts in ``target_density``; default False), ``sensitivity_prompts`` (prompts run to measure how much each step group's error costs in the final
            output, default 1; 0: off) and ``sensitivity_rounds`` (re-measure after re-selecting, default 1),
            ``progress`` (tqdm bar), ``on_progress(done, total)``; anything else goes to every run (e.g.
            ``height=``, ``num_frames=``, ``guidance_scale=``; testbed: ``frames=``, ``size=``).

    Raises:
        CalibrationError: bad input, or prompts that produced no attention calls.
        BudgetError: a budget no plan of these candidates meets (the message says what they reach).
        CalibrationInterrupted: Ctrl-C; the message says what the checkpoint holds.
    """
    result = run_calibration(pipe_or_model, prompts, target_density=target_density, error_budget=error_budget,
                             methods=methods, steps=steps, seed=seed, **kwargs)  # fmt: skip
    if out is not None:
        result.save(out)
    return result.plan


# ---------------------------------------------------------------------------------------- phases


def _observe(target, prompts, steps, seed, observer, ckpt, progress, on_progress) -> Observations:
    """Run every prompt not yet in the checkpoint under the observation plan; the summed observations."""
    done = set(ckpt.done) if ckpt else set()
    total = ckpt.observations if ckpt else None
    if ckpt and ckpt.layout is not None:
        observer.layout = ckpt.layout
    if total is not None:
        observer.mass_base = total.block_mass
    handle = target.enable(AttentionPlan(method=OBSERVE_METHOD, block_size=observer.block_size))
    stats, current = None, None
    try:
        remove = [rt.add_observer(observer) for rt in handle.runtimes]
        bar = _bar(len(prompts), len(done), progress, "calibrating: observing prompts")
        for i, prompt in enumerate(prompts):
            if i in done:
                continue
            current = i
            observer.new_run()
            observer.obs = None  # this prompt's observations, added to the total once it finished
            target.run(prompt, steps, seed + i)
            if observer.obs is None:
                break  # no call observed: reported below
            if total is None:
                total = observer.obs.clone()
            else:
                total.add(observer.obs)
            observer.mass_base = total.block_mass
            done.add(i)
            if ckpt:
                ckpt.save(sorted(done), total, observer.candidates, observer.layout)
            bar.update(1)
            if on_progress is not None:
                on_progress(len(done), len(prompts))
        current = None
        bar.close()
        for r in remove:
            r()
        stats = handle.stats()
    except KeyboardInterrupt:
        saved = (
            f"the {len(done)} finished prompt(s) are saved in {ckpt.dir}: call again with the same "
            "arguments and checkpoint_dir to resume"
            if ckpt and done
            else "nothing was saved (pass checkpoint_dir= to make a calibration resumable)"
        )
        where = f" during prompt {current + 1} of {len(prompts)}" if current is not None else ""
        raise CalibrationInterrupted(f"calibration interrupted{where}; {saved}") from None
    finally:
        handle.disable()
    if total is None:
        reasons = {**stats.get("planned_dense", {}), **stats.get("fallbacks", {})} if stats else {}
        raise CalibrationError(
            "the prompts produced no self-attention call calibration could observe"
            + (f" (calls served dense: {reasons})" if reasons else " (the model made no self-attention call)")
            + "; check the model runs on a supported device and dtype (bf16/fp16 on a GPU) and the prompts run"
        )
    return total


def _sensitivity(target, prompts, steps, seed, options, sel, cs, bits, bounds, block_size, progress):
    """How much a unit of estimated attention error costs in the final output, per step group.

    Early steps fix the layout of the picture: an attention error there is carried through every later
    step, one at the end is not. The observations cannot see that, so the selected plan is run with only
    one step group as chosen (the rest exact, see :func:`_probe`), for each group, and the final output's
    relative squared error against the exact run is divided by what the observations estimated for that
    probe. Returns ``[G, 1]`` gains with weighted mean 1, or None when the host returns no output to compare.
    """
    from .select import _quantities

    p = options.problem
    g_count, l_count = p.err.shape[:2]

    def estimate(s) -> float:
        err = _quantities(p, s.choice, s.reuse, s.dense_rows)["err"].sum(-1)
        return float((err * p.weights[:, None]).sum() / l_count)

    probes = {}
    for g in range(g_count):
        probe = _probe(sel, options, g)
        est = estimate(probe)
        if est > 0:
            probes[g] = (probe, est)
    measured = dict.fromkeys(probes, 0.0)
    bar = _bar(len(probes) * len(prompts), 0, progress, "calibrating: step sensitivity")
    for i, prompt in prompts:
        ref = target.run(prompt, steps, seed + i)  # the model's own attention: nothing enabled
        if ref is None:
            bar.close()
            return None
        for g, (probe, _) in probes.items():
            plan = B.make_plan(options, probe, cs, bits, bounds, block_size)
            handle = target.enable(plan)
            try:
                out = target.run(prompt, steps, seed + i)
            finally:
                handle.disable()
            err = (out.double() - ref.double()).pow(2).sum() / ref.double().pow(2).sum().clamp_min(1e-30)
            measured[g] += float(err) / len(prompts)
            bar.update(1)
    bar.close()
    if not probes:
        return None
    gains = torch.ones(g_count, dtype=torch.float64)
    for g, (_, est) in probes.items():
        gains[g] = measured[g] / est
    _fill_unmeasured(gains, list(probes))
    gains = gains.clamp_min(1e-6)
    gains = gains / float((gains * p.weights).sum())
    return gains[:, None]


def _probe(sel, options, g: int):
    """The selection with only step group ``g`` as chosen and every other group exact.

    A head that reuses in ``g`` keeps its whole chain: the groups it reused before ``g`` still reuse (their
    other heads run exact through the kernel), so it returns the output it would return in the full plan.
    """
    exact = torch.ones_like(sel.dense_rows)
    reuse = torch.zeros_like(sel.reuse)
    choice = sel.choice.clone()
    exact[g], reuse[g] = sel.dense_rows[g], sel.reuse[g]
    dist = sel.reuse_distance()
    dense_option = options.pairs.index((0, 0))  # candidate 0 is dense, bit-width 0 is 16-bit
    for layer, h in (reuse[g] & (dist[g] > 1)).nonzero().tolist():
        for back in range(1, int(dist[g, layer, h])):
            row = g - back
            if exact[row, layer]:
                exact[row, layer] = False
                choice[row, layer] = dense_option
            reuse[row, layer, h] = True
    return dataclasses.replace(sel, choice=choice, reuse=reuse, dense_rows=exact)


def _fill_unmeasured(x: torch.Tensor, measured: list[int]) -> None:
    """Entries nobody measured (rows the plan left exact) take the nearest measured entry's value."""
    if not measured:
        return
    idx = torch.tensor(measured)
    for i in range(len(x)):
        if i not in measured:
            x[i] = x[idx[(idx - i).abs().argmin()]]


# ---------------------------------------------------------------------------------------- helpers


def _check_bits(bits) -> tuple[str, ...]:
    from ..attn_kernels.quantize import MODES

    if isinstance(bits, str):
        bits = (bits,)
    bits = tuple(bits)
    bad = [b for b in bits if b not in MODES]
    if bad or not bits:
        raise CalibrationError(f"bits must name kernel bit-widths among {list(MODES)}, got {list(bits)}")
    return ("none",) + tuple(b for b in dict.fromkeys(bits) if b != "none")


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return f"tensor{list(x.shape)} sha256:{_tensor_hash(x)}"
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return repr(x)


def _tensor_hash(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def _bar(total: int, initial: int, enabled: bool, desc: str):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False)


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


class _Checkpoint:
    """Observations saved after every finished prompt: ``state.json`` + ``observations.safetensors``."""

    def __init__(self, directory, settings: dict):
        self.dir = Path(directory)
        self.settings = json.loads(json.dumps(settings))
        self.done: list[int] = []
        self.observations: Observations | None = None
        self.candidates: list[Candidate] | None = None
        self.layout: TokenLayout | None = None
        state_file = self.dir / "state.json"
        if self.dir.exists() and not self.dir.is_dir():
            raise CalibrationError(f"checkpoint_dir {self.dir} is a file; give a folder")
        if not state_file.exists():
            return
        try:
            state = json.loads(state_file.read_text())
        except json.JSONDecodeError as e:
            raise CalibrationError(f"{state_file} is not a calibration checkpoint ({e.msg})") from None
        if state.get("format") != CHECKPOINT_FORMAT:
            raise CalibrationError(f"{state_file} is not a fastattn calibration checkpoint")
        if state.get("version") != CHECKPOINT_VERSION:
            raise CalibrationError(
                f"checkpoint {self.dir} was written by another fastattn calibration version "
                f"({state.get('version')}, this one reads {CHECKPOINT_VERSION}); use a new checkpoint_dir"
            )
        diff = sorted(k for k in set(state["settings"]) | set(self.settings)
                      if state["settings"].get(k) != self.settings.get(k))  # fmt: skip
        if diff:
            raise CalibrationError(
                f"checkpoint {self.dir} was made with other calibration arguments (differing: {diff}); "
                "resume with the same model, prompts and settings, or use another checkpoint_dir"
            )
        from safetensors.torch import load_file

        self.observations = Observations.from_tensors(load_file(str(self.dir / "observations.safetensors")))
        self.done = list(state["done"])
        self.candidates = [
            Candidate(
                c["label"],
                c["family"],
                method_from_name(
                    c["method"]["method"], **{k: v for k, v in c["method"].items() if k != "method"}
                )
                if c["method"]
                else None,
                c["order"],
                c["reuse"],
            )  # fmt: skip
            for c in state["candidates"]
        ]
        lay = state["layout"]
        self.layout = TokenLayout(
            lay["seq_len"], lay["text_len"], lay["text_first"], tuple(lay["grid"]) if lay["grid"] else None
        )

    def save(self, done: list[int], obs: Observations, candidates, layout: TokenLayout) -> None:
        from safetensors.torch import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / ".observations.safetensors.tmp"
        save_file({k: v.contiguous() for k, v in obs.tensors().items()}, str(tmp))
        tmp.replace(self.dir / "observations.safetensors")
        state = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "settings": self.settings, "done": done,
            "candidates": [{"label": c.label, "family": c.family, "method": describe(c.method) if c.method else None,
                            "order": c.order, "reuse": c.reuse} for c in candidates],
            "layout": {"seq_len": layout.seq_len, "text_len": layout.text_len, "text_first": layout.text_first,
                       "grid": list(layout.grid) if layout.grid else None},
        }  # fmt: skip
        tmp = self.dir / ".state.json.tmp"
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.dir / "state.json")
