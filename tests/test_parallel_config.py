"""ParallelConfig: the one schema of sequence-parallel settings, and its errors (no processes needed)."""

from __future__ import annotations

import pytest
from fastattn.parallel import ParallelConfig


def test_from_any_takes_none_dicts_and_configs_and_names_unknown_fields():
    assert ParallelConfig.from_any(None) == ParallelConfig()
    cfg = ParallelConfig.from_any({"ulysses": 2, "ring": 2, "balance": "none", "timeout_s": 60})
    assert cfg == ParallelConfig(2, 2, "none", 60.0) and ParallelConfig.from_any(cfg) is cfg
    assert ParallelConfig.from_any(cfg.to_dict()) == cfg
    with pytest.raises(
        ValueError, match=r"unknown field\(s\) \['rings'\]; known: \['ulysses', 'ring', 'balance'"
    ):
        ParallelConfig.from_any({"rings": 2})
    with pytest.raises(TypeError, match="parallel must be a dict"):
        ParallelConfig.from_any(4)


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(ulysses=0), "ulysses must be a positive int or 'auto'"),
        (dict(ring=2.0), "ring must be a positive int or 'auto'"),
        (dict(ulysses=True), "ulysses must be a positive int"),
        (dict(balance="lpt"), r"balance must be one of \['db-sp', 'none'\]"),
        (dict(timeout_s=0), "timeout_s must be a positive number"),
        (dict(timeout_s=float("inf")), "timeout_s must be a positive number"),
    ],
)
def test_bad_settings_are_refused(fields, match):
    with pytest.raises(ValueError, match=match):
        ParallelConfig(**fields)


def test_degrees_resolve_auto_and_check_the_world_and_heads():
    assert ParallelConfig().degrees(4, heads=24) == (4, 1)  # all Ulysses when the heads allow it
    assert ParallelConfig().degrees(8, heads=12) == (4, 2)  # the rest as ring
    assert ParallelConfig().degrees(4, heads=5) == (1, 4)
    assert ParallelConfig().degrees(6) == (6, 1)
    assert ParallelConfig(ring=2).degrees(8) == (4, 2)
    assert ParallelConfig(ulysses=2).degrees(8) == (2, 4)
    assert ParallelConfig(2, 2).degrees(4, heads=6) == (2, 2)
    with pytest.raises(ValueError, match=r"ulysses 2 x ring 2 = 4 processes, but the process group has 3"):
        ParallelConfig(2, 2).degrees(3)
    with pytest.raises(ValueError, match="ring 3 does not divide the 4 processes"):
        ParallelConfig(ring=3).degrees(4)
    with pytest.raises(ValueError, match="ulysses 4 must divide the 6 attention heads"):
        ParallelConfig(ulysses=4).degrees(4, heads=6)
