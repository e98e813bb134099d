"""Ring and hybrid (Ulysses x ring) sequence parallelism on gloo equal the one-process runtime.

Ring steps run the kernel on the plan's block lists restricted to (this rank's query blocks x the peer's key
blocks) and merge by log-sum-exp; what the ring cannot serve (shards that are not whole blocks, reordered heads,
quantized heads, dynamic selection, key padding) takes the documented fallback, counted with its reason.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import parallel_workers as pw  # noqa: E402

TOL = 2e-5

NOT_WHOLE = (
    "ring: ring shards are not whole blocks of the global layout: Q/K/V all-gathered, every row computed"
)
PERM = "ring: reordered (PARO) heads: Q/K/V all-gathered, every row computed"
QUANT = "ring: quantized (scales span the whole sequence): K/V all-gathered, this rank's rows computed"
DYNAMIC = "ring: dynamic selection: Q/K all-gathered to select"
PADDING = "ring: key padding: Q/K/V all-gathered, every row computed"
MASK = "ring: attn_mask: K/V all-gathered, dense rows"


def _case(plan, **kw):
    return dict(dict(plan=plan, ulysses=1, ring=2, balance="db-sp"), **kw)


def _check(results, expected_notes):
    for rank_results in results:
        for r, notes in zip(rank_results, expected_notes):
            tol = 2e-2 * r["ref_max"] if r["case"].get("dtype") == "bfloat16" else TOL
            assert r["err"] <= tol, r
            assert set(r["parallel_fallbacks"]) == set(notes), r
            assert r["density"] == pytest.approx(r["ref_density"]), r


def test_ring_two_ranks_equal_one_process():
    cases = [
        (_case("dense"), ()),
        (_case("window3d"), ()),
        (_case("radial", layout="text_last"), ()),
        (_case("radial", layout="ragged", positions="ragged_whole"), ()),  # ragged blocks, not contiguous
        (_case("window3d", dtype="bfloat16"), ()),
        (_case("reuse", steps=4), ()),
        (_case("shared", steps=5), ()),
        (_case("window3d", positions="interleaved"), (NOT_WHOLE,)),
        (_case("per_head"), (PERM,)),  # its int8 heads carry the table's permutation too
        (_case("int8"), (QUANT,)),
        (_case("dynamic"), (DYNAMIC,)),
        (_case("window3d", mask="padding"), (PADDING, MASK)),  # sparse over the kept tokens; layer 0 dense
        (_case("window3d", mask="float"), (MASK,)),  # a float mask runs dense, in one process too
        # auto degrees, per layer: reordered heads keep off the ring; 3 heads cannot split over 2 Ulysses ranks
        (_case("per_head", ulysses="auto", ring="auto"), ()),
        (_case("window3d", ulysses="auto", ring="auto", heads=3), ()),
    ]
    results = pw.values(pw.launch(pw.exactness, 2, [c for c, _ in cases]))
    _check(results, [n for _, n in cases])
    reordered, three_heads = results[0][-2:]
    assert reordered["degrees"] == {0: (2, 1), 1: (2, 1)}, reordered
    assert three_heads["degrees"] == {0: (1, 2), 1: (1, 2)}, three_heads
    padded, masked = results[0][-4:-2]
    assert padded["fallbacks"] == {}, padded
    # each rank counts its share of every call: summed over 2 ranks, twice the one-process counts
    assert masked["fallbacks"] == {k: 2 * n for k, n in masked["ref_fallbacks"].items()} != {}, masked


def test_hybrid_two_by_two_equal_one_process():
    cases = [
        (_case("per_head_plain", ulysses=2, ring=2, positions="balanced"), ()),  # db-SP heads and ring blocks
        (_case("per_head", ulysses=2, ring=2), (PERM,)),
        (_case("window3d", ulysses=2, ring=2, balance="none"), ()),
        (_case("window3d", ulysses=2, ring=2, positions="flux"), (NOT_WHOLE,)),  # 8 text tokens per chunk
        (_case("dynamic", ulysses=2, ring=2), (DYNAMIC,)),
    ]
    results = pw.values(pw.launch(pw.exactness, 4, [c for c, _ in cases]))
    _check(results, [n for _, n in cases])
    ((balanced, contiguous),) = results[0][0]["ring_balance"].values()
    assert balanced < contiguous, results[0][0]  # the balanced blocks shorten the ring's critical path


def test_ring_through_the_triton_kernel():
    """The real kernel code (Triton, in the interpreter on the CPU) on rectangular ring steps, bf16."""
    pytest.importorskip("triton")
    cases = [_case("window3d", dtype="bfloat16", head_dim=64, heads=2, layers=1, backend="triton")]
    results = pw.values(pw.launch(pw.exactness, 2, cases, deadline_s=300))
    _check(results, [()])


def test_merge_partial_equals_attention_over_all_keys():
    from fastattn.attn_kernels import attention_reference
    from fastattn.parallel.ring import merge_partial

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 4, generator=g) for _ in range(3))
    full, _ = attention_reference(q, k, v)
    acc = None
    for part in (slice(0, 3), slice(3, 3), slice(3, 8)):
        if part.start == part.stop:  # a peer whose keys no row reads: zeros and -inf
            out, lse = torch.zeros_like(q), torch.full(q.shape[:3], -math.inf)
        else:
            out, lse = attention_reference(q, k[:, :, part], v[:, :, part])
        acc = merge_partial(acc, (out, lse))
    torch.testing.assert_close(acc[0], full, rtol=1e-6, atol=1e-6)
