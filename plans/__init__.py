"""Plans as data: the plan schema, method configs and their mask handlers, per-head tables, building.

Host-neutral (no diffusers, no ComfyUI): adapters build plans here and hand them to the runtime.
"""

from .build import make_plan
from .heads import HeadTable
from .methods import (
    METHODS,
    ArrowConfig,
    BandConfig,
    BlockMapConfig,
    DenseConfig,
    DynamicConfig,
    MethodConfig,
    MultiDiagonalConfig,
    RadialConfig,
    SkipConfig,
    StripesConfig,
    Window3DConfig,
    build_mask,
    call_handler,
    method_from_name,
    register_call_handler,
    register_method_handler,
)
from .schema import AttentionPlan, known_keys


def __getattr__(name):
    # Plan files and the Hub load lazily (huggingface_hub / safetensors only when used).
    if name in ("save_plan", "load_plan", "LoadedPlan", "PlanFileError", "PlanMismatchError"):
        from . import files

        return getattr(files, name)
    if name in ("ModelFingerprint", "PlanMeta"):
        from . import meta

        return getattr(meta, name)
    raise AttributeError(f"module 'fastattn.plans' has no attribute {name!r}")

__all__ = [
    "METHODS",
    "ArrowConfig",
    "AttentionPlan",
    "BandConfig",
    "BlockMapConfig",
    "DenseConfig",
    "DynamicConfig",
    "HeadTable",
    "MethodConfig",
    "MultiDiagonalConfig",
    "RadialConfig",
    "SkipConfig",
    "StripesConfig",
    "Window3DConfig",
    "build_mask",
    "call_handler",
    "known_keys",
    "make_plan",
    "method_from_name",
    "register_call_handler",
    "register_method_handler",
]
