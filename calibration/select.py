"""Selection: one option per head, under a target attention work or an error budget (a knapsack over heads).

Every head of every (step group, layer) is an item. Its options are the candidates x bit-widths it may run,
each with an estimated error (its share of the layer's relative squared output error), a work (block
density) and a time (:class:`~fastattn.calibration.costs.CostModel`, in units of the head's dense time); or
*reuse*: return the output of the last step group it computed (no work, no time, the error observed at
that distance, at most ``MAX_REUSE`` groups in a row). A layer call (a *row*) either runs every head dense
through the model's own SDPA, or pays the kernel's call overhead plus its heads' times.

Totals are means over the run's steps and the model's layers::

    work  = sum_{g,l,h} w_g work / (L H)        (the runtime's attention density, 1.0 = dense)
    error = sum_{g,l,h} w_g err / L             (mean relative squared error of a layer's attention output)
    time  = sum_{g,l} w_g row_time / (L H)      (estimated attention time, 1.0 = dense SDPA)

with ``w_g`` the share of steps in group ``g``. Two problems:

* ``target_density`` alone: least error with ``work <= target_density``;
* ``error_budget`` (and optionally ``target_density``): least time with ``error <= error_budget``.

This is a multiple-choice knapsack. It is solved by Lagrangian relaxation: for multipliers ``lam`` the
problem separates per head (each takes its cheapest options under ``objective + lam * constraint``; reuse
chains make that a small dynamic program over the step groups of each head) and per row (dense SDPA when
cheaper), and bisection on ``lam`` finds the smallest multiplier that meets the budget (the LP optimum of
the knapsack, off the integer optimum by at most one item's step). A greedy pass then spends the budget left
over on the best remaining upgrades (best objective gain per unit of budget). Deterministic: ties break by
option order.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


class BudgetError(ValueError):
    """A target density or error budget no plan built from these candidates can meet."""


@dataclass
class Problem:
    """Per-head options and row-level costs.

    ``err``/``work``/``time``/``valid``: ``[G, L, H, K]`` (float64 / bool) per regular option;
    ``reuse_err``: ``[G, L, H, R]`` error of reusing the output of ``k = 1..R`` groups back (``inf``: not
    allowed); ``weights``: ``[G]`` step shares the selection decides, summing to ``1 - exact_share``;
    ``row_overhead``: the kernel path's fixed cost of one row, in dense-head units; ``exact_share``: the share
    of the run computed exactly whatever is chosen (WA-RS's capture step), counted in work and time.
    """

    err: torch.Tensor
    work: torch.Tensor
    time: torch.Tensor
    valid: torch.Tensor
    reuse_err: torch.Tensor
    weights: torch.Tensor
    row_overhead: float = 0.0
    exact_share: float = 0.0

    @property
    def shape(self):
        return tuple(self.err.shape[:3])


@dataclass
class Selection:
    """The chosen regular option per head (``[G, L, H]``), the heads that reuse, the rows that run dense
    SDPA, and the totals."""

    choice: torch.Tensor
    reuse: torch.Tensor  # bool [G, L, H]
    dense_rows: torch.Tensor  # bool [G, L]
    work: float
    error: float
    time: float
    multipliers: dict

    def reuse_distance(self) -> torch.Tensor:
        """``[G, L, H]``: how many groups back a reusing head's output comes from (0: computed)."""
        return reuse_distance(self.reuse, self.dense_rows)


def reuse_distance(reuse: torch.Tensor, dense_rows: torch.Tensor) -> torch.Tensor:
    active = reuse & ~dense_rows[..., None]
    dist = torch.zeros(active.shape, dtype=torch.long)
    for g in range(1, active.shape[0]):
        dist[g] = torch.where(active[g], dist[g - 1] + 1, torch.zeros_like(dist[g]))
    return dist


def _quantities(p: Problem, choice, reuse, dense_rows) -> dict[str, torch.Tensor]:
    """Per head ``err``/``work``/``time`` ``[G, L, H]`` of a selection (dense rows and reuse included)."""
    pick = lambda t: torch.gather(t, 3, choice[..., None])[..., 0]  # noqa: E731
    dist = reuse_distance(reuse, dense_rows)
    r = p.reuse_err.shape[-1]
    reuse_e = torch.gather(p.reuse_err, 3, (dist.clamp(1, r) - 1)[..., None])[..., 0]
    on = dist > 0
    out = {
        "err": torch.where(on, reuse_e, pick(p.err)),
        "work": torch.where(on, torch.zeros_like(reuse_e), pick(p.work)),
        "time": torch.where(on, torch.zeros_like(reuse_e), pick(p.time)),
    }
    d = dense_rows[..., None]
    out["err"] = torch.where(d, torch.zeros_like(out["err"]), out["err"])
    out["work"] = torch.where(d, torch.ones_like(out["work"]), out["work"])
    out["time"] = torch.where(d, torch.ones_like(out["time"]), out["time"])
    return out


def _totals(p: Problem, choice, reuse, dense_rows) -> dict:
    g, l, h = p.shape
    q = _quantities(p, choice, reuse, dense_rows)
    w = p.weights[:, None]
    time = q["time"].sum(-1) + torch.where(dense_rows, torch.zeros(g, l, dtype=torch.float64), p.row_overhead)
    return {
        "err": float((w * q["err"].sum(-1)).sum() / l),
        "work": float((w * q["work"].sum(-1)).sum() / (l * h)) + p.exact_share,
        "time": float((w * time).sum() / (l * h)) + p.exact_share,
    }


def _relaxed(p: Problem, objective: str, lams: dict):
    """Each head's options minimising ``objective + sum lam_k * constraint_k`` (reuse chains by dynamic
    programming over the groups), then per row dense SDPA where that is cheaper."""
    score = getattr(p, objective).clone()
    for name, lam in lams.items():
        score += lam * getattr(p, name)
    score = torch.where(p.valid, score, torch.full_like(score, float("inf")))
    best, choice = score.min(dim=-1)  # [G, L, H]
    reuse_obj = p.reuse_err if objective == "err" else torch.zeros_like(p.reuse_err)
    reuse_score = reuse_obj + lams.get("err", 0.0) * p.reuse_err
    reuse_score = torch.where(
        torch.isfinite(p.reuse_err), reuse_score, torch.full_like(reuse_score, float("inf"))
    )
    reuse = _chains(best, reuse_score)
    g, l, h = p.shape
    r = p.reuse_err.shape[-1]
    dist = reuse_distance(reuse, torch.zeros(g, l, dtype=torch.bool))
    chosen = torch.where(reuse, torch.gather(reuse_score, 3, (dist.clamp(1, r) - 1)[..., None])[..., 0], best)
    row_sparse = chosen.sum(-1) + (p.row_overhead if objective == "time" else 0.0)
    dense_row = {"time": float(h), "err": 0.0, "work": float(h)}[objective] + sum(
        lam * (float(h) if name == "work" else 0.0) for name, lam in lams.items()
    )
    dense_rows = row_sparse >= dense_row  # ties go to the exact row
    return choice, reuse, dense_rows


def _chains(best: torch.Tensor, reuse_score: torch.Tensor) -> torch.Tensor:
    """Per head, which groups reuse: the cheapest sequence over the groups where a reuse ``k`` groups after
    the last computed one costs ``reuse_score[g, ..., k - 1]`` and a computed group costs ``best``."""
    g_count, l, h = best.shape
    r = reuse_score.shape[-1]
    inf = float("inf")
    value = torch.full((l, h, r + 1), inf, dtype=torch.float64)  # state: groups reused in a row so far
    value[..., 0] = best[0]
    back = torch.zeros((g_count, l, h, r + 1), dtype=torch.long)
    for g in range(1, g_count):
        new = torch.full_like(value, inf)
        prev_best, prev_arg = value.min(dim=-1)
        new[..., 0] = prev_best + best[g]
        back[g, ..., 0] = prev_arg
        for s in range(1, r + 1):
            new[..., s] = value[..., s - 1] + reuse_score[g, ..., s - 1]
            back[g, ..., s] = s - 1
        value = new
    state = value.argmin(dim=-1)  # [L, H]
    reuse = torch.zeros((g_count, l, h), dtype=torch.bool)
    for g in range(g_count - 1, -1, -1):
        reuse[g] = state > 0
        state = torch.gather(back[g], -1, state[..., None])[..., 0]
    return reuse


def _bisect(p: Problem, objective: str, name: str, cap: float, fixed: dict):
    """Smallest multiplier of constraint ``name`` whose relaxed solution meets ``cap`` (None: none does)."""

    def solve(lam):
        sol = _relaxed(p, objective, {**fixed, name: lam})
        return sol, _totals(p, *sol)[name]

    sol, used = solve(0.0)
    if used <= cap + 1e-12:
        return 0.0, sol
    hi = 1e-6
    while True:
        sol, used = solve(hi)
        if used <= cap + 1e-12:
            break
        hi *= 4.0
        if hi > 1e15:
            return None
    lo = hi / 4.0 if hi > 1e-6 else 0.0
    best = (hi, sol)
    for _ in range(50):
        mid = (lo + hi) / 2 if lo == 0.0 else (lo * hi) ** 0.5
        sol, used = solve(mid)
        if used <= cap + 1e-12:
            hi, best = mid, (mid, sol)
        else:
            lo = mid
        if hi - lo <= 1e-9 * hi:
            break
    return best


def _fill(p: Problem, objective: str, caps: dict, choice, reuse, dense_rows) -> torch.Tensor:
    """Spend what the budgets have left on the best upgrades of computed heads in kernel rows (greedy by
    objective gain per unit of the first budget)."""
    g, l, h, k = p.err.shape
    w = (p.weights[:, None, None, None] / (l * h)).expand(g, l, h, 1)
    scale = {"err": w * h, "work": w, "time": w}  # contribution of one head's option to each total
    choice = choice.clone()
    primary = next(iter(caps))
    movable = (~dense_rows[:, :, None] & ~reuse)[..., None]
    for _ in range(8):
        tot = _totals(p, choice, reuse, dense_rows)
        slack = {n: caps[n] - tot[n] for n in caps}
        cur = {n: torch.gather(getattr(p, n), 3, choice[..., None]) for n in ("err", "work", "time")}
        gain = (cur[objective] - getattr(p, objective)) * scale[objective]  # > 0: better
        use = {n: (getattr(p, n) - cur[n]) * scale[n] for n in caps}
        ok = p.valid & movable & (gain > 1e-15)
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
    """Choose per head (see the module docstring). Raises :class:`BudgetError` when no choice meets the
    budgets, saying what the candidates can reach."""
    if target_density is None and error_budget is None:
        raise ValueError(
            "give target_density= (attention work to keep, e.g. 0.3) or error_budget= (e.g. 0.02)"
        )
    given = p
    if error_budget is None:
        objective, caps = "err", {"work": float(target_density)}
        # a hair of time breaks ties between options of equal error (the faster one)
        p = dataclasses.replace(p, err=p.err + 1e-9 * p.time)
    else:
        objective, caps = "time", {"err": float(error_budget)}
        if target_density is not None:
            caps["work"] = float(target_density)
    for name, cap in caps.items():
        least = _totals(given, *_relaxed(p, name, {}))[name]
        if least > cap + 1e-12:
            if name == "work":
                raise BudgetError(
                    f"target_density {cap:g} cannot be met: the sparsest plan these candidates allow computes "
                    f"{least:.4f} of the attention work; allow more methods (e.g. 'skip', 'reuse') or raise "
                    "target_density"
                )
            raise BudgetError(
                f"error_budget {cap:g} cannot be met: the least error these candidates reach is {least:.4g}"
            )
    names = list(caps)
    if len(names) == 1:
        res = _bisect(p, objective, names[0], caps[names[0]], {})
        lams, sol = {names[0]: res[0]}, res[1]
    else:  # error budget and target density: outer bisection on the work multiplier
        found, lo, hi, mu = None, 0.0, None, 0.0
        for _ in range(40):
            inner = _bisect(p, objective, "err", caps["err"], {"work": mu})
            ok = inner is not None and _totals(p, *inner[1])["work"] <= caps["work"] + 1e-12
            if ok:
                found, hi = (mu, inner), mu
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
        lams, sol = {"work": found[0], "err": found[1][0]}, found[1][1]
    choice, reuse, dense_rows = sol
    choice = _fill(p, objective, caps, choice, reuse, dense_rows)
    tot = _totals(given, choice, reuse, dense_rows)
    return Selection(choice, reuse, dense_rows, tot["work"], tot["err"], tot["time"], lams)
