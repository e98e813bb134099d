"""Caching across denoising steps and CFG branches (``fastattn.caching``) on the CPU.

The policies on fake blocks (schedules, trigger, branches, shape changes), the memory store (budget, storage,
offload), attention output sharing in the runtime (AST, ASC batched and two-pass, composed with a sparse
method), and the diffusers adapter on tiny models of every family: a skipped range reproduces the computed
output on identical inputs, caches off (or never triggering) are bit-identical, state resets per pipeline
call, the budget makes the policy recompute (counted), two pipelines and Wan 2.2's two transformers each keep
their own state.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from fastattn.attention import AttentionRuntime, ForwardContext
from fastattn.caching import CACHE_PRESETS, BlockCache, CacheConfig, CacheStore
from fastattn.masks import TokenLayout
from fastattn.plans import AttentionPlan, BandConfig, build_mask, make_plan

# ------------------------------------------------------------------------------------------ config, plans


def test_cache_config_presets_plan_fields_and_errors(tmp_path):
    assert not CacheConfig().enabled and CACHE_PRESETS["balanced"].blocks == "auto"
    cfg = CacheConfig.from_value({"preset": "fast", "threshold": 0.3, "attn_share_layers": [0, -1]})
    assert (
        cfg.blocks == "auto"
        and cfg.max_skips == 4
        and cfg.order == 1
        and cfg.threshold == 0.3
        and cfg.attn_share_layers == (0, -1)
    )
    for bad, match in (({"blokcs": "auto"}, "unknown cache field"), ("turbo", "unknown cache preset"),
                       ({"blocks": "sometimes"}, "blocks must be one of"), ({"first_steps": 1.5}, "fraction"),
                       ({"span": 0}, "span"), ({"blocks": "auto", "probe_blocks": 0}, "probe_blocks"),
                       (3, "preset name, a dict")):  # fmt: skip
        with pytest.raises((TypeError, ValueError), match=match):
            CacheConfig.from_value(bad)
    # one plan mixes sparsity and caching; caching fields at their defaults are not written (old files stay)
    plan = make_plan("wan", "fast", cache="balanced", cache_budget_gb=2, cache_storage="int8")
    assert plan.method.name in ("window3d", "radial") and plan.cache == CACHE_PRESETS["balanced"]
    assert "cache" not in make_plan("wan", "fast").to_dict()
    assert AttentionPlan.from_dict(plan.to_dict()) == plan
    assert AttentionPlan.load(plan.save(tmp_path / "p")) == plan
    preset = tmp_path / "mine.json"
    preset.write_text('{"method": "band", "density": 0.5, "cache": {"blocks": "delta", "interval": 3}}')
    assert make_plan("wan", str(preset)).cache.interval == 3
    for kw, match in ((dict(cache_budget_gb=-1), "cache_budget_gb"), (dict(cache_storage="fp4"), "cache_storage"),
                      (dict(cache={"interval": 0}), "interval")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            make_plan("wan", "fast", **kw)


def test_store_budget_storage_and_offload():
    x = torch.randn(4, 6, 8, dtype=torch.float32)
    auto = CacheStore()
    assert auto.put(("a", 0), x) and torch.equal(auto.get(("a", 0)), x) and auto.bytes == x.numel() * 4
    assert auto.get(("a", 0), shape=(1, 2)) is None and auto.misses == 1
    for storage, tol, ratio in (("bf16", 1e-2, 0.5), ("int8", 2e-2, 0.25 + 1 / 8)):
        s = CacheStore(storage=storage, offload=True)
        s.put(("a", 0), x)
        y = s.get(("a", 0), like=x)
        assert y.dtype == x.dtype and (y - x).abs().max() <= tol * x.abs().max()
        assert s.bytes == pytest.approx(x.numel() * 4 * ratio)
    small = CacheStore(budget_bytes=x.numel() * 4 + 10)
    assert small.put(("a", 0), x) and small.put(("a", 0), x * 2)  # a replacement fits in place
    assert not small.put(("b", 0), x) and ("b", 0) not in small and small.refused == {"b": 1}
    small.external_bytes = lambda: 100
    assert not small.put(("a", 0), x) and ("a", 0) not in small  # refused: the stale value is dropped too
    assert small.as_dict()["refused_over_budget"] == {"a": 1, "b": 1} and small.peak_bytes == x.numel() * 4


# ------------------------------------------------------------------------------------------ block policy


class FakeBlocks:
    """Two block lists (2 + 3 blocks); the first list also updates a text stream. Counts the blocks run."""

    def __init__(self, config, budget=None):
        self.cache = BlockCache(config, CacheStore(budget))
        self.cache.set_blocks((2, 3), attention_calls=(1, 1, 2, 1, 1))
        self.ran = []
        self.layers = 0

    def forward(self, step, steps, h, e=None, branch=0):
        fwd = self.cache.begin_forward(step, steps, branch, on_skip=self._skip)
        ran = []
        for i in range(5):
            e = e if i < 2 else None  # the second list has no text stream

            def compute(i=i, h=h, e=e):
                ran.append(i)
                w = 1.0 + 0.1 * (i + 1)
                return torch.tanh(h * w) + h, (e * w if e is not None else None)

            h, e = compute() if fwd is None else fwd.block(i, h, e, compute)
        if fwd is not None:
            fwd.end()
        self.ran.append(ran)
        return h

    def _skip(self, n):
        self.layers += n


def test_fixed_and_delta_schedules_skip_the_planned_blocks():
    m = FakeBlocks(CacheConfig(blocks="fixed", skip_fraction=0.5, first_steps=1, last_steps=1))
    h = torch.randn(2, 3, 4)
    outs = [m.forward(s, 6, h, torch.ones(2, 1, 4)) for s in range(6)]
    # window: steps 1-4; its steps 1 and 3 (2 and 4 of the run) skip every block after the probe
    assert m.ran == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [0], [0, 1, 2, 3, 4], [0], [0, 1, 2, 3, 4]]
    assert m.layers == 2 * (1 + 2 + 1 + 1)  # the skipped blocks' self-attention calls, for the layer count
    torch.testing.assert_close(outs[2], outs[1])  # identical inputs: the residuals reproduce the blocks
    d = FakeBlocks(
        CacheConfig(blocks="delta", interval=2, boundary=0.5, span=0.4, first_steps=1, last_steps=1)
    )
    for s in range(8):
        d.forward(s, 8, h)
    # span 0.4 of 5 blocks: the rear two early (steps 2), the front two late (steps 4, 6); refreshes between
    assert d.ran[2] == [0, 1, 2] and d.ran[4] == [2, 3, 4] and d.ran[6] == [2, 3, 4]
    assert all(r == [0, 1, 2, 3, 4] for i, r in enumerate(d.ran) if i not in (2, 4, 6))
    assert d.cache.stats.recomputes == {}


def _linear_run(config, budget=None, steps=6, evals=1, storage="auto"):
    """Blocks whose residuals grow linearly with the step (2 + 3 blocks, text stream in the first list): a
    first-order extrapolation reproduces them exactly; reusing the last residual is off by a step's growth.
    ``evals`` forwards per step (ComfyUI's step clock gives both of Heun's / DPM++ 2S's one step); the last
    one's output is kept."""
    cache = BlockCache(config, CacheStore(budget, storage=storage))
    cache.set_blocks((2, 3))
    gen = torch.Generator().manual_seed(0)
    h, e = torch.randn(2, 3, 4, generator=gen), torch.randn(2, 1, 4, generator=gen)
    outs, exact = [], []
    for step in [s for s in range(steps) for _ in range(evals)]:
        fwd = cache.begin_forward(step, steps, 0)
        x, y, rx, ry = h, e, h, e
        for i in range(5):
            y = y if i < 2 else None
            ry = ry if i < 2 else None

            def compute(i=i, x=x, y=y, step=step):
                return x + (i + 1) * step * 0.1, (y - step * 0.2 if y is not None else None)

            x, y = fwd.block(i, x, y, compute)
            rx = rx + (i + 1) * step * 0.1
            ry = ry - step * 0.2 if ry is not None else None
        fwd.end()
        if len(outs) > step:  # a second forward of the step replaces the first
            del outs[-1], exact[-1]
        outs.append(x)
        exact.append(rx)
    return cache, outs, exact


def test_order_one_extrapolates_the_residual_from_the_last_two_captures():
    base = dict(blocks="fixed", skip_fraction=0.5, first_steps=1, last_steps=1)
    c0, outs0, exact = _linear_run(CacheConfig(**base))
    c1, outs1, _ = _linear_run(CacheConfig(**base, order=1))
    skipped = [s for s, _, n in c1.stats.schedule if n]
    assert skipped == [2, 4] and [s for s, _, n in c0.stats.schedule if n] == skipped
    for s in skipped:  # both block lists' residuals (and the text stream's) extrapolated exactly
        torch.testing.assert_close(outs1[s], exact[s])
        assert (outs0[s] - exact[s]).abs().max() > 0.05  # order 0 reuses step s-1's residual
    assert c1.stats.extrapolated == len(skipped) and c0.stats.extrapolated == 0  # skipping forwards
    # twice the memory: each range keeps its last two residuals (hidden + text stream of the first list)
    one = 2 * 3 * 4 * 4 * 2 + 2 * 1 * 4 * 4
    assert c0.store.peak_bytes == one and c1.store.peak_bytes == 2 * one
    # a budget that holds one residual set: order 1 drops the older one and works as order 0, refusing nothing
    cb, outsb, _ = _linear_run(CacheConfig(**base, order=1), budget=one)
    assert cb.stats.extrapolated == 0 and not cb.stats.recomputes and cb.store.refused == {}
    for s in skipped:
        torch.testing.assert_close(outsb[s], outs0[s])
    with pytest.raises(ValueError, match="order must be 0"):
        CacheConfig(order=2)
    with pytest.raises(ValueError, match="order must be 0"):
        CacheConfig(order=1.0)


def test_order_one_keeps_its_line_when_a_step_runs_twice_and_fits_agrees_with_put():
    # two forwards per step (Heun, DPM++ 2S in ComfyUI): the second capture of a step replaces the first and
    # keeps the previous step's residual as the line's first point (two points on one step make no line)
    base = dict(blocks="fixed", skip_fraction=0.5, first_steps=1, last_steps=1)
    c1, outs1, exact = _linear_run(CacheConfig(**base, order=1), evals=2)
    skipped = sorted({s for s, _, n in c1.stats.schedule if n})
    assert skipped == [2, 4] and c1.stats.extrapolated == 2 * len(skipped)  # two skipping forwards a step
    for s in skipped:
        torch.testing.assert_close(outs1[s], exact[s])
    # fits() is put()'s admission without the work: exact bytes for every storage (int8: one fp32 scale per
    # row), nothing encoded or copied (it runs on every order-1 capture, offloaded or not)
    for storage in ("auto", "bf16", "int8"):
        for shape in [(1, 9, 10), (2, 5, 3072 // 64), (3,)]:
            t = torch.randn(*shape)
            probe = CacheStore(storage=storage)
            probe.put("t", t)
            for budget, fits in ((probe.bytes, True), (probe.bytes - 1, False)):
                store = CacheStore(budget, storage=storage, offload=True)
                store._encode = None  # fits must not call it
                assert store.fits("t", t) is fits, (storage, shape, budget)
    # an int8 budget that holds exactly one residual set: order 1 falls back to order 0, refusing nothing
    c0, outs0, _ = _linear_run(CacheConfig(**base), storage="int8")
    one = c0.store.peak_bytes
    cb, outsb, _ = _linear_run(CacheConfig(**base, order=1), budget=one, storage="int8")
    assert cb.store.refused == {} and not cb.stats.recomputes and cb.stats.extrapolated == 0
    for s in skipped:
        torch.testing.assert_close(outsb[s], outs0[s])


def test_auto_trigger_accumulates_change_per_branch_and_counts_recomputes():
    cfg = CacheConfig(blocks="auto", threshold=0.05, max_skips=2, first_steps=1, last_steps=1)
    m = FakeBlocks(cfg)
    h0, h1 = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    for s in range(8):  # two-pass CFG: each branch unchanged from step to step -> skips, at most 2 in a row
        a, b = m.forward(s, 8, h0, branch=0), m.forward(s, 8, h1, branch=1)
    assert [len(r) for r in m.ran[0::2]] == [5, 1, 1, 5, 1, 1, 5, 5]
    assert [len(r) for r in m.ran[1::2]] == [5, 1, 1, 5, 1, 1, 5, 5]
    torch.testing.assert_close(
        a, FakeBlocks(CacheConfig()).forward(0, 8, h0)
    )  # branch 0 kept its own residual
    torch.testing.assert_close(b, FakeBlocks(CacheConfig()).forward(0, 8, h1))
    changing = FakeBlocks(cfg)
    g = torch.Generator().manual_seed(1)
    for s in range(6):
        changing.forward(s, 6, torch.randn(1, 3, 4, generator=g))
    assert all(len(r) == 5 for r in changing.ran)  # the probe residual changes too much: compute every step
    shaped = FakeBlocks(CacheConfig(blocks="fixed", first_steps=0, last_steps=0))
    shaped.forward(0, 4, h0)
    shaped.forward(1, 4, torch.randn(1, 5, 4))
    assert shaped.ran[1] == [0, 1, 2, 3, 4]
    assert shaped.cache.stats.recomputes == {"input shape changed ([1, 3, 4] -> [1, 5, 4])": 2}
    poor = FakeBlocks(CacheConfig(blocks="fixed", first_steps=0, last_steps=0), budget=16)
    poor.forward(0, 4, h0)
    poor.forward(1, 4, h0)
    assert poor.ran[1] == [0, 1, 2, 3, 4]
    assert poor.cache.stats.recomputes == {"the residual did not fit cache_budget_gb": 2}


# ------------------------------------------------------------------------------------------ AST / ASC


def _oracle(q, k, v, block_mask, *, scale=None, quant="none", perm=None):
    tm = block_mask.to_token_mask().to(q.device)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=tm, scale=scale), None


def _attend(rt, step, steps, qkv, branch=0, chunks=None, layers=2):
    state = rt.begin_forward(ForwardContext(LAYOUT, step, steps, branch, cfg_chunks=chunks))
    outs = [rt.attend(state, *qkv) for _ in range(layers)]
    rt.end_forward(state)
    return outs


LAYOUT = TokenLayout(32, 0, True, (1, 4, 8))


def test_attention_sharing_across_steps_and_cfg_composes_with_sparsity():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 32, 2, 8, generator=g) for _ in range(3))
    band = BandConfig(window=8)
    mask = build_mask(band, LAYOUT, 8)
    sparse = _oracle(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)[0].transpose(1, 2)
    ast = AttentionPlan(
        band, block_size=8, cache={"attn_share_interval": 2, "first_steps": 1, "last_steps": 1}
    )
    rt = AttentionRuntime(ast, num_layers=2, sparse_fn=_oracle)
    outs = [_attend(rt, s, 6, (q * (1 + s), k, v)) for s in range(6)]
    # window 1-4, computed on steps 1 and 3: steps 2 and 4 return exactly the previous step's output
    assert torch.equal(outs[2][0], outs[1][0]) and torch.equal(outs[4][1], outs[3][1])
    assert not torch.equal(outs[3][0], outs[2][0])
    torch.testing.assert_close(
        _attend(rt, 0, 6, (q, k, v))[0], sparse
    )  # computed calls run the plan's method
    st = rt.stats.as_dict()
    assert st["reuses"] == {"step": 4} and st["reused_calls"] == 4 and st["dense_calls"] == 0
    # ASC, batched CFG: only the positive chunk attends; the negative chunk gets its rows
    asc = AttentionRuntime(AttentionPlan(band, block_size=8, cache={"cfg_share": True, "first_steps": 0,
                                                                    "last_steps": 0}), 2, sparse_fn=_oracle)  # fmt: skip
    out = _attend(asc, 0, 4, (q, k, v), chunks=(1, 0))[0]
    torch.testing.assert_close(out[0], sparse[1])
    torch.testing.assert_close(out[1], sparse[1])
    assert asc.stats.as_dict()["density"] == pytest.approx(mask.block_density() / 2)
    # ASC, CFG as two passes: the second pass of a step returns the first one's output
    first = _attend(asc, 1, 4, (q, k, v), branch=1)
    second = _attend(asc, 1, 4, (q * 3, k, v), branch=0)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert asc.cache.attention.cfg_reuses == 2 + 2
    # over the budget nothing is kept: every call computes, counted
    poor = AttentionRuntime(ast.replace(cache_budget_gb=1e-9), 2, sparse_fn=_oracle)
    outs = [_attend(poor, s, 6, (q * (1 + s), k, v)) for s in range(4)]
    assert not torch.equal(outs[2][0], outs[1][0])
    assert poor.cache.attention.recomputes == {"AST: not cached (over cache_budget_gb)": 2}


