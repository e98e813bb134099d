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

Besides the candidates' errors it records per head: the output energy (the error scale), the error of each
bit-width (the kernel's quantized attention emulated on the same rows), the error of reusing the output of
the previous step group (DiTFastAttn-v2 head-wise reuse) and, per axis order, how concentrated the block
mass is (PARO's criterion: the share of key blocks needed to cover 90% of it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from ..attn_kernels.reference import reference_attention
from ..masks.layout import AXIS_ORDERS, TokenLayout
from .candidates import CandidateSet, position_blocks

MASS_TOP_P = 0.9  # PARO concentration: share of key blocks that carry this much of a row's mass
MAX_REUSE = 2  # a head may reuse its output for at most this many step groups in a row
WORKING_SET = {"cuda": 2 << 30, "cpu": 256 << 20}  # bytes of per-chunk scratch; bounds heads per chunk


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
    """

    err: torch.Tensor
    energy: torch.Tensor
    quant_err: torch.Tensor
    reuse_err: torch.Tensor
    concentration: torch.Tensor
    calls: torch.Tensor
    reuse_calls: torch.Tensor

    @classmethod
    def zeros(cls, groups: int, layers: int, heads: int, candidates: int, bits: int) -> Observations:
        f = dict(dtype=torch.float64)
        return cls(
            torch.zeros(groups, layers, heads, candidates, **f),
            torch.zeros(groups, layers, heads, **f),
            torch.zeros(groups, layers, heads, bits, **f),
            torch.zeros(groups, layers, heads, MAX_REUSE, **f),
            torch.zeros(groups, layers, heads, len(AXIS_ORDERS), **f),
            torch.zeros(groups, layers, dtype=torch.int64),
            torch.zeros(groups, layers, MAX_REUSE, dtype=torch.int64),
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
        self.calls_seen = 0

    # ------------------------------------------------------------------ set-up
    @property
    def candidates(self):
        return None if self._configs is None else list(self._configs)

    def candidate_set(self, layout: TokenLayout) -> CandidateSet:
        cs = self.sets.get(layout)
        if cs is None:
            cs = CandidateSet.build(layout, self.block_size, self.methods, self._configs)
            if self._configs is None:
                self._configs = cs.candidates
            self.sets[layout] = cs
        return cs

    def prepare(self, layout: TokenLayout) -> CandidateSet:
        """Build the candidates for ``layout`` (the joint layout of the model's calls) ahead of the first call."""
        self._check_layout(layout)
        cs = self.candidate_set(layout)
        self._ensure_obs(len(cs.candidates))
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

    def _ensure_obs(self, n_cand: int) -> None:
        if self.obs is None:
            g = len(self.step_bounds) - 1
            self.obs = Observations.zeros(g, self.num_layers, self.num_heads, n_cand, len(self.bits))

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
        self._ensure_obs(len(cs.candidates))
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
        outs, err, energy, conc = [], [], [], []
        for lo in range(0, b * h, chunk):
            sl = slice(lo, min(b * h, lo + chunk))
            o, e, en, cc = self._score(qr[sl], kk[sl], vv[sl], scale, cs, sc)
            outs.append(o)
            err.append(e)
            energy.append(en)
            conc.append(cc)
        out = torch.cat(outs)  # [n, R, Dv] exact rows
        obs = self.obs
        fold = lambda x: x.reshape(b, h, *x.shape[1:]).mean(0).double().cpu()  # noqa: E731  batch -> mean
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
            n_q = cs.by_order[0].maps.shape[1] if cs.by_order else 1
            rows = sample_rows(layout.seq_len, self.rows_per_block * n_q, self.seed)
            pos_block = position_blocks(layout, self.block_size)
            orders = []
            for om in cs.by_order:
                inv = torch.argsort(om.perm)
                valid = om.pad >= 0
                tok = om.perm[om.pad.clamp(min=0)]  # [nK, bs] token of each block slot
                orders.append({
                    "index": om.index.to(device),
                    # per sampled row, the key blocks each candidate keeps for that row's query block
                    "keep": om.maps[:, pos_block[inv[rows]], :].to(device),
                    "tok": tok.to(device),
                    "valid": valid.to(device),
                    "axis": AXIS_ORDERS.index(om.order),
                })  # fmt: skip
            sc = {"rows": rows.to(device), "orders": orders, "n_blocks": int(pos_block.max()) + 1,
                  "n_cand": len(cs.candidates)}  # fmt: skip
            self._scratch[key] = sc
        return sc

    def _score(self, qr, k, v, scale, cs: CandidateSet, sc):
        """Exact rows, candidate errors, energy and mass concentration of ``n`` heads (``[n, R, D]`` rows)."""
        p = torch.softmax(torch.einsum("nrd,nsd->nrs", qr.float(), k.float()) * scale, dim=-1)
        vf = v.float()
        out = torch.einsum("nrs,nsd->nrd", p, vf)
        energy = out.pow(2).sum(-1).mean(-1)
        n = qr.shape[0]
        err = torch.zeros(n, sc["n_cand"], device=qr.device)
        conc = torch.zeros(n, len(AXIS_ORDERS), device=qr.device)
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
            top = torch.sort(m, dim=-1, descending=True).values.cumsum(-1)
            needed = (top < MASS_TOP_P * top[..., -1:]).sum(-1) + 1
            conc[:, om["axis"]] = needed.float().mean(-1) / m.shape[-1]
        return out, err, energy, conc

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
