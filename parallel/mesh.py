"""ParallelMesh: the process group cut into Ulysses and ring sub-groups.

Rank ``r`` of the group (``U`` Ulysses x ``R`` ring ranks) sits at Ulysses index ``r % U`` and ring index
``r // U``: the ``U`` consecutive ranks ``i*U .. i*U + U - 1`` form Ulysses group ``i`` (consecutive ranks share a
node under torchrun, where the all-to-all, which moves the most bytes, has the fastest links), and the ranks with
the same Ulysses index form a ring group (they hold the same heads and pass key/value chunks around).

:func:`init_process_group` starts torch.distributed from torchrun's environment with the config's timeout (NCCL
on CUDA, gloo on the CPU); :meth:`ParallelMesh.create` then checks that every rank joined (a monitored barrier on
gloo names the ranks that did not) and builds the sub-groups. With both degrees ``"auto"`` it builds the sub-groups
of every factorization ``U x R`` of the world (Ulysses dividing the heads when they are given) in
:attr:`ParallelMesh.options`, and :class:`~.attention.SequenceParallel` picks one per layer.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .comm import ParallelError, global_ranks, guard
from .config import AUTO, ParallelConfig


def init_process_group(config: ParallelConfig | dict | None = None, backend: str | None = None) -> None:
    """Start torch.distributed from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...) unless it
    is already started: NCCL when CUDA is available (and this process's GPU set from ``LOCAL_RANK``), else gloo;
    collectives time out after ``config.timeout_s``."""
    config = ParallelConfig.from_any(config)
    if dist.is_initialized():
        return
    if "WORLD_SIZE" not in os.environ:
        raise RuntimeError(
            "fastattn.parallel: torch.distributed is not started and WORLD_SIZE is unset: launch with "
            "torchrun --nproc-per-node N (or call torch.distributed.init_process_group first)"
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=config.timeout_s))


@dataclass(frozen=True, eq=False)
class ParallelMesh:
    """This rank's place in the Ulysses x ring grid and the sub-groups it communicates in.

    Attributes:
        config: the settings, with ``ulysses`` and ``ring`` resolved to ints.
        group: the process group the mesh was made of (None: the default world group).
        rank, world_size: this process's rank in ``group`` and the group's size (``ulysses * ring``).
        world_group: a group of every rank with the config's timeout (the shape checks and stats use it).
        ulysses_rank, ring_rank: indices in the Ulysses and ring groups.
        ulysses_group, ring_group: the sub-groups (process groups).
        device: where communicated tensors live (``cuda:<current>`` for NCCL, ``cpu`` for gloo).
    """

    config: ParallelConfig
    group: object
    rank: int
    world_size: int
    ulysses_rank: int
    ring_rank: int
    ulysses_group: object
    ring_group: object
    device: torch.device
    world_group: object = None
    options: dict | None = None  # (ulysses, ring) -> mesh, when the degrees are chosen per layer

    @property
    def ulysses(self) -> int:
        return self.config.ulysses

    @property
    def ring(self) -> int:
        return self.config.ring

    @classmethod
    def create(
        cls, config: ParallelConfig | dict | None = None, group=None, heads: int | None = None
    ) -> ParallelMesh:
        """Build the sub-groups of ``group`` (default: the world). Every rank of ``group`` must call it.

        ``heads``: the model's attention heads, to resolve ``"auto"`` degrees (Ulysses must divide them).
        Raises ValueError when the degrees do not fit the group size, ParallelError when a rank does not join
        within ``config.timeout_s``.
        """
        config = ParallelConfig.from_any(config)
        if not dist.is_initialized():
            raise RuntimeError(
                "fastattn.parallel: torch.distributed is not started: call fastattn.parallel.init_process_group() "
                "under torchrun, or torch.distributed.init_process_group(...)"
            )
        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        u, r = config.degrees(world, heads)
        # both degrees "auto": SequenceParallel picks (U, R) per layer among every factorization of the world
        auto = config.ulysses == AUTO and config.ring == AUTO
        candidates = [(u, r)]
        if auto:
            candidates += [
                (d, world // d)
                for d in range(world, 0, -1)
                if world % d == 0 and (heads is None or heads % d == 0) and d != u
            ]
        backend = dist.get_backend(group)
        device = (
            torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
        )
        timeout = datetime.timedelta(seconds=config.timeout_s)
        members = global_ranks(group if group is not None else dist.group.WORLD)
        with guard("joining the parallel mesh (every rank must call ParallelMesh.create)", config.timeout_s):
            if backend == "gloo":
                # names the ranks that never arrived, instead of a bare timeout
                dist.monitored_barrier(group, timeout=timeout, wait_all_ranks=True)
            else:
                dist.barrier(group)
        # new_group is collective over the whole world: every rank creates every sub-group, in the same order
        world_group = dist.new_group(members, timeout=timeout)
        meshes = {}
        for uu, rr in candidates:
            groups = _sub_groups(members, rank, uu, rr, timeout)
            cfg = ParallelConfig(uu, rr, config.balance, config.timeout_s)
            meshes[uu, rr] = cls(cfg, group, rank, world, rank % uu, rank // uu, *groups, device, world_group)
        mesh = meshes[u, r]
        if auto and len(meshes) > 1:
            object.__setattr__(mesh, "options", meshes)
        return mesh

    @property
    def auto(self) -> bool:
        """Degrees chosen per layer (both ``"auto"``): :attr:`options` holds a mesh per candidate ``(U, R)``."""
        return self.options is not None

    def describe(self) -> dict:
        return {
            "ulysses": self.ulysses,
            "ring": self.ring,
            "world_size": self.world_size,
            "rank": self.rank,
            "ulysses_rank": self.ulysses_rank,
            "ring_rank": self.ring_rank,
            "balance": self.config.balance,
            "device": str(self.device),
        }


def _sub_groups(members: list[int], rank: int, u: int, r: int, timeout) -> tuple:
    """This rank's (Ulysses group, ring group) of a ``u x r`` grid; every rank creates every group."""
    ulysses_group = ring_group = None
    for i in range(r):
        g = dist.new_group([members[i * u + j] for j in range(u)], timeout=timeout)
        if i == rank // u:
            ulysses_group = g
    for j in range(u):
        g = dist.new_group([members[i * u + j] for i in range(r)], timeout=timeout)
        if j == rank % u:
            ring_group = g
    if ulysses_group is None or ring_group is None:
        raise ParallelError(f"fastattn.parallel: rank {rank} found no sub-group ({u} x {r})")
    return ulysses_group, ring_group
