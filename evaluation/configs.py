"""The configurations ``fastattn eval`` compares against dense, written as short specs.

A spec is ``NAME[:DENSITY][,key=value...]``; ``NAME`` is a method (``dense``, ``window3d``, ``radial``,
``band``, ``arrow``, ``dynamic``) or else a preset (``safe``, ``balanced``, ``fast``, ``family/level`` or a
preset ``.json``)::

    balanced                                   the model family's balanced preset
    balanced,quant=int8-fp8,dense_steps=0      the preset with knobs overridden
    window3d:0.3                               method window3d at block density 0.3
    window3d:0.3,dense_layers=[0,-1]           ... with the first and last layer dense
    window3d,window=[1,4,4]                    ... with an explicit window instead of a density
    dynamic,top_p=0.9

Values are read as JSON where they parse (numbers, ``true``/``false``, ``null``, ``[lists]`` which become
tuples), else as plain strings. Every key is a keyword of :func:`fastattn.enable`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

KINDS = ("preset", "method")


@dataclass(frozen=True)
class EvalConfig:
    """One configuration: a label for the report and the keywords passed to ``fastattn.enable``.

    ``EvalConfig("int8", {"method": "dense", "quant": "int8"})``
    """

    label: str
    enable_kwargs: dict = field(default_factory=dict)

    def with_defaults(self, defaults: dict) -> EvalConfig:
        """The same config with ``defaults`` filled in where the spec names no value."""
        merged = {k: v for k, v in defaults.items() if v is not None}
        merged.update(self.enable_kwargs)
        return EvalConfig(self.label, merged)


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets: ``"a,b=[1,2],c"`` -> ``["a", "b=[1,2]", "c"]``."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts]


def _value(text: str):
    try:
        v = json.loads(text.replace("(", "[").replace(")", "]"))
    except ValueError:
        return text
    return tuple(v) if isinstance(v, list) else v


def parse_spec(spec: str, kind: str | None = None) -> EvalConfig:
    """``"window3d:0.3,quant=int8"`` -> ``EvalConfig("window3d:0.3,quant=int8", {"method": ..., ...})``.

    ``kind`` is ``"preset"``, ``"method"`` or ``None`` (a known method name is a method, anything else a
    preset). Raises ``ValueError`` naming the expected form.
    """
    from ..plans.methods import METHODS

    if kind not in (None, *KINDS):
        raise ValueError(f"kind must be one of {KINDS} or None, got {kind!r}")
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("empty configuration; expected NAME[:DENSITY][,key=value...], e.g. 'window3d:0.3'")
    head, *pairs = _split_top(spec.strip())
    name, _, density = head.partition(":")
    name = name.strip()
    if not name:
        raise ValueError(f"configuration {spec!r} names no preset or method (NAME[:DENSITY][,key=value...])")
    if kind is None:
        kind = "method" if name.lower() in METHODS else "preset"
    kwargs: dict = {kind: name.lower() if kind == "method" else name}
    if density.strip():
        try:
            kwargs["density"] = float(density)
        except ValueError:
            raise ValueError(
                f"configuration {spec!r}: the part after ':' must be a density like 0.3, got {density!r}"
            ) from None
    for pair in pairs:
        key, eq, text = pair.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier():
            raise ValueError(
                f"configuration {spec!r}: expected key=value after the name, got {pair!r} "
                "(e.g. 'window3d:0.3,quant=int8,dense_layers=[0,-1]')"
            )
        if key in KINDS:
            raise ValueError(f"configuration {spec!r}: {key}= goes first, as the NAME")
        kwargs[key] = _value(text.strip())
    return EvalConfig(spec.strip(), kwargs)


def as_config(config) -> EvalConfig:
    """An :class:`EvalConfig` from an ``EvalConfig``, a spec string or a dict of ``enable`` keywords."""
    if isinstance(config, EvalConfig):
        return config
    if isinstance(config, str):
        return parse_spec(config)
    if isinstance(config, dict):
        kwargs = dict(config)
        label = kwargs.pop("label", None) or ",".join(f"{k}={v}" for k, v in kwargs.items()) or "balanced"
        return EvalConfig(str(label), kwargs)
    raise TypeError(
        f"a configuration is a spec string ('window3d:0.3'), a dict of fastattn.enable keywords or an "
        f"EvalConfig; got {type(config).__name__}"
    )


def unique_labels(configs: list[EvalConfig]) -> list[EvalConfig]:
    """Labels made unique (``label``, ``label #2``...) so every config has its own row."""
    seen: dict[str, int] = {}
    out = []
    for c in configs:
        n = seen.get(c.label, 0) + 1
        seen[c.label] = n
        out.append(c if n == 1 else EvalConfig(f"{c.label} #{n}", c.enable_kwargs))
    return out
