"""What a plan file says about where its plan came from and which model it fits.

:class:`PlanMeta` is the ``meta`` object of a plan file's ``plan.json`` header. :class:`ModelFingerprint` names
the model a plan was made for (family, class, self-attention layers, heads, head_dim); the adapter builds one
for the model a plan is applied to, and :func:`fastattn.plans.files.check_fingerprint` compares the two. Every
field but ``family`` may be ``None`` (unknown / fits any): a structural preset fits every model of its family.

Both parse strictly from JSON (:meth:`PlanMeta.from_dict`): unknown names and wrong types are refused with the
name of the file.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from ..masks.layout import TokenLayout

_SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_DIM = 1 << 20  # any layer / head / head_dim / step count / token count above this is not a real model


@dataclass(frozen=True)
class ModelFingerprint:
    """The model a plan was made for, or that a plan is applied to.

    Args:
        family: adapter family (``"wan"``, ``"flux"``...).
        model_class: the transformer's class name (``"WanTransformer3DModel"``); informational.
        num_layers: self-attention layers. num_heads: attention heads per layer. head_dim: channels per head.
    """

    family: str
    model_class: str | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    head_dim: int | None = None

    def __post_init__(self):
        if not isinstance(self.family, str) or not self.family:
            raise TypeError(f"family must be a non-empty string, got {self.family!r}")
        if self.model_class is not None and not isinstance(self.model_class, str):
            raise TypeError(f"model_class must be a string or None, got {self.model_class!r}")
        for name in ("num_layers", "num_heads", "head_dim"):
            _check_count(name, getattr(self, name))

    def differences(self, other: ModelFingerprint) -> list[str]:
        """``["layers: plan 40, model 30", ...]`` for every field both sides know and that differs
        (family, num_layers, num_heads, head_dim; ``model_class`` is informational and never compared)."""
        out = []
        for name, label in (("family", "family"), ("num_layers", "layers"), ("num_heads", "heads"),
                            ("head_dim", "head_dim")):  # fmt: skip
            a, b = getattr(self, name), getattr(other, name)
            if a is not None and b is not None and a != b:
                out.append(f"{label}: plan {a!r}, model {b!r}")
        return out


@dataclass(frozen=True)
class PlanMeta:
    """Provenance and fit of a plan file (JSON-able; the ``meta`` object of ``plan.json``).

    Args:
        model: the model the plan was made for; ``None``: any model (then the plan itself limits it).
        layout: the token layout (seq_len, text_len, text_first, grid ``(F, H, W)``) it was made for, or None.
        steps: denoising steps of the runs it was made for (calibration), or None.
        creator: what made it (``"fastattn.calibrate"``, ``"fastattn.presets.structural"``, a user's tool).
        creator_params: the creator's parameters (JSON object: prompts, error budget...).
        density: expected fraction of 128x128 block pairs computed, or None.
        bits: expected attention bit-width (16 for bf16, 8 for int8/fp8...), or None.
        doc: one line for humans.
        fastattn_version: the fastattn that wrote it, if the creator recorded it.
        tensors_sha256: sha256 (hex) of ``plan.safetensors``; ``None`` when the plan has no head table.
            Filled by ``save_plan``.
    """

    model: ModelFingerprint | None = None
    layout: TokenLayout | None = None
    steps: int | None = None
    creator: str = ""
    creator_params: dict = field(default_factory=dict)
    density: float | None = None
    bits: float | None = None
    doc: str = ""
    fastattn_version: str | None = None
    tensors_sha256: str | None = None

    def __post_init__(self):
        if self.model is not None and not isinstance(self.model, ModelFingerprint):
            raise TypeError(f"model must be a ModelFingerprint or None, got {type(self.model).__name__}")
        if self.layout is not None and not isinstance(self.layout, TokenLayout):
            raise TypeError(f"layout must be a TokenLayout or None, got {type(self.layout).__name__}")
        _check_count("steps", self.steps)
        for name in ("creator", "doc"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a string, got {getattr(self, name)!r}")
        if self.fastattn_version is not None and not isinstance(self.fastattn_version, str):
            raise TypeError(f"fastattn_version must be a string or None, got {self.fastattn_version!r}")
        if not isinstance(self.creator_params, dict):
            raise TypeError(f"creator_params must be a JSON object, got {type(self.creator_params).__name__}")
        if self.density is not None and (not _is_number(self.density) or not 0.0 < self.density <= 1.0):
            raise ValueError(f"density must be a fraction in (0, 1] or None, got {self.density!r}")
        if self.bits is not None and (not _is_number(self.bits) or not 0 < self.bits <= 64):
            raise ValueError(f"bits must be a bit-width in (0, 64] or None, got {self.bits!r}")
        sha = self.tensors_sha256
        if sha is not None and not (isinstance(sha, str) and _SHA256.fullmatch(sha)):
            raise ValueError(f"tensors_sha256 must be 64 lowercase hex digits or None, got {sha!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"] = dataclasses.asdict(self.model) if self.model else None
        if self.layout is not None:
            lay = self.layout
            d["layout"] = {"seq_len": lay.seq_len, "text_len": lay.text_len, "text_first": lay.text_first,
                           "grid": list(lay.grid) if lay.grid else None}  # fmt: skip
        return d

    @classmethod
    def from_dict(cls, data, source: str = "meta") -> PlanMeta:
        """Strict inverse of :meth:`to_dict`: unknown or missing structure and wrong types raise ValueError."""
        data = _object(data, source, {f.name for f in dataclasses.fields(cls)})
        data = dict(data)
        try:
            if data.get("model") is not None:
                model = _object(
                    data["model"], f"{source}.model", {f.name for f in dataclasses.fields(ModelFingerprint)}
                )
                data["model"] = ModelFingerprint(**model)
            if data.get("layout") is not None:
                lay = _object(
                    data["layout"], f"{source}.layout", {"seq_len", "text_len", "text_first", "grid"}
                )
                data["layout"] = _layout(lay, f"{source}.layout")
            return cls(**data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None


def _layout(d: dict, source: str) -> TokenLayout:
    if d.get("seq_len") is None:
        raise ValueError("layout needs seq_len")
    for name in ("seq_len", "text_len"):
        _check_count(name, d.get(name), zero_ok=name == "text_len")
    if not isinstance(d.get("text_first", True), bool):
        raise TypeError(f"text_first must be true or false, got {d['text_first']!r}")
    grid = d.get("grid")
    if grid is not None:
        if not isinstance(grid, list) or len(grid) != 3:
            raise TypeError(f"grid must be [F, H, W] or null, got {grid!r}")
        for g in grid:
            _check_count("grid entry", g)
        grid = tuple(grid)
    return TokenLayout(d["seq_len"], d.get("text_len", 0), d.get("text_first", True), grid)


def _object(data, source: str, known: set) -> dict:
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
    return data


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_count(name: str, v, zero_ok: bool = False) -> None:
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int) or not (0 if zero_ok else 1) <= v <= MAX_DIM:
        raise ValueError(f"{name} must be an int in [{0 if zero_ok else 1}, {MAX_DIM}] or None, got {v!r}")
