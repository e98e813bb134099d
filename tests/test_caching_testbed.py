"""Caching on the testbed DiT (``fastattn.testbed.fast.enable(..., cache=...)``, tiny model, CPU): the same
CacheConfig and policies as diffusers and ComfyUI, through ``fastattn.caching``; and the caching-quality bench's
logic with diffusers' own caches on the testbed (``bench/caching_quality.py --tiny``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from fastattn.caching import CacheConfig
from fastattn.evaluation.metrics import psnr
from fastattn.testbed.caching import BlockCall
from fastattn.testbed.fast import cfg_chunks, enable
from fastattn.testbed.model import TestbedConfig, TestbedDiT
from fastattn.testbed.sample import sample

KW = dict(frames=2, size=32, num_steps=8, seed=3)  # grid (2, 8, 8): 128 tokens
FIXED = {"blocks": "fixed", "skip_fraction": 0.5, "first_steps": 1, "last_steps": 1}  # skips steps 2, 4, 6


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = TestbedDiT(dataclasses.replace(TestbedConfig.tiny(), depth=3)).eval()
    with torch.no_grad():  # adaLN-zero init would leave the blocks without effect
        for p in m.parameters():
            p.normal_(0.0, 0.2)
    return m


@pytest.fixture(scope="module")
def ref(model):
    return sample(model, [1], **KW)


class BlockRuns:
    """Counts the runs of each block (its MLP's first Linear: a skipped block never reaches it)."""

    def __init__(self, model):
        self.runs = [0] * len(model.blocks)
        self.handles = [blk.mlp[0].register_forward_pre_hook(lambda *_, i=i: self._hit(i))
                        for i, blk in enumerate(model.blocks)]  # fmt: skip

    def _hit(self, i):
        self.runs[i] += 1

    def remove(self):
        for h in self.handles:
            h.remove()


def _run(model, labels=(1,), **kw):
    counter = BlockRuns(model)
    try:
        out = sample(model, list(labels), **{**KW, **kw})
    finally:
        counter.remove()
    return out, counter.runs


@pytest.mark.parametrize(
    "cache",
    [
        "off",
        CacheConfig(),
        {"blocks": "fixed", "skip_fraction": 0.0},  # the block wrappers in place, nothing skipped
        {"blocks": "auto", "threshold": 0.0},  # the trigger runs (probe residuals kept), never fires
        {"blocks": "fixed", "skip_fraction": 0.5, "first_steps": 8},  # every step before the window
    ],
)
def test_caches_off_are_bit_identical(model, ref, cache):
    h = enable(model, method="dense", cache=cache, block_size=16)
    out, runs = _run(model)
    st = h.stats()
    h.disable()
    assert torch.equal(out, ref) and runs == [8, 8, 8]
    blocks = st.get("cache", {}).get("blocks")
    assert blocks is None or blocks["blocks_skipped"] == 0
    assert st["notes"] == {} and st["forwards"] == 8


def test_sparse_preset_with_caches_off_matches_the_preset_alone(model):
    kw = {**KW, "num_steps": 4}
    h = enable(model, "fast", block_size=16)
    plain = sample(model, [2], **kw)
    h = enable(model, "fast", block_size=16, cache={"blocks": "fixed", "skip_fraction": 0.0})
    wrapped = sample(model, [2], **kw)
    h.disable()
    assert torch.equal(wrapped, plain)


def test_fixed_schedule_skips_what_it_says_and_stats_report_it(model, ref):
    h = enable(model, method="dense", cache=FIXED, block_size=16)
    out, runs = _run(model)
    st = h.stats()
    blocks = st["cache"]["blocks"]
    # window: steps 1..6; skip_fraction 0.5 skips every second window step (2, 4, 6); the probe block always runs
    assert [s for s, _, k in blocks["schedule"] if k] == [2, 4, 6]
    assert all(k == 2 for _, _, k in blocks["schedule"] if k)
    assert runs == [8, 5, 5]
    assert blocks["blocks_skipped"] == 6 and blocks["skipping_forwards"] == 3 and blocks["blocks_run"] == 18
    assert blocks["block_work_skipped"] == 0.25 and blocks["recomputes"] == {}
    assert st["planned_dense"] == {"method dense": 18}  # skipped blocks made no attention call
    assert st["notes"] == {}  # skipped layers keep the layer count aligned
    assert st["cache"]["memory"]["hits"] == 3 and st["cache"]["memory"]["bytes"] == 0  # freed after the run
    assert not torch.equal(out, ref) and 10 < float(psnr(out, ref)) < float("inf")
    # a second run starts over (step 0 resets): same schedule, same output
    h.reset_stats()
    assert h.stats()["cache"]["blocks"]["blocks_skipped"] == 0
    again, _ = _run(model)
    assert torch.equal(again, out) and h.stats()["cache"]["blocks"]["blocks_skipped"] == 6
    h.disable()


def test_delta_and_auto_policies_skip(model):
    h = enable(model, method="dense", cache={"blocks": "delta", "interval": 2, "span": 0.5, "first_steps": 1},
               block_size=16)  # fmt: skip
    _, runs = _run(model)
    blocks = h.stats()["cache"]["blocks"]
    # span 0.5 of 3 blocks = 2: rear blocks (1, 2) before the boundary, front blocks (0, 1) after it
    assert blocks["blocks_skipped"] > 0 and runs[1] < 8 and runs[0] < 8 and runs[2] < 8
    h = enable(model, method="dense", cache={"blocks": "auto", "threshold": 1e9, "max_skips": 2, "first_steps": 1},
               block_size=16)  # fmt: skip
    _, runs = _run(model)
    sched = h.stats()["cache"]["blocks"]["schedule"]
    h.disable()
    skipped = [s for s, _, k in sched if k]
    assert runs[0] == 8 and runs[1] == runs[2] == 8 - len(skipped)
    # the trigger fires whenever allowed: in the window (steps 1..6), at most max_skips in a row, then a compute
    assert skipped == [1, 2, 4, 5]


def test_budget_too_small_recomputes_counted_and_exact(model, ref):
    h = enable(model, method="dense", cache=FIXED, cache_budget_gb=0, block_size=16)
    out, runs = _run(model)
    st = h.stats()["cache"]
    h.disable()
    assert torch.equal(out, ref) and runs == [8, 8, 8]
    assert st["blocks"]["recomputes"] == {"the residual did not fit cache_budget_gb": 3}
    assert st["memory"]["refused_over_budget"]["blocks"] > 0 and st["memory"]["peak_bytes"] == 0


def test_attention_sharing_ast_and_asc_on_batched_cfg(model, ref):
    assert cfg_chunks(torch.tensor([1, 2, 24, 24]), 24) == (0, 1)
    assert cfg_chunks(torch.tensor([24, 3]), 24) == (1, 0)
    assert cfg_chunks(torch.tensor([1, 2]), 24) is None and cfg_chunks(torch.tensor([1]), 24) is None
    assert cfg_chunks(torch.tensor([1, 24, 24, 24]), 24) is None and cfg_chunks(None, 24) is None
    cfg_ref = sample(model, [1], cfg_scale=3.0, **KW)
    h = enable(model, method="dense", cache={"cfg_share": True, "first_steps": 1}, block_size=16)
    asc = sample(model, [1], cfg_scale=3.0, **KW)
    st = h.stats()
    # window steps 1..6, every layer: the unconditional half copies the conditional half's attention
    assert st["cache"]["attention"]["cfg_reuses"] == 6 * 3 and st["reuses"] == {"cfg": 18}
    assert not torch.equal(asc, cfg_ref)
    h = enable(model, method="dense", cache={"attn_share_interval": 2, "first_steps": 1}, block_size=16)
    ast = sample(model, [1], **KW)
    st = h.stats()
    h.disable()
    # window steps 1..6 compute on 1, 3, 5 and reuse on 2, 4, 6
    assert st["cache"]["attention"]["step_reuses"] == 3 * 3 and st["reused_calls"] == 9
    assert 10 < float(psnr(ast, ref)) < float("inf")


def test_disable_and_replace_leave_no_trace(model, ref):
    fns = [blk.attn.attention_fn for blk in model.blocks]
    h1 = enable(model, method="dense", cache=FIXED, block_size=16)
    wrappers = [blk.__dict__["forward"] for blk in model.blocks]
    h2 = enable(model, method="dense", cache={"blocks": "delta"}, block_size=16)  # replaces h1
    assert not h1.enabled and all(blk.__dict__["forward"] is not w for blk, w in zip(model.blocks, wrappers))
    assert all(not isinstance(blk.forward.run, BlockCall) for blk in model.blocks)  # h1's wrappers are gone
    h2.disable()
    assert all("forward" not in blk.__dict__ for blk in model.blocks)
    assert [blk.attn.attention_fn for blk in model.blocks] == fns
    assert torch.equal(sample(model, [1], **KW), ref)


# ------------------------------------------------------------------ diffusers' own caches on the testbed (bench)

PEER_SETTINGS = {  # settings that must skip on the tiny model within 8 steps
    "FirstBlockCache": dict(threshold=1e9),
    "MagCache": dict(threshold=1e9, max_skip_steps=2, retention_ratio=0.2, num_inference_steps=8,
                     mag_ratios=[1.0] * 8),
    "TaylorSeer": dict(cache_interval=2, disable_cache_before_step=2),
    "FasterCache": dict(is_guidance_distilled=True, spatial_attention_timestep_skip_range=(-1, 901)),
    "PyramidAttentionBroadcast": dict(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001)),
}  # fmt: skip


