"""One attention call as ComfyUI's dispatcher hands it to an override, in the runtime's layout and back.

ComfyUI's attention functions share one signature::

    attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
              **kwargs)   # kwargs: transformer_options, scale, enable_gqa, low_precision_attention, ...

and an override is called as ``override(func, *args, **kwargs)`` with exactly the caller's arguments.
:class:`HostCall` reads those arguments without changing them (the host's attention is always called with
the original ``args`` / ``kwargs``), gives the runtime ``[B, S, H, D]`` views and turns the runtime's output
back into the layout the caller asked for:

- ``skip_reshape=True``: q/k/v are ``(B, H, L, D)``; otherwise ``(B, L, H*D)`` with ``heads`` heads (SD3 passes
  v as ``(B, L, H, D)``, which the host's attention views the same way).
- ``skip_output_reshape=True``: the caller wants ``(B, H, L, D)`` back; otherwise ``(B, L, H*D)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

PARAMS = ("q", "k", "v", "heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def bind(args: tuple, kwargs: dict) -> dict:
    """The call's named parameters (positional or keyword), defaults filled in; ``args``/``kwargs`` untouched."""
    named = dict(zip(PARAMS, args))
    for name in PARAMS[len(args) :]:
        named[name] = kwargs.get(name, False if name.startswith("skip_") else None)
    return named


@dataclass
class HostCall:
    """One attention call: its tensors, its layout flags, and how to run the host's own attention on it.

    Args:
        q, k, v: the tensors as the caller passed them.
        heads: attention heads (``q.shape[1]`` when ``skip_reshape``).
        mask: the caller's attention mask or None.
        skip_reshape, skip_output_reshape: the caller's layout flags (module docstring).
        kwargs: the caller's keyword arguments (``transformer_options``, ``scale``...), read only.
        host: runs the attention the host would have run for this call (the previous override or ``func``)
            with the caller's exact arguments.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    heads: int
    mask: object
    skip_reshape: bool
    skip_output_reshape: bool
    kwargs: dict
    host: Callable[[], torch.Tensor]

    @classmethod
    def parse(cls, args: tuple, kwargs: dict, host: Callable[[], torch.Tensor]) -> HostCall:
        p = bind(args, kwargs)
        return cls(p["q"], p["k"], p["v"], p["heads"], p["mask"], bool(p["skip_reshape"]),
                   bool(p["skip_output_reshape"]), kwargs, host)  # fmt: skip

    # ------------------------------------------------------------------ what the call is
    @property
    def batch(self) -> int:
        return int(self.q.shape[0])

    @property
    def q_len(self) -> int:
        return int(self.q.shape[2] if self.skip_reshape else self.q.shape[1])

    @property
    def k_len(self) -> int:
        return int(self.k.shape[2] if self.skip_reshape else self.k.shape[1])

    @property
    def num_heads(self) -> int:
        return int(self.q.shape[1]) if self.skip_reshape else int(self.heads)

    @property
    def head_dim(self) -> int | None:
        """Channels per head, or None when ``(B, L, C)`` does not split into ``heads`` equal heads."""
        if self.skip_reshape:
            return int(self.q.shape[-1])
        c, h = int(self.q.shape[-1]), int(self.heads or 0)
        return c // h if h > 0 and c % h == 0 else None

    @property
    def scale(self) -> float | None:
        s = self.kwargs.get("scale")
        return None if s is None else float(s)

    @property
    def work(self) -> float:
        """Score entries ``B * H * S_q * S_kv`` (the runtime's unit of attention work)."""
        return float(self.batch * self.num_heads * self.q_len * self.k_len)

    def shape_problem(self) -> str | None:
        """Why q/k/v are not tensors of the layout the flags name (None: they are)."""
        q, k, v = self.q, self.k, self.v
        if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
            return "q/k/v are not tensors"
        rank = 4 if self.skip_reshape else 3
        v_ok = v.dim() == rank or (not self.skip_reshape and v.dim() == 4)  # SD3 passes v as (B, L, H, D)
        if not (q.dim() == k.dim() == rank and v_ok):
            return f"q/k/v of rank {q.dim()}/{k.dim()}/{v.dim()}, expected {rank}"
        return None

    def unsupported(self) -> str | None:
        """Why the runtime cannot take this call whatever the plan says (None: it can)."""
        q, k, v = self.q, self.k, self.v
        if self.mask is not None:
            return "attention mask"
        v_channels = v.shape[-1] if v.dim() == q.dim() else v.shape[-2] * v.shape[-1]
        if (
            self.kwargs.get("enable_gqa")
            or k.shape[-1] != q.shape[-1]
            or v_channels != q.shape[-1]
            or (self.skip_reshape and (k.shape[1] != q.shape[1] or v.shape[1] != q.shape[1]))
            or (v.dim() != q.dim() and v.shape[-2] != self.heads)
        ):
            return "grouped-query attention (k/v heads differ from q)"
        if self.kwargs.get("low_precision_attention", True) is False:
            return "low_precision_attention=False"
        if self.head_dim is None:
            return f"unknown head_dim ({q.shape[-1]} channels do not split into {self.heads} heads)"
        if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
            return f"dtype {q.dtype}/{k.dtype}/{v.dtype}"
        if q.is_cuda:
            from ...attn_kernels.ops import SUPPORTED_HEAD_DIMS

            if self.head_dim not in SUPPORTED_HEAD_DIMS:
                return f"head_dim {self.head_dim} (the GPU kernel takes {list(SUPPORTED_HEAD_DIMS)})"
        return None

    # ------------------------------------------------------------------ layouts
    def bshd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as ``[B, S, H, D]`` views (no copy where the strides allow one)."""
        if self.skip_reshape:
            return tuple(t.transpose(1, 2) for t in (self.q, self.k, self.v))
        h, d = self.num_heads, self.head_dim
        return tuple(t if t.dim() == 4 else t.unflatten(-1, (h, d)) for t in (self.q, self.k, self.v))

    def host_bshd(self) -> torch.Tensor:
        """The host's own attention on this call, as ``[B, S, H, D]`` (values untouched)."""
        return self.from_host(self.host())

    def from_host(self, out: torch.Tensor) -> torch.Tensor:
        """A host output (the caller's output layout) as ``[B, S, H, D]``."""
        if self.skip_output_reshape:
            return out.transpose(1, 2)
        return out.unflatten(-1, (self.num_heads, out.shape[-1] // self.num_heads))

    def to_host(self, out: torch.Tensor) -> torch.Tensor:
        """A runtime output ``[B, S, H, D]`` in the layout the caller asked for."""
        if self.skip_output_reshape:
            return out.transpose(1, 2)
        return out.flatten(-2)
