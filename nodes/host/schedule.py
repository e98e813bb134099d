"""Where a ComfyUI forward is: step and step count from the sigma schedule, CFG branch from the batch.

ComfyUI tells every forward its noise level (``transformer_options["sigmas"]``), the schedule of the sampler
call (``transformer_options["sample_sigmas"]``, ending in 0 for a full run) and which conditionings are in
the batch (``transformer_options["cond_or_uncond"]``: 0 = positive, 1 = negative, one entry per batch
chunk). The step is the position of the current sigma in the schedule: the last schedule point at or
above it, so samplers that evaluate the model between two points (Heun, DPM++ 2S) stay on their step.

Two samplers on one schedule (two KSamplerAdvanced, e.g. Wan 2.2's high-noise and low-noise models) each
see only their part: ``[s0 .. sk]`` (leftover noise, not ending in 0) then ``[sk .. 0]``. The
:class:`ScheduleBook` remembers recent schedules of this process, so the second part continues the first
one's step numbering (steps ``k ..`` of a run whose length is known once the part ending in 0 runs).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class RunSchedule:
    """One sampler call's schedule placed in the shared schedule.

    Args:
        sigmas: this sampler's ``sample_sigmas`` (descending).
        offset: steps of the shared schedule that ran before this sampler's first step.
        total: steps of the shared schedule, when known (this part ends in 0).
    """

    sigmas: tuple[float, ...]
    offset: int = 0
    total: int | None = None

    @property
    def steps(self) -> int:
        return max(len(self.sigmas) - 1, 0)

    @property
    def ends_run(self) -> bool:
        return bool(self.sigmas) and self.sigmas[-1] == 0.0

    def step_of(self, sigma: float) -> int:
        """Shared-schedule step of a forward at noise level ``sigma``."""
        s = self.sigmas[: max(len(self.sigmas) - 1, 1)]  # the last point ends the run, it is no step
        for j, v in enumerate(s):
            if math.isclose(v, sigma, rel_tol=1e-4, abs_tol=1e-8):
                return self.offset + j
        i = 0
        for j, v in enumerate(s):  # between two points (Heun, DPM++ 2S): the step that started above it
            if v < sigma:
                break
            i = j
        return self.offset + i


class ScheduleBook:
    """The last few sampler schedules of this process (shared by every patched model, so a low-noise
    model's sampler continues the high-noise model's step count)."""

    def __init__(self, keep: int = 8):
        self._recent: deque[RunSchedule] = deque(maxlen=keep)

    def clear(self) -> None:
        self._recent.clear()

    def place(self, sigmas) -> RunSchedule:
        """Register a new sampler call's schedule; continue the most recent schedule that ended where this
        one begins with noise left (not 0)."""
        sigmas = tuple(float(x) for x in sigmas)
        offset, total = 0, None
        if sigmas:
            for prev in reversed(self._recent):
                if (
                    not prev.ends_run
                    and prev.sigmas
                    and math.isclose(prev.sigmas[-1], sigmas[0], rel_tol=1e-5)
                ):
                    offset = prev.offset + prev.steps
                    break
        if sigmas and sigmas[-1] == 0.0:
            total = offset + len(sigmas) - 1
        run = RunSchedule(sigmas, offset, total)
        self._recent.append(run)
        return run


SCHEDULES = ScheduleBook()  # one per process: ComfyUI runs one prompt at a time


def cfg_branch(cond_or_uncond) -> int:
    """0 for the positive pass or a batch holding several conditionings (batched CFG), 1 for a pass that
    holds only the negative conditioning."""
    if cond_or_uncond is None:
        return 0
    items = list(cond_or_uncond)
    return 1 if len(items) == 1 and int(items[0]) == 1 else 0


def current_sigma(transformer_options: dict, t=None) -> float | None:
    """The forward's noise level: ``transformer_options["sigmas"][0]``, else ``apply_model``'s ``t``."""
    for value in (transformer_options.get("sigmas"), t):
        if value is None:
            continue
        try:
            return float(value.flatten()[0]) if hasattr(value, "flatten") else float(value)
        except (TypeError, ValueError, IndexError):
            continue
    return None
