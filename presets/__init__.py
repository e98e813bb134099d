"""Structural presets: JSON data naming a method, a density and a bit-width per model family.

``resolve_preset("balanced", family="wan")`` returns the preset's fields; ``"wan/balanced"`` names the
family explicitly (an error if it is not the model's family); a path to a ``.json`` file holding one
preset object (same fields) loads a local preset. See ``structural.json`` for the documented densities.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

PRESET_DIR = Path(__file__).parent
LEVELS = ("safe", "balanced", "fast")


@functools.lru_cache(maxsize=1)
def structural_presets() -> dict:
    data = json.loads((PRESET_DIR / "structural.json").read_text())
    if data.get("format") != "fastattn-structural-presets":
        raise ValueError("presets/structural.json is not a fastattn structural preset file")
    return data["families"]


def preset_names(family: str | None = None) -> list[str]:
    fams = structural_presets()
    return [f"{f}/{lvl}" for f in fams if family in (None, f) for lvl in fams[f]]


def resolve_preset(name: str, family: str) -> dict:
    """Fields of preset ``name`` for a model of ``family``; clear errors list the valid choices."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"preset must be a non-empty string; valid presets here: {preset_names(family)}")
    if name.endswith(".json"):
        fields = _read_preset_file(Path(name))
        want = fields.pop("family", family)
        if want != family:
            raise ValueError(f"preset file {name} is for {want!r}, this model is {family!r}")
        return _clean(fields, name)
    fams = structural_presets()
    fam, _, level = name.rpartition("/")
    fam = fam or family
    if fam not in fams:
        raise ValueError(f"unknown preset family {fam!r} in {name!r}; families: {sorted(fams)}")
    if fam != family:
        raise ValueError(
            f"preset {name!r} is for {fam!r} models, but this model is {family!r}; "
            f"valid presets here: {preset_names(family)}"
        )
    if family not in fams:
        raise ValueError(
            f"no structural presets for family {family!r}; families with presets: {sorted(fams)}"
        )
    if level not in fams[family]:
        raise ValueError(
            f"unknown preset {name!r}; valid presets here: {preset_names(family)} (or {list(LEVELS)})"
        )
    return _clean(dict(fams[family][level]), name)


def _read_preset_file(path: Path) -> dict:
    """One preset object from a local ``.json`` file, with errors that name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"preset file {path} does not exist")
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"preset file {path} is not UTF-8 JSON text (a binary or pickled file?)") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"preset file {path} is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(fields, dict):
        raise ValueError(f"preset file {path} must hold one JSON object of plan settings, got {type(fields).__name__}")
    return fields


def _clean(fields: dict, name: str) -> dict:
    """The preset's settings; their names and values are checked by the plan schema
    (:meth:`fastattn.plans.AttentionPlan.from_dict`), the one list of known fields."""
    fields.pop("doc", None)
    return fields
