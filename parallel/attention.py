"""SequenceParallel: one rank's share of every self-attention call, equal to the one-process runtime's rows.

Each rank holds a token shard ``[B, S_local, H, D]`` of q, k and v (all heads) and the global positions of its
tokens. :meth:`SequenceParallel.attend`:

1. checks, once per shape and positions, that every rank agrees (same shapes, dtype and device type; the
   positions together a permutation of the whole sequence) and learns every rank's positions;
2. Ulysses all-to-all in the rank's Ulysses group: token shards of all heads -> every token of the group for
   ``H / U`` heads, in the head order of the layer (db-SP: heads grouped by :func:`~.balance.assign_heads_lpt`
   on the plan's per-head block counts, one order per layer for the whole run so per-layer caches keep the
   same heads; ``balance="none"``: contiguous);
3. the group's tokens sorted by global position: with ``ring == 1`` that is the whole sequence in order,
   with ``ring > 1`` this ring rank's chunk;
4. the runtime's :meth:`~fastattn.attention.AttentionRuntime.attend` with a
   :class:`~fastattn.attention.runtime.Shard` (the heads held, the sequence length, and the
   :class:`~.ring.RingAttention` executor when ``ring > 1``), so it runs exactly this rank's rows of the plan;
5. the inverse all-to-all: this rank's tokens, all heads, in the model's head order.

Per-rank stats stay in the runtime; :meth:`SequenceParallel.stats` gathers them on request.

Example (every rank, under torchrun)::

    init_process_group({"ulysses": 2, "ring": 2})
    mesh = ParallelMesh.create({"ulysses": 2, "ring": 2}, heads=24)
    sp = SequenceParallel(mesh, runtime)
    state = runtime.begin_forward(ForwardContext(layout, step, num_steps))
    out = sp.attend(state, q_shard, k_shard, v_shard, positions=my_positions)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..attention.runtime import AttentionRuntime, Shard
from ..masks.block_mask import BlockMask
from ..plans.methods import call_handler
from . import balance
from .comm import all_gather, guard, heads_to_seq, seq_to_heads
from .mesh import ParallelMesh
from .ring import RingAttention

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class _Placement:
    """Where the tokens are for one (shape, positions) signature, the same on every rank."""

    seq_len: int
    # the Ulysses group's tokens (all-to-all order) -> ascending global position; None: already sorted
    sort: torch.Tensor | None
    unsort: torch.Tensor | None
    chunk: torch.Tensor  # this ring rank's positions, ascending
    ring: RingAttention | None


class SequenceParallel:
    """This rank's share of every self-attention call under Ulysses x ring sequence parallelism.

    Args:
        mesh: the process groups (:meth:`ParallelMesh.create`). With both degrees ``"auto"`` the mesh holds every
            factorization of the world and each layer runs the one :func:`~.balance.choose_degrees` predicts
            fastest for its mask (ring degrees are avoided where the ring would fall back).
        runtime: the model's :class:`~fastattn.attention.AttentionRuntime` (one per rank, same plan).
        backend: kernel backend of ring steps (``"auto"``, ``"triton"``, ``"reference"``).
        latency_model: the :class:`~.balance.LatencyModel` of auto degrees (default: its H200 figures).
    """

    def __init__(
        self,
        mesh: ParallelMesh,
        runtime: AttentionRuntime,
        backend: str = "auto",
        latency_model: balance.LatencyModel | None = None,
    ):
        if not isinstance(mesh, ParallelMesh):
            raise TypeError(f"mesh must be a ParallelMesh, got {type(mesh).__name__}")
        if not isinstance(runtime, AttentionRuntime):
            raise TypeError(f"runtime must be an AttentionRuntime, got {type(runtime).__name__}")
        self.mesh = mesh
        self.runtime = runtime
        self.backend = backend
        self.latency_model = latency_model
        self._exchanges: dict = {}  # call signature -> every rank's positions
        self._placements: dict = {}
        self._degrees: dict = {}  # (layer, layout, heads, seq_len) -> (U, R), with auto degrees
        self.degrees: dict[int, tuple[int, int]] = {}  # layer -> the (U, R) chosen for it
        self._orders: dict = {}  # (layer, layout, heads, seq_len, U) -> head order or None
        self._on_device: dict = {}  # id(order) -> (order, on the tensors' device, its inverse there)
        self.imbalance: dict[int, tuple[float, float]] = {}  # layer -> (this order's ratio, contiguous ratio)
        # layout -> rows of positions per rank (None: contiguous), and the ring ratios or why not balanced
        self._ring_positions: dict = {}
        self.ring_balance: dict = {}

    # ------------------------------------------------------------------ checks and placement
    def _check(self, query, key, value) -> None:
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"fastattn.parallel: {name} must be a [B, S_local, H, D] tensor, got {got}")
        if key.shape != query.shape or value.shape[:3] != query.shape[:3]:
            raise ValueError(
                "fastattn.parallel: query, key and value must be this rank's shard of one self-attention call, "
                f"[B, S_local, H, D] each; got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
            )
        if not (query.dtype == key.dtype == value.dtype) or query.dtype not in _DTYPES:
            raise TypeError(f"fastattn.parallel: q, k, v dtypes {query.dtype}, {key.dtype}, {value.dtype}")
        if not (query.device == key.device == value.device):
            raise ValueError(f"fastattn.parallel: q, k, v on {query.device}, {key.device}, {value.device}")
        if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
            raise RuntimeError(
                "fastattn.parallel: sequence-parallel attention is inference-only (its communication carries "
                "no gradients); run under torch.no_grad() / torch.inference_mode()"
            )

    def _exchange(self, query, value, positions) -> torch.Tensor:
        """Every rank's positions ``[world, S_local]``, after checking that the ranks agree on the call. A
        collective of the whole mesh, done once per (shapes, positions): every rank learns every rank's
        signature, so a mismatch raises the same error everywhere."""
        mesh = self.mesh
        b, s_local, h, d = query.shape
        if positions is not None:
            if not isinstance(positions, torch.Tensor) or positions.dtype not in (torch.int32, torch.int64):
                raise TypeError("fastattn.parallel: positions must be an integer tensor [S_local] or None")
            if tuple(positions.shape) != (s_local,):
                raise ValueError(
                    f"fastattn.parallel: positions must be [S_local] = [{s_local}] (one global position per token "
                    f"of this rank's shard), got {tuple(positions.shape)}"
                )
            positions = positions.detach().cpu().long()
        device_ok = query.device.type == mesh.device.type
        pos_key = None if positions is None else hash(positions.numpy().tobytes())
        signature = (b, s_local, h, d, value.shape[-1], query.dtype, device_ok, pos_key)
        hit = self._exchanges.get(signature)
        if hit is not None:
            return hit
        world, timeout = mesh.world_size, mesh.config.timeout_s
        shape = [b, s_local, h, d, value.shape[-1], _DTYPES.index(query.dtype)]
        meta = torch.tensor(shape + [int(device_ok), int(positions is None)], device=mesh.device)
        metas = torch.stack(all_gather(meta, mesh.world_group, world, "checking the call's shapes", timeout))
        metas = metas.cpu()
        if not bool((metas == metas[:1]).all()) or not bool(metas[:, 6].all()):
            raise ValueError(
                "fastattn.parallel: ranks disagree on the attention call:\n" + _describe(metas, mesh)
            )
        seq_len = s_local * world
        if positions is None:
            every = torch.arange(seq_len).view(world, s_local)
        else:
            mine = positions.to(mesh.device)
            every = torch.stack(all_gather(mine, mesh.world_group, world, "exchanging positions", timeout))
            every = every.cpu()
            if not torch.equal(every.flatten().sort().values, torch.arange(seq_len)):
                raise ValueError(
                    f"fastattn.parallel: the ranks' positions must together hold every token 0..{seq_len - 1} "
                    f"exactly once ({world} ranks x {s_local} tokens); they do not"
                )
        if len(self._exchanges) > 16:
            self._exchanges.clear()
            self._placements.clear()
        self._exchanges[signature] = every
        return every

    def _placement(self, mesh: ParallelMesh, every: torch.Tensor, device) -> _Placement:
        """Where this rank's tokens are under ``mesh`` (cached per positions and degrees)."""
        key = (id(every), mesh.ulysses, mesh.ring, device)
        hit = self._placements.get(key)
        if hit is not None and hit[0] is every:
            return hit[1]
        u, r = mesh.ulysses, mesh.ring
        seq_len = every.numel()
        chunks = [every[i * u : (i + 1) * u].flatten() for i in range(r)]  # the all-to-all's token order
        mine = chunks[mesh.ring_rank]
        order = torch.argsort(mine)
        sorted_ = bool((order == torch.arange(len(mine))).all())
        ring = None
        if r > 1:
            ring = RingAttention(
                mesh.ring_group,
                mesh.ring_rank,
                r,
                [c.sort().values for c in chunks],
                seq_len,
                backend=self.backend,
                timeout_s=mesh.config.timeout_s,
            )
        placement = _Placement(
            seq_len,
            None if sorted_ else order.to(device),
            None if sorted_ else torch.argsort(order).to(device),
            mine.sort().values,
            ring,
        )
        self._placements[key] = (every, placement)
        return placement

    # ------------------------------------------------------------------ degrees (auto)
    def _call_mesh(self, layer: int | None, ctx, query, seq_len: int) -> ParallelMesh:
        """The mesh of this call: the fixed one, or with both degrees ``"auto"`` the ``(U, R)`` the latency
        model predicts fastest for the layer (chosen once per layer and layout: caches keep their shapes)."""
        mesh = self.mesh
        if not mesh.auto or layer is None or ctx is None or ctx.layout is None:
            return mesh
        key = (layer, ctx.layout, query.shape[2], seq_len)
        if key not in self._degrees:
            self._degrees[key] = self._choose(layer, ctx.layout, query, seq_len)
        return mesh.options.get(self._degrees[key], mesh)

    def _choose(self, layer: int, layout, query, seq_len: int) -> tuple[int, int]:
        rt, mesh = self.runtime, self.mesh
        default = (mesh.ulysses, mesh.ring)
        entries = rt.layer_masks(layer, layout, seq_len)
        if entries:
            mask = max(entries, key=lambda e: e[0])[1]  # the mask of the longest step group
        else:
            lay = rt.call_layout(layout, seq_len)
            if lay is None:
                return default
            mask = BlockMask.dense(lay, rt.plan.block_size)
        reason = self._ring_reason(layer)
        b, _, heads, d = query.shape
        try:
            choice = balance.choose_degrees(
                mask,
                heads,
                mesh.world_size,
                head_dim=d,
                batch=b,
                dtype_bytes=query.element_size(),
                ring_ok=reason is None,
                ring_reason=reason or "",
                method=mesh.config.balance,
                model=self.latency_model,
            )
        except ValueError:
            return default  # no option fits: the mesh's own degrees say why at the call
        self.degrees[layer] = (choice.ulysses, choice.ring)
        return choice.ulysses, choice.ring

    def _ring_reason(self, layer: int) -> str | None:
        """Why a ring would fall back on this layer's calls (then auto degrees avoid it), or None."""
        plan = self.runtime.plan
        table = plan.heads
        if table is None and call_handler(plan.method) is not None:
            return "dynamic (top-p) selection reads the whole sequence"
        if plan.quant != "none":
            return "quantized plan: keys and values all-gathered under a ring"
        if table is not None and 0 <= layer < table.num_layers:
            if table.order_index is not None and bool((table.order_index[:, layer] != 0).any()):
                return "reordered (PARO) heads: all-gathered under a ring"
            if table.quant_index is not None and bool((table.quant_index[:, layer] > 0).any()):
                return "quantized heads: keys and values all-gathered under a ring"
        return None

    # ------------------------------------------------------------------ head order (db-SP)
    def head_order(
        self, layer: int | None, layout, heads: int, seq_len: int, ulysses: int | None = None
    ) -> torch.Tensor | None:
        """Global head ids grouped by Ulysses rank for ``layer`` over ``ulysses`` ranks (default: the mesh's);
        None: contiguous. The same on every rank (the plan is), and fixed per layer for the whole run."""
        u = self.mesh.ulysses if ulysses is None else ulysses
        if self.mesh.config.balance == "none" or u == 1 or layer is None or layout is None:
            return None
        key = (layer, layout, heads, seq_len, u)
        if key not in self._orders:
            loads = self.runtime.head_loads(layer, layout, seq_len)
            order = None
            if loads is not None and loads.numel() == heads:
                assigned = balance.assign_heads_lpt(loads, u)
                plain = balance.contiguous_heads(loads, u)
                self.imbalance[layer] = (assigned.ratio, plain.ratio)
                if not torch.equal(assigned.order, torch.arange(heads)):
                    order = assigned.order
            self._orders[key] = order
        return self._orders[key]

    # ------------------------------------------------------------------ ring balance (db-SP)
    def positions(self, layout) -> torch.Tensor | None:
        """The global token positions this rank should hold for ``layout`` (shard the model's tokens by them and
        pass them to :meth:`attend`), or None for contiguous shards.

        With ``ring > 1`` and ``balance="db-sp"``: ring ranks get the blocks db-SP's biased greedy
        (:func:`~.balance.assign_blocks_ring`) chooses on the plan's block loads summed over layers, heads and
        step groups (one token split serves every layer), cut into equal pieces for the Ulysses ranks
        (:func:`~.balance.rank_positions`); whole blocks, so the ring runs natively. None when nothing is
        balanced (one rank in the ring, auto degrees, ``balance="none"``, dense or dynamic plans) or when the blocks cannot
        give every rank the same token count; :attr:`ring_balance` says which, per layout. The same on every
        rank (the plan is)."""
        mesh = self.mesh
        if mesh.ring == 1 or mesh.auto or mesh.config.balance == "none" or layout is None:
            return None
        if layout not in self._ring_positions:
            self._ring_positions[layout] = self._balanced_positions(layout)
        rows = self._ring_positions[layout]
        return None if rows is None else rows[mesh.rank]

    def _balanced_positions(self, layout) -> torch.Tensor | None:
        table = self.runtime.plan.heads
        load, geometry = None, None
        for layer in range(table.num_layers) if table is not None else (0,):
            for share, mask, reused in self.runtime.layer_masks(layer, layout) or ():
                block_map = mask.to_block_map()
                if reused is not None and block_map.shape[1] == reused.numel():
                    block_map[:, reused] = False  # reused heads compute nothing
                part = balance.ring_block_loads(block_map).double() * share
                load, geometry = (part if load is None else load + part), mask
        if load is None:
            self.ring_balance[layout] = "nothing to balance: no static block mask (dense or dynamic plan)"
            return None
        ring = self.mesh.ring
        try:  # fewer blocks than ring ranks, or blocks that cannot give every rank the same token count
            owner = balance.assign_blocks_ring(load, ring)
            rows = balance.rank_positions(geometry, owner, self.mesh.ulysses, ring)
        except ValueError as e:
            self.ring_balance[layout] = f"contiguous shards kept: {e}"
            return None
        plain = balance.contiguous_owner(len(owner), ring)
        self.ring_balance[layout] = (
            balance.ring_imbalance(load, owner, ring),
            balance.ring_imbalance(load, plain, ring),
        )
        return rows

    # ------------------------------------------------------------------ the call
    def attend(
        self, state, query, key, value, attn_mask=None, scale=None, layer: int | None = None, positions=None
    ) -> torch.Tensor:
        """This rank's rows of one self-attention call.

        Args:
            state: the runtime's ForwardState of this forward (or None: dense, counted).
            query, key, value: this rank's token shard ``[B, S_local, H, D]``, every head. ``S_local`` is the same
                on every rank; the whole sequence has ``S = S_local * world`` tokens.
            attn_mask: as the one-process runtime takes it, over the whole sequence (key dim ``S``, in global
                order; a query dim of ``S`` and a head dim of ``H`` are cut to this rank's rows and heads).
            scale, layer: as :meth:`AttentionRuntime.attend`.
            positions: LongTensor ``[S_local]``: the global position of each token of the shard (a CPU tensor;
                e.g. a text shard then a latent shard, as diffusers' context-parallel split gives for Flux).
                None: rank ``r`` holds tokens ``r * S_local .. (r + 1) * S_local - 1``.
        Returns:
            ``[B, S_local, H, D]``: this rank's rows of the one-process ``runtime.attend`` on the whole sequence.
        """
        self._check(query, key, value)
        every = self._exchange(query, value, positions)
        seq_len = every.numel()
        ctx = state.ctx if state is not None else None
        layer_index = layer if layer is not None else (state.layer_counter if state is not None else None)
        mesh = self._call_mesh(layer_index, ctx, query, seq_len)
        heads, u = query.shape[2], mesh.ulysses
        if heads % u:
            raise ValueError(
                f"fastattn.parallel: ulysses {u} must divide the {heads} heads of the call (each Ulysses rank "
                f"holds heads / ulysses of them)"
            )
        place = self._placement(mesh, every, query.device)
        order = self.head_order(layer_index, ctx.layout if ctx is not None else None, heads, seq_len, u)
        held = (order if order is not None else torch.arange(heads)).view(u, -1)[mesh.ulysses_rank]
        inverse = None
        if order is not None:  # device copies, made once per order
            if self._on_device.get(id(order), (None,))[0] is not order:
                self._on_device[id(order)] = (
                    order,
                    order.to(query.device),
                    torch.argsort(order).to(query.device),
                )
            order, inverse = self._on_device[id(order)][1:]
        timeout = mesh.config.timeout_s
        if value.shape[-1] == query.shape[-1]:
            q, k, v = seq_to_heads(torch.stack([query, key, value]), order, mesh.ulysses_group, u, timeout)
        else:
            q, k = seq_to_heads(torch.stack([query, key]), order, mesh.ulysses_group, u, timeout)
            v = seq_to_heads(value[None], order, mesh.ulysses_group, u, timeout)[0]
        if place.sort is not None:
            q, k, v = (x.index_select(1, place.sort) for x in (q, k, v))
        mask = self._local_mask(attn_mask, held, place, heads)
        shard = Shard(tuple(held.tolist()), seq_len, place.ring)
        out = self.runtime.attend(state, q, k, v, mask, scale, layer=layer, shard=shard)
        if place.unsort is not None:
            out = out.index_select(1, place.unsort)
        return heads_to_seq(out[None], inverse, mesh.ulysses_group, u, timeout)[0]

    def _local_mask(self, attn_mask, held: torch.Tensor, place: _Placement, heads: int):
        """The whole call's ``attn_mask`` cut to this rank's heads and (with a ring) query rows."""
        if attn_mask is None:
            return None
        m = attn_mask
        if m.dim() == 4 and m.shape[1] == heads and heads > 1:
            m = m.index_select(1, held.to(m.device))
        if place.ring is not None and m.dim() == 4 and m.shape[2] == place.seq_len:
            m = m.index_select(2, place.chunk.to(m.device))  # this ring rank's query rows
        return m

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict:
        """The runtime stats of every rank, gathered (collective: every rank must call it).

        Counts (calls, fallbacks by reason...) are summed over ranks: each rank counts its share of every call,
        so ``calls`` is ``world_size`` times the calls of the model. ``density`` is over the work of all ranks.
        ``per_rank`` holds each rank's own dict; ``parallel`` the mesh and the head balance (per layer, the
        sparse imbalance ratio of the order used and of the contiguous split).
        """
        rt = self.runtime.stats
        mine = rt.as_dict()
        mine["work_total"], mine["work_done"] = rt.work_total, rt.work_done
        every = [None] * self.mesh.world_size
        with guard("gathering stats", self.mesh.config.timeout_s):
            dist.all_gather_object(every, mine, group=self.mesh.world_group)
        merged = _merge_stats(every)
        merged["per_rank"] = every
        ratios = list(self.imbalance.values())
        merged["parallel"] = dict(
            self.mesh.describe(),
            head_imbalance={layer: round(a, 4) for layer, (a, _) in self.imbalance.items()},
            head_imbalance_contiguous={layer: round(b, 4) for layer, (_, b) in self.imbalance.items()},
            mean_head_imbalance=sum(a for a, _ in ratios) / len(ratios) if ratios else 1.0,
            ring_balance={str(lay): v for lay, v in self.ring_balance.items()},
            degrees=dict(self.degrees),
        )
        return merged


