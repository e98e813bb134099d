"""Public entry points for diffusers: ``fastattn.enable(pipe_or_transformer, ...) -> Handle`` and
``fastattn.disable``.

Example::

    import fastattn
    pipe = WanPipeline.from_pretrained(...)
    handle = fastattn.enable(pipe, preset="balanced")            # or method="window3d", density=0.3
    video = pipe(prompt).frames
    print(handle.stats())
    handle.disable()                                               # model exactly as before

After the first ``fastattn.enable`` (or ``import fastattn`` with diffusers already imported) every
pipeline also has ``pipe.enable_fast_attention(...)`` / ``pipe.disable_fast_attention()``.
"""

from __future__ import annotations

from .calibration import calibrate
from .pipelines.entry import disable, enable
from .plans import make_plan

__all__ = ["calibrate", "disable", "enable", "make_plan"]