class AttentionRuns(BlockRuns):
    """Counts each block's attention module runs (its qkv Linear)."""

    def __init__(self, model):
        self.runs = [0] * len(model.blocks)
        self.handles = [blk.attn.qkv.register_forward_pre_hook(lambda *_, i=i: self._hit(i))
                        for i, blk in enumerate(model.blocks)]  # fmt: skip


@pytest.mark.parametrize("name", list(PEER_SETTINGS))
def test_diffusers_caches_run_unchanged_on_the_testbed(model, ref, name):
    pytest.importorskip("diffusers")
    from fastattn.bench.testbed_peers import PeerCache

    before = {n: set(m.__dict__) for n, m in model.named_modules()}
    peer = PeerCache(model, name, **PEER_SETTINGS[name])
    try:
        counter = AttentionRuns(model)
        out = sample(model, [1], **KW)
        peer.reset()  # a pipeline call ends: the next run starts from fresh state
        again = sample(model, [1], **KW)
        counter.remove()
        runs = counter.runs
    finally:
        peer.remove()
    assert torch.equal(again, out)
    assert runs[-1] < 16 and not torch.equal(out, ref) and 5 < float(psnr(out, ref)) < float("inf")
    if name in ("FirstBlockCache",):
        assert runs[0] == 16  # the first block is the trigger's probe: it always runs
    assert {n: set(m.__dict__) for n, m in model.named_modules()} == before
    assert all(type(blk.attn).__module__ == "fastattn.testbed.model" for blk in model.blocks)
    assert torch.equal(sample(model, [1], **KW), ref)


