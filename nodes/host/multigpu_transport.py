"""Moving Python objects that hold tensors from the ComfyUI process (rank 0) to the Multi-GPU workers.

An object (a diffusion model, a plan, one forward's inputs) travels in two parts:

- its structure: pickled with every tensor replaced by a *persistent id* (index, shape, dtype, Parameter or
  not), sent as bytes over the worker's control pipe; nothing of a tensor's data is in it;
- its tensors: broadcast from rank 0 over the process group, in index order (device to device with NCCL, over
  local sockets with gloo), each as a flat byte view so every dtype travels the same way.

:func:`pack` (rank 0) gives ``(payload, tensors)``; :func:`unpack` (a worker) gives the object with empty tensors
of the right shapes on the worker's device and the list to fill; :func:`send_tensors` / :func:`receive_tensors`
are the matching broadcasts. ``markers`` name objects that are not sent but replaced on the other side (the
forward's ``transformer_options``: each worker puts its own).

Only plain tensors and Parameters travel: a tensor subclass (quantized or GGUF weights) is refused with a clear
error, since its type would be lost.
"""

from __future__ import annotations

import io
import pickle

import torch
import torch.distributed as dist

from ...parallel.comm import guard

_PLAIN = (torch.Tensor, torch.nn.Parameter)


class TransportError(TypeError):
    """An object that cannot be sent to the workers (a tensor subclass, an unpicklable value), with what it is."""


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.rsplit(".", 1)[-1], None)
    if not isinstance(dtype, torch.dtype):
        raise TransportError(f"unknown tensor dtype {name!r}")
    return dtype


class _Pickler(pickle.Pickler):
    def __init__(self, file, markers: dict[int, str]):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors: list[torch.Tensor] = []
        self.markers = markers

    def persistent_id(self, obj):
        if id(obj) in self.markers:
            return ("marker", self.markers[id(obj)])
        if not isinstance(obj, torch.Tensor):
            return None
        if type(obj) not in _PLAIN:
            raise TransportError(
                f"a tensor of type {type(obj).__name__} cannot be sent to the workers (only plain tensors and "
                "Parameters: quantized / GGUF weight types are not supported by Multi-GPU yet)"
            )
        if obj.device.type == "meta":
            raise TransportError(
                f"a tensor of shape {tuple(obj.shape)} is on the meta device (no data to send)"
            )
        self.tensors.append(obj)
        param = isinstance(obj, torch.nn.Parameter)
        return (
            "tensor",
            len(self.tensors) - 1,
            tuple(obj.shape),
            str(obj.dtype),
            param,
            bool(obj.requires_grad),
        )


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, device: torch.device, markers: dict[str, object]):
        super().__init__(file)
        self.device = device
        self.markers = markers
        self.tensors: list[torch.Tensor] = []

    def persistent_load(self, pid):
        if pid[0] == "marker":
            return self.markers[pid[1]]
        _, index, shape, dtype, param, requires_grad = pid
        if index != len(self.tensors):
            raise TransportError(f"tensor {index} arrived out of order (expected {len(self.tensors)})")
        t = torch.empty(shape, dtype=_dtype(dtype), device=self.device)
        if param:
            t = torch.nn.Parameter(t, requires_grad=requires_grad)
        self.tensors.append(t)
        return t


def pack(obj, markers: dict[int, str] | None = None) -> tuple[bytes, list[torch.Tensor]]:
    """``obj``'s structure as bytes and its tensors in the order :func:`send_tensors` must broadcast them.

    ``markers``: ``{id(some_object): name}`` for objects the receiver supplies itself. Raises
    :class:`TransportError` naming what cannot travel."""
    buf = io.BytesIO()
    p = _Pickler(buf, markers or {})
    try:
        p.dump(obj)
    except TransportError:
        raise
    except (pickle.PicklingError, TypeError, AttributeError) as e:
        raise TransportError(f"cannot be pickled for the workers: {type(e).__name__}: {e}") from None
    return buf.getvalue(), p.tensors


def unpack(payload: bytes, device: torch.device, markers: dict[str, object] | None = None):
    """``(obj, tensors)``: the object with empty tensors on ``device``; :func:`receive_tensors` fills them."""
    u = _Unpickler(io.BytesIO(payload), torch.device(device), markers or {})
    obj = u.load()
    return obj, u.tensors


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def send_tensors(tensors: list[torch.Tensor], device: torch.device, group=None, what: str = "tensors",
                 timeout_s: float | None = None) -> None:  # fmt: skip
    """Rank 0: broadcast each tensor's bytes (copied to the process group's ``device`` where it lives elsewhere)."""
    with torch.no_grad(), guard(f"sending {what} to the workers", timeout_s):
        for t in tensors:
            if t.numel() == 0:
                continue
            dist.broadcast(_bytes(t.detach().to(device).contiguous()), 0, group=group)


def receive_tensors(tensors: list[torch.Tensor], group=None, what: str = "tensors",
                    timeout_s: float | None = None) -> None:  # fmt: skip
    """A worker: fill each tensor (allocated contiguous by :func:`unpack`) from rank 0's broadcast."""
    with torch.no_grad(), guard(f"receiving {what} from rank 0", timeout_s):
        for t in tensors:
            if t.numel() == 0:
                continue
            dist.broadcast(_bytes(t.detach()), 0, group=group)
