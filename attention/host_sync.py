"""Count the torch calls that make the host wait for a GPU: reads of tensor values and copies of host data.

On a GPU, reading a tensor's values on the host (``.item()``, ``.cpu()``, ``.tolist()``, ``bool(t)``,
``int(t)``, ``float(t)``, ``torch.nonzero``...) waits until the GPU has run everything queued before it, and
so does PyTorch's blocking copy of host memory to the device (``t.to(device)`` of a CPU tensor copies, then
synchronizes the stream). One of either per attention call serialises host and device. :class:`HostSyncs`
records them by name and by the line that made them, on any device (a CPU run finds the calls a GPU run
would stall on)::

    with HostSyncs() as syncs:
        model(x)
    assert not syncs.calls, syncs.report()

It is a ``torch.overrides.TorchFunctionMode``: it sees calls made through torch's Python API (on torch 2.13:
``Tensor.item``, ``cpu``, ``tolist``, ``numpy``, ``__bool__``, ``__int__``, ``__float__``, ``__index__``,
``nonzero``, ``torch.nonzero``, ``torch.equal``, ``Tensor.to``... each of those intercepted), not calls inside
a custom op or C++ code it calls; a call it intercepts runs with the mode off, so reads nested inside it
(``float(t)`` calls ``item()``) count once. Copies are counted where the call names a device (``t.to(dev)``,
``t.to(other)``, ``t.cuda()``, ``torch.tensor(data, device=dev)``): on the CPU the copy itself is a no-op,
the call is what a GPU would wait on.
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
# Calls that copy to a device when they name one (from host memory: a blocking copy, then a stream sync)
COPIES = {_T.to, _T.cuda, torch.tensor, torch.as_tensor}
_TORCH_DIR = str(Path(torch.__file__).parent)


class HostSyncs(TorchFunctionMode):
    """While active, counts host reads of tensor values and copies to a named device (``calls``: by name;
    ``sites``: by name and the first caller outside torch, ``path:line (function)``). Indexing with a boolean
    mask (a ``nonzero`` inside) counts as ``Tensor.__getitem__[bool]``, a copy as ``<call>(device)``."""

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
        elif func in COPIES and _names_device(func, args, kwargs):
            name = f"{resolve_name(func)}(device)"
        if name is not None:
            self.calls[name] += 1
            self.sites[(name, _caller())] += 1
        return func(*args, **kwargs)

    def report(self) -> str:
        """One line per (call, site) with its count."""
        return "\n".join(f"{n}x {name} at {site}" for (name, site), n in self.sites.most_common())


def _bool_index(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


def _names_device(func, args, kwargs) -> bool:
    if func is _T.cuda or kwargs.get("device") is not None:
        return True
    # t.to(device), t.to("cuda"), t.to(0), t.to(other_tensor); not t.to(dtype)
    return func is _T.to and len(args) > 1 and isinstance(args[1], (torch.device, str, int, torch.Tensor))


def _caller() -> str:
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(_TORCH_DIR):
        frame = frame.f_back
    if frame is None:
        return "?"
    return f"{frame.f_code.co_filename}:{frame.f_lineno} ({frame.f_code.co_name})"