# ------------------------------------------------------------------------------------------ diffusers

diffusers = pytest.importorskip("diffusers")
import fastattn.api as fa  # noqa: E402
from diffusers.hooks.hooks import CacheContext, _set_cache_context  # noqa: E402

_spec = importlib.util.spec_from_file_location("_fa_tiny", Path(__file__).with_name("test_diffusers.py"))
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)
_spec = importlib.util.spec_from_file_location(
    "_fa_pipe", Path(__file__).with_name("test_diffusers_pipeline.py")
)
pipes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pipes)
SKIP_HALF = dict(blocks="fixed", skip_fraction=0.5, first_steps=0, last_steps=0)


def _steps(model, inputs, n):
    outs = []
    for i in range(n):
        _set_cache_context(model, CacheContext("cond", step_index=i, num_inference_steps=n))
        try:
            outs.append(tiny.run(model, inputs))
        finally:
            _set_cache_context(model, None)
    return outs


@pytest.mark.parametrize("name", list(tiny.FAMILIES))
def test_every_family_skipped_blocks_reproduce_the_computed_output(name):
    """Block hooks in diffusers' registry: joint blocks' (hidden, encoder) tuples in each family's order, block
    lists, layer numbering; disable() leaves no hook behind."""
    model, inputs, _ = tiny.build(name)
    before = {n: "forward" in m.__dict__ for n, m in model.named_modules()}
    ref = _steps(model, inputs, 2)
    h = fa.enable(model, method="dense", cache=SKIP_HALF)
    outs = _steps(model, inputs, 2)
    st = h.stats()
    assert torch.equal(outs[0], ref[0])
    torch.testing.assert_close(outs[1], ref[1], rtol=1e-5, atol=1e-6)
    blocks = st["cache"]["blocks"]
    assert blocks["blocks_skipped"] == blocks["blocks_run"] - 2 > 0 and st["notes"] == {}
    memory = st["cache"]["memory"]
    assert memory["bytes"] == 0 < memory["peak_bytes"]  # freed after the run's last step
    h.disable()
    assert {n: "forward" in m.__dict__ for n, m in model.named_modules()} == before
    assert not any("_diffusers_hook" in m.__dict__ for n, m in model.named_modules() if n)


