"""The ComfyUI adapter: fastattn's runtime behind ComfyUI's attention override, per model family.

Knows ComfyUI's runtime contract (the override signature, ``transformer_options`` fields, ``ModelPatcher``
wrappers and callbacks) but imports nothing from ComfyUI: it is tested against fakes written from that
description (``tests/test_comfy_contract.py``). One module per concern:

- ``calls``: one attention call's arguments and layouts (``(B, H, L, D)`` / ``(B, L, H*D)`` <-> ``[B, S, H, D]``);
- ``families``: which model a MODEL holds and the token layout of each forward;
- ``schedule``: step and step count from the sigma schedule (shared across samplers), CFG branch;
- ``patch``: per-run state, the forward bracket's body, one call's decision (runtime or host, counted);
- ``install``: the override object, the ``APPLY_MODEL`` wrapper and callbacks on a clone, finding them again;
- ``report`` / ``timing``: what ran, for the Report node;
- ``multigpu*``: the Multi-GPU node's side: the ``DIFFUSION_MODEL`` wrapper and per-forward decisions
  (``multigpu``), token shards through the blocks (``multigpu_shard``), one rank's state (``multigpu_rank``), the
  worker processes and process group (``multigpu_cluster``, ``multigpu_worker``), sending objects with tensors
  (``multigpu_transport``).
"""

from .calls import HostCall
from .families import ComfyFamily, detect_family
from .install import AttentionOverride, ForwardBracket, find_patch, install, install_override
from .patch import FastAttentionPatch
from .report import build_report, format_report
from .schedule import SCHEDULES, RunSchedule, ScheduleBook, cfg_branch

__all__ = [
    "SCHEDULES", "AttentionOverride", "ComfyFamily", "FastAttentionPatch", "ForwardBracket", "HostCall",
    "RunSchedule", "ScheduleBook", "build_report", "cfg_branch", "detect_family", "find_patch", "format_report",
    "install", "install_override",
]  # fmt: skip
