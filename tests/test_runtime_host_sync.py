"""Steady-state attention calls neither read tensor values back to the host nor copy host data to the
device: on a GPU each such call (``.item()``, ``.cpu()``, ``.tolist()``, ``bool(t)``, ``torch.nonzero``,
``t.to(device)`` of a host tensor...) waits for the device to drain, which made the testbed host-bound
under per-head plans. Checked on the CPU with :class:`HostSyncs` (the same calls)."""

from __future__ import annotations

import pytest
import torch
from fastattn.attention.host_sync import HostSyncs
from fastattn.plans import AttentionPlan, BandConfig, HeadTable, Window3DConfig
from fastattn.testbed.fast import enable
from fastattn.testbed.model import TestbedConfig, TestbedDiT
from fastattn.testbed.sample import sample

KW = dict(frames=2, size=32, num_steps=8, seed=3)  # grid (2, 8, 8): 128 tokens, 8 blocks of 16
LAYERS, HEADS = 2, 4


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = TestbedDiT(TestbedConfig(dim=64 * HEADS, depth=LAYERS, heads=HEADS, mlp_ratio=2.0, frames=2, size=32))
    with torch.no_grad():  # adaLN-zero init would leave attention without effect
        for p in m.parameters():
            p.normal_(0.0, 0.2)
    return m.eval()


def _head_table_plan() -> AttentionPlan:
    """Two step groups (steps 0-3, 4-7): heads 1 and 3 reordered (HWF, WFH), heads 2 and 3 in int8, and in
    the second group heads 0 and 2 reuse their output of step 3 (so heads 1 and 3 run as two bit-widths)."""
    per_layer = [[0, 1, 0, 1]] * LAYERS
    table = HeadTable(
        (Window3DConfig(window=(1, 2, 2)), BandConfig(window=24)),
        torch.tensor([per_layer] * 2),
        step_bounds=(0.0, 0.5, 1.0),
        order_index=torch.tensor([[[0, 3, 0, 4]] * LAYERS] * 2),
        quant_index=torch.tensor([[[-1, -1, 1, 1]] * LAYERS] * 2),
        reuse=torch.tensor([[[False] * HEADS] * LAYERS, [[True, False, True, False]] * LAYERS]),
    )
    return AttentionPlan(BandConfig(window=8), block_size=16, heads=table)


PLANS = {
    "head table": lambda: dict(plan=_head_table_plan()),
    "dynamic (balanced)": lambda: dict(preset="balanced", block_size=16),
    "window3d": lambda: dict(method="window3d", density=0.3, block_size=16),
}


def _recorded_run(model) -> tuple[HostSyncs, int]:
    """One sampling run with every attention call recorded: ``(syncs, calls)``."""
    syncs, calls = HostSyncs(), 0
    saved = [blk.attn.attention_fn for blk in model.blocks]

    def recorded(fn):
        def attend(q, k, v, ctx):
            nonlocal calls
            calls += 1
            with syncs:
                return fn(q, k, v, ctx)

        return attend

    for blk, fn in zip(model.blocks, saved):
        blk.attn.set_attention_fn(recorded(fn))
    try:
        sample(model, [1], **KW)
    finally:
        for blk, fn in zip(model.blocks, saved):
            blk.attn.set_attention_fn(fn)
    return syncs, calls


@pytest.mark.parametrize("name", list(PLANS))
def test_steady_state_attention_calls_make_no_host_sync(model, name):
    handle = enable(model, **PLANS[name]())
    try:
        with torch.no_grad():
            sample(model, [1], **KW)  # warm-up run: builds masks, per-head work, permutations, geometry
            handle.reset_stats()
            syncs, calls = _recorded_run(model)
        st = handle.stats()  # not recorded: stats() reads the device-side sums once
    finally:
        handle.disable()
    assert calls == KW["num_steps"] * LAYERS
    # the run took the paths this test is for
    assert st["sparse_calls"] > 0 and st["fallbacks"] == {}, st
    if name == "head table":
        assert st["head_reuses"] == 4 * LAYERS * 2  # steps 4-7, every layer, heads 0 and 2
    if name.startswith("dynamic"):
        assert st["selections"] > 0 and st["selection_reuses"] > 0, st
        assert st["planned_dense"].get("residual capture (WA-RS)", 0) > 0, st
    assert not syncs.calls, f"{name}: host syncs in {calls} steady-state attention calls:\n{syncs.report()}"


def test_host_syncs_sees_the_calls_that_sync():
    """What HostSyncs intercepts on this torch (each a device sync for a GPU tensor), and what it does not."""
    t = torch.arange(4.0)
    b = t > 1
    with HostSyncs() as syncs:
        t[0].item(), t.cpu(), t.tolist(), bool(t[1]), int(t[1]), float(t[1])
        torch.nonzero(b), b.nonzero(), t[b]
        t.to(t.device), t.to(b), torch.tensor([1, 2], device=t.device)  # copies to a named device
        _ = t + 1, t.sum(), t.shape, t[1:], t.to(torch.float16), torch.tensor([1, 2])  # none of them
    assert dict(syncs.calls) == {
        "torch.Tensor.item": 1, "torch.Tensor.cpu": 1, "torch.Tensor.tolist": 1, "torch.Tensor.__bool__": 1,
        "torch.Tensor.__int__": 1, "torch.Tensor.__float__": 1, "torch.nonzero": 1, "torch.Tensor.nonzero": 1,
        "torch.Tensor.__getitem__[bool]": 1, "torch.Tensor.to(device)": 2, "torch.tensor(device)": 1,
    }  # fmt: skip
    assert "test_runtime_host_sync.py" in syncs.report()  # sites name the caller, not torch's internals
