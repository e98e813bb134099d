"""Communication of sequence parallelism: the Ulysses all-to-alls, the ring shift, all-gathers.

Backend-agnostic torch.distributed (NCCL for CUDA tensors, gloo for CPU tensors). Inference only: nothing here
carries gradients. Every collective runs inside :func:`guard`, which turns a backend error (a peer that
raised, exited or stalled past the process group's timeout) into a :class:`ParallelError` naming this rank,
the operation and its peers, so every rank of a failed run stops with a clear message instead of hanging.

Shapes: q, k and v travel stacked as one ``[P, B, S, H, D]`` tensor (``P`` = 3, or 1 for the output), so one
all-to-all moves all three.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist


class ParallelError(RuntimeError):
    """A collective of sequence parallelism failed: a peer raised, exited or timed out. Raised on every rank."""


@contextmanager
def guard(what: str, timeout_s: float | None = None, group=None):
    """Re-raise a communication failure inside the block as :class:`ParallelError` saying where it happened
    (``group``: named by its members' global ranks, computed only on failure)."""
    try:
        yield
    except ParallelError:
        raise
    except (RuntimeError, dist.DistError) as e:  # DistBackendError / DistNetworkError derive from DistError
        rank = dist.get_rank() if dist.is_initialized() else "?"
        where = ""
        if group is not None:
            try:
                where = f" in group {global_ranks(group)}"
            except (RuntimeError, ValueError):
                pass
        limit = f" within timeout_s={timeout_s:g}" if timeout_s else ""
        raise ParallelError(
            f"fastattn.parallel: rank {rank}: {what}{where} failed: a peer rank failed, exited or did not answer"
            f"{limit} (or ranks passed shards of other shapes, or called attention a different number of times);"
            f" the run stops on every rank ({type(e).__name__}: {e})"
        ) from e


def global_ranks(group) -> list[int]:
    """Global ranks of ``group``'s members (None: the world), in group-rank order."""
    group = group if group is not None else dist.group.WORLD
    return [dist.get_global_rank(group, i) for i in range(dist.get_world_size(group))]


def seq_to_heads(
    x: torch.Tensor, order: torch.Tensor | None, group, size: int, timeout_s=None
) -> torch.Tensor:
    """Ulysses all-to-all: token shards of all heads -> all group tokens of this rank's heads.

    Args:
        x: ``[P, B, S_local, H, D]`` this rank's tokens, every head.
        order: LongTensor ``[H]``: global head ids grouped by rank (rank ``j`` gets ``order[j*H/size:(j+1)*H/size]``);
            None for the contiguous split.
        group, size: the Ulysses process group and its size.
    Returns:
        ``[P, B, size * S_local, H / size, D]``: the tokens of group rank 0, then rank 1..., for this rank's heads.
    """
    p, b, s, h, d = x.shape
    if order is not None:
        x = x.index_select(3, order.to(x.device))
    if size == 1:
        return x
    send = x.reshape(p, b, s, size, h // size, d).permute(3, 0, 1, 2, 4, 5).contiguous()
    recv = torch.empty_like(send)
    with guard("Ulysses all-to-all (sequence -> heads)", timeout_s, group):
        dist.all_to_all_single(recv, send, group=group)
    # recv[j]: group rank j's tokens for this rank's heads
    return recv.permute(1, 2, 0, 3, 4, 5).reshape(p, b, size * s, h // size, d)


def heads_to_seq(
    y: torch.Tensor, inverse: torch.Tensor | None, group, size: int, timeout_s=None
) -> torch.Tensor:
    """Inverse of :func:`seq_to_heads`: ``[P, B, size * S_local, H / size, D]`` -> ``[P, B, S_local, H, D]``.

    ``inverse``: ``argsort(order)`` of the order :func:`seq_to_heads` used (puts the heads back in the model's
    order); None for the contiguous split."""
    p, b, n, h, d = y.shape
    s = n // size
    if size == 1:
        out = y
    else:
        send = y.reshape(p, b, size, s, h, d).permute(2, 0, 1, 3, 4, 5).contiguous()
        recv = torch.empty_like(send)
        with guard("Ulysses all-to-all (heads -> sequence)", timeout_s, group):
            dist.all_to_all_single(recv, send, group=group)
        # recv[j]: this rank's tokens for group rank j's heads
        out = recv.permute(1, 2, 3, 0, 4, 5).reshape(p, b, s, size * h, d)
    if inverse is not None:
        out = out.index_select(3, inverse.to(out.device))
    return out


def all_gather(x: torch.Tensor, group, size: int, what: str, timeout_s=None) -> list[torch.Tensor]:
    """Every group rank's ``x`` (equal shapes), in group-rank order."""
    x = x.contiguous()
    if size == 1:
        return [x]
    parts = [torch.empty_like(x) for _ in range(size)]
    with guard(f"{what}: all-gather", timeout_s, group):
        dist.all_gather(parts, x, group=group)
    return parts


class RingShift:
    """One step of the ring: send ``buf`` to global rank ``send_to`` and receive a buffer of its shape from
    ``recv_from``, asynchronously (the caller computes on ``buf`` meanwhile; :meth:`wait` returns the new one)."""

    def __init__(self, buf: torch.Tensor, group, send_to: int, recv_from: int, timeout_s=None):
        self.what = f"ring send/recv (-> rank {send_to}, <- rank {recv_from})"
        self.timeout_s = timeout_s
        self.recv = torch.empty_like(buf)
        ops = [
            dist.P2POp(dist.isend, buf, send_to, group),
            dist.P2POp(dist.irecv, self.recv, recv_from, group),
        ]
        with guard(self.what, timeout_s):
            self.works = dist.batch_isend_irecv(ops)

    def wait(self) -> torch.Tensor:
        with guard(self.what, self.timeout_s):
            for w in self.works:
                w.wait()
        return self.recv
