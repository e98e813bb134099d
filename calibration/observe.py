"""Observation: per (step group, layer, head), the error every candidate would make, from sampled query rows.

:class:`CalibrationObserver` is registered with the runtime (``runtime.add_observer``) while the model runs
its normal denoising loop under an *observation plan* whose every call goes through the kernel with a full
mask (exact attention, so the trajectory is the dense one). For each call and head it takes ``R`` sampled
query rows (the same positions every call, drawn once per layout from the seed), computes their exact
softmax over all keys, and pools it per key block of every axis order::

    m[r, b] = sum_{j in block b} p[r, j]          u[r, b] = sum_{j in block b} p[r, j] v[j]

A candidate mask keeps, for the query block of row ``r``, a set of key blocks ``K``; block-sparse attention
renormalises over what it keeps, so its output on row ``r`` is exactly ``sum_K u / sum_K m``. The squared
error against the exact row output is summed per candidate. Memory is ``O(R * S)`` per head: no S x S map.

Block-map candidates (PARO's calibrated masks) keep different blocks per head: the observer pools each
head's attention mass per (query block, key block) of every axis order with such candidates (the sampled
rows of a query block averaged, keys summed per block: ``[nQ, nK]`` per head, never S x S) and sums it over
the calls of each step group; the plan's map is thresholded from that sum. A map scored on the rows it was
built from would look better than it is on the rows it never saw, so the sampled rows are split in two
halves (alternate rows) pooled apart, and each half is scored against the maps thresholded from the other
half's mass so far (this call's included): a cross-fitted, slightly pessimistic estimate of the map built
from both halves.

Besides the candidates' errors it records per head: the output energy (the error scale), the error of each
bit-width (the kernel's quantized attention emulated on the same rows), the error of reusing the output of
the previous step group (DiTFastAttn-v2 head-wise reuse) and, per axis order, how concentrated the block
mass is (PARO's criterion: the share of key blocks needed to cover 90% of it).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields

import torch

from ..attn_kernels.reference import reference_attention
from ..masks.layout import AXIS_ORDERS, BlockGeometry, TokenLayout
from ..plans.files import MAX_TENSORS_BYTES, packed_maps_bytes
from .candidates import CandidateSet, position_blocks, threshold_maps

MASS_TOP_P = 0.9  # PARO concentration: share of key blocks that carry this much of a row's mass
MAX_REUSE = 2  # a head may reuse its output for at most this many step groups in a row
WORKING_SET = {"cuda": 2 << 30, "cpu": 256 << 20}  # bytes of per-chunk scratch; bounds heads per chunk
MAX_BLOCK_MASS_BYTES = 2 << 30  # pooled block mass of block-map candidates; past it they are left out


@dataclass
class Observations:
    """What the observer accumulated (sums over calls; everything a checkpoint holds).

    Shapes: ``G`` step groups, ``L`` layers, ``H`` heads, ``C`` candidates, ``Q`` bit-widths.

    Args:
        err: ``[G, L, H, C]`` summed mean squared row error of each candidate.
        energy: ``[G, L, H]`` summed mean squared norm of the exact row outputs.
        quant_err: ``[G, L, H, Q]`` summed mean squared error of each bit-width (dense mask).
        reuse_err: ``[G, L, H, K]`` summed mean squared error of the output the head had at the end of step
            group ``g - k`` (``k = 1..K``, ``K = MAX_REUSE``): what head-wise reuse returns after ``k - 1``
            reused groups.
        concentration: ``[G, L, H, 6]`` summed share of key blocks covering ``MASS_TOP_P`` of the mass, per
            axis order (``AXIS_ORDERS``).
        calls: ``[G, L]`` calls observed; reuse_calls: ``[G, L, K]`` of them with an output ``k`` groups back.
        block_mass: ``[G, L, H, O, 2, n, n]`` summed pooled attention mass per block of each half of the sampled
            rows, for the ``O`` axis orders with block-map candidates (``CandidateSet.map_orders``) on the
            calibrated layout's ``n`` blocks.
    """

    err: torch.Tensor
    energy: torch.Tensor
    quant_err: torch.Tensor
    reuse_err: torch.Tensor
    concentration: torch.Tensor
    calls: torch.Tensor
    reuse_calls: torch.Tensor
    block_mass: torch.Tensor

    @classmethod
    def zeros(cls, groups: int, layers: int, heads: int, candidates: int, bits: int, map_orders: int = 0,
              blocks: int = 0) -> Observations:  # fmt: skip
        f = dict(dtype=torch.float64)
        return cls(
            torch.zeros(groups, layers, heads, candidates, **f),
            torch.zeros(groups, layers, heads, **f),
            torch.zeros(groups, layers, heads, bits, **f),
            torch.zeros(groups, layers, heads, MAX_REUSE, **f),
            torch.zeros(groups, layers, heads, len(AXIS_ORDERS), **f),
            torch.zeros(groups, layers, dtype=torch.int64),
            torch.zeros(groups, layers, MAX_REUSE, dtype=torch.int64),
            torch.zeros(groups, layers, heads, map_orders, 2, blocks, blocks, **f),
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> Observations:
        return cls(**{f.name: tensors[f.name] for f in fields(cls)})

    def add(self, other: Observations) -> None:
        for f in fields(self):
            getattr(self, f.name).add_(getattr(other, f.name))

    def clone(self) -> Observations:
        return Observations(**{f.name: getattr(self, f.name).clone() for f in fields(self)})

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.energy.shape)


def step_group(step: int, num_steps: int, bounds) -> int:
    """The step group of ``step`` in a run of ``num_steps`` (as :meth:`HeadTable.group_of` assigns it)."""
    p = step / num_steps
    for g in range(len(bounds) - 1):
        if p < bounds[g + 1]:
            return g
    return len(bounds) - 2


def sample_rows(seq_len: int, count: int, seed: int) -> torch.Tensor:
    """``count`` distinct positions of ``seq_len``, sorted, from ``seed`` (drawn on the CPU: same on any device)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(seq_len, generator=g)[: min(count, seq_len)].sort().values


