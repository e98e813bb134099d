"""Count the torch calls that read tensor values back to the host (a device sync on a GPU).

On a GPU each such read (``.item()``, ``.cpu()``, ``.tolist()``, ``bool(t)``, ``int(t)``, ``float(t)``,
``torch.nonzero``...) waits until the GPU has run everything queued before it, so a read per attention call
serialises host and device. :class:`HostReads` records them by name and by the line that made them, on any
device (a CPU run finds the reads a GPU run would stall on)::

    with HostReads() as reads:
        model(x)
    assert not reads.calls, reads.report()

It is a ``torch.overrides.TorchFunctionMode``: it sees calls made through torch's Python API (on torch 2.13:
``Tensor.item``, ``cpu``, ``tolist``, ``numpy``, ``__bool__``, ``__int__``, ``__float__``, ``__index__``,
``nonzero``, ``torch.nonzero``, ``torch.equal``... each of those intercepted), not reads inside a custom op
or C++ code it calls; a call it intercepts runs with the mode off, so reads nested inside it (``float(t)``
calls ``item()``) count once.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode, resolve_name

_T = torch.Tensor
# Calls that read values of their tensor argument on the host (a GPU tensor's: a device sync)
READS = {
    _T.item, _T.cpu, _T.tolist, _T.numpy, _T.__bool__, _T.__int__, _T.__float__, _T.__index__, _T.__repr__,
    _T.__format__, _T.nonzero, torch.nonzero, torch.argwhere, _T.argwhere, torch.equal, _T.equal,
    torch.masked_select, _T.masked_select, torch.unique, _T.unique,
}  # fmt: skip
_TORCH_DIR = str(Path(torch.__file__).parent)


class HostReads(TorchFunctionMode):
    """While active, counts host reads of tensor values (``calls``: by name; ``sites``: by name and the first
    caller outside torch, ``path:line (function)``). Indexing with a boolean mask (a ``nonzero`` inside)
    counts as ``Tensor.__getitem__[bool]``."""

    def __init__(self):
        super().__init__()
        self.calls: Counter = Counter()
        self.sites: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = None
        if func in READS:
            name = resolve_name(func) or repr(func)
        elif func in (_T.__getitem__, _T.__setitem__) and _bool_index(args[1] if len(args) > 1 else None):
            name = f"{resolve_name(func)}[bool]"
        if name is not None:
            self.calls[name] += 1
            self.sites[(name, _caller())] += 1
        return func(*args, **kwargs)

    def report(self) -> str:
        """One line per (read, site) with its count."""
        return "\n".join(f"{n}x {name} at {site}" for (name, site), n in self.sites.most_common())


def _bool_index(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


def _caller() -> str:
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(_TORCH_DIR):
        frame = frame.f_back
    if frame is None:
        return "?"
    return f"{frame.f_code.co_filename}:{frame.f_lineno} ({frame.f_code.co_name})"
