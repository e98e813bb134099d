"""ParallelConfig: the one schema of sequence-parallel settings (diffusers ``parallel=``, the ComfyUI node).

``ulysses`` x ``ring`` processes split every self-attention call: Ulysses ranks exchange token shards for head
shards (an all-to-all; each rank then attends over the whole sequence for ``H / ulysses`` heads), ring ranks
keep their query chunk and pass key/value chunks around (partial results merged by log-sum-exp). ``"auto"``
picks the degrees from the world size and the head count. ``balance="db-sp"`` assigns heads to Ulysses ranks
by their sparse work (longest-processing-time greedy on the plan's per-head block counts); ``"none"`` keeps
the contiguous head split. ``timeout_s`` bounds every collective: a rank that fails, exits or stalls ends the
run on every rank with an error instead of a hang.

Example::

    cfg = ParallelConfig.from_any({"ulysses": 2, "ring": 2, "balance": "db-sp"})
    cfg.degrees(world_size=4, heads=24)  # (2, 2)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

AUTO = "auto"
BALANCES = ("db-sp", "none")


@dataclass(frozen=True)
class ParallelConfig:
    """Sequence-parallel degrees, balancing and failure timeout.

    Args:
        ulysses: Ulysses degree U (all-to-all over heads), or ``"auto"``.
        ring: ring degree R (key/value chunks passed around), or ``"auto"``. ``U * R`` must equal the number
            of processes.
        balance: ``"db-sp"`` (heads assigned to Ulysses ranks by sparse work) or ``"none"`` (contiguous).
        timeout_s: seconds any collective may wait for a peer before every rank stops with an error.
    """

    ulysses: int | str = AUTO
    ring: int | str = AUTO
    balance: str = "db-sp"
    timeout_s: float = 300.0

    def __post_init__(self):
        for name in ("ulysses", "ring"):
            value = getattr(self, name)
            if value == AUTO:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"parallel: {name} must be a positive int or 'auto', got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.balance not in BALANCES:
            raise ValueError(f"parallel: balance must be one of {list(BALANCES)}, got {self.balance!r}")
        t = self.timeout_s
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not (math.isfinite(t) and t > 0):
            raise ValueError(f"parallel: timeout_s must be a positive number of seconds, got {t!r}")
        object.__setattr__(self, "timeout_s", float(t))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_any(cls, value) -> ParallelConfig:
        """A config from ``None`` (defaults), a dict of its fields, or a config (returned as is)."""
        if value is None:
            return cls()
        if isinstance(value, ParallelConfig):
            return value
        if not isinstance(value, dict):
            raise TypeError(
                f"parallel must be a dict of {list(cls.field_names())}, a ParallelConfig or None; "
                f"got {type(value).__name__}"
            )
        unknown = sorted(set(value) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"parallel: unknown field(s) {unknown}; known: {list(cls.field_names())}")
        return cls(**value)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def degrees(self, world_size: int, heads: int | None = None) -> tuple[int, int]:
        """``(ulysses, ring)`` for ``world_size`` processes and ``heads`` attention heads (None: unknown).

        ``"auto"`` on both: the largest Ulysses degree dividing both the world size and the head count (the
        all-to-all moves each token once; the ring moves keys and values ``R - 1`` times), the rest ring.
        Raises ValueError saying what was expected when the degrees do not fit.
        """
        if isinstance(world_size, bool) or not isinstance(world_size, numbers.Integral) or world_size < 1:
            raise ValueError(f"parallel: world_size must be a positive int, got {world_size!r}")
        u, r = self.ulysses, self.ring
        if u == AUTO and r == AUTO:
            u = max(
                d
                for d in range(1, world_size + 1)
                if world_size % d == 0 and (heads is None or heads % d == 0)
            )
            r = world_size // u
        elif u == AUTO:
            if world_size % r:
                raise ValueError(f"parallel: ring {r} does not divide the {world_size} processes")
            u = world_size // r
        elif r == AUTO:
            if world_size % u:
                raise ValueError(f"parallel: ulysses {u} does not divide the {world_size} processes")
            r = world_size // u
        if u * r != world_size:
            raise ValueError(
                f"parallel: ulysses {u} x ring {r} = {u * r} processes, but the process group has {world_size} "
                f"(launch {u * r} processes, e.g. torchrun --nproc-per-node {u * r}, or change the degrees)"
            )
        if heads is not None and heads % u:
            raise ValueError(
                f"parallel: ulysses {u} must divide the {heads} attention heads (each Ulysses rank holds "
                f"heads / ulysses of them); use a ulysses degree dividing {heads}, the rest as ring"
            )
        return u, r
