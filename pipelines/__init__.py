"""diffusers integration: backend registration, family adapters, hooks, and the pipeline methods.

``attach_pipeline_methods()`` adds ``enable_fast_attention`` / ``disable_fast_attention`` to diffusers'
``DiffusionPipeline`` *only if absent*, and only once diffusers is imported: if it already is, now;
otherwise a tiny import hook does it when ``diffusers.pipelines.pipeline_utils`` finishes loading. So
``import fastattn`` never imports diffusers. Set ``FASTATTN_NO_PIPELINE_METHODS=1`` to opt out.
"""

from __future__ import annotations

import importlib.abc
import os
import sys

_TARGET_MODULE = "diffusers.pipelines.pipeline_utils"
OPT_OUT_ENV = "FASTATTN_NO_PIPELINE_METHODS"


def enable_fast_attention(self, preset=None, **kwargs):
    """Run this pipeline's transformer attention through fastattn (see ``fastattn.enable``)."""
    from ..api import enable

    return enable(self, preset, **kwargs)


def disable_fast_attention(self):
    """Restore the pipeline's attention exactly as before ``enable_fast_attention``."""
    from ..api import disable

    return disable(self)


def _attach(module) -> bool:
    cls = getattr(module, "DiffusionPipeline", None)
    if cls is None:
        return False
    if not hasattr(cls, "enable_fast_attention"):
        cls.enable_fast_attention = enable_fast_attention
    if not hasattr(cls, "disable_fast_attention"):
        cls.disable_fast_attention = disable_fast_attention
    return True


class _AttachOnImport(importlib.abc.MetaPathFinder):
    """Runs ``_attach`` right after diffusers' pipeline_utils module executes, then removes itself."""

    # Recognised by this marker, not by class identity: a second copy of this module (the package
    # imported under another name) must not install a finder that recurses into this one.
    _fastattn_attach_finder = True

    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET_MODULE:
            return None
        for finder in sys.meta_path:
            if getattr(finder, "_fastattn_attach_finder", False) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                loader = spec.loader
                original = loader.exec_module

                def exec_module(module, _original=original):
                    _original(module)
                    _attach(module)
                    _remove_finder()

                loader.exec_module = exec_module
                return spec
        return None


def _remove_finder() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "_fastattn_attach_finder", False)]


def attach_pipeline_methods() -> bool:
    """Add the pipeline methods now if diffusers is loaded, else when it is. Returns True if attached now."""
    if os.environ.get(OPT_OUT_ENV) == "1":
        return False
    mod = sys.modules.get(_TARGET_MODULE)
    if mod is not None:
        return _attach(mod)
    if not any(getattr(f, "_fastattn_attach_finder", False) for f in sys.meta_path):
        sys.meta_path.insert(0, _AttachOnImport())
    return False


def __getattr__(name):
    # Lazy: importing fastattn.pipelines must not import diffusers.
    if name in ("Handle", "ModelHandle"):
        from . import integration

        return getattr(integration, name)
    raise AttributeError(name)


__all__ = ["OPT_OUT_ENV", "attach_pipeline_methods", "disable_fast_attention", "enable_fast_attention"]
