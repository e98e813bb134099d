"""fastattn: fast sparse, reordered and quantized attention for diffusion transformers.

The repository root is this package. ComfyUI imports it as a custom-node pack and calls
``comfy_entrypoint()`` (V3 nodes); Python users ``import fastattn``. Importing it stays light: no ComfyUI,
no GPU, no diffusers until a feature that needs them is used.
"""

__version__ = "0.1.0"

from .masks import BlockMask, TokenLayout  # noqa: E402  (light: torch only)
from .pipelines import attach_pipeline_methods as _attach_pipeline_methods  # noqa: E402

# Adds pipe.enable_fast_attention / disable_fast_attention to DiffusionPipeline (only if absent) when
# diffusers is already imported (fastattn.enable does it too); FASTATTN_NO_PIPELINE_METHODS=1 opts out.
if __name__ == "fastattn":  # not when a host (pytest, ComfyUI) imports this folder under another name
    _attach_pipeline_methods()

__all__ = [
    "BlockMask", "TokenLayout", "__version__", "calibrate", "comfy_entrypoint", "disable", "enable",
]  # fmt: skip


def __getattr__(name: str):
    # enable/disable/calibrate load the runtime on first use, so `import fastattn` stays light.
    if name in ("enable", "disable", "calibrate"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'fastattn' has no attribute {name!r}")


# ComfyUI discovers the V3 nodes through comfy_entrypoint (comfy_api is imported only when it is called).
# No NODE_CLASS_MAPPINGS here: ComfyUI's loader would take those and never call comfy_entrypoint.
from .nodes import comfy_entrypoint  # noqa: E402
