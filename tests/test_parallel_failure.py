"""A rank that dies, stalls or disagrees ends the run on every rank with a clear error, within the timeout."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import parallel_workers as pw  # noqa: E402

TIMEOUT = 3.0


def _failed(r: dict) -> dict:
    """What a rank's failing call raised (``type``, ``error``, ``waited`` seconds, ``call``)."""
    assert "value" in r and "error" in r["value"], r
    return r["value"]


def test_a_killed_rank_stops_the_others_with_a_clear_error():
    results = pw.launch(pw.failing, 3, "die", TIMEOUT, deadline_s=120)
    assert results[-1].get("exit") == 3  # the victim died without a word
    for r in results[:-1]:
        f = _failed(r)
        assert f["type"] == "ParallelError" and f["call"] == 3, f
        assert f"rank {r['rank']}: Ulysses all-to-all" in f["error"], f
        assert "the run stops on every rank" in f["error"], f
        assert f["waited"] < TIMEOUT + 10, f  # the timeout bounds it: no hang


def test_a_stalled_rank_times_out_on_every_rank():
    results = pw.launch(pw.failing, 2, "stall", TIMEOUT, deadline_s=120)
    f = _failed(results[0])
    assert f["type"] == "ParallelError" and f"timeout_s={TIMEOUT:g}" in f["error"], f
    assert TIMEOUT - 0.5 < f["waited"] < TIMEOUT + 10, f  # it waited for the timeout, not forever
    assert _failed(results[1])["type"] == "ParallelError"  # the stalled rank finds its peers gone on waking


def test_a_shard_length_that_changes_on_one_rank_later_still_ends_the_run():
    """Shapes are exchanged when they change; a rank that alone changes them mid-run meets peers in another
    collective: every rank stops within the timeout."""
    results = pw.launch(pw.failing, 2, "mismatch_later", TIMEOUT, deadline_s=120)
    for r in results:
        f = _failed(r)
        assert f["type"] == "ParallelError" and f["waited"] < TIMEOUT + 10, f
    assert "ranks passed shards of other shapes" in _failed(results[0])["error"]


def test_bad_input_is_refused_with_what_was_expected():
    (errors, again) = pw.values(pw.launch(pw.bad_input, 2, deadline_s=120))
    assert errors == again  # every rank raises the same errors: none is left waiting in a collective
    assert "ulysses 2 x ring 2 = 4 processes, but the process group has 2" in errors["degrees"]
    assert "ulysses 2 must divide the 3 heads" in errors["heads"]
    assert "inference-only" in errors["grad"]
    assert "not on the process group's device type (cpu)" in errors["device"]
    assert "must together hold every token 0..31 exactly once" in errors["positions"]
    assert "positions must be [S_local] = [16]" in errors["positions_shape"]
    # shards of other lengths: every rank saw every rank's shape, the same message everywhere
    assert "ranks disagree on the attention call" in errors["mismatch"]
    assert "S_local=16" in errors["mismatch"] and "S_local=15" in errors["mismatch"]
