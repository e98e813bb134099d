"""Building a plan from what a user names: a preset, a plan, or a method plus settings.

Host-neutral: the diffusers adapter, the ComfyUI nodes and the testbed all call :func:`make_plan` with
the model's family; nothing here knows a host.
"""

from __future__ import annotations

from pathlib import Path

from .methods import METHODS, MethodConfig, describe
from .schema import AttentionPlan


def make_plan(
    family: str,
    preset: str | None = None,
    method=None,
    density: float | None = None,
    plan: AttentionPlan | None = None,
    *,
    fingerprint=None,
    **settings,
) -> AttentionPlan:
    """The :class:`AttentionPlan` for a model of ``family`` from a preset, a plan, or a method plus settings.

    ``settings`` are the plan's fields and the method's parameters (``quant=``, ``dense_steps=``,
    ``window=``...); ``None`` values are ignored. Explicit settings override the preset's
    (``preset="balanced", quant="none"``). Unknown names are refused with the list of known ones.

    A preset may also be a plan file: ``hf://owner/repo[/subdir][@revision]``, a plan directory or its
    ``plan.json``. It is checked against ``fingerprint`` (a :class:`~fastattn.plans.meta.ModelFingerprint`
    of the model it will run on; by default only ``family`` is known) and refused when made for another model.
    """
    settings = {k: v for k, v in settings.items() if v is not None}
    if plan is not None:
        if preset is not None or method is not None:
            raise ValueError("give one of plan=, preset= or method=")
        if not isinstance(plan, AttentionPlan):
            raise TypeError(f"plan must be an AttentionPlan, got {type(plan).__name__}")
        if density is not None:
            settings["density"] = density
        if not settings:
            return plan
        return AttentionPlan.from_dict({**plan.to_dict(), **settings}, "plan").replace(heads=plan.heads)
    if preset is not None and method is not None:
        raise ValueError(f"give preset= or method=, not both (got preset={preset!r}, method={method!r})")
    fields: dict = {}
    source = "settings"
    if preset is not None:
        from ..presets import resolve_preset
        from .files import is_plan_source, load_plan
        from .meta import ModelFingerprint

        if is_plan_source(preset):  # hf://owner/repo[/subdir][@rev], a plan directory or its plan.json
            fingerprint = fingerprint or ModelFingerprint(family=family)
            if fingerprint.family != family:
                raise ValueError(f"fingerprint is for family {fingerprint.family!r}, make_plan for {family!r}")
            base = load_plan(preset, fingerprint=fingerprint).plan
            if density is None and not settings:
                return base
            fields = {**base.to_dict(), **settings}
            if density is not None:
                fields["density"] = density
                if "clamp_density" not in settings:
                    fields.pop("clamp_density", None)
                for geometric in ("window", "factor"):
                    if geometric not in settings:
                        fields.pop(geometric, None)
            return AttentionPlan.from_dict(fields, f"plan {preset!r}").replace(heads=base.heads)
        fields = resolve_preset(preset, family)
        source = f"preset {preset!r}"
    elif method is None:
        raise ValueError(f"give preset= ('safe', 'balanced', 'fast') or method= (one of {sorted(METHODS)})")
    if method is not None:
        fields = describe(method) if isinstance(method, MethodConfig) else {"method": method}
    if density is not None:
        fields["density"] = density
        if "clamp_density" not in settings:
            fields.pop("clamp_density", None)  # a density the user asks for is checked, not clamped
        for geometric in ("window", "factor"):  # a density replaces the preset's geometric parameter
            fields.pop(geometric, None)
    fields.update(settings)
    return AttentionPlan.from_dict(fields, source)


def export_structural_presets(out_dir) -> list[Path]:
    """Write every structural preset (``presets/structural.json``) as a plan directory
    ``out_dir/<family>-<level>/`` (``plan.json`` only: structural plans have no head table)."""
    from ..presets import structural_presets
    from .files import QUANT_BITS, save_plan
    from .meta import ModelFingerprint, PlanMeta

    out = []
    for family, levels in structural_presets().items():
        for level, fields in levels.items():
            name = f"{family}/{level}"
            plan = make_plan(family, name)
            meta = PlanMeta(model=ModelFingerprint(family=family), creator="fastattn.presets.structural",
                            creator_params={"preset": name}, density=fields.get("density"),
                            bits=QUANT_BITS[plan.quant], doc=fields.get("doc", ""))  # fmt: skip
            out.append(save_plan(plan, Path(out_dir) / f"{family}-{level}", meta))
    return out
