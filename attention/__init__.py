"""Runtime layer: per-call decisions, per-head work, mask cache, dynamic selection, stats, observers.

Knows nothing about diffusers or ComfyUI: adapters hand it a :class:`ForwardContext` per forward and
q/k/v per self-attention call.
"""

from .context import ForwardContext, ForwardState, StepTracker
from .observe import ObservedCall
from .runtime import AttentionRuntime, HeadWork, Shard, sdpa_dense
from .stats import AttentionStats

__all__ = [
    "AttentionRuntime",
    "AttentionStats",
    "ForwardContext",
    "ForwardState",
    "HeadWork",
    "ObservedCall",
    "Shard",
    "StepTracker",
    "sdpa_dense",
]
