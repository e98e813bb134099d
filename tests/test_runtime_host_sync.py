"""Steady-state attention calls neither read tensor values back to the host nor copy host data to the
device: on a GPU each such call (``.item()``, ``.cpu()``, ``.tolist()``, ``bool(t)``, ``torch.nonzero``,
``t.to(device)`` of a host tensor...) waits for the device to drain, which made the testbed host-bound
under per-head plans. Checked on the CPU with :class:`HostSyncs` (the same calls)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fastattn.attention import AttentionRuntime, ForwardContext
from fastattn.attention.host_sync import HostSyncs
from fastattn.masks import TokenLayout
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
    # batched CFG (the sampler's cfg_scale) with ASC: the positive half attends, the negative half copies it
    "cfg_share": lambda: dict(
        method="window3d",
        density=0.3,
        block_size=16,
        cache={"cfg_share": True, "first_steps": 0, "last_steps": 0},
    ),
}


def _recorded_run(model, **kw) -> tuple[HostSyncs, int]:
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
        sample(model, [1], **KW, **kw)
    finally:
        for blk, fn in zip(model.blocks, saved):
            blk.attn.set_attention_fn(fn)
    return syncs, calls


@pytest.mark.parametrize("name", list(PLANS))
def test_steady_state_attention_calls_make_no_host_sync(model, name):
    handle = enable(model, **PLANS[name]())
    kw = dict(cfg_scale=3.0) if name == "cfg_share" else {}
    try:
        with torch.no_grad():
            sample(model, [1], **KW, **kw)  # warm-up run: builds masks, per-head work, permutations, geometry
            handle.reset_stats()
            syncs, calls = _recorded_run(model, **kw)
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
    if name == "cfg_share":
        assert st["cache"]["attention"]["cfg_reuses"] == KW["num_steps"] * LAYERS, st
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


# ------------------------------------------------------------------------------ key-padding masks

PAD_LAYOUT = TokenLayout.video(2, 8, 8, text_len=16, text_first=False)  # [img, txt], as HunyuanVideo


def _padding_mask(batch: int) -> torch.Tensor:
    """bool ``[B, 1, 1, S]``: padded text keys dropped, a different count per batch row."""
    keep = torch.ones(batch, 1, 1, PAD_LAYOUT.seq_len, dtype=torch.bool)
    for i in range(batch):
        keep[i, ..., PAD_LAYOUT.seq_len - 5 - 3 * i :] = False
    return keep


KEY_PADDING = {
    # the host passes one mask tensor to every layer of a forward (HunyuanVideo)
    "one tensor per forward": dict(fresh=False),
    # a new tensor per layer, the host says they are alike (Qwen-Image: ForwardContext.one_key_mask)
    "one_key_mask": dict(fresh=True),
    # batched CFG with ASC: the runtime takes the positive rows of the mask
    "cfg_share": dict(fresh=False, cache={"cfg_share": True, "first_steps": 0, "last_steps": 0}),
}


@pytest.mark.parametrize("name", list(KEY_PADDING))
def test_key_padding_mask_is_read_once_per_forward(name):
    """The first call of a forward reads the mask's values once; every later call of the forward reads
    nothing, and the outputs are the masked dense attention."""
    case = KEY_PADDING[name]
    layers, steps, batch = 3, 4, 2
    plan = AttentionPlan(BandConfig(window=24), block_size=8, cache=case.get("cache"))
    rt = AttentionRuntime(plan, layers)
    chunks = (1, 0) if "cache" in case else None
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, PAD_LAYOUT.seq_len, 2, 16) for _ in range(3))
    band = rt.masks.get(plan.method, PAD_LAYOUT, plan.block_size).to_token_mask()[0]
    first_calls, later_calls = [], HostSyncs()
    for step in range(steps):
        ctx = ForwardContext(PAD_LAYOUT, step, steps, cfg_chunks=chunks, one_key_mask=case["fresh"])
        state = rt.begin_forward(ctx)
        mask = _padding_mask(batch)  # built once per forward, as the host does
        for layer in range(layers):
            call_mask = mask.clone() if case["fresh"] else mask
            syncs = HostSyncs() if layer == 0 else later_calls
            with syncs:
                out = rt.attend(state, q, k, v, call_mask, None)
            if layer == 0:
                first_calls.append(syncs)
            rows = [1, 1] if chunks else [0, 1]  # with ASC the negative row 0 copies the positive row 1
            ref = F.scaled_dot_product_attention(
                *(x[rows].transpose(1, 2) for x in (q, k, v)), attn_mask=band & mask[rows]
            ).transpose(1, 2)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        rt.end_forward(state)
    st = rt.stats.as_dict()
    assert st["fallbacks"] == {} and st["dense_calls"] == 0 < st["sparse_calls"], st
    assert not later_calls.calls, (
        f"{name}: host syncs after the first call of a forward:\n{later_calls.report()}"
    )
    # warm-up (the first forward builds masks for the shorter layouts), then one read per forward
    assert [dict(s.calls) for s in first_calls[1:]] == [{"torch.Tensor.tolist": 1}] * (steps - 1)


def test_one_key_mask_forward_whose_masks_differ_raises_then_reads_every_mask():
    plan = AttentionPlan(BandConfig(window=24), block_size=8)
    rt = AttentionRuntime(plan, 2)
    q, k, v = (torch.randn(1, PAD_LAYOUT.seq_len, 2, 16) for _ in range(3))
    first, other = _padding_mask(1), _padding_mask(1)
    other[..., -9:] = False  # drops more text than the first mask

    def forward(step):
        state = rt.begin_forward(ForwardContext(PAD_LAYOUT, step, 4, one_key_mask=True))
        outs = [rt.attend(state, q, k, v, m, None) for m in (first, other)]
        rt.end_forward(state)
        return outs

    with pytest.raises(RuntimeError, match="the masks differed"):
        forward(0)
    _, out = forward(1)  # now the second call reads its own mask: exact
    band = rt.masks.get(plan.method, PAD_LAYOUT, plan.block_size).to_token_mask()[0]
    ref = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), attn_mask=band & other)
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-5, atol=1e-5)