def test_caches_off_or_never_triggering_are_bit_identical():
    pipe = pipes._wan_pipe()
    ref = pipes._call(pipe, steps=3)
    for kw in (dict(cache="off", cache_budget_gb=1.0, cache_storage="int8"),
               dict(cache={"blocks": "auto", "threshold": 0.0, "attn_share_interval": 0})):  # fmt: skip
        h = pipe.enable_fast_attention(method="dense", **kw)
        assert torch.equal(pipes._call(pipe, steps=3), ref), kw
        h.disable()
    sparse = pipe.enable_fast_attention(method="band", window=6, block_size=tiny.BS)
    want = pipes._call(pipe, steps=3)
    sparse.disable()
    pipe.enable_fast_attention(method="band", window=6, block_size=tiny.BS, cache="off", cache_storage="bf16")
    assert torch.equal(pipes._call(pipe, steps=3), want)
    pipe.disable_fast_attention()


def test_pipeline_trigger_per_branch_reset_per_call_and_new_shapes():
    pipe = pipes._wan_pipe()
    ref = pipes._call(pipe, steps=5)
    h = pipe.enable_fast_attention(method="band", window=6, block_size=tiny.BS,
                                   cache={"blocks": "auto", "threshold": 1e9, "max_skips": 1, "first_steps": 1})  # fmt: skip
    out = pipes._call(pipe, steps=5)
    st = h.stats()
    sched = st["cache"]["blocks"]["schedule"]
    # cond and uncond each: step 0 computed (first_steps), 1 skipped, 2 computed (max_skips), 3 skipped, 4 last
    assert sched == [[s, b, 1 if s in (1, 3) else 0] for s in range(5) for b in (0, 1)]
    assert st["cache"]["memory"]["bytes"] == 0 and st["cache"]["memory"]["peak_bytes"] > 0  # freed per call
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert torch.equal(pipes._call(pipe, steps=5), out)  # nothing carried over from the last call
    small = pipes._call(pipe, steps=3, height=32, width=48)  # other steps and resolution: a new run
    assert small.shape[-2:] == (4, 6) and torch.isfinite(small).all()
    assert h.stats()["cache"]["blocks"]["recomputes"] == {}
    h.reset_stats()
    assert h.stats()["cache"]["blocks"]["blocks_run"] == 0
    pipe.disable_fast_attention()
    assert torch.equal(pipes._call(pipe, steps=5), ref)


