"""The Fast Attention Calibrate and Save Plan nodes' logic, testable without ComfyUI.

- :func:`calibrate_model` (node *Fast Attention Calibrate*, MODEL + conditioning + LATENT -> PLAN): runs the
  sampler ``runs`` times on clones of the model with fastattn's observation plan installed (the same
  override and forward bracket as the Fast Attention node), and calibrates a per-head plan
  (:func:`fastattn.calibration.run_calibration` through :class:`ComfyTarget`). The input MODEL is never
  changed. The PLAN goes straight into a Fast Attention node or a Save Plan node.
- :func:`save_plan` (node *Save Plan*): writes the plan directory under ComfyUI's output folder and, with a
  repo id, pushes it to the Hugging Face Hub with the token of the environment (``HF_TOKEN``) or the stored
  login: no token is ever a node input, so none ends up in the workflow JSON.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .fast_attention import NodeError, PlanChoice, diffusion_model_of
from .host.families import detect_family
from .host.install import find_patch, install
from .host.patch import FastAttentionPatch

PLAN_FOLDER = "fastattn_plans"  # under ComfyUI's output directory


@dataclass(frozen=True)
class CalibratedPlan(PlanChoice):
    """The PLAN of a Calibrate node: a plan choice that also carries its calibration report."""

    report: dict | None = None


class _Handle:
    """What calibration needs of an enabled model: its runtimes, its stats, and undoing it (dropping the clone)."""

    def __init__(self, target, patch: FastAttentionPatch):
        self.target, self.patch = target, patch
        self.runtimes = [patch.runtime]

    def stats(self) -> dict:
        out = self.patch.runtime.stats.as_dict()
        out["fallbacks"] = {**out["fallbacks"], **self.patch.host_calls}  # calls the override never served
        return out

    def disable(self) -> None:
        self.target.current = None  # the clone carried the patch; the input MODEL never did


class ComfyTarget:
    """A calibration target over a ComfyUI MODEL: one sampler call per run, on the same conditioning and
    latent, with seeds ``seed + i`` (prompts are run indices)."""

    default_steps = 20

    def __init__(self, model, positive, negative, latent, *, cfg: float, sampler_name: str, scheduler: str,
                 sample_fn=None, sparse_fn=None):  # fmt: skip
        family, reason = detect_family(diffusion_model_of(model))
        if family is None:
            raise NodeError(f"Fast Attention Calibrate needs a model fastattn serves: {reason}")
        if find_patch(model) is not None:
            raise NodeError(
                "this MODEL already has Fast Attention applied: connect the model before the Fast Attention node, "
                "so calibration observes the model's own attention"
            )
        if not isinstance(latent, dict) or "samples" not in latent:
            raise NodeError(
                "latent_image must be a LATENT (e.g. from Empty Latent Image / EmptyHunyuanLatentVideo)"
            )
        self.model, self.family = model, family
        self.positive, self.negative, self.latent = positive, negative, latent
        self.cfg, self.sampler_name, self.scheduler = cfg, sampler_name, scheduler
        self.sample_fn = sample_fn or comfy_sample
        self.sparse_fn = sparse_fn
        self.fingerprint = family.fingerprint()
        self.num_layers, self.num_heads, self.head_dim = family.num_layers, family.num_heads, family.head_dim
        self.current = None

    def normalize_prompts(self, prompts) -> list:
        return list(prompts)

    def describe_run(self) -> dict:
        shape = list(self.latent["samples"].shape)
        return {"cfg": self.cfg, "sampler": self.sampler_name, "scheduler": self.scheduler, "latent": shape}

    def enable(self, plan):
        patch = FastAttentionPatch(self.family, plan, settings={"calibration": "observing"},
                                   sparse_fn=self.sparse_fn)  # fmt: skip
        clone = self.model.clone()
        install(clone, patch)
        self.current = clone
        return _Handle(self, patch)

    def run(self, prompt, steps: int, seed: int):
        return self.sample_fn(self.current if self.current is not None else self.model, seed=seed, steps=steps,
                              cfg=self.cfg, sampler_name=self.sampler_name, scheduler=self.scheduler,
                              positive=self.positive, negative=self.negative, latent=self.latent)  # fmt: skip


def comfy_sample(model, *, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent):
    """One sampler call through ComfyUI's own sampling API; returns the denoised latent."""
    import comfy.sample

    image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(image, seed, latent.get("batch_index"))
    return comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, image,
                               noise_mask=latent.get("noise_mask"), disable_pbar=True, seed=seed)  # fmt: skip


