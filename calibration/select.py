"""Selection: one option per head, under a target attention work or an error budget (a knapsack over heads).

Every head of every (step group, layer) is an item; its options are the candidates x bit-widths it may run,
each with an estimated error (its share of the layer's relative squared output error), a work (block
density) and a time (:class:`~fastattn.calibration.costs.CostModel`, in units of the head's dense time). A
layer call (a *row*) either runs every head dense through the model's own SDPA, or pays the kernel's call
overhead plus its heads' times.

Totals are means over the run's steps and the model's layers::

    work  = sum_{g,l,h} w_g work / (L H)        (the runtime's attention density, 1.0 = dense)
    error = sum_{g,l,h} w_g err / L             (mean relative squared error of a layer's attention output)
    time  = sum_{g,l} w_g row_time / (L H)      (estimated attention time, 1.0 = dense SDPA)

with ``w_g`` the share of steps in group ``g``. Two problems:

* ``target_density`` alone: least error with ``work <= target_density``;
* ``error_budget`` (and optionally ``target_density``): least time with ``error <= error_budget``.

This is a multiple-choice knapsack. It is solved by Lagrangian relaxation: for multipliers ``lam`` the
problem separates per row and per head (each takes its cheapest option under ``objective + lam *
constraint``), and bisection on ``lam`` finds the smallest multiplier that meets the budget (the LP optimum
of the knapsack, off the integer optimum by at most one item's step). A greedy pass then spends the budget
left over on the best remaining upgrades (best objective gain per unit of budget). Everything is exact
arithmetic on the observed tables: deterministic, ties broken by option order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class BudgetError(ValueError):
    """A target density or error budget no plan built from these candidates can meet."""


@dataclass
class Problem:
    """Per-head options, all ``[G, L, H, K]`` (float64 / bool), and row-level costs.

    ``err``/``work``/``time``: per option; ``valid``: which options a head may take; ``weights``: ``[G]``
    step shares summing to 1; ``row_overhead``: the kernel path's fixed cost of one row, in dense-head units.
    """

    err: torch.Tensor
    work: torch.Tensor
    time: torch.Tensor
    valid: torch.Tensor
    weights: torch.Tensor
    row_overhead: float = 0.0

    @property
    def shape(self):
        return tuple(self.err.shape[:3])


@dataclass
class Selection:
    """The chosen option per head (``[G, L, H]`` indices), which rows run dense SDPA, and the totals."""

    choice: torch.Tensor
    dense_rows: torch.Tensor  # bool [G, L]: every head of the row runs the model's dense attention
    work: float
    error: float
    time: float
    multipliers: dict


def _totals(p: Problem, choice: torch.Tensor, dense_rows: torch.Tensor) -> dict:
    g, l, h = p.shape
    pick = lambda t: torch.gather(t, 3, choice[..., None])[..., 0]  # noqa: E731
    w = p.weights[:, None]
    err = pick(p.err).sum(-1)
    work = pick(p.work).sum(-1)
    time = pick(p.time).sum(-1) + p.row_overhead
    err = torch.where(dense_rows, torch.zeros_like(err), err)
    work = torch.where(dense_rows, torch.full_like(work, float(h)), work)
    time = torch.where(dense_rows, torch.full_like(time, float(h)), time)
    return {
        "err": float((w * err).sum() / l),
        "work": float((w * work).sum() / (l * h)),
        "time": float((w * time).sum() / (l * h)),
    }


def _relaxed(p: Problem, objective: str, lams: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head the option minimising ``objective + sum lam_k * constraint_k``; per row dense SDPA when cheaper."""
    score = getattr(p, objective).clone()
    for name, lam in lams.items():
        score += lam * getattr(p, name)
    score = torch.where(p.valid, score, torch.full_like(score, float("inf")))
    best, choice = score.min(dim=-1)
    h = p.shape[2]
    row_sparse = best.sum(-1) + (p.row_overhead if objective == "time" else 0.0)
    dense_row = {"time": float(h), "err": 0.0}[objective] + sum(
        lam * (float(h) if name == "work" else 0.0) for name, lam in lams.items()
    )
    dense_rows = row_sparse >= dense_row  # ties go to the exact row
    return choice, dense_rows


def _bisect(
    p: Problem, objective: str, name: str, cap: float, fixed: dict
) -> tuple[float, torch.Tensor, torch.Tensor] | None:
    """Smallest multiplier of constraint ``name`` whose relaxed solution meets ``cap`` (None: none does)."""

    def solve(lam):
        c, d = _relaxed(p, objective, {**fixed, name: lam})
        return c, d, _totals(p, c, d)[name]

    c, d, used = solve(0.0)
    if used <= cap + 1e-12:
        return 0.0, c, d
    hi = 1e-6
    while True:
        c, d, used = solve(hi)
        if used <= cap + 1e-12:
            break
        hi *= 4.0
        if hi > 1e15:
            return None
    lo = hi / 4.0 if hi > 1e-6 else 0.0
    best = (hi, c, d)
    for _ in range(50):
        mid = (lo + hi) / 2 if lo == 0.0 else (lo * hi) ** 0.5
        c, d, used = solve(mid)
        if used <= cap + 1e-12:
            hi, best = mid, (mid, c, d)
        else:
            lo = mid
        if hi - lo <= 1e-9 * hi:
            break
    return best


