"""Quality and speed of fastattn on any diffusers pipeline, against its own dense attention.

``evaluate_pipeline(pipe, ["balanced", "window3d:0.3"], prompts, seeds)`` returns a report dict;
``write_report(report, folder)`` writes ``report.json``, ``report.png`` and ``report.html``; the
``fastattn eval`` command (:mod:`.cli`) does both for a pipeline folder. Nothing here is imported by
``import fastattn``; the names below load on first use.
"""

from __future__ import annotations

_EXPORTS = {
    "evaluate_pipeline": ".evaluate",
    "EvalInputError": ".evaluate",
    "compare": ".evaluate",
    "EvalConfig": ".configs",
    "parse_spec": ".configs",
    "AttentionErrorProbe": ".probe",
    "write_report": ".report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