def test_two_pipelines_and_wan22_transformers_keep_their_own_state():
    a, b = pipes._wan_pipe(), pipes._wan_pipe(num_layers=3)
    cache = dict(blocks="fixed", skip_fraction=0.5, first_steps=1, last_steps=1)
    alone = []
    for p in (a, b):
        h = p.enable_fast_attention(method="dense", cache=cache)
        alone.append(pipes._call(p, steps=4))
        h.disable()
    ha, hb = (p.enable_fast_attention(method="dense", cache=cache) for p in (a, b))
    assert ha.runtimes[0].cache.store is not hb.runtimes[0].cache.store
    assert torch.equal(pipes._call(a, steps=4), alone[0]) and torch.equal(pipes._call(b, steps=4), alone[1])
    ha.disable(), hb.disable()
    spec = importlib.util.spec_from_file_location(
        "_fa_plan", Path(__file__).with_name("test_plan_runtime.py")
    )
    plan_tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plan_tests)
    pipe = plan_tests._wan22_pipe()
    pipe.register_to_config(boundary_ratio=0.8)  # 6 steps: the high-noise transformer runs steps 0-2
    h = fa.enable(pipe, method="dense", cache=cache)
    torch.manual_seed(1)
    pipe(prompt_embeds=torch.randn(1, 12, 32), negative_prompt_embeds=torch.randn(1, 12, 32), height=32, width=48,
         num_frames=5, num_inference_steps=6, guidance_scale=5.0, output_type="latent")  # fmt: skip
    high, low = (m["cache"]["blocks"] for m in h.stats()["models"])
    steps_high, steps_low = {s for s, *_ in high["schedule"]}, {s for s, *_ in low["schedule"]}
    assert steps_high and steps_low and max(steps_high) < min(steps_low)  # the switch mid-run
    assert high["blocks_skipped"] > 0 and low["blocks_skipped"] > 0
    # the second transformer's first step after the switch has nothing of its own cached yet: it computes
    assert all(k == 0 for s, _, k in low["schedule"] if s == min(steps_low))
    h.disable()


