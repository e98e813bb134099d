"""Where cached tensors live: counted, bounded by a byte budget, stored as given, in bf16 or in int8, on the
model's device or on the CPU.

One :class:`CacheStore` per runtime (per transformer). Every policy puts and gets through it, so one budget
bounds them all. A tensor that would take the store over its budget is refused (``put`` returns False and
the refusal is counted): the policy then recomputes what it wanted to reuse instead of running out of memory.
Tensors the runtime keeps outside the store (residual sharing, head reuse) are counted through
``external_bytes`` and admitted through :meth:`CacheStore.admit`.

Storage formats (``storage=``):

- ``"auto"``: the tensor as computed (bit-exact reuse);
- ``"bf16"``: bfloat16 (half of fp32, the same as a bf16 model's own tensors);
- ``"int8"``: symmetric int8 per row of the last dimension with one fp32 scale per row (about half of bf16).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

STORAGES = ("auto", "bf16", "int8")
GIB = 1 << 30


@dataclass
class _Entry:
    payload: torch.Tensor
    scale: torch.Tensor | None
    dtype: torch.dtype
    device: torch.device
    tag: object  # what the policy needs to know about the entry (step, branch...)

    @property
    def nbytes(self) -> int:
        n = self.payload.numel() * self.payload.element_size()
        if self.scale is not None:
            n += self.scale.numel() * self.scale.element_size()
        return n

    @property
    def shape(self) -> torch.Size:
        return self.payload.shape


class CacheStore:
    """Cached tensors by key, within ``budget_bytes`` (None: unbounded).

    Args:
        budget_bytes: most bytes held at once (the plan's ``cache_budget_gb``), or None.
        storage: ``"auto"``, ``"bf16"`` or ``"int8"`` (module docstring).
        offload: keep cached tensors in CPU memory (copied back to the model's device on use).
    """

    def __init__(self, budget_bytes: int | None = None, storage: str = "auto", offload: bool = False):
        if storage not in STORAGES:
            raise ValueError(f"cache_storage must be one of {list(STORAGES)}, got {storage!r}")
        if budget_bytes is not None and budget_bytes < 0:
            raise ValueError(f"cache budget must be >= 0 bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.storage = storage
        self.offload = offload
        self.external_bytes: Callable[[], int] = lambda: 0
        self._entries: dict[Hashable, _Entry] = {}
        self._bytes = 0
        self.peak_bytes = 0
        self.puts = 0
        self.hits = 0
        self.misses = 0
        self.refused: Counter = Counter()  # puts refused over budget, by the key's kind (key[0])

    # ------------------------------------------------------------------ memory
    @property
    def bytes(self) -> int:
        """Bytes held in the store (not counting ``external_bytes``)."""
        return self._bytes

    def total_bytes(self) -> int:
        return self._bytes + self.external_bytes()

    def admit(self, nbytes: int, replacing: int = 0, kind: str = "external") -> bool:
        """Whether ``nbytes`` more (freeing ``replacing``) fit the budget; a refusal is counted under ``kind``."""
        if self._fits(nbytes, replacing):
            return True
        self.refused[kind] += 1
        return False

    def _fits(self, nbytes: int, replacing: int = 0) -> bool:
        return self.budget_bytes is None or self.total_bytes() - replacing + nbytes <= self.budget_bytes

    def fits(self, key: Hashable, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` would fit under ``key`` (replacing what is there) now; counts nothing, encodes and
        copies nothing (it is asked on every capture that keeps an older residual)."""
        old = self._entries.get(key)
        return self._fits(self.stored_bytes(tensor), old.nbytes if old is not None else 0)

    def stored_bytes(self, tensor: torch.Tensor) -> int:
        """Bytes ``tensor`` takes once stored (as :meth:`put` encodes it; offloading changes no size)."""
        n = tensor.numel()
        if self.storage == "int8" and tensor.is_floating_point():
            # the int8 payload and one fp32 scale per row of the last dimension
            return n + math.prod(tensor.shape[:-1]) * 4
        if self.storage == "bf16" and tensor.is_floating_point():
            return n * 2
        return n * tensor.element_size()

    def note_peak(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.total_bytes())

    # ------------------------------------------------------------------ entries
    def put(self, key: Hashable, tensor: torch.Tensor, tag=None) -> bool:
        """Keep ``tensor`` under ``key`` (replacing what was there). False when it does not fit the budget: the
        key is then dropped, so a stale value is never reused. ``"auto"`` storage on the model's device keeps
        the tensor itself, no copy: callers hand over tensors nothing else writes to."""
        old = self._entries.get(key)
        payload, scale = self._encode(tensor.detach())
        entry = _Entry(payload, scale, tensor.dtype, tensor.device, tag)
        kind = key[0] if isinstance(key, tuple) and key else str(key)
        if not self.admit(entry.nbytes, old.nbytes if old is not None else 0, kind):
            self.drop(key)
            return False
        if old is not None:
            self._bytes -= old.nbytes
        self._entries[key] = entry
        self._bytes += entry.nbytes
        self.puts += 1
        self.note_peak()
        return True

    def get(self, key: Hashable, like: torch.Tensor | None = None, shape=None) -> torch.Tensor | None:
        """The tensor under ``key`` in ``like``'s dtype and device (else its own), or None (counted as a miss)
        when absent or, with ``shape``, of another shape."""
        e = self._entries.get(key)
        if e is None or (shape is not None and tuple(e.shape) != tuple(shape)):
            self.misses += 1
            return None
        self.hits += 1
        dtype = like.dtype if like is not None else e.dtype
        device = like.device if like is not None else e.device
        if e.scale is not None:
            return (e.payload.to(device).to(torch.float32) * e.scale.to(device)).to(dtype)
        return e.payload.to(device=device, dtype=dtype)

    def tag(self, key: Hashable):
        e = self._entries.get(key)
        return None if e is None else e.tag

    def shape(self, key: Hashable):
        e = self._entries.get(key)
        return None if e is None else tuple(e.shape)

    def __contains__(self, key) -> bool:
        return key in self._entries

    def keys(self, kind: str | None = None) -> list:
        return [k for k in self._entries if kind is None or (isinstance(k, tuple) and k and k[0] == kind)]

    def rename(self, key: Hashable, new_key: Hashable) -> None:
        """Keep ``key``'s entry under ``new_key`` instead (replacing what was there); no bytes are added."""
        e = self._entries.pop(key, None)
        if e is None:
            return
        self.drop(new_key)
        self._entries[new_key] = e

    def drop(self, key: Hashable) -> None:
        e = self._entries.pop(key, None)
        if e is not None:
            self._bytes -= e.nbytes

    def clear(self) -> None:
        """Drop every entry (a new run); counters stay until :meth:`reset_stats`."""
        self._entries.clear()
        self._bytes = 0

    def reset_stats(self) -> None:
        self.peak_bytes = self.total_bytes()
        self.puts = self.hits = self.misses = 0
        self.refused.clear()

    def _encode(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        scale = None
        if self.storage == "int8" and t.is_floating_point():
            x = t.float()
            scale = (x.abs().amax(dim=-1, keepdim=True) / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
            t = torch.round(x / scale).clamp_(-127, 127).to(torch.int8)
        elif self.storage == "bf16" and t.is_floating_point():
            t = t.to(torch.bfloat16)
        if self.offload:
            t = t.to("cpu")
            scale = scale.to("cpu") if scale is not None else None
        return t, scale

    def as_dict(self) -> dict:
        return {
            "bytes": self.total_bytes(),
            "peak_bytes": self.peak_bytes,
            "budget_bytes": self.budget_bytes,
            "storage": self.storage,
            "offload": self.offload,
            "entries": len(self._entries),
            "puts": self.puts,
            "hits": self.hits,
            "misses": self.misses,
            "refused_over_budget": dict(self.refused),
        }