def _fill(
    p: Problem, objective: str, caps: dict, choice: torch.Tensor, dense_rows: torch.Tensor
) -> torch.Tensor:
    """Spend what the budgets have left on the best upgrades of heads in kernel rows (greedy by objective
    gain per unit of the first budget)."""
    g, l, h, k = p.err.shape
    w = (p.weights[:, None, None, None] / (l * h)).expand(g, l, h, 1)
    scale = {"err": w * h, "work": w, "time": w}  # contribution of one head's option to each total
    choice = choice.clone()
    primary = next(iter(caps))
    for _ in range(8):
        tot = _totals(p, choice, dense_rows)
        slack = {n: caps[n] - tot[n] for n in caps}
        cur = {n: torch.gather(getattr(p, n), 3, choice[..., None]) for n in ("err", "work", "time")}
        gain = (cur[objective] - getattr(p, objective)) * scale[objective]  # > 0: better
        use = {n: (getattr(p, n) - cur[n]) * scale[n] for n in caps}
        ok = p.valid & ~dense_rows[:, :, None, None] & (gain > 1e-15)
        for n in caps:
            ok &= use[n] <= slack[n] + 1e-15
        if not ok.any():
            break
        ratio = torch.where(ok, gain / use[primary].clamp_min(1e-18), torch.full_like(gain, -1.0))
        best_ratio, best_opt = ratio.flatten(0, 2).max(dim=-1)  # the best move of each head
        order = torch.argsort(best_ratio, descending=True, stable=True)
        order = order[best_ratio[order] > 0]
        changed = False
        for item in order.tolist():
            opt = int(best_opt[item])
            gi, rest = divmod(item, l * h)
            li, hi = divmod(rest, h)
            need = {n: float(use[n][gi, li, hi, opt]) for n in caps}
            if any(need[n] > slack[n] + 1e-15 for n in caps):
                continue
            choice[gi, li, hi] = opt
            for n in caps:
                slack[n] -= need[n]
            changed = True
        if not changed:
            break
    return choice


def select(
    p: Problem, *, target_density: float | None = None, error_budget: float | None = None
) -> Selection:
    """Choose one option per head (see the module docstring). Raises :class:`BudgetError` when no choice
    meets the budgets, saying what the candidates can reach."""
    if target_density is None and error_budget is None:
        raise ValueError(
            "give target_density= (attention work to keep, e.g. 0.3) or error_budget= (e.g. 0.02)"
        )
    given = p
    if error_budget is None:
        objective, caps = "err", {"work": float(target_density)}
        # a hair of time breaks ties between options of equal error (the faster one)
        p = Problem(p.err + 1e-9 * p.time, p.work, p.time, p.valid, p.weights, p.row_overhead)
    else:
        objective, caps = "time", {"err": float(error_budget)}
        if target_density is not None:
            caps["work"] = float(target_density)
    floor = _floor(p, caps)
    for name, cap in caps.items():
        if floor[name] > cap + 1e-12:
            what = {"work": f"target_density {cap:g}", "err": f"error_budget {cap:g}"}[name]
            reach = {
                "work": "the sparsest plan these candidates allow computes",
                "err": "the exact plan has error",
            }[name]
            hint = {"work": "; allow more methods (e.g. 'skip', 'reuse') or raise target_density",
                    "err": ""}[name]  # fmt: skip
            raise BudgetError(f"{what} cannot be met: {reach} {floor[name]:.4f}{hint}")
    names = list(caps)
    if len(names) == 1:
        res = _bisect(p, objective, names[0], caps[names[0]], {})
        lams = {names[0]: res[0]}
        choice, dense_rows = res[1], res[2]
    else:  # error budget and target density: outer bisection on the work multiplier
        found = None
        lo, hi = 0.0, None
        mu = 0.0
        for _ in range(40):
            inner = _bisect(p, objective, "err", caps["err"], {"work": mu})
            ok = inner is not None and _totals(p, inner[1], inner[2])["work"] <= caps["work"] + 1e-12
            if ok:
                found = (mu, inner)
                hi = mu
                if mu == 0.0:
                    break
            else:
                lo = mu
            mu = (lo + hi) / 2 if hi is not None else (mu * 4 if mu else 1e-4)
            if hi is not None and hi - lo <= 1e-6 * hi:
                break
        if found is None:
            raise BudgetError(
                f"error_budget {caps['err']:g} and target_density {caps['work']:g} cannot both be met by these "
                "candidates; raise one of them"
            )
        lams = {"work": found[0], "err": found[1][0]}
        choice, dense_rows = found[1][1], found[1][2]
    choice = _fill(p, objective, caps, choice, dense_rows)
    tot = _totals(given, choice, dense_rows)
    return Selection(choice, dense_rows, tot["work"], tot["err"], tot["time"], lams)


def _floor(p: Problem, caps: dict) -> dict:
    """The least each budgeted quantity can be (each minimised on its own)."""
    out = {}
    for name in caps:
        t = torch.where(p.valid, getattr(p, name), torch.full_like(p.err, float("inf")))
        choice = t.argmin(-1)
        rows = torch.zeros(p.shape[:2], dtype=torch.bool)
        out[name] = _totals(p, choice, rows)[name]
    return out
