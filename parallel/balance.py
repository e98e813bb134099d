"""db-SP balancing: spread sparse attention work evenly over Ulysses and ring ranks.

Sparse plans give heads (and query/key blocks) very different amounts of work, so an even split of heads or
tokens over GPUs leaves some GPUs waiting for others. The *sparse imbalance ratio* measures this in dense
(computed) blocks: the busiest rank's critical path over the mean work per rank; 1.0 is balanced.

- Ulysses (all-to-all over heads): rank ``u`` computes a group of ``H / U`` heads. Heads go to ranks by
  longest-processing-time greedy (:func:`assign_heads_lpt`), each rank holding the same number of heads.
- Ring (key/value chunks passed around): rank ``r`` owns some query/key blocks of the sequence (the same
  blocks for its queries and its keys: self-attention shards tokens, not q and k separately). At ring
  iteration ``i`` it computes its query blocks against the key blocks of rank ``(r - i) mod R``; ranks wait
  for each other every iteration, so each iteration costs its slowest rank. Blocks go to ranks by db-SP's
  biased greedy (:func:`assign_blocks_ring`).
- Hybrid ``U x R``: heads are grouped for Ulysses first; each head group runs its own ring over the shared
  block assignment (:func:`plan_balance`).

:class:`LatencyModel` and :func:`choose_degrees` pick ``(U, R)`` for one attention call; :class:`BalanceCache`
computes all of this once per mask while the plan's masks stay the same.

Pure functions on CPU tensors; nothing here touches torch.distributed. Loads count blocks: a short (ragged)
block at the end of a text or image segment counts as a whole one, as the kernel's cost nearly does.
"""

from __future__ import annotations

import json
import math
import weakref
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from ..attn_kernels.geometry import check_int
from ..masks.block_mask import BlockMask

# ParallelConfig.balance's values; "none": contiguous heads and blocks (plain Ulysses / ring)
METHODS = ("db-sp", "none")
RING_BIAS = 2.0  # db-SP's R_b: a block staying on its original rank counts as load - R_b * w


# ----------------------------------------------------------------------------- input checks
def _check_ranks(name: str, ranks) -> int:
    ranks = check_int(name, ranks)
    if ranks < 1:
        raise ValueError(f"{name} must be >= 1, got {ranks}")
    return ranks


