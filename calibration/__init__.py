"""Calibration: per-head PARO / Sparse-vDiT / DiTFastAttn-v2 plans from a few observed denoising runs.

``fastattn.calibrate(pipe_or_model, prompts, target_density=... | error_budget=...) -> AttentionPlan``.
Host-neutral core: the observer (:mod:`.observe`) registers with the runtime through its observer
interface; candidates (:mod:`.candidates`), the cost model of our kernels (:mod:`.costs`) and the selection
(:mod:`.select`) know no host; :mod:`.host_testbed` and :mod:`.host_diffusers` each know one.
"""

from .candidates import DEFAULT_METHODS, FAMILIES
from .costs import CostModel
from .run import (
    BudgetError,
    CalibrationError,
    CalibrationInterrupted,
    CalibrationResult,
    calibrate,
    run_calibration,
)

__all__ = [
    "DEFAULT_METHODS",
    "FAMILIES",
    "BudgetError",
    "CalibrationError",
    "CalibrationInterrupted",
    "CalibrationResult",
    "CostModel",
    "calibrate",
    "run_calibration",
]
