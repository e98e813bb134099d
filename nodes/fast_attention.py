"""The Fast Attention nodes' logic as plain functions: testable without ComfyUI, called by the thin V3
classes in ``comfy_nodes.py``.

- :func:`apply_fast_attention` (node *Fast Attention*, MODEL -> MODEL): detect the model's family, build the
  plan, install the override on a ``clone()``; the input model is never changed.
- :func:`load_plan_choice` (node *Fast Attention Plan* -> PLAN): a shipped plan, a local plan directory or
  ``hf://owner/repo[/subdir][@revision]``, loaded (and fetched) when the node runs.
- :func:`report_text` (node *Fast Attention Report* -> STRING): what ran in the model's last sampling run.
- :func:`parse_dense_blocks`: ``"0,1,38-39"`` -> ``(0, 1, 38, 39)``, with errors that say what was expected.

Errors a user can fix are :class:`NodeError` (a ``ValueError``): ComfyUI shows the message on the node and
the queue goes on with the next prompt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..plans.schema import AttentionPlan
from .host.families import ComfyFamily, detect_family
from .host.install import find_patch, install
from .host.patch import FastAttentionPatch
from .host.report import format_report
from .host.schedule import SCHEDULES

PLAN_TYPE = "FASTATTN_PLAN"  # the custom ComfyUI io type of a plan
PRESETS = ("balanced", "safe", "fast", "custom")
METHODS = ("window3d", "radial", "band", "arrow", "dynamic", "dense")
QUANTS = ("default", "none", "int8", "int8-fp8", "fp8")
PLAN_PATH = "path or hf://"
_NO_DENSITY = ("dense", "dynamic")


class NodeError(ValueError):
    """A node input that cannot work, with what was expected."""


# ------------------------------------------------------------------------------------------ dense_blocks


def parse_dense_blocks(text: str, num_layers: int | None = None) -> tuple[int, ...]:
    """``"0,1,38-39"`` -> ``(0, 1, 38, 39)``: block numbers and inclusive ranges, comma separated.

    Blocks count the model's self-attention blocks in forward order from 0 (Flux: the 19 double blocks
    are 0-18, the 38 single blocks 19-56). With ``num_layers`` a block the model does not have is refused.
    """
    if text is None:
        return ()
    if not isinstance(text, str):
        raise NodeError(f"dense_blocks must be a string like '0,1,38-39', got {type(text).__name__}")
    blocks: set[int] = set()
    for part in text.split(","):
        item = part.strip()
        if not item:
            continue
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", item)
        if m is None:
            raise NodeError(
                f"dense_blocks: {item!r} is not a block number or range; expected e.g. '0,1,38-39'"
            )
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise NodeError(
                f"dense_blocks: range {item!r} runs backwards; write it low-high, e.g. '{hi}-{lo}'"
            )
        if num_layers is not None and hi >= num_layers:
            raise NodeError(f"dense_blocks: block {hi} does not exist; this model has {num_layers} self-attention "
                            f"blocks (0-{num_layers - 1})")  # fmt: skip
        blocks.update(range(lo, hi + 1))
    return tuple(sorted(blocks))


# ------------------------------------------------------------------------------------------ plans


@dataclass(frozen=True)
class PlanChoice:
    """The PLAN a Fast Attention Plan node outputs: a plan file's plan and meta, checked against the model
    when Fast Attention applies it."""

    source: str
    plan: AttentionPlan
    meta: object = None  # fastattn.plans.meta.PlanMeta

    def resolve(self, family: ComfyFamily) -> AttentionPlan:
        from ..plans.files import PlanMismatchError, check_fingerprint

        try:
            if self.meta is not None:
                check_fingerprint(self.meta, family.fingerprint())
        except PlanMismatchError as e:
            raise NodeError(f"plan {self.source}: {e}") from None
        return self.plan


def plan_sources() -> list[str]:
    """The Plan node's choices: ``"path or hf://"`` then the shipped plans (``flux-balanced``...)."""
    from ..plans.files import shipped_plans
    from .host.families import CLASSES

    families = {family for family, _ in CLASSES.values()}
    return [PLAN_PATH, *(p.name for p in shipped_plans() if p.name.rsplit("-", 1)[0] in families)]


def load_plan_choice(source: str, location: str = "") -> PlanChoice:
    """Load a shipped plan (``source`` one of :func:`plan_sources`) or, for ``"path or hf://"``, the plan at
    ``location``: a plan directory, its ``plan.json`` or ``hf://owner/repo[/subdir][@revision]`` (fetched
    through huggingface_hub: its cache and ``HF_HUB_OFFLINE=1`` apply)."""
    from ..plans.files import PlanFileError, load_plan, shipped_plans

    if source == PLAN_PATH:
        where = (location or "").strip()
        if not where:
            raise NodeError("location is empty: give a plan directory, its plan.json, or "
                            "hf://owner/repo[/subdir][@revision]")  # fmt: skip
    else:
        found = {p.name: p for p in shipped_plans()}
        if source not in found:
            raise NodeError(f"unknown plan {source!r}; choose {PLAN_PATH!r} or one of {sorted(found)}")
        where = str(found[source])
    try:
        loaded = load_plan(where)
    except (PlanFileError, FileNotFoundError, ValueError, OSError) as e:
        raise NodeError(f"could not load plan {where}: {e}") from None
    return PlanChoice(where if source == PLAN_PATH else source, loaded.plan, loaded.meta)