def call_layout(ctx_layout: TokenLayout | None, seq_len: int) -> TokenLayout | None:
    """The layout of a call of ``seq_len`` tokens in a forward whose joint layout is ``ctx_layout`` (the
    runtime's own rule: the joint sequence, or its image tokens alone)."""
    if ctx_layout is None:
        return None
    if seq_len == ctx_layout.seq_len:
        return ctx_layout
    if seq_len == ctx_layout.image_len and ctx_layout.text_len:
        return TokenLayout(seq_len, 0, True, ctx_layout.grid)
    return None


class LayoutError(ValueError):
    """Calls of a layout calibration cannot serve (another resolution than the first call's)."""


class CalibrationObserver:
    """The observer calibration registers with a runtime (``runtime.add_observer(observer)``).

    Args:
        methods: candidate method names (see :func:`fastattn.calibration.candidates.resolve_methods`).
        num_layers, num_heads: the model's self-attention layers and heads.
        step_bounds: ``G + 1`` fractions of the run (the plan's step groups).
        num_steps: steps of each run (used when the host does not say it per call).
        bits: bit-widths measured (``"none"`` first; kernel quant modes).
        block_size: mask block size.
        rows_per_block: sampled query rows per query block (``R = rows_per_block * nQ``, at most ``S``).
        seed: seed of the row sample.
        candidates: a candidate list to use instead of building one (a resumed run's).
    """

    def __init__(self, methods, num_layers: int, num_heads: int, step_bounds, num_steps: int, bits,
                 block_size: int, rows_per_block: int = 8, seed: int = 0, candidates=None):  # fmt: skip
        self.methods = methods
        self.num_layers, self.num_heads = num_layers, num_heads
        self.step_bounds = tuple(step_bounds)
        self.num_steps = num_steps
        self.bits = tuple(bits)
        self.block_size = block_size
        self.rows_per_block = rows_per_block
        self.seed = seed
        self._configs = candidates  # fixed by the first layout (or a checkpoint)
        self.sets: dict[TokenLayout, CandidateSet] = {}
        self.layout: TokenLayout | None = None  # the joint layout calibrated (first call's)
        self.obs: Observations | None = None
        self._scratch: dict = {}  # per (layout, device): rows, query blocks and maps on the device
        self._ends: dict = {}  # (layer, branch) -> {group: outputs [n, R, D] of its latest step} in this run
        # block mass of the finished prompts (``self.obs`` holds the current prompt's): block-map candidates
        # are scored against maps from everything observed so far
        self.mass_base: torch.Tensor | None = None
        self.calls_seen = 0

    # ------------------------------------------------------------------ set-up
    @property
    def candidates(self):
        return None if self._configs is None else list(self._configs)

    def rows(self, layout: TokenLayout) -> torch.Tensor:
        """The sampled query positions of ``layout`` (``rows_per_block`` per query block, from the seed)."""
        n_q = BlockGeometry(layout, self.block_size).num_blocks
        return sample_rows(layout.seq_len, self.rows_per_block * n_q, self.seed)

    def candidate_set(self, layout: TokenLayout) -> CandidateSet:
        cs = self.sets.get(layout)
        if cs is None:
            cs = CandidateSet.build(layout, self.block_size, self.methods, self._configs, self.rows(layout))
            if self._configs is None and cs.map_orders:
                n = BlockGeometry(layout, self.block_size).num_blocks
                g = len(self.step_bounds) - 1
                heads = g * self.num_layers * self.num_heads
                size = 16 * heads * len(cs.map_orders) * n * n
                # each head may end on a map of its own, all saved in the plan file: known now, not when the
                # plan is saved after the observation (the block-mass cap alone keeps it under ~16 MiB)
                file_size = packed_maps_bytes(heads, n)
                if size > MAX_BLOCK_MASS_BYTES or file_size > MAX_TENSORS_BYTES:
                    warnings.warn(
                        f"fastattn calibration: block-map candidates left out: for {g} step groups x "
                        f"{self.num_layers} layers x {self.num_heads} heads at {n}^2 blocks their pooled "
                        f"block mass would take {size / 2**30:.1f} GiB ({len(cs.map_orders)} orders; at most "
                        f"{MAX_BLOCK_MASS_BYTES / 2**30:g} GiB) and their maps up to "
                        f"{file_size / 2**20:.1f} MiB of the plan file (at most "
                        f"{MAX_TENSORS_BYTES / 2**20:g} MiB); use fewer step_groups or a larger block_size",
                        stacklevel=2,
                    )
                    self.methods = tuple(m for m in self.methods if m != "blockmap")
                    cs = CandidateSet.build(layout, self.block_size, self.methods, None, self.rows(layout))
            if self._configs is None:
                self._configs = cs.candidates
            self.sets[layout] = cs
        return cs

    def prepare(self, layout: TokenLayout) -> CandidateSet:
        """Build the candidates for ``layout`` (the joint layout of the model's calls) ahead of the first call."""
        self._check_layout(layout)
        cs = self.candidate_set(layout)
        self._ensure_obs(cs)
        return cs

    def _check_layout(self, layout: TokenLayout) -> None:
        if self.layout is None:
            self.layout = layout
        elif layout != self.layout and layout.grid != self.layout.grid:
            raise LayoutError(
                f"calibration saw a second resolution: first calls had the latent grid {self.layout.grid} "
                f"(seq_len {self.layout.seq_len}), now {layout.grid} (seq_len {layout.seq_len}). A plan is "
                "calibrated at one resolution: give every prompt the same size"
            )

    def _ensure_obs(self, cs: CandidateSet) -> None:
        if self.obs is None:
            g = len(self.step_bounds) - 1
            n = BlockGeometry(cs.layout, self.block_size).num_blocks if cs.map_orders else 0
            self.obs = Observations.zeros(g, self.num_layers, self.num_heads, len(cs.candidates), len(self.bits),
                                          len(cs.map_orders), n)  # fmt: skip

    def new_run(self) -> None:
        """A new denoising run starts: forget the last outputs (reuse compares steps of one run only)."""
        self._ends.clear()

    # ------------------------------------------------------------------ one call
    @torch.no_grad()
    def __call__(self, call) -> None:
        q, k, v = call.q, call.k, call.v
        b, h, s, d = q.shape
        ctx = call.ctx
        layout = call_layout(ctx.layout, s)
        if layout is None:
            return
        self._check_layout(ctx.layout)
        if call.layer >= self.num_layers or h != self.num_heads:
            raise LayoutError(
                f"calibration expected {self.num_layers} layers of {self.num_heads} heads, got a call of layer "
                f"{call.layer} with {h} heads"
            )
        cs = self.candidate_set(layout)
        self._ensure_obs(cs)
        g = step_group(ctx.step, ctx.num_steps or self.num_steps, self.step_bounds)
        layer = call.layer
        scale = call.scale if call.scale is not None else 1.0 / math.sqrt(d)
        sc = self._scratch_for(layout, cs, q.device)
        rows = sc["rows"]
        n_rows = rows.numel()
        # heads (times batch) per chunk so the [n, R, S] probabilities and their pooled copies fit
        per_head = 4 * n_rows * (3 * s + 2 * sc["n_blocks"] * d)
        chunk = max(1, WORKING_SET["cuda" if q.is_cuda else "cpu"] // max(per_head, 1))
        qr = q[:, :, rows].reshape(b * h, n_rows, d)
        kk, vv = k.reshape(b * h, s, d), v.reshape(b * h, s, v.shape[-1])
        obs = self.obs
        # the block mass so far of each head (the maps this call is scored against add its own)
        maps_fit = obs.block_mass.shape[-1] == sc["n_blocks"]
        prev = None
        if maps_fit:
            prev = obs.block_mass[g, layer]
            if self.mass_base is not None and self.mass_base.shape == obs.block_mass.shape:
                prev = prev + self.mass_base[g, layer]
            prev = prev.to(q.device, torch.float32)
        head_of = torch.arange(b * h, device=q.device) % h
        outs, err, energy, conc, pooled = [], [], [], [], []
        for lo in range(0, b * h, chunk):
            sl = slice(lo, min(b * h, lo + chunk))
            o, e, en, cc, pm = self._score(
                qr[sl], kk[sl], vv[sl], scale, cs, sc, None if prev is None else prev[head_of[sl]]
            )
            outs.append(o)
            err.append(e)
            energy.append(en)
            conc.append(cc)
            pooled.append(pm)
        out = torch.cat(outs)  # [n, R, Dv] exact rows
        fold = lambda x: x.reshape(b, h, *x.shape[1:]).mean(0).double().cpu()  # noqa: E731  batch -> mean
        if prev is not None:
            obs.block_mass[g, layer] += fold(torch.cat(pooled))
        obs.err[g, layer] += fold(torch.cat(err))
        obs.energy[g, layer] += fold(torch.cat(energy))
        obs.concentration[g, layer] += fold(torch.cat(conc))
        obs.quant_err[g, layer] += self._quant_errors(
            q[:, :, rows], k, v, scale, out.reshape(b, h, n_rows, -1)
        )
        obs.calls[g, layer] += 1
        self._reuse(layer, ctx, g, out, b, h)
        self.calls_seen += 1

    def _scratch_for(self, layout: TokenLayout, cs: CandidateSet, device) -> dict:
        key = (layout, str(device))
        sc = self._scratch.get(key)
        if sc is None:
            rows = self.rows(layout)
            pos_block = position_blocks(layout, self.block_size)
            n = int(pos_block.max()) + 1
            orders = []
            for om in cs.by_order:
                inv = torch.argsort(om.perm)
                valid = om.pad >= 0
                tok = om.perm[om.pad.clamp(min=0)]  # [nK, bs] token of each block slot
                qblock = pos_block[inv[rows]]  # the query block of each sampled row in this order
                entry = {
                    "index": om.index.to(device),
                    # per sampled row, the key blocks each candidate keeps for that row's query block
                    "keep": om.maps[:, qblock, :].to(device),
                    "tok": tok.to(device),
                    "valid": valid.to(device),
                    "axis": AXIS_ORDERS.index(om.order),
                    "slot": om.map_slot,
                }
                if om.map_slot >= 0:
                    r = rows.numel()
                    half = torch.arange(r) % 2  # the two halves of the sampled rows, alternating
                    # [2, nQ, R]: per half, the mean over a query block's sampled rows of that half
                    pool = torch.zeros(2, n, r)
                    pool[half, qblock, torch.arange(r)] = 1.0
                    pool /= pool.sum(-1, keepdim=True).clamp_min(1.0)
                    # a half's maps keep whole the rows it has no sample of (as the plan's maps do for all rows)
                    forced = torch.stack([om.forced | ~pool[i].sum(-1, keepdim=True).bool() for i in (0, 1)])
                    counts = torch.maximum(om.map_counts[None], forced.sum((-1, -2))[:, None])
                    entry.update(pool=pool.to(device), qblock=qblock.to(device), half=half.bool().to(device),
                                 forced=forced.to(device), counts=counts.to(device),
                                 map_index=om.map_index.to(device))  # fmt: skip
                orders.append(entry)
            sc = {"rows": rows.to(device), "orders": orders, "n_blocks": n, "n_cand": len(cs.candidates),
                  "map_orders": len(cs.map_orders)}  # fmt: skip
            self._scratch[key] = sc
        return sc

    def _score(self, qr, k, v, scale, cs: CandidateSet, sc, prev=None):
        """Exact rows, candidate errors, energy, mass concentration and pooled block mass ``[n, O, 2, nQ, nK]``
        of ``n`` heads (``[n, R, D]`` rows); ``prev``: their block mass of earlier calls (``None``: the
        block-map candidates cannot be served on this layout, they get the error of computing nothing)."""
        p = torch.softmax(torch.einsum("nrd,nsd->nrs", qr.float(), k.float()) * scale, dim=-1)
        vf = v.float()
        out = torch.einsum("nrs,nsd->nrd", p, vf)
        energy = out.pow(2).sum(-1).mean(-1)
        n = qr.shape[0]
        err = torch.zeros(n, sc["n_cand"], device=qr.device)
        conc = torch.zeros(n, len(AXIS_ORDERS), device=qr.device)
        nb = sc["n_blocks"]
        pooled = torch.zeros(n, sc["map_orders"], 2, nb, nb, device=qr.device)
        for om in sc["orders"]:
            tok, valid = om["tok"], om["valid"]
            pb = p[:, :, tok] * valid  # [n, R, nK, bs]
            m = pb.sum(-1)  # [n, R, nK]
            vb = vf[:, tok] * valid[..., None]  # [n, nK, bs, D]
            u = torch.einsum("nrkb,nkbd->nrkd", pb, vb)
            del pb, vb
            keep = om["keep"].float()  # [C_o, R, nK]
            num = torch.einsum("crk,nrkd->ncrd", keep, u)
            den = torch.einsum("crk,nrk->ncr", keep, m)
            est = num / den.clamp_min(1e-30)[..., None]
            e = (est - out[:, None]).pow(2).sum(-1)
            # a row whose mask keeps no key returns zeros in the kernel
            e = torch.where(den > 0, e, out.pow(2).sum(-1)[:, None].expand_as(e))
            err[:, om["index"]] = e.mean(-1)
            if om["slot"] >= 0:
                pooled[:, om["slot"]] = torch.einsum("hqr,nrk->nhqk", om["pool"], m)
                if prev is None:
                    err[:, om["map_index"]] = energy[:, None]
                else:
                    mass = prev[:, om["slot"]] + pooled[:, om["slot"]]  # [n, 2, nQ, nK]
                    # rows of half 1 read the maps of half 0's mass, and the other way round
                    maps = [threshold_maps(mass[:, i], om["forced"][i], om["counts"][i]) for i in (0, 1)]
                    qb = om["qblock"]
                    keep = torch.where(om["half"][None, None, :, None], maps[0][:, :, qb], maps[1][:, :, qb])
                    keep = keep.float()  # [n, C_b, R, nK]
                    num = torch.einsum("ncrk,nrkd->ncrd", keep, u)
                    den = torch.einsum("ncrk,nrk->ncr", keep, m)
                    e = (num / den.clamp_min(1e-30)[..., None] - out[:, None]).pow(2).sum(-1)
                    e = torch.where(den > 0, e, out.pow(2).sum(-1)[:, None].expand_as(e))
                    err[:, om["map_index"]] = e.mean(-1)
            top = torch.sort(m, dim=-1, descending=True).values.cumsum(-1)
            needed = (top < MASS_TOP_P * top[..., -1:]).sum(-1) + 1
            conc[:, om["axis"]] = needed.float().mean(-1) / m.shape[-1]
        return out, err, energy, conc, pooled

    def _quant_errors(self, q_rows, k, v, scale, out) -> torch.Tensor:
        """``[H, Q]`` mean squared row error of each bit-width (the kernel's quantization, emulated exactly
        on the sampled rows against all keys), averaged over the batch."""
        b, h = q_rows.shape[:2]
        res = torch.zeros(h, len(self.bits), dtype=torch.float64)
        for i, mode in enumerate(self.bits):
            if mode == "none":
                continue
            got, _ = reference_attention(q_rows, k, v, None, scale, mode)
            res[:, i] = (got.float() - out).pow(2).sum(-1).mean(-1).mean(0).double().cpu()
        return res

    def _reuse(self, layer: int, ctx, g: int, out: torch.Tensor, b: int, h: int) -> None:
        """Error of returning the output of step group ``g - k`` (head-wise reuse after ``k - 1`` reused groups).

        The runtime hands a reusing head the layer's output of the latest step it computed, i.e. the last
        step of the last computed group; observed here on the exact trajectory.
        """
        ends = self._ends.setdefault((layer, ctx.cfg_branch), {})
        for k in range(1, MAX_REUSE + 1):
            ref = ends.get(g - k)
            if ref is None or ref.shape != out.shape:
                continue
            e = (ref - out).pow(2).sum(-1).mean(-1).reshape(b, h).mean(0).double().cpu()
            self.obs.reuse_err[g, layer, :, k - 1] += e
            self.obs.reuse_calls[g, layer, k - 1] += 1
        ends[g] = out  # the group's latest step so far; its last once the run moves on
        for old in [x for x in ends if x < g - MAX_REUSE]:
            del ends[old]
