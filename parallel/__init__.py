"""Sequence parallelism for fastattn (Ulysses, ring and their hybrid) with db-SP balancing of sparse work.

Between the adapters (pipelines/, nodes/) and the runtime (attention/). Importing the package imports nothing
heavy: torch.distributed is used only by the modules that communicate, loaded on first use.

- :class:`ParallelConfig` (``config``): the one schema of settings (degrees, balance, timeout).
- :func:`init_process_group`, :class:`ParallelMesh` (``mesh``): torch.distributed and the Ulysses / ring groups.
- :class:`SequenceParallel` (``attention``): one rank's share of every self-attention call.
- ``comm`` (all-to-all, ring shift, :class:`ParallelError`), ``ring`` (ring attention), ``balance`` (db-SP).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .config import ParallelConfig

if TYPE_CHECKING:
    from .attention import SequenceParallel
    from .comm import ParallelError
    from .mesh import ParallelMesh, init_process_group

_LAZY = {
    "SequenceParallel": ("attention", "SequenceParallel"),
    "ParallelError": ("comm", "ParallelError"),
    "ParallelMesh": ("mesh", "ParallelMesh"),
    "init_process_group": ("mesh", "init_process_group"),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = _LAZY[name]
    return getattr(importlib.import_module(f".{module}", __name__), attr)


__all__ = ["ParallelConfig", "ParallelError", "ParallelMesh", "SequenceParallel", "init_process_group"]
