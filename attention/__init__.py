"""Runtime layer: plans, method configs, per-call context, mask cache, dynamic selection, stats.

Knows nothing about diffusers or ComfyUI: adapters hand it q/k/v and the call's place in the model.
"""

from .context import AttentionContext, StepTracker
from .methods import (
    METHODS,
    ArrowConfig,
    BandConfig,
    DenseConfig,
    DynamicConfig,
    MethodConfig,
    RadialConfig,
    Window3DConfig,
    build_mask,
    method_from_name,
    register_method_handler,
)
from .plan import AttentionPlan
from .runtime import AttentionRuntime, current_runtime, runtime_attention, sdpa_dense
from .stats import AttentionStats

__all__ = [
    "METHODS",
    "ArrowConfig",
    "AttentionContext",
    "AttentionPlan",
    "AttentionRuntime",
    "AttentionStats",
    "BandConfig",
    "DenseConfig",
    "DynamicConfig",
    "MethodConfig",
    "RadialConfig",
    "StepTracker",
    "Window3DConfig",
    "build_mask",
    "current_runtime",
    "method_from_name",
    "register_method_handler",
    "runtime_attention",
    "sdpa_dense",
]