def test_mag_calibration_and_peer_errors(model):
    pytest.importorskip("diffusers")
    from fastattn.bench.testbed_peers import PeerCache, _printed_ratios, calibrate_mag_ratios

    ratios = calibrate_mag_ratios(model, lambda: sample(model, [1], **KW), 8)
    assert len(ratios) == 8 and ratios[0] == 1.0 and all(r > 0 for r in ratios)
    with pytest.raises(ValueError, match="printed no ratios"):
        _printed_ratios("nothing here", 8)
    with pytest.raises(ValueError, match="unknown diffusers cache"):
        PeerCache(model, "DeepCache")
    with pytest.raises(ValueError, match="mag_ratios"):  # diffusers' own check, and nothing is left behind
        PeerCache(model, "MagCache")
    with pytest.raises(ValueError, match="first step"):
        PeerCache(model, "FasterCache", spatial_attention_timestep_skip_range=(-1, 1001))
    assert all("_diffusers_hook" not in m.__dict__ for m in model.modules())


def _row(config, kind, psnr_db, compute, seconds=1.0, **kw):
    return dict(config=config, kind=kind, psnr=psnr_db, compute_fraction=compute, flops_fraction=compute,
                seconds=seconds, **kw)  # fmt: skip


def test_caching_quality_summary_matches_compute():
    pytest.importorskip("diffusers")
    from fastattn.bench.caching_quality import summarize

    ours = {"preset": "testbed/fast", "cache": {}}
    rows = [
        _row("dense", "dense", float("inf"), 1.0),
        _row("fast", "ours", 25.0, 1.0, seconds=4.0, sparse=True, enable={"preset": "testbed/fast"}),
        _row("fast+cache a", "ours", 24.5, 0.70, seconds=2.8, sparse=True, enable=ours),
        _row("fast+cache b", "ours", 23.0, 0.50, seconds=2.0, sparse=True, enable=ours),
        _row("dense+cache", "ours", 40.0, 0.70, sparse=False, enable={"method": "dense", "cache": {}}),
        _row("PAB", "peer", 22.0, 0.72),
        _row("FBC", "peer", 23.9, 0.66),
        _row("Mag", "peer", 30.0, 0.40),  # computes much less: only the conservative comparison sees it
        {"config": "TaylorSeer", "kind": "peer", "error": "boom"},
    ]
    s = summarize(rows, tol=0.05)
    assert s["best_matched"]["ours"] == "fast+cache a" and s["best_matched"]["peer"] == "FBC"
    assert s["best_matched"]["margin_db"] == pytest.approx(0.6)
    assert s["best_conservative"]["peer"] == "Mag" and s["best_conservative"]["margin_db"] == pytest.approx(
        -5.5
    )
    assert not s["targets_met"]["cache+sparsity >= best peer + 1 dB at matched compute"]
    # our cache alone counts only in the informative comparison, never in the target's
    assert (
        s["best_matched_any_cache"]["ours"] == "dense+cache" and s["best_matched_any_cache"]["peer"] == "FBC"
    )
    assert s["best_matched_flops"]["ours_flops_fraction"] == 0.70
    assert s["best_fast_cache"]["config"] == "fast+cache a"
    assert s["best_fast_cache"]["speedup_vs_fast"] == pytest.approx(4.0 / 2.8)
    assert s["targets_met"]["fast+cache >= 24 dB and >= 1.3x fast"]


