"""Ulysses sequence parallelism on gloo (2 and 4 CPU processes) equals the one-process runtime.

Dense, static sparse (3-D window, radial), per-head tables with reordered (PARO) heads, skipped and int8
heads, quantized and dynamic (top-p) plans, head reuse with residual sharing over steps, key padding, text
last, non-contiguous (Flux-style text + latent) shards; db-SP balanced and contiguous head orders agree.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import parallel_workers as pw  # noqa: E402

TOL = 2e-5  # float32: the same arithmetic per row, summed in another order at most


def _case(plan, **kw):
    return dict(dict(plan=plan, ulysses=2, ring=1, balance="db-sp"), **kw)


def test_ulysses_two_ranks_equal_one_process():
    cases = [
        _case("dense"),
        _case("window3d"),
        _case("radial", layout="text_last"),
        _case("per_head"),
        _case("per_head", balance="none"),
        _case("int8"),
        _case("dynamic"),
        _case("reuse", steps=4),
        _case("shared", steps=5),
        _case("window3d", mask="padding"),
        _case("window3d", positions="flux"),
        _case("radial", dtype="bfloat16", layout="ragged", positions="ragged_whole"),
    ]
    results = pw.values(pw.launch(pw.exactness, 2, cases))
    for rank_results in results:
        for r in rank_results:
            tol = 2e-2 * r["ref_max"] if r["case"].get("dtype") == "bfloat16" else TOL
            assert r["err"] <= tol, r
            assert r["parallel_fallbacks"] == {}, r  # Ulysses serves every call as planned
            assert r["density"] == pytest.approx(r["ref_density"]), r
    by_name = {(r["case"]["plan"], r["case"]["balance"]): r for r in results[0]}
    balanced, plain = by_name[("per_head", "db-sp")], by_name[("per_head", "none")]
    # db-SP moves heads: the balanced order's imbalance is lower than the contiguous split's on some layer
    assert any(
        balanced["imbalance"][layer] < balanced["imbalance_contiguous"][layer]
        for layer in balanced["imbalance"]
    )
    assert plain["imbalance"] == {}  # balance="none": contiguous order, nothing computed
    shared = by_name[("shared", "db-sp")]
    assert shared["reused_calls"] == 2 * shared["ref_reused_calls"] > 0  # each rank reuses its share
    reuse = by_name[("reuse", "db-sp")]
    assert reuse["head_reuses"] == reuse["ref_head_reuses"] > 0  # each rank reused its share of the heads


def test_ulysses_four_ranks_equal_one_process():
    cases = [
        _case("per_head", ulysses=4),
        _case("window3d", ulysses=4, positions="flux"),
    ]
    results = pw.values(pw.launch(pw.exactness, 4, cases))
    for rank_results in results:
        for r in rank_results:
            assert r["err"] <= TOL, r
            assert r["parallel_fallbacks"] == {}, r