def _merge_stats(every: list[dict]) -> dict:
    out: dict = {}
    for d in every:
        for k, v in d.items():
            if isinstance(v, dict):
                out.setdefault(k, Counter()).update(v)
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
                out[k] = out.get(k, 0) + v
    out = {k: dict(v) if isinstance(v, Counter) else v for k, v in out.items()}
    total, done = out.get("work_total", 0.0), out.get("work_done", 0.0)
    density = done / total if total else 1.0
    out.update(
        density=density,
        attention_work_saved=1.0 - density,
        est_attention_speedup=(1.0 / density) if density > 0 else float("inf"),
        layers_per_forward=every[0].get("layers_per_forward"),
    )
    return out


def _describe(metas: torch.Tensor, mesh: ParallelMesh) -> str:
    lines = []
    for rank, (b, s, h, d, dv, dt, dev_ok, no_pos) in enumerate(metas.tolist()):
        device = "ok" if dev_ok else f"not on the process group's device type ({mesh.device.type})"
        positions = "default" if no_pos else "given"
        lines.append(
            f"  rank {rank}: q/k [B={b}, S_local={s}, H={h}, D={d}], v D={dv}, {_DTYPES[dt]}, device {device}, "
            f"positions {positions}"
        )
    return "\n".join(lines)
