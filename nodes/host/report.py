"""What ran in a sampling run, as data (:func:`build_report`) and as text for a ComfyUI STRING output
(:func:`format_report`): density achieved, calls by method, dense calls and fallbacks with their reasons,
calls left to the host, time per step."""

from __future__ import annotations

from statistics import mean


def build_report(patch) -> dict:
    """A JSON-able summary of ``patch``'s current (or just finished) run."""
    run = patch.run
    out = {
        "family": patch.family.family if patch.family else None,
        "model_class": patch.family.model_class if patch.family else None,
        "passthrough_reason": patch.reason,
        "settings": dict(patch.settings),
        "forwards": run.forwards if run else 0,
        "host_calls": dict(patch.host_calls),
    }
    if patch.runtime is None or run is None:
        return out
    out["plan"] = patch.plan.describe()
    out["layers"] = patch.family.num_layers
    sched = run.schedule
    out["steps_seen"] = sorted(run.steps)
    out["steps_total"] = sched.total if sched else None
    out["schedule_offset"] = sched.offset if sched else 0
    ms = run.timer.ms_per_step()
    out["ms_per_step"] = {str(k): round(v, 3) for k, v in ms.items()}
    out["sparse_steps"] = sorted(run.sparse_steps)
    out.update(patch.runtime.stats.as_dict())
    plan = patch.plan
    if plan.cache.enabled or plan.cache_budget_gb is not None:
        out["cache"] = patch.runtime.cache.as_dict()
    return out


def _method(plan: dict) -> str:
    name = plan.get("method", "?")
    if "heads" in plan:
        return f"{name} + per-head table"
    for key in ("density", "window", "factor", "top_p"):
        if plan.get(key) is not None:
            return f"{name} ({key} {plan[key]})"
    return name


def _counts(d: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(d.items(), key=lambda kv: -kv[1])) or "none"


def format_report(r: dict | None) -> str:
    """Plain text, one fact per line."""
    if r is None:
        return (
            "fastattn: nothing ran yet with this model (queue a sampler that uses it, then read the report)"
        )
    if r.get("passthrough_reason"):
        return (f"fastattn: passed through ({r['passthrough_reason']}); the host's attention ran for all "
                f"{r['forwards']} forwards of the last run")  # fmt: skip
    if "calls" not in r:
        return f"fastattn: {r.get('family')} model, no forward recorded in the last run"
    plan = r["plan"]
    steps = r["steps_seen"]
    lines = [
        f"fastattn on {r['family']} ({r['model_class']}), {r['layers']} self-attention layers per forward"
    ]
    lines.append(f"plan: {_method(plan)}, quant {plan.get('quant')}, dense_steps {plan.get('dense_steps')}, "
                 f"dense_layers {plan.get('dense_layers') or '[]'}")  # fmt: skip
    s = r["settings"]
    if s:
        lines.append("node: " + ", ".join(f"{k}={v}" for k, v in s.items()))
    total = r.get("steps_total")
    span = f"steps {steps[0]}-{steps[-1]}" if steps else "no steps"
    lines.append(f"last run: {span} of {total if total is not None else '?'} (shared schedule offset "
                 f"{r['schedule_offset']}), {r['forwards']} forwards")  # fmt: skip
    saved = r["attention_work_saved"]
    lines.append(f"density achieved: {r['density']:.3f} of the attention work ({saved:.1%} skipped; "
                 f"attention at most {r['est_attention_speedup']:.2f}x faster)")  # fmt: skip
    lines.append(f"self-attention calls: {r['calls']}: {r['sparse_calls']} sparse ({_method(plan)}), "
                 f"{r['dense_calls']} dense")  # fmt: skip
    lines.append(f"dense by plan: {_counts(r['planned_dense'])}")
    lines.append(f"fallbacks to the host's attention: {_counts(r['fallbacks'])}")
    if r.get("kernel_backends"):
        lines.append(f"kernel calls by backend: {_counts(r['kernel_backends'])}")
    lines.append(f"other calls left to the host: {_counts(r['host_calls'])}")
    ms = {int(k): v for k, v in r["ms_per_step"].items()}
    if ms:
        sparse = [v for k, v in ms.items() if k in set(r["sparse_steps"])]
        dense = [v for k, v in ms.items() if k not in set(r["sparse_steps"])]
        parts = [f"{mean(ms.values()):.1f} ms mean over {len(ms)} steps"]
        if sparse and dense:
            parts.append(
                f"steps with sparse attention {mean(sparse):.1f} ms, dense steps {mean(dense):.1f} ms"
            )
        lines.append("time per step: " + "; ".join(parts))
    if r.get("cache"):
        lines += _cache_lines(r["cache"])
    if r.get("notes"):
        lines.append(f"notes: {_counts(r['notes'])}")
    return "\n".join(lines)


def _mib(n) -> str:
    return "unbounded" if n is None else f"{n / 2**20:.1f} MiB"


def _cache_lines(c: dict) -> list[str]:
    """What the cache reused and held (``report["cache"]``, :meth:`fastattn.caching.RuntimeCache.as_dict`)."""
    cfg = c.get("config") or {}
    lines = ["cache: " + (", ".join(f"{k}={v}" for k, v in cfg.items()) or "off")]
    b = c.get("blocks")
    if b:
        lines.append(f"blocks skipped: {b['blocks_skipped']} of {b['blocks_run'] + b['blocks_skipped']} block calls "
                     f"({b['block_work_skipped']:.1%}) in {b['skipping_forwards']} of {b['forwards']} forwards; "
                     f"skipped ranges extrapolated (first order): {b['extrapolated']}; "
                     f"recomputed instead of skipping: {_counts(b['recomputes'])}")  # fmt: skip
    a = c.get("attention")
    if a:
        lines.append(f"attention reused: {a['step_reuses']} from an earlier step (AST), {a['cfg_reuses']} from the "
                     f"other CFG branch (ASC); recomputed: {_counts(a['recomputes'])}")  # fmt: skip
    m = c["memory"]
    lines.append(f"cache memory: {_mib(m['bytes'])} now, {_mib(m['peak_bytes'])} peak, budget "
                 f"{_mib(m['budget_bytes'])}, storage {m['storage']}{' on the CPU' if m['offload'] else ''}; "
                 f"hits {m['hits']}, refused over budget: {_counts(m['refused_over_budget'])}")  # fmt: skip
    return lines