def _check_loads(name: str, t, dims: int, shape: str) -> torch.Tensor:
    """A real-valued, finite, non-negative tensor of ``dims`` dims, as int64 or float64 on the CPU."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {shape}, got {type(t).__name__}")
    if t.dtype == torch.bool or t.dtype.is_complex:
        raise TypeError(f"{name} must be a real-valued tensor {shape} (block counts), got {t.dtype}")
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D {shape}, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(
            f"{name} is empty (shape {tuple(t.shape)}); expected {shape} with at least one entry"
        )
    t = t.detach().cpu()
    t = t.double() if t.dtype.is_floating_point else t.long()
    if t.dtype == torch.float64 and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} holds NaN or infinite values")
    if bool((t < 0).any()):
        raise ValueError(f"{name} must be non-negative (block counts), min is {t.min().item()}")
    return t


def _check_index(name: str, t, length: int, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a LongTensor [{length}] of {what}, got {type(t).__name__}")
    if t.dtype == torch.bool or t.dtype.is_floating_point or t.dtype.is_complex:
        raise TypeError(f"{name} must be an integer tensor [{length}] of {what}, got {t.dtype}")
    if tuple(t.shape) != (length,):
        raise ValueError(f"{name} must be [{length}] ({what}), got shape {tuple(t.shape)}")
    return t.detach().cpu().long()


def _check_order(order, heads: int) -> torch.Tensor:
    order = _check_index("order", order, heads, "global head ids")
    if not torch.equal(order.sort().values, torch.arange(heads)):
        raise ValueError(f"order must be a permutation of the head ids 0..{heads - 1}, got {order.tolist()}")
    return order


def _check_owner(owner, num_blocks: int, ranks: int) -> torch.Tensor:
    owner = _check_index("owner", owner, num_blocks, "the ring rank of each block")
    if bool(((owner < 0) | (owner >= ranks)).any()):
        raise ValueError(f"owner values must be ring ranks in [0, {ranks}), got {owner.tolist()}")
    return owner


def _check_square(load) -> torch.Tensor:
    load = _check_loads("load", load, 2, "[nB, nB]")
    if load.shape[0] != load.shape[1]:
        raise ValueError(
            f"load must be square [nB, nB] (self-attention: queries and keys share blocks), got {tuple(load.shape)}"
        )
    return load


def _check_mask(mask) -> BlockMask:
    if not isinstance(mask, BlockMask):
        raise TypeError(f"mask must be a fastattn.masks.BlockMask, got {type(mask).__name__}")
    return mask


def _mask_rows(mask: BlockMask, heads: int) -> int:
    """The mask's head rows (1: shared by all heads), checked against the call's ``heads``."""
    rows = mask.kv_counts.shape[1]
    if rows not in (1, heads):
        raise ValueError(
            f"the mask has per-head rows for {rows} heads; the attention call has {heads} heads "
            f"(expected a mask with 1 head row, shared, or {heads})"
        )
    return rows


def _ring_blocks(ring: int, num_blocks: int) -> None:
    if ring > num_blocks:
        raise ValueError(
            f"{ring} ring ranks need at least {ring} blocks (one each); there are {num_blocks} blocks"
        )


def _ratio(critical: float, total: float, ranks: int) -> float:
    """Critical-path work over the mean work per rank (1.0 when there is no work at all)."""
    return 1.0 if total <= 0 else float(critical) / (float(total) / ranks)


# ----------------------------------------------------------------------------- heads (Ulysses)
def head_block_loads(mask: BlockMask, heads: int) -> torch.Tensor:
    """Dense (computed) blocks per head: int64 ``[heads]``.

    Summed over the mask's query blocks and batch rows (a mask shared by the batch counts once). A mask with
    one head row (one pattern for every head) gives every head the same load."""
    mask = _check_mask(mask)
    heads = _check_ranks("heads", heads)
    rows = _mask_rows(mask, heads)
    loads = mask.kv_counts.detach().cpu().long().sum(dim=(0, 2))
    return loads.expand(heads).clone() if rows == 1 else loads


@dataclass(frozen=True, eq=False)
class HeadAssignment:
    """Heads of one attention call over ``ranks`` Ulysses ranks.

    Args:
        order: LongTensor ``[H]``: global head ids grouped rank by rank (ascending within a rank); rank ``r``
            holds ``order[r * H / ranks : (r + 1) * H / ranks]``. ``torch.arange(H)`` is the plain split.
        loads: per-rank load ``[ranks]`` (int64 for block counts, float64 for float loads).
        ratio: sparse imbalance ratio, max over mean of ``loads`` (1.0 = balanced).
        ranks: Ulysses ranks.
    """

    order: torch.Tensor
    loads: torch.Tensor
    ratio: float
    ranks: int

    @property
    def heads_per_rank(self) -> int:
        return self.order.numel() // self.ranks

    @property
    def inverse(self) -> torch.Tensor:
        """Position of each global head in ``order`` (``order[inverse] == arange(H)``): undoes the grouping."""
        return torch.argsort(self.order)

    def heads_of(self, rank: int) -> torch.Tensor:
        """Global head ids rank ``rank`` holds."""
        n = self.heads_per_rank
        return self.order[rank * n : (rank + 1) * n]


def _check_heads_split(heads: int, ranks: int) -> None:
    if heads % ranks:
        raise ValueError(
            f"{heads} heads do not split evenly over {ranks} ranks: Ulysses gives every rank the same number "
            f"of heads, so the head count must be divisible by the Ulysses degree"
        )


def _assignment(loads: torch.Tensor, order: torch.Tensor, ranks: int) -> HeadAssignment:
    per_rank = loads[order].view(ranks, -1).sum(1)
    return HeadAssignment(order, per_rank, _ratio(per_rank.max(), per_rank.sum(), ranks), ranks)


def contiguous_heads(loads: torch.Tensor, ranks: int) -> HeadAssignment:
    """The plain Ulysses split (rank ``r`` holds heads ``r * H / ranks ...``), for comparison."""
    loads = _check_loads("loads", loads, 1, "[H] (load per head)")
    ranks = _check_ranks("ranks", ranks)
    _check_heads_split(loads.numel(), ranks)
    return _assignment(loads, torch.arange(loads.numel()), ranks)


def assign_heads_lpt(loads: torch.Tensor, ranks: int) -> HeadAssignment:
    """Longest-processing-time greedy with equal head counts: heads by descending load (ties: lower head id),
    each to the least-loaded rank (ties: lower rank) that still has room for one of its ``H / ranks`` heads.

    ``loads``: ``[H]`` non-negative load per head (e.g. :func:`head_block_loads`). ``H % ranks`` must be 0."""
    loads = _check_loads("loads", loads, 1, "[H] (load per head)")
    ranks = _check_ranks("ranks", ranks)
    heads = loads.numel()
    _check_heads_split(heads, ranks)
    per_rank, values = heads // ranks, loads.tolist()
    sums, members = [0] * ranks, [[] for _ in range(ranks)]
    for h in sorted(range(heads), key=lambda h: (-values[h], h)):
        r = min((r for r in range(ranks) if len(members[r]) < per_rank), key=lambda r: (sums[r], r))
        members[r].append(h)
        sums[r] += values[h]
    order = torch.tensor([h for m in members for h in sorted(m)], dtype=torch.long)
    return _assignment(loads, order, ranks)


def ulysses_imbalance(loads: torch.Tensor, order: torch.Tensor, ranks: int) -> float:
    """Sparse imbalance ratio of a head order over ``ranks`` Ulysses ranks: max over mean of the per-rank
    loads (1.0 = balanced). ``order = torch.arange(H)`` is the plain contiguous split."""
    loads = _check_loads("loads", loads, 1, "[H] (load per head)")
    ranks = _check_ranks("ranks", ranks)
    _check_heads_split(loads.numel(), ranks)
    return _assignment(loads, _check_order(order, loads.numel()), ranks).ratio


# ----------------------------------------------------------------------------- ring
class _BlockPairs:
    """A mask's listed (head row, query block, key block) pairs, flattened once (int32) so that the ring load
    and the per-head ring pair loads of several assignments cost one ``bincount`` each, not a pass over the
    padded index table."""

    def __init__(self, mask: BlockMask):
        self.mask, self.rows = mask, mask.kv_counts.shape[1]
        self.n_q, self.n_k = mask.num_blocks, mask.num_kv_blocks
        self._flat = self._ring_load = None

    def flat(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(head row, query block, key block)`` of every listed pair (batch rows fold onto their head row)."""
        if self._flat is None:  # on first use: a cached plan needs none of this
            counts, indices = self.mask.kv_counts.detach().cpu(), self.mask.kv_indices.detach().cpu()
            listed = torch.arange(indices.shape[-1], dtype=torch.int32) < counts[..., None]
            key = indices[listed]  # row-major: cell by cell, each cell's listed keys first
            cell = torch.repeat_interleave(torch.arange(counts.numel(), dtype=torch.int32), counts.flatten())
            self._flat = ((cell // self.n_q) % self.rows, cell % self.n_q, key)
        return self._flat

    def ring_load(self) -> torch.Tensor:
        """int64 ``[nQ, nK]``: listed pairs per (query block, key block), over all head and batch rows."""
        if self._ring_load is None:
            _, query, key = self.flat()
            flat = query * self.n_k + key
            self._ring_load = torch.bincount(flat, minlength=self.n_q * self.n_k).view(self.n_q, self.n_k)
        return self._ring_load

    def head_pairs(self, owner: torch.Tensor, ring: int) -> torch.Tensor:
        """int64 ``[rows, R, R]``: per head row, blocks of ring rank ``a``'s queries against rank ``b``'s keys."""
        # a rectangular mask runs on one ring rank: its key blocks (not its query blocks) index kv_owner
        kv_owner = owner if self.n_k == owner.numel() else owner.new_zeros(self.n_k)
        owner, kv_owner = owner.to(torch.int32), kv_owner.to(torch.int32)
        row, query, key = self.flat()
        flat = (row * ring + owner[query]) * ring + kv_owner[key]
        return torch.bincount(flat, minlength=self.rows * ring * ring).view(self.rows, ring, ring)


def ring_block_loads(block_map: torch.Tensor | BlockMask, heads: int | None = None) -> torch.Tensor:
    """Work per (query block, key block), summed over heads and batch: int64 ``[nQ, nK]``.

    ``block_map``: a bool ``[..., nQ, nK]`` block map (every leading dim summed), or a :class:`BlockMask`
    (read from its block lists). ``heads``: for a BlockMask whose one head row is shared by all heads, counts
    that row ``heads`` times (the absolute load the latency model needs; the balance does not depend on it)."""
    if isinstance(block_map, BlockMask):
        mask = block_map
        if heads is not None:
            heads = _check_ranks("heads", heads)
            rows = _mask_rows(mask, heads)
        load = _BlockPairs(mask).ring_load()
        return load * heads if heads is not None and rows == 1 else load
    if not isinstance(block_map, torch.Tensor) or block_map.dtype != torch.bool:
        got = block_map.dtype if isinstance(block_map, torch.Tensor) else type(block_map).__name__
        raise TypeError(f"block_map must be a bool tensor [..., nQ, nK] or a BlockMask, got {got}")
    if block_map.dim() < 2:
        raise ValueError(f"block_map must be [..., nQ, nK], got shape {tuple(block_map.shape)}")
    if heads is not None:
        raise ValueError(
            "heads applies to a shared BlockMask; a block map lists its heads in its leading dims"
        )
    return block_map.detach().cpu().reshape(-1, *block_map.shape[-2:]).sum(0, dtype=torch.long)


def contiguous_owner(num_blocks: int, ranks: int) -> torch.Tensor:
    """The plain ring split: blocks in order, the first ``num_blocks % ranks`` ranks one block more (as
    ``torch.tensor_split``). LongTensor ``[num_blocks]``: the ring rank of each block."""
    num_blocks, ranks = check_int("num_blocks", num_blocks), _check_ranks("ranks", ranks)
    _ring_blocks(ranks, num_blocks)
    sizes = torch.full((ranks,), num_blocks // ranks)
    sizes[: num_blocks % ranks] += 1
    return torch.repeat_interleave(torch.arange(ranks), sizes)


def block_order(owner: torch.Tensor, ranks: int) -> torch.Tensor:
    """Block ids grouped rank by rank (ascending within a rank): rank ``r``'s blocks are the next
    ``(owner == r).sum()`` entries. LongTensor ``[nB]``."""
    ranks = _check_ranks("ranks", ranks)
    n = owner.numel() if isinstance(owner, torch.Tensor) else 0
    owner = _check_owner(owner, n, ranks)
    return torch.sort(owner, stable=True).indices


def ring_pair_loads(load: torch.Tensor, owner: torch.Tensor, ranks: int) -> torch.Tensor:
    """``[R, R]``: entry ``[a, b]`` is the work of rank ``a``'s query blocks against rank ``b``'s key blocks."""
    ranks = _check_ranks("ranks", ranks)
    load = _check_square(load)
    owner = _check_owner(owner, load.shape[0], ranks)
    rows = torch.zeros(ranks, load.shape[1], dtype=load.dtype).index_add_(0, owner, load)
    return torch.zeros(ranks, ranks, dtype=load.dtype).index_add_(1, owner, rows)


def _iteration_max(pairs: torch.Tensor) -> torch.Tensor:
    """``[..., R, R]`` pair loads -> ``[..., R]``: per ring iteration ``i`` the slowest rank's work, rank ``r``
    computing its queries against the keys of rank ``(r - i) mod R``."""
    ranks = pairs.shape[-1]
    r = torch.arange(ranks)
    return torch.stack([pairs[..., r, (r - i) % ranks].amax(-1) for i in range(ranks)], dim=-1)


def ring_imbalance(load: torch.Tensor, owner: torch.Tensor, ranks: int) -> float:
    """db-SP's ring imbalance ratio: per ring iteration the busiest rank's work, summed over the iterations,
    over the mean work per rank ``total / R`` (1.0 = balanced).

    ``load``: ``[nB, nB]`` work per (query block, key block) (:func:`ring_block_loads`); ``owner``: ``[nB]`` ring
    rank of each block (its queries and its keys)."""
    pairs = ring_pair_loads(load, owner, ranks)
    return _ratio(_iteration_max(pairs).sum(), pairs.sum(), ranks)


def assign_blocks_ring(load: torch.Tensor, ranks: int, bias: float = RING_BIAS) -> torch.Tensor:
    """db-SP's biased greedy over ring ranks: LongTensor ``[nB]``, the ring rank of each block.

    A block's weight ``w`` is its query row's work (``load.sum(1)``: what its owner computes for it over the
    ring). Blocks go heaviest first (ties: lower block id) to the rank with the lowest load, where a block
    staying on its original rank (the contiguous split, :func:`contiguous_owner`) counts as ``load - bias * w``
    so that blocks move only when that pays. Every rank keeps its original block count (equal, +-1).
    The contiguous split is returned when the greedy result is not better by :func:`ring_imbalance`.
    """
    ranks = _check_ranks("ranks", ranks)
    load = _check_square(load)
    bias = _check_bias(bias)
    n = load.shape[0]
    home = contiguous_owner(n, ranks)
    room = torch.bincount(home, minlength=ranks).tolist()
    weight, origin = load.sum(1).tolist(), home.tolist()
    sums, owner = [0] * ranks, [0] * n
    for b in sorted(range(n), key=lambda b: (-weight[b], b)):
        o = origin[b]
        candidates = (r for r in range(ranks) if room[r] > 0)
        # staying home wins ties (nothing to move)
        r = min(candidates, key=lambda r: (sums[r] - (bias * weight[b] if r == o else 0), r != o, r))
        owner[b], room[r], sums[r] = r, room[r] - 1, sums[r] + weight[b]
    owner = torch.tensor(owner, dtype=torch.long)
    if ring_imbalance(load, owner, ranks) < ring_imbalance(load, home, ranks):
        return owner
    return home


def rank_positions(mask: BlockMask, owner: torch.Tensor | None, ulysses: int, ring: int) -> torch.Tensor:
    """Global token positions per rank for a ring block assignment: LongTensor ``[U * R, S / (U * R)]``.

    Row ``ring_index * U + ulysses_index`` (the mesh's rank order) holds its ring rank's share: the tokens of the
    blocks ``owner`` gives ring rank ``ring_index`` (ascending), cut into ``U`` equal consecutive pieces, so the
    Ulysses all-to-all gathers whole blocks for the ring. ``owner`` None: the contiguous split. Every ring rank
    must get the same number of tokens (whole blocks of equal size, ``nB % R == 0``) and ``U`` must divide
    it; otherwise a ValueError says so (the caller then keeps the contiguous token split)."""
    mask = _check_mask(mask)
    ulysses, ring = _check_ranks("ulysses", ulysses), _check_ranks("ring", ring)
    n = mask.num_blocks
    owner = contiguous_owner(n, ring) if owner is None else _check_owner(owner, n, ring)
    starts, ends = mask.geometry.bounds()
    chunks = []
    for r in range(ring):
        blocks = (owner == r).nonzero().flatten()
        chunks.append(torch.cat([torch.arange(int(starts[b]), int(ends[b])) for b in blocks]))
    sizes = [len(c) for c in chunks]
    if len(set(sizes)) > 1 or sizes[0] % ulysses:
        raise ValueError(
            f"ring ranks would hold {sizes} tokens ({mask.seq_len} tokens in {n} blocks of up to "
            f"{mask.block_size}); every rank needs the same count, divisible by ulysses={ulysses}: whole blocks of "
            f"one size with the block count divisible by ring={ring}"
        )
    return torch.stack(chunks).reshape(ulysses * ring, -1)


# ----------------------------------------------------------------------------- hybrid plans
def _head_pairs(pairs: _BlockPairs, heads: int, owner: torch.Tensor, ring: int) -> torch.Tensor:
    """int64 ``[H, R, R]``: per head, ring pair loads (:func:`ring_pair_loads`), summed over batch rows."""
    per_row = pairs.head_pairs(owner, ring)
    return per_row.expand(heads, ring, ring) if pairs.rows == 1 else per_row


def _group_pairs(head_pairs: torch.Tensor, order: torch.Tensor, ulysses: int) -> torch.Tensor:
    ring = head_pairs.shape[-1]
    return head_pairs[order].reshape(ulysses, -1, ring, ring).sum(1)


def hybrid_imbalance(pair_loads: torch.Tensor) -> float:
    """Sparse imbalance ratio of a ``U x R`` plan from its ``[U, R, R]`` pair loads: the slowest Ulysses group's
    ring critical path (per iteration the busiest rank, summed) over the mean work per rank ``total / (U R)``."""
    pair_loads = _check_loads("pair_loads", pair_loads, 3, "[U, R, R]")
    u, r, r2 = pair_loads.shape
    if r != r2:
        raise ValueError(f"pair_loads must be [U, R, R], got shape {tuple(pair_loads.shape)}")
    return _ratio(_iteration_max(pair_loads).sum(-1).max(), pair_loads.sum(), u * r)


@dataclass(frozen=True, eq=False)
class BalancePlan:
    """Where each head and block of one attention call runs under ``ulysses x ring`` ranks.

    Args:
        ulysses, ring: the degrees.
        method: ``"db-sp"`` (balanced) or ``"none"`` (contiguous heads and blocks).
        heads: the head groups (:class:`HeadAssignment` over ``ulysses`` ranks; its ``ratio`` is the head-level
            ratio alone).
        owner: LongTensor ``[nB]``: the ring rank of each block, or None when ``ring == 1``.
        pair_loads: int64 ``[U, R, R]``: blocks Ulysses group ``u``'s ring rank ``a`` computes against rank
            ``b``'s keys (all of the group's heads; batch rows of the mask summed).
        imbalance: the plan's sparse imbalance ratio (:func:`hybrid_imbalance`).
        baseline_imbalance: the same for the contiguous split (what plain Ulysses / ring would get).
    """

    ulysses: int
    ring: int
    method: str
    heads: HeadAssignment
    owner: torch.Tensor | None
    pair_loads: torch.Tensor
    imbalance: float
    baseline_imbalance: float

    @property
    def critical_blocks(self) -> int:
        """Blocks on the slowest rank's critical path (per ring iteration the busiest rank, summed)."""
        return int(_iteration_max(self.pair_loads).sum(-1).max())

    @property
    def moved_blocks(self) -> int:
        """Blocks not on their contiguous-split ring rank (tokens that the balanced order moves)."""
        if self.owner is None:
            return 0
        return int((self.owner != contiguous_owner(self.owner.numel(), self.ring)).sum())


def _check_degrees(mask: BlockMask, heads: int, ulysses: int, ring: int) -> None:
    _check_heads_split(heads, ulysses)
    if ring > 1:
        if mask.kv_layout is not None:
            raise ValueError(
                f"ring attention needs self-attention (a square mask); this mask has {mask.num_blocks} query "
                f"blocks x {mask.num_kv_blocks} key blocks"
            )
        _ring_blocks(ring, mask.num_blocks)


def plan_balance(
    mask: BlockMask, heads: int, ulysses: int, ring: int, *, method: str = "db-sp", bias: float = RING_BIAS
) -> BalancePlan:
    """Balance one attention call's mask over ``ulysses x ring`` ranks.

    ``mask``: the call's BlockMask (per-head ``[Bm, heads, nQ, nK]`` as the runtime builds from a plan's head
    table, or one row shared by all heads). ``method="db-sp"``: heads by :func:`assign_heads_lpt`, blocks by
    :func:`assign_blocks_ring` on the load of all heads (one token split serves every head group);
    ``"none"``: contiguous. Ring (``ring > 1``) needs a square mask with at least ``ring`` blocks."""
    mask = _check_mask(mask)
    heads = _check_ranks("heads", heads)
    ulysses, ring = _check_ranks("ulysses", ulysses), _check_ranks("ring", ring)
    _check_method(method)
    bias = _check_bias(bias)
    _mask_rows(mask, heads)
    _check_degrees(mask, heads, ulysses, ring)
    return _plan(mask, _BlockPairs(mask), heads, ulysses, ring, method, bias)


def _check_method(method) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _check_bias(bias) -> float:
    if (
        isinstance(bias, bool)
        or not isinstance(bias, (int, float))
        or not (math.isfinite(bias) and bias >= 0)
    ):
        raise ValueError(f"bias must be a finite number >= 0 (db-SP uses {RING_BIAS}), got {bias!r}")
    return float(bias)


def _plan(
    mask: BlockMask, pairs: _BlockPairs, heads: int, ulysses: int, ring: int, method: str, bias: float
) -> BalancePlan:
    """:func:`plan_balance` on checked arguments, with the mask's pairs already flattened."""
    loads = head_block_loads(mask, heads)
    plain_heads = contiguous_heads(loads, ulysses)
    plain_owner = contiguous_owner(mask.num_blocks, ring)
    if method == "db-sp":
        assigned = assign_heads_lpt(loads, ulysses)
        owner = assign_blocks_ring(pairs.ring_load(), ring, bias) if ring > 1 else plain_owner
    else:
        assigned, owner = plain_heads, plain_owner
    head_pairs = _head_pairs(pairs, heads, owner, ring)
    grouped = _group_pairs(head_pairs, assigned.order, ulysses)
    if not torch.equal(owner, plain_owner):
        head_pairs = _head_pairs(pairs, heads, plain_owner, ring)
    baseline = hybrid_imbalance(_group_pairs(head_pairs, plain_heads.order, ulysses))
    return BalancePlan(
        ulysses,
        ring,
        method,
        assigned,
        owner if ring > 1 else None,
        grouped,
        hybrid_imbalance(grouped),
        baseline,
    )


# ----------------------------------------------------------------------------- latency model
@dataclass(frozen=True)
class LatencyEstimate:
    """Predicted seconds of one attention call and its parts (``seconds`` is not their plain sum when the ring
    overlaps its transfers with compute)."""

    seconds: float
    compute_s: float  # the slowest Ulysses group's kernels and merges (per ring iteration the busiest rank)
    a2a_s: float  # Ulysses all-to-alls (q, k, v together, then the output)
    ring_s: float  # ring transfers of keys and values (R - 1 steps)
    merge_s: float  # log-sum-exp merges of the ring's partial outputs (R - 1, part of compute_s)


@dataclass(frozen=True)
class LatencyModel:
    """Predicts one sequence-parallel attention call from block loads, all-to-all bytes and ring bytes.

    Defaults are rough figures for one H200 node (NVLink) with fastattn's Triton kernels; measure on the
    machine and load them with :meth:`from_json` (a flat JSON object of these fields).

    Args:
        flops_per_s: sustained attention FLOP/s of the block-sparse kernel; one ``bs x bs`` block at head dim
            ``D`` costs ``4 bs^2 D`` FLOPs (``QK^T`` and ``PV``).
        a2a_bytes_per_s: bytes per second each rank sends in an all-to-all.
        a2a_latency_s: fixed cost of one all-to-all.
        p2p_bytes_per_s: bytes per second of one ring send/receive.
        p2p_latency_s: fixed cost of one ring step's transfer.
        kernel_launch_s: fixed cost of one kernel call (one per ring iteration).
        merge_bytes_per_s: memory bandwidth of the ring's log-sum-exp merge, which reads the running output
            and a partial one and writes the result (three float32 ``[S / R, H / U, D]`` tensors per step).
        overlap_ring: the ring sends the next keys/values while computing the current ones.
    """

    flops_per_s: float = 3.0e14
    a2a_bytes_per_s: float = 2.5e11
    a2a_latency_s: float = 3.0e-5
    p2p_bytes_per_s: float = 3.0e11
    p2p_latency_s: float = 1.5e-5
    kernel_launch_s: float = 1.0e-5
    merge_bytes_per_s: float = 3.0e12
    overlap_ring: bool = True

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "overlap_ring":
                if not isinstance(value, bool):
                    raise TypeError(f"overlap_ring must be True or False, got {value!r}")
                continue
            ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            if f.name.endswith("_per_s"):
                if not (ok and value > 0):
                    raise ValueError(f"{f.name} must be a positive finite number, got {value!r}")
            elif not (ok and value >= 0):
                raise ValueError(f"{f.name} must be a non-negative finite number of seconds, got {value!r}")
            object.__setattr__(self, f.name, float(value))

    # ----------------------------------------------------------------- files
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LatencyModel:
        if not isinstance(data, dict):
            raise TypeError(f"a latency model is a JSON object of its fields, got {type(data).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown latency model fields {unknown}; known fields: {known}")
        return cls(**data)

    @classmethod
    def from_json(cls, path: str | Path) -> LatencyModel:
        """Read measured figures (a flat JSON object; missing fields keep their defaults)."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    # ----------------------------------------------------------------- prediction
    def block_seconds(self, block_size: int, head_dim: int) -> float:
        """Seconds of one ``block_size x block_size`` block of one head."""
        return 4.0 * block_size * block_size * head_dim / self.flops_per_s

    def predict(
        self,
        pair_loads: torch.Tensor,
        *,
        seq_len: int,
        heads: int,
        head_dim: int,
        block_size: int,
        batch: int = 1,
        dtype_bytes: int = 2,
    ) -> LatencyEstimate:
        """Seconds of one call with ``pair_loads`` ``[U, R, R]`` (blocks, the whole batch counted, as
        :attr:`BalancePlan.pair_loads` times the batch for a mask shared by the batch).

        ``seq_len`` tokens, ``heads`` heads of ``head_dim``, ``batch`` and ``dtype_bytes`` size the transfers.
        Ulysses: two all-to-alls (q, k, v, then the output), each rank sending ``(U - 1) / U`` of its
        ``S / (U R)`` tokens' four tensors. Ring: ``R - 1`` steps each moving k and v of ``S / R`` tokens and
        ``H / U`` heads, then a merge of the partial outputs; every iteration waits for its slowest rank."""
        pair_loads = _check_loads("pair_loads", pair_loads, 3, "[U, R, R]")
        u, r = pair_loads.shape[0], pair_loads.shape[-1]
        if pair_loads.shape[1] != r:
            raise ValueError(f"pair_loads must be [U, R, R], got shape {tuple(pair_loads.shape)}")
        sizes = dict(seq_len=seq_len, heads=heads, head_dim=head_dim, block_size=block_size, batch=batch)
        for name, v in {**sizes, "dtype_bytes": dtype_bytes}.items():
            _check_ranks(name, v)
        _check_heads_split(heads, u)
        per_iter = _iteration_max(pair_loads).double() * self.block_seconds(block_size, head_dim)
        per_iter = per_iter + self.kernel_launch_s  # [U, R]
        step = merge = 0.0
        if r > 1:
            chunk = (
                batch * math.ceil(seq_len / r) * (heads // u) * head_dim
            )  # elements of one rank's q, k or v
            step = self.p2p_latency_s + 2 * chunk * dtype_bytes / self.p2p_bytes_per_s
            merge = 3 * chunk * 4 / self.merge_bytes_per_s
            per_iter[:, 1:] += merge
        if self.overlap_ring:  # step i + 1's keys arrive while step i computes
            ring_time = per_iter[:, :-1].clamp(min=step).sum(-1) + per_iter[:, -1]
        else:
            ring_time = per_iter.sum(-1) + (r - 1) * step
        a2a = 0.0
        if u > 1:
            tensor_bytes = batch * math.ceil(seq_len / (u * r)) * heads * head_dim * dtype_bytes
            a2a = 2 * self.a2a_latency_s + 4 * tensor_bytes * (u - 1) / u / self.a2a_bytes_per_s
        compute = float(per_iter.sum(-1).max())
        return LatencyEstimate(a2a + float(ring_time.max()), compute, a2a, (r - 1) * step, (r - 1) * merge)


# ----------------------------------------------------------------------------- degree choice
@dataclass(frozen=True, eq=False)
class DegreeOption:
    """One ``ulysses x ring`` candidate: infeasible ones carry the reason, feasible ones a plan and estimate."""

    ulysses: int
    ring: int
    reason: str | None
    plan: BalancePlan | None = None
    estimate: LatencyEstimate | None = None

    @property
    def feasible(self) -> bool:
        return self.reason is None


@dataclass(frozen=True, eq=False)
class DegreeChoice:
    """The fastest feasible option and every option considered (Ulysses degree descending)."""

    ulysses: int
    ring: int
    plan: BalancePlan
    estimate: LatencyEstimate
    options: tuple[DegreeOption, ...]


def choose_degrees(
    mask: BlockMask,
    heads: int,
    world: int,
    *,
    head_dim: int,
    batch: int = 1,
    dtype_bytes: int = 2,
    ring_ok: bool = True,
    ring_reason: str = "ring attention is not available for this call",
    method: str = "db-sp",
    bias: float = RING_BIAS,
    model: LatencyModel | None = None,
    cache: BalanceCache | None = None,
) -> DegreeChoice:
    """Pick ``(ulysses, ring)`` with ``ulysses * ring == world`` for one attention call by predicted time.

    Every factor pair of ``world`` is considered; infeasible ones say why: ``heads % ulysses != 0``; ring
    when ``ring_ok`` is False (``ring_reason`` says why, e.g. a reordered head or a top-p plan), when the mask
    is not square, or when it has fewer blocks than ring ranks. Feasible ones are balanced (``method``) and
    timed with ``model`` (default :class:`LatencyModel`). Ties go to the larger Ulysses degree. Raises
    ValueError, listing every reason, when no option fits."""
    mask = _check_mask(mask)
    heads, world = _check_ranks("heads", heads), _check_ranks("world", world)
    head_dim, batch = _check_ranks("head_dim", head_dim), _check_ranks("batch", batch)
    if not isinstance(ring_ok, bool):
        raise TypeError(f"ring_ok must be True or False, got {ring_ok!r}")
    _check_method(method)
    bias = _check_bias(bias)
    _mask_rows(mask, heads)
    model = LatencyModel() if model is None else model
    if not isinstance(model, LatencyModel):
        raise TypeError(f"model must be a LatencyModel, got {type(model).__name__}")
    mask_batch = mask.kv_counts.shape[0]
    if mask_batch not in (1, batch):
        raise ValueError(
            f"the mask has {mask_batch} batch rows; the call has batch {batch} (expected 1 or {batch})"
        )
    scale = batch if mask_batch == 1 else 1  # a mask shared by the batch runs once per batch element
    pairs = _BlockPairs(mask)  # flattened once for every option
    options = []
    for ulysses in sorted((d for d in range(1, world + 1) if world % d == 0), reverse=True):
        ring = world // ulysses
        reason = None
        if heads % ulysses:
            reason = f"{heads} heads do not split evenly over {ulysses} Ulysses ranks"
        elif ring > 1 and not ring_ok:
            reason = ring_reason
        elif ring > 1 and mask.kv_layout is not None:
            reason = (
                f"ring attention needs self-attention (a square mask); this mask has {mask.num_blocks} query "
                f"blocks x {mask.num_kv_blocks} key blocks"
            )
        elif ring > mask.num_blocks:
            reason = f"{ring} ring ranks need at least {ring} blocks; the sequence has {mask.num_blocks}"
        if reason is not None:
            options.append(DegreeOption(ulysses, ring, reason))
            continue
        if cache is not None:
            plan = cache._plan(mask, pairs, heads, ulysses, ring, method, bias)
        else:
            plan = _plan(mask, pairs, heads, ulysses, ring, method, bias)
        estimate = model.predict(
            plan.pair_loads * scale,
            seq_len=mask.seq_len,
            heads=heads,
            head_dim=head_dim,
            block_size=mask.block_size,
            batch=batch,
            dtype_bytes=dtype_bytes,
        )
        options.append(DegreeOption(ulysses, ring, None, plan, estimate))
    feasible = [o for o in options if o.feasible]
    if not feasible:
        why = "; ".join(f"{o.ulysses}x{o.ring}: {o.reason}" for o in options)
        raise ValueError(f"no (ulysses, ring) degrees with ulysses x ring = {world} fit this call: {why}")
    best = min(feasible, key=lambda o: o.estimate.seconds)  # first of equals: the larger Ulysses degree
    return DegreeChoice(best.ulysses, best.ring, best.plan, best.estimate, tuple(options))


# ----------------------------------------------------------------------------- cache
class BalanceCache:
    """Balancing results per mask, computed once while the masks stay the same.

    Keyed by the mask's identity (the runtime keeps one BlockMask per plan row, so a static plan hits every
    step; a mask built per call, e.g. top-p selection, is balanced per call) and the arguments. A weak
    reference guards against a new mask reusing a dead one's id. Least recently used entries go first."""

    def __init__(self, max_entries: int = 64):
        self.max_entries = _check_ranks("max_entries", max_entries)
        self._entries: OrderedDict = OrderedDict()
        self.hits = 0
        self.misses = 0

    def _get(self, mask: BlockMask, key: tuple, compute):
        mask = _check_mask(mask)
        key = (id(mask), *key)
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is mask:
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[1]
        self.misses += 1
        value = compute()
        self._entries[key] = (weakref.ref(mask), value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return value

    def plan(
        self,
        mask: BlockMask,
        heads: int,
        ulysses: int,
        ring: int,
        *,
        method: str = "db-sp",
        bias: float = RING_BIAS,
    ) -> BalancePlan:
        """:func:`plan_balance`, cached."""
        _check_mask(mask)
        key = ("plan", heads, ulysses, ring, method, bias)
        return self._get(
            mask, key, lambda: plan_balance(mask, heads, ulysses, ring, method=method, bias=bias)
        )

    def _plan(self, mask, pairs, heads, ulysses, ring, method, bias) -> BalancePlan:
        """:meth:`plan` on arguments :func:`choose_degrees` checked, with its flattened pairs."""
        key = ("plan", heads, ulysses, ring, method, bias)
        return self._get(mask, key, lambda: _plan(mask, pairs, heads, ulysses, ring, method, bias))

    def choose(self, mask: BlockMask, heads: int, world: int, **options) -> DegreeChoice:
        """:func:`choose_degrees` (keyword ``options`` as there), cached; its plans come from this cache."""
        options.pop("cache", None)
        key = ("choose", heads, world, *sorted(options.items()))
        return self._get(mask, key, lambda: choose_degrees(mask, heads, world, cache=self, **options))

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