def test_caching_quality_bench_tiny(tmp_path):
    pytest.importorskip("diffusers")
    import json

    from fastattn.bench import caching_quality

    out = tmp_path / "cq.json"
    only = r"^(fast|fast\+cache.*|dense\+cache.*|MagCache.*|PyramidAttentionBroadcast.*)$"
    assert caching_quality.main(["--tiny", "--steps", "4", "--only", only, "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["meta"]["diffusers"] and len(data["meta"]["mag_ratios"]) == 4
    rows = {r["config"].split(" ")[0]: r for r in data["rows"]}
    assert set(rows) == {
        "dense",
        "fast",
        "fast+cache",
        "dense+cache",
        "MagCache",
        "PyramidAttentionBroadcast",
    }
    for r in rows.values():
        assert "error" not in r and r["seconds"] > 0 and r["speedup_vs_dense"] > 0, r
    # 4 steps: step 0 and the last compute; skip_fraction 0.5 skips one of the two window steps
    assert rows["fast+cache"]["compute_fraction"] == 0.75 and rows["fast+cache"]["last_clip_schedule"] == [2]
    assert rows["fast+cache"]["flops_fraction"] < rows["fast"]["flops_fraction"] < 1.0
    assert rows["dense+cache"]["compute_fraction"] == 0.75 and rows["dense"]["compute_fraction"] == 1.0
    assert rows["PyramidAttentionBroadcast"]["compute_fraction"] < 1.0
    assert rows["PyramidAttentionBroadcast"]["blocks_fraction"] == 1.0  # PAB skips attention, never the MLP
    assert "best_matched" in data["summary"] and "targets_met" in data["summary"]
    with pytest.raises(SystemExit, match="match-tol"):
        caching_quality.main(["--tiny", "--match-tol", "2"])


def test_a_skipped_wa_rs_refresh_is_captured_at_the_next_computed_step():
    torch.manual_seed(0)
    m = TestbedDiT(TestbedConfig.tiny()).eval()
    kw = {**KW, "num_steps": 12}
    # residual_refresh 4 after 2 dense steps: captures at steps 1 (last dense), 6 and 10 in each of the 2 layers
    plan = dict(
        method="window3d", density=0.5, dense_steps=2, residual=True, residual_refresh=4, block_size=16
    )
    h = enable(m, **plan, cache={"blocks": "fixed", "skip_fraction": 0.5, "first_steps": 1, "last_steps": 1})
    sample(m, [1], **kw)
    st = h.stats()
    h.disable()
    assert 6 in [s for s, _, k in st["cache"]["blocks"]["schedule"] if k]  # the schedule skips a refresh step
    assert st["planned_dense"]["residual capture (WA-RS)"] == 2 * 3