def test_bench_caching_tiny_times_every_row_on_the_same_inputs(tmp_path):
    """bench/caching.py's logic on its CPU configuration (numbers are meaningless here)."""
    import json

    from fastattn.bench import caching

    out = tmp_path / "caching.json"
    rc = caching.main(["--tiny", "--only", "Wan", "--steps", "4", "--peers", "MagCache,FirstBlockCache",
                       "--out", str(out)])  # fmt: skip
    assert rc == 0
    data = json.loads(out.read_text())
    assert "fixed schedule" in data["meta"]["note"] and data["meta"]["skip_fraction"] == 0.5
    rows = {r["config"]: r for r in data["records"]}
    assert set(rows) == {"dense", "fast", "fast+cache", "dense+cache", "MagCache", "FirstBlockCache"}
    for r in rows.values():
        assert "error" not in r and r["ms"] > 0 and r["steps"] == 4 and r["speedup"] > 0, r
    assert rows["dense"]["compute_fraction"] == 1.0
    # 4 steps: step 0 and the last computed (first_steps 0.1, last_steps 1); 1 of the 2 window steps skips
    assert rows["fast+cache"]["compute_fraction"] == 0.75 and rows["fast+cache"]["blocks_skipped"] == 1
    assert rows["fast+cache"]["cache"]["blocks"] == "fixed" and 0 < rows["fast"]["density"] <= 1.0
    with pytest.raises(SystemExit, match="unknown cache"):
        caching.main(["--tiny", "--peers", "DeepCache"])
    # the skip schedule a testbed row produced (16 steps: window 2..14, 6 of its 13 steps skipped), order 1
    cq = tmp_path / "cq.json"
    row = {"config": "fast+cache auto t=0.3 k=3 o1", "psnr": 28.0, "compute_fraction": 0.6,
           "enable": {"preset": "testbed/fast", "cache": {"blocks": "auto", "threshold": 0.3, "max_skips": 3,
                                                          "order": 1}},
           "last_clip_schedule": [3, 5, 7, 9, 11, 13]}  # fmt: skip
    cq.write_text(json.dumps({"meta": {"steps": 16}, "rows": [row]}))
    rc = caching.main(["--tiny", "--only", "Wan", "--steps", "8", "--peers", "", "--out", str(out),
                       "--skip-fraction-from", f"{cq}:{row['config']}"])  # fmt: skip
    data = json.loads(out.read_text())
    src = data["meta"]["schedule_source"]
    assert rc == 0 and src["window_steps"] == 13 and src["skip_fraction"] == pytest.approx(6 / 13)
    assert data["meta"]["skip_fraction"] == src["skip_fraction"] and data["meta"]["order"] == 1
    rows = {r["config"]: r for r in data["records"]}
    assert rows["fast+cache"]["cache"]["order"] == 1 and rows["fast+cache"]["blocks_skipped"] > 0
    # --fraction time-boxes the blocks and every row says so, with the block counts run and in full
    rc = caching.main(
        ["--tiny", "--only", "Wan", "--steps", "4", "--peers", "", "--fraction", "0.5", "--out", str(out)]
    )
    boxed = [r.get("time_boxed", "") for r in json.loads(out.read_text())["records"]]
    assert rc == 0 and all(
        "50% of the blocks ({'num_layers': 1} of {'num_layers': 2})" in b for b in boxed
    ), boxed
    with pytest.raises(SystemExit, match="no row 'nope'"):
        caching.main(["--tiny", "--skip-fraction-from", f"{cq}:nope"])
