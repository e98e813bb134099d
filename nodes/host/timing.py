"""Wall time of each denoising step, without a device sync per forward.

On CUDA each forward records two events on the current stream; they are read when the report is built
(after sampling, when the events have completed). On the CPU the time is taken directly.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch


class StepTimer:
    """Forward times grouped by denoising step (a step's CFG passes add up)."""

    def __init__(self):
        self._marks: dict[int, list] = defaultdict(list)

    def start(self, device):
        if getattr(device, "type", None) == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, step: int, started, device) -> None:
        if started is None:
            return
        if isinstance(started, float):
            self._marks[step].append((time.perf_counter() - started) * 1e3)
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._marks[step].append((started, end))

    def ms_per_step(self) -> dict[int, float]:
        """``{step: milliseconds}`` (resolves CUDA events; call after sampling)."""
        out = {}
        for step, marks in sorted(self._marks.items()):
            total = 0.0
            for m in marks:
                if isinstance(m, float):
                    total += m
                else:
                    m[1].synchronize()
                    total += m[0].elapsed_time(m[1])
            out[step] = total
        return out
