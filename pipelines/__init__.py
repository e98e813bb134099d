"""diffusers integration: backend registration, family adapters, hooks, and the pipeline methods.

``attach_pipeline_methods()`` adds ``enable_fast_attention`` / ``disable_fast_attention`` to diffusers'
``DiffusionPipeline`` *only if absent*, and only if diffusers is already imported: ``import fastattn``
calls it (after ``import diffusers`` the methods are there), and so does every ``fastattn.enable``. No
import hook, and ``import fastattn`` never imports diffusers. ``FASTATTN_NO_PIPELINE_METHODS=1`` opts out.
"""

from __future__ import annotations

import os
import sys

_TARGET_MODULE = "diffusers.pipelines.pipeline_utils"
OPT_OUT_ENV = "FASTATTN_NO_PIPELINE_METHODS"


def enable_fast_attention(self, preset=None, **kwargs):
    """Run this pipeline's transformer attention through fastattn (see ``fastattn.enable``)."""
    from .entry import enable

    return enable(self, preset, **kwargs)


def disable_fast_attention(self):
    """Restore the pipeline's attention exactly as before ``enable_fast_attention``."""
    from .entry import disable

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


def attach_pipeline_methods() -> bool:
    """Add the pipeline methods if diffusers is loaded (``import fastattn`` and every ``fastattn.enable``
    call this). Returns True when they are attached."""
    if os.environ.get(OPT_OUT_ENV) == "1":
        return False
    if "diffusers" not in sys.modules:
        return False  # never import diffusers for the user
    import importlib

    return _attach(importlib.import_module(_TARGET_MODULE))


def __getattr__(name):
    # Lazy: importing fastattn.pipelines must not import diffusers.
    if name in ("Handle", "ModelHandle"):
        from . import integration

        return getattr(integration, name)
    raise AttributeError(name)


__all__ = ["OPT_OUT_ENV", "attach_pipeline_methods", "disable_fast_attention", "enable_fast_attention"]