def calibrate_model(model, positive, negative, latent, *, seed: int = 0, runs: int = 2, steps: int = 20,
                    cfg: float = 5.0, sampler_name: str = "euler", scheduler: str = "simple",
                    target_density: float = 0.3, on_progress=None, sample_fn=None, sparse_fn=None,
                    **kwargs) -> tuple[PlanChoice, str]:  # fmt: skip
    """Calibrate a per-head plan for ``model`` (the Calibrate node); returns ``(PLAN, report text)``.

    ``kwargs`` go to :func:`fastattn.calibration.run_calibration` (``block_size=``, ``methods=``...).
    """
    from ..calibration import BudgetError, CalibrationError, run_calibration

    for name, v, lo in (("runs", runs, 1), ("steps", steps, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise NodeError(f"{name} must be an int >= {lo}, got {v!r}")
    target = ComfyTarget(model, positive, negative, latent, cfg=cfg, sampler_name=sampler_name,
                         scheduler=scheduler, sample_fn=sample_fn, sparse_fn=sparse_fn)  # fmt: skip
    try:
        result = run_calibration(target, list(range(runs)), target_density=target_density, steps=steps,
                                 seed=seed, progress=False, on_progress=on_progress, **kwargs)  # fmt: skip
    except (CalibrationError, BudgetError) as e:
        raise NodeError(str(e)) from None
    s = result.report["summary"]
    source = f"calibrated {target.family.family} ({runs} run(s), {steps} steps, target {target_density:g})"
    text = (
        f"fastattn calibration: {source}\n"
        f"expected attention work {s['expected_work']:.3f}, estimated error {s['estimated_error']:.2e}, "
        f"estimated attention time {s['estimated_attention_time_vs_dense']:.2f}x dense\n"
        f"families: {s['families']}\nreused heads {s['reused_heads']}, skipped {s['skipped_heads']}, "
        f"reordered {s['reordered_heads']}; calibrated in {s['calibration_seconds']:.1f} s"
    )
    return CalibratedPlan(source, result.plan, result.meta, result.report), text


def save_plan(plan: PlanChoice, name: str, hub_repo: str = "", private: bool = True, output_dir=None) -> str:
    """Write ``plan`` to ``<output>/fastattn_plans/<name>/`` and, with ``hub_repo``, push it; returns where."""
    if not isinstance(plan, PlanChoice):
        raise NodeError(
            f"the plan input must come from a Fast Attention Calibrate or Plan node, got {type(plan).__name__}"
        )
    name = (name or "").strip()
    if not re.fullmatch(r"[\w.-]+", name) or name in (".", ".."):
        raise NodeError(f"name {name!r}: use letters, digits, '.', '_' and '-' (a folder name, no path)")
    if output_dir is None:
        import folder_paths

        output_dir = folder_paths.get_output_directory()
    where = Path(output_dir) / PLAN_FOLDER / name
    try:
        plan.plan.save(where, plan.meta)
    except OSError as e:
        raise NodeError(f"could not write the plan to {where}: {e.strerror or e}") from None
    report = getattr(plan, "report", None)
    if report is not None:
        from ..calibration.report import write_report

        write_report(report, where)
    out = f"saved {where}"
    repo = (hub_repo or "").strip()
    if repo:
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
            raise NodeError(f"hub_repo {repo!r}: expected owner/name")
        from ..plans.hub import PlanHubError, push_plan

        try:
            address = push_plan(plan.plan, repo, meta=plan.meta, private=bool(private))
        except (PlanHubError, OSError, ValueError) as e:
            raise NodeError(f"saved {where}, but the Hub push failed: {e}") from None
        out += f"; pushed {address}"
    return out
