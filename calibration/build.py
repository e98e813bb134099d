"""From observations to a plan: the options of every head, then the chosen ones as a per-head table.

:func:`make_problem` turns :class:`~fastattn.calibration.observe.Observations` into the knapsack of
:mod:`fastattn.calibration.select` (errors normalised by each layer's output energy, works from the block
maps, times from the cost model); :func:`make_plan` writes the selection as an
:class:`~fastattn.plans.AttentionPlan` with a :class:`~fastattn.plans.HeadTable` (palette of method
configs + method / axis-order / bit-width / reuse tensors ``[G, L, H]``), the format ``plans/files.py``
saves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attn_kernels.quantize import MODES as QUANT_MODES
from ..masks.layout import AXIS_ORDERS, TokenLayout
from ..plans.heads import NO_MAP, QUANT_FROM_PLAN, HeadTable, unique_maps
from ..plans.methods import BlockMapConfig, DenseConfig, SkipConfig, StripesConfig
from ..plans.schema import AttentionPlan
from .candidates import CandidateSet
from .costs import CostModel
from .observe import Observations
from .select import Problem, Selection

# Every key of every query: a full mask served by the kernel. Used where a row of dense heads must still go
# through the kernel (the runtime only keeps reused heads' outputs from kernel rows).
FULL_KERNEL = StripesConfig(key_ranges=((0.0, 1.0),))


@dataclass
class Options:
    """The options of a head: ``(candidate index, bit-width index)`` pairs, and the problem built on them."""

    pairs: list[tuple[int, int]]
    problem: Problem
    quant_err: torch.Tensor  # [G, L, H, Q] normalised
    block_mass: torch.Tensor | None = None  # [G, L, H, O, 2, n, n]: what block-map candidates are thresholded from


def step_weights(bounds, num_steps: int) -> torch.Tensor:
    """``[G]`` share of a run's steps falling in each group."""
    from .observe import step_group

    counts = torch.zeros(len(bounds) - 1, dtype=torch.float64)
    for s in range(num_steps):
        counts[step_group(s, num_steps, bounds)] += 1
    return counts / counts.sum()


def with_capture_step(sel: Selection, weights: torch.Tensor) -> Selection:
    """WA-RS captures ``R = exact - approximate`` with the first step's row and adds it at later steps. When the
    first step group holds only that step (weight 0 once the capture is taken out), the selection is free
    there; giving it the second group's row makes ``R`` the correction of the row that follows it."""
    if weights.numel() < 2 or float(weights[0]) > 0.0:
        return sel
    sel.choice[0] = sel.choice[1]
    sel.dense_rows[0] = sel.dense_rows[1]
    sel.reuse[0] = False  # nothing is cached at the first step: a reusing head would compute exactly
    return sel


def step_bounds(groups: int) -> tuple[float, ...]:
    return tuple(i / groups for i in range(groups)) + (1.0,)