def build_plan(family: ComfyFamily, preset: str = "balanced", method: str = "window3d", density: float = 0.3,
               quant: str = "default", dense_blocks: tuple[int, ...] = (), plan: PlanChoice | None = None,
               ) -> AttentionPlan:  # fmt: skip
    """The plan for ``family``: the PLAN input if given, else the family's ``preset``, else (``"custom"``)
    ``method`` at ``density``; then ``quant`` (unless ``"default"``) and ``dense_blocks`` on top."""
    from ..plans.build import make_plan

    if quant not in QUANTS:
        raise NodeError(f"unknown quant {quant!r}; choose one of {list(QUANTS)}")
    try:
        if plan is not None:
            if not isinstance(plan, PlanChoice):
                raise NodeError(
                    f"the plan input must come from a Fast Attention Plan node, got {type(plan).__name__}"
                )
            base = plan.resolve(family)
        elif preset in PRESETS[:3]:
            base = make_plan(family.family, preset)
        elif preset == "custom":
            if method not in METHODS:
                raise NodeError(f"unknown method {method!r}; choose one of {list(METHODS)}")
            extra = {} if method in _NO_DENSITY else {"density": float(density), "clamp_density": True}
            base = make_plan(family.family, method=method, **extra)
        else:
            raise NodeError(f"unknown preset {preset!r}; choose one of {list(PRESETS)}")
        if quant != "default":
            base = base.replace(quant=quant)
        if dense_blocks:
            base = base.replace(dense_layers=tuple(sorted(set(base.dense_layers) | set(dense_blocks))))
        if family.num_layers:
            base.check_model(family.num_layers, family.num_heads)
    except NodeError:
        raise
    except (TypeError, ValueError) as e:
        raise NodeError(f"{family.family}: {e}") from None
    return base


# ------------------------------------------------------------------------------------------ apply


def diffusion_model_of(model):
    """``model``'s diffusion model (object patches considered where the ModelPatcher supports them)."""
    get = getattr(model, "get_model_object", None)
    if get is not None:
        try:
            return get("diffusion_model")
        except (AttributeError, KeyError):
            pass
    return model.model.diffusion_model


def sigma_window(model, start_percent: float, end_percent: float) -> tuple[float | None, float | None]:
    """``(sigma_start, sigma_end)`` as ComfyUI's core nodes compute them (``model_sampling.percent_to_sigma``);
    ``(None, None)`` for the whole run."""
    for name, v in (("start_percent", start_percent), ("end_percent", end_percent)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise NodeError(f"{name} must be a fraction of the run in [0, 1], got {v!r}")
    if start_percent > end_percent:
        raise NodeError(f"start_percent {start_percent} is after end_percent {end_percent}")
    if start_percent == 0.0 and end_percent == 1.0:
        return None, None
    get = getattr(model, "get_model_object", None)
    ms = get("model_sampling") if get is not None else model.model.model_sampling
    return float(ms.percent_to_sigma(start_percent)), float(ms.percent_to_sigma(end_percent))


def apply_fast_attention(model, preset: str = "balanced", method: str = "window3d", density: float = 0.3,
                         quant: str = "default", start_percent: float = 0.0, end_percent: float = 1.0,
                         dense_blocks: str = "", plan: PlanChoice | None = None, *, sparse_fn=None,
                         default_attention=None, book=SCHEDULES):  # fmt: skip
    """A ``clone()`` of ``model`` with fastattn installed (the Fast Attention node). A model fastattn cannot
    serve yet passes through: the clone runs the host's attention and the report says why."""
    family, reason = detect_family(diffusion_model_of(model))
    blocks = parse_dense_blocks(dense_blocks, family.num_layers if family else None)
    window = sigma_window(model, start_percent, end_percent)
    settings = {"preset": preset} if plan is None else {"plan": plan.source}
    if plan is None and preset == "custom":
        settings.update(method=method, density=density)
    settings.update(quant=quant, start_percent=start_percent, end_percent=end_percent,
                    dense_blocks=",".join(map(str, blocks)) or "none")  # fmt: skip
    if family is None:
        patch = FastAttentionPatch(None, settings=settings, reason=reason, book=book)
    else:
        built = build_plan(family, preset, method, density, quant, blocks, plan)
        below = find_patch(model)
        if below is not None and below.plan is not None and not built.cache.enabled:
            # a Fast Attention Cache node applied before this one: its caching stays on the new plan
            built = built.replace(cache=below.plan.cache, cache_budget_gb=below.plan.cache_budget_gb,
                                  cache_storage=below.plan.cache_storage, cache_offload=below.plan.cache_offload)  # fmt: skip
        patch = FastAttentionPatch(family, built, sigma_start=window[0], sigma_end=window[1], settings=settings,
                                   book=book, sparse_fn=sparse_fn, default_attention=default_attention)  # fmt: skip
    patched = model.clone()
    install(patched, patch)
    return patched


def report_text(model) -> str:
    """The Report node's text for ``model`` (a MODEL patched by Fast Attention)."""
    patch = find_patch(model)
    if patch is None:
        return "fastattn is not applied to this model: connect the MODEL output of a Fast Attention node"
    return format_report(patch.report())
