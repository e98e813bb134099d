"""What one Multi-GPU rank keeps between forwards, the same in the ComfyUI process (rank 0) and in each worker:
the process-group mesh, one runtime + SequenceParallel per plan, the token positions per token layout.

Rank 0 decides and sends; every rank then calls the same methods in the same order, so the collectives they
contain (creating the mesh, exchanging balanced positions, the attention and gathers of a forward) match.
"""

from __future__ import annotations

from collections import Counter, OrderedDict

import torch

from ...attention.runtime import AttentionRuntime
from ...parallel.comm import all_gather
from .multigpu_shard import ACTIVE, ParallelForward, contiguous_positions, host_dense, local_order

MAX_PLANS = 4  # runtimes kept per rank (one per plan in use; evicted in the same order on every rank)


class RankState:
    """One rank's mesh, runtimes and positions.

    Args:
        rank, world: this process's place in the process group.
    """

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.mesh = None
        self.mesh_key = None
        self.plans: OrderedDict = OrderedDict()  # plan key -> SequenceParallel
        self._positions: dict = {}  # (plan key, layout) -> (local, every)
        self.notes: Counter = Counter()

    def set_mesh(self, config: dict, heads: int | None) -> None:
        """Build the Ulysses x ring mesh (collective: every rank calls it with the same arguments)."""
        from ...parallel import ParallelMesh

        key = (tuple(sorted(config.items())), heads)
        if key == self.mesh_key:
            return
        self.mesh = ParallelMesh.create(config, heads=heads)
        self.mesh_key = key
        self.plans.clear()
        self._positions.clear()

    def set_plan(self, key, plan, num_layers: int | None) -> None:
        """A runtime for ``plan`` under ``key`` (local: no communication)."""
        from ...parallel import SequenceParallel

        if self.mesh is None:
            raise RuntimeError("fastattn Multi-GPU: a plan arrived before the mesh")
        runtime = AttentionRuntime(plan, num_layers, dense_fn=host_dense)
        self.plans[key] = SequenceParallel(self.mesh, runtime)
        self.plans.move_to_end(key)
        while len(self.plans) > MAX_PLANS:
            old, _ = self.plans.popitem(last=False)
            for k in [k for k in self._positions if k[0] == old]:
                del self._positions[k]

    def reset_run(self) -> None:
        """A new sampling run: every runtime forgets what the last run cached."""
        for sp in self.plans.values():
            sp.runtime.reset_run()

    def positions(self, key, layout) -> tuple[torch.Tensor, torch.Tensor]:
        """``(local, every)`` for ``layout``: this rank's global token positions in its blocks' local order, and
        every rank's in rank order. db-SP's ring balance where the SequenceParallel gives one (exchanged once per
        layout: a collective), else the contiguous split."""
        cached = self._positions.get((key, layout))
        if cached is not None:
            return cached
        sp = self.plans[key]
        text = layout.text_len if layout.text_first else 0
        try:
            balanced = sp.positions(layout)
        except ValueError as e:  # e.g. fewer kernel blocks than ring ranks: the same on every rank
            self.notes[f"ring balance not used: {e}"] += 1
            balanced = None
        if balanced is None:
            rows = [local_order(contiguous_positions(layout.seq_len, text, self.world, r), text)
                    for r in range(self.world)]  # fmt: skip
            local = rows[self.rank]
        else:
            local = local_order(balanced, text)
            mesh = self.mesh
            rows = [r.cpu() for r in all_gather(local.to(mesh.device), mesh.world_group, mesh.world_size,
                                                "exchanging token positions", mesh.config.timeout_s)]  # fmt: skip
        self._positions[(key, layout)] = (local, torch.cat(rows))
        return self._positions[(key, layout)]

    def run(self, key, ctx, family: str, forward):
        """Run ``forward()`` (the diffusion model's forward on this rank) with this rank's blocks sharded."""
        sp = self.plans[key]
        layout = ctx.layout
        local, every = self.positions(key, layout)
        text = layout.text_len if layout.text_first else 0
        state = sp.runtime.begin_forward(ctx)
        pf = ParallelForward(family, sp, state, layout.seq_len, text, local, every)
        token = ACTIVE.set(pf)
        try:
            out = forward()
        finally:
            ACTIVE.reset(token)
            self.notes.update(pf.notes)
        sp.runtime.end_forward(state)
        return out