def make_problem(obs: Observations, cs: CandidateSet, bits, weights: torch.Tensor, cost: CostModel,
                 dense_head_ms: float, *, quant_in_solve: bool) -> Options:  # fmt: skip
    """The knapsack of one calibration.

    ``quant_in_solve``: bit-widths below 16 compete in the solve (error-budget mode); otherwise only 16-bit
    options are valid and bit-widths are applied afterwards within a tolerance (:func:`lower_bits`).
    """
    g, l, h, c = obs.err.shape
    missing = (obs.calls == 0).nonzero().tolist()
    if missing:
        gi, li = missing[0]
        raise ValueError(
            f"no attention call was observed for step group {gi} of layer {li} ({len(missing)} (group, layer) "
            "pairs unobserved): use fewer step groups than steps, and check every layer runs self-attention"
        )
    denom = obs.energy.sum(-1, keepdim=True).clamp_min(1e-30)  # [G, L, 1]: the layer's output energy
    err_c = obs.err / denom[..., None]
    quant_err = obs.quant_err / denom[..., None]
    per_call = denom / obs.calls.clamp_min(1)[..., None]  # [G, L, 1]
    reuse_err = (obs.reuse_err / obs.reuse_calls.clamp_min(1)[:, :, None, :]) / per_call[..., None]
    allowed = (obs.reuse_calls > 0)[:, :, None, :] & any(c.reuse for c in cs.candidates)
    reuse_err = torch.where(allowed, reuse_err, torch.full_like(reuse_err, float("inf")))
    pairs = []
    for ci, cand in enumerate(cs.candidates):
        if cand.reuse:
            continue  # reuse is not an option of its own: selection chains it over the step groups
        if isinstance(cand.method, SkipConfig):
            pairs.append((ci, 0))
        else:
            pairs.extend((ci, qi) for qi in range(len(bits)))
    k = len(pairs)
    err = torch.zeros(g, l, h, k, dtype=torch.float64)
    work = torch.zeros(g, l, h, k, dtype=torch.float64)
    time = torch.zeros(g, l, h, k, dtype=torch.float64)
    valid = torch.ones(g, l, h, k, dtype=torch.bool)
    for j, (ci, qi) in enumerate(pairs):
        cand = cs.candidates[ci]
        d = float(cs.density[ci])
        err[..., j] = err_c[..., ci]
        work[..., j] = d
        if isinstance(cand.method, SkipConfig):
            continue
        err[..., j] += quant_err[..., qi]
        time[..., j] = cost.head_time(d, bits[qi], cand.order != "FHW")
        if bits[qi] != "none" and not quant_in_solve:
            valid[..., j] = False
    overhead = cost.call_overhead_ms / max(dense_head_ms, 1e-9)
    return Options(pairs, Problem(err, work, time, valid, reuse_err, weights, overhead), quant_err, obs.block_mass)


def lower_bits(options: Options, sel: Selection, cs: CandidateSet, bits, tolerance: float,
               cost: CostModel) -> torch.Tensor:  # fmt: skip
    """Density mode: move each computed head to the fastest bit-width whose own error (its share of the
    layer's relative squared error) is at most ``tolerance``; returns the new choice ``[G, L, H]``."""
    choice = sel.choice.clone()
    if tolerance <= 0 or len(bits) == 1:
        return choice
    index = {pair: j for j, pair in enumerate(options.pairs)}
    g, l, h = choice.shape
    for gi in range(g):
        for li in range(l):
            if sel.dense_rows[gi, li]:
                continue
            for hi in range(h):
                ci, qi = options.pairs[int(choice[gi, li, hi])]
                cand = cs.candidates[ci]
                if sel.reuse[gi, li, hi] or isinstance(cand.method, SkipConfig):
                    continue
                d = float(cs.density[ci])
                reordered = cand.order != "FHW"
                best = (cost.head_time(d, bits[qi], reordered), qi)
                for q2, mode in enumerate(bits):
                    if options.quant_err[gi, li, hi, q2] <= tolerance:
                        best = min(best, (cost.head_time(d, mode, reordered), q2))
                choice[gi, li, hi] = index[(ci, best[1])]
    return choice


