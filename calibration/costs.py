"""A cost model of our own kernels: estimated time of a head's work from a table of measurements.

Calibration chooses per head by *time*, not FLOPs: our kernel's speed per computed block depends on the
bit-width, on the density (short block lists run less efficiently) and on whether the head is reordered
(PARO's permutation makes each tile load an indexed gather), and every call through the kernel pays a fixed
launch cost that dense SDPA does not. A :class:`CostModel` holds those numbers::

    time(head) = density * dense_head_ms / efficiency(quant, density) * reorder_factor(quant)   [if reordered]
    time(row)  = call_overhead_ms + (groups - 1) * group_overhead_ms + sum of its heads   (a layer call)
    time(row)  = H * dense_head_ms                                         (every head dense: the model's SDPA)

``efficiency`` is cuDNN dense time per block divided by our time per computed block (1.0 = as fast per
block as cuDNN), interpolated linearly in density between measured points. The shipped table
(``default_costs.json``) is derived from committed benchmark JSON and says so in its ``source``;
``python -m fastattn.bench.calibrate --costs-only`` measures one on the GPU at hand.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_TABLE = Path(__file__).with_name("default_costs.json")
FORMAT = "fastattn-cost-table"


@dataclass(frozen=True)
class CostModel:
    """Measured kernel costs (see the module docstring); load with :meth:`load`."""

    efficiency: dict = field(default_factory=dict)  # quant -> [[block density, efficiency], ...] ascending
    reorder_factor: dict = field(default_factory=dict)  # quant -> time multiplier of a reordered head
    call_overhead_ms: float = 0.0
    group_overhead_ms: float = 0.0
    dense_tflops: float = 500.0
    dense_floor_ms: float = 0.0
    source: str = ""
    device: str = ""

    def __post_init__(self):
        if "none" not in self.efficiency:
            raise ValueError("a cost table needs efficiency points for quant 'none'")
        for quant, pts in self.efficiency.items():
            if not pts or any(len(p) != 2 or not 0 < p[0] <= 1 or p[1] <= 0 for p in pts):
                raise ValueError(
                    f"cost table: efficiency[{quant!r}] must be [[density in (0, 1], efficiency > 0], ...]"
                )
        for name in ("call_overhead_ms", "group_overhead_ms", "dense_floor_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"cost table: {name} must be >= 0")
        if self.dense_tflops <= 0:
            raise ValueError("cost table: dense_tflops must be > 0")

    @classmethod
    def load(cls, path=None) -> CostModel:
        """The table in ``path`` (a JSON file written by ``bench/calibrate.py``), or the shipped default."""
        path = Path(path) if path is not None else DEFAULT_TABLE
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"cost table {path} does not exist") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"cost table {path} is not valid JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f'{path} is not a fastattn cost table (expected "format": "{FORMAT}")')
        data = {k: v for k, v in data.items() if k not in ("format", "records")}  # records: raw timings
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"cost table {path}: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        eff = {
            q: sorted((float(a), float(b)) for a, b in pts) for q, pts in data.pop("efficiency", {}).items()
        }
        return cls(efficiency=eff, **data)

    def to_dict(self) -> dict:
        d = {"format": FORMAT}
        d.update({k: getattr(self, k) for k in self.__dataclass_fields__})
        d["efficiency"] = {q: [list(p) for p in pts] for q, pts in self.efficiency.items()}
        return d

    # ------------------------------------------------------------------ estimates
    def efficiency_at(self, density: float, quant: str = "none") -> float:
        pts = self.efficiency.get(quant, self.efficiency["none"])
        if density <= pts[0][0]:
            return pts[0][1]
        for (d0, e0), (d1, e1) in zip(pts, pts[1:]):
            if density <= d1:
                return e0 + (e1 - e0) * (density - d0) / (d1 - d0)
        return pts[-1][1]

    def head_time(self, density: float, quant: str = "none", reordered: bool = False) -> float:
        """Time of one head's kernel work in units of that head's dense (cuDNN) time."""
        if density <= 0:
            return 0.0
        t = density / self.efficiency_at(density, quant)
        return t * self.reorder_factor.get(quant, 1.0) if reordered else t

    def dense_head_ms(self, seq_len: int, head_dim: int, batch: int = 1, heads: int = 1) -> float:
        """Estimated cuDNN time of one head's dense attention (ms) on ``batch`` sequences of ``seq_len``."""
        ms = 4.0 * batch * seq_len**2 * head_dim / (self.dense_tflops * 1e12) * 1e3
        return max(ms, self.dense_floor_ms / max(heads, 1))