def make_plan(
    options: Options, sel: Selection, cs: CandidateSet, bits, bounds, block_size: int, residual: bool = False
) -> AttentionPlan:
    """The selection as a per-head plan (a :class:`HeadTable` over ``[G, L, H]``); a head on a block-map
    candidate gets its map thresholded from its own block mass (identical maps are stored once). ``residual``:
    the plan shares WA-RS residuals (captured exactly at the first step, added to the approximate heads)."""
    g, l, h = sel.choice.shape
    palette: list = []
    pal_index: dict = {}

    def method_id(cfg) -> int:
        if cfg not in pal_index:
            pal_index[cfg] = len(palette)
            palette.append(cfg)
        return pal_index[cfg]

    method = torch.zeros(g, l, h, dtype=torch.int16)
    order = torch.zeros(g, l, h, dtype=torch.int8)
    quant = torch.full((g, l, h), QUANT_FROM_PLAN, dtype=torch.int8)
    reuse = torch.zeros(g, l, h, dtype=torch.bool)
    map_index = torch.full((g, l, h), NO_MAP, dtype=torch.int32)
    maps: list[torch.Tensor] = []  # bool [n, n] per blockmap head: at most a 16th of the block mass held
    dense = DenseConfig()
    for gi in range(g):
        for li in range(l):
            for hi in range(h):
                if sel.dense_rows[gi, li]:
                    method[gi, li, hi] = method_id(dense)
                    continue
                if sel.reuse[gi, li, hi]:
                    method[gi, li, hi] = method_id(dense)  # computed exactly when nothing is cached yet
                    reuse[gi, li, hi] = True
                    continue
                ci, qi = options.pairs[int(sel.choice[gi, li, hi])]
                cand = cs.candidates[ci]
                method[gi, li, hi] = method_id(cand.method)
                order[gi, li, hi] = AXIS_ORDERS.index(cand.order)
                if isinstance(cand.method, BlockMapConfig):
                    map_index[gi, li, hi] = len(maps)
                    maps.append(cs.block_map(ci, options.block_mass[gi, li, hi]))
                if bits[qi] != "none" and not isinstance(cand.method, SkipConfig):
                    quant[gi, li, hi] = QUANT_MODES.index(bits[qi])
    # The runtime keeps a layer's output for reuse only from kernel rows: a row of exact heads before a
    # reusing row would leave the reused heads an older output. Such a row runs the full mask in the kernel.
    dense_id = pal_index.get(dense)
    for gi in range(1, g):
        for li in range(l):
            if not reuse[gi, li].any() or dense_id is None:
                continue
            prev = method[gi - 1, li]
            if (
                bool((prev == dense_id).all())
                and bool((quant[gi - 1, li] == QUANT_FROM_PLAN).all())
                and not reuse[gi - 1, li].any()
            ):
                method[gi - 1, li] = method_id(FULL_KERNEL)
    block_maps = None
    if maps:
        block_maps, map_index = unique_maps(torch.stack(maps), map_index)
    table = HeadTable(
        tuple(palette),
        method,
        step_bounds=tuple(bounds),
        order_index=order if bool(order.any()) else None,
        quant_index=quant if bool((quant != QUANT_FROM_PLAN).any()) else None,
        reuse=reuse if bool(reuse.any()) else None,
        map_index=map_index if maps else None,
        block_maps=block_maps,
    )
    return AttentionPlan(method=DenseConfig(), quant="none", block_size=block_size, heads=table, residual=residual)


def describe_choice(
    options: Options, sel: Selection, cs: CandidateSet, bits, layout: TokenLayout
) -> list[dict]:
    """Per (group, layer, head): what was chosen, its block density, estimated error and bit-width."""
    from .select import _quantities

    q = _quantities(options.problem, sel.choice, sel.reuse, sel.dense_rows)
    dist = sel.reuse_distance()
    out = []
    g, l, h = sel.choice.shape
    for gi in range(g):
        for li in range(l):
            for hi in range(h):
                row = {"group": gi, "layer": li, "head": hi, "density": float(q["work"][gi, li, hi]),
                       "error": float(q["err"][gi, li, hi])}  # fmt: skip
                if sel.dense_rows[gi, li]:
                    row.update(choice="dense (row)", family="dense", bits="none")
                elif dist[gi, li, hi] > 0:
                    row.update(
                        choice="reuse",
                        family="ditfastattn",
                        bits="none",
                        reuse_groups_back=int(dist[gi, li, hi]),
                    )
                else:
                    ci, qi = options.pairs[int(sel.choice[gi, li, hi])]
                    cand = cs.candidates[ci]
                    row.update(choice=cand.label, family=cand.family, bits=bits[qi])
                out.append(row)
    return out
