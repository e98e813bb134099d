"""PARO's calibrated block maps ("blockmap" heads): data in the plan file, run by the runtime as masked attention
in the head's axis order, chosen by calibration where they beat the fixed candidates."""

from __future__ import annotations

import json
import math

import pytest
import torch
from fastattn.attention import AttentionRuntime, ForwardContext
from fastattn.masks import TokenLayout, head_permutations
from fastattn.masks.block_mask import BlockMask
from fastattn.masks.layout import BlockGeometry
from fastattn.plans import AttentionPlan, BandConfig, BlockMapConfig, DenseConfig, HeadTable, build_mask
from fastattn.plans.files import (
    PLAN_JSON,
    PlanFileError,
    PlanMismatchError,
    load_plan,
    pack_block_maps,
    packed_maps_bytes,
    save_plan,
    unpack_block_maps,
)
from fastattn.plans.heads import unique_maps
from fastattn.plans.meta import ModelFingerprint, PlanMeta

LAYOUT = TokenLayout.video(4, 8, 8, text_len=10, text_first=True)  # 266 tokens: 2 text + 32 image blocks of 8
BS = 8
N = BlockGeometry(LAYOUT, BS).num_blocks
FP = ModelFingerprint("wan", "WanTransformer3DModel", 2, 4, 16)


def _random_maps(count: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    maps = torch.rand(count, N, N, generator=g) < 0.3
    maps |= torch.eye(N, dtype=torch.bool)  # every query block keeps a key block
    return maps


def _table(maps: torch.Tensor) -> HeadTable:
    """Layer 0: blockmap heads 0 (FHW, map 0) and 1 (HWF, map 1), a band head and a dense head; layer 1 band."""
    methods = (BandConfig(window=12), BlockMapConfig(density=0.3), DenseConfig())
    return HeadTable(
        methods,
        torch.tensor([[[1, 1, 0, 2], [0, 0, 0, 0]]]),
        order_index=torch.tensor([[[0, 3, 0, 0], [0, 0, 0, 0]]]),
        map_index=torch.tensor([[[0, 1, -1, -1], [-1, -1, -1, -1]]]),
        block_maps=maps,
    )


def _oracle_per_head(q, k, v, masks, perms):
    """Masked dense attention per head on ``[B, S, H, D]`` (in each head's own token order)."""
    out = torch.empty_like(q)
    for h, m in enumerate(masks):
        perm = perms[h].long() if perms is not None else torch.arange(q.shape[1])
        qh, kh, vh = (x[:, perm, h] for x in (q, k, v))
        tok = m.to_token_mask()[0, 0]
        s = (qh @ kh.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        o = torch.nan_to_num(torch.softmax(s.masked_fill(~tok, -math.inf), -1)) @ vh
        out[:, perm, h] = o
    return out


def _qkv(seq=LAYOUT.seq_len, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, seq, 4, 16, generator=g) for _ in range(3)]


def _attend(rt, layout, q, k, v, layer=0):
    state = rt.begin_forward(ForwardContext(step=0, num_steps=1, layout=layout))
    out = rt.attend(state, q, k, v, layer=layer)
    rt.end_forward(state)
    return out


# ------------------------------------------------------------------------------------------ plan files


def test_block_maps_round_trip_through_a_plan_file(tmp_path):
    maps = _random_maps(2)
    plan = AttentionPlan(block_size=BS, heads=_table(maps))
    d = save_plan(plan, tmp_path / "p", PlanMeta(model=FP, layout=LAYOUT))
    back = load_plan(d, fingerprint=FP, layout=LAYOUT).plan
    assert torch.equal(back.heads.block_maps, maps) and back.heads.block_maps.dtype == torch.bool
    assert torch.equal(back.heads.map_index, plan.heads.map_index)
    assert back.heads.methods == plan.heads.methods
    assert back.heads.describe()["block_maps"] == 2
    # data maps fit only their block grid: another resolution is refused, even with adapt
    other = TokenLayout.video(4, 8, 16, text_len=10)
    with pytest.raises(PlanMismatchError, match=r"block maps are 34 x 34 blocks.*has 66"):
        load_plan(d, layout=other, adapt=True)
    # a plan whose maps do not fit its own meta.layout
    bad = save_plan(plan, tmp_path / "bad", PlanMeta(model=FP))
    import json

    header = json.loads((bad / PLAN_JSON).read_text())
    header["meta"]["layout"] = {"seq_len": 522, "text_len": 10, "text_first": True, "grid": [4, 8, 16]}
    (bad / PLAN_JSON).write_text(json.dumps(header))
    with pytest.raises(PlanFileError, match="does not fit its own meta.layout"):
        load_plan(bad)


def _rewrite_tensors(d, tensors: dict) -> None:
    """Replace ``d``'s plan.safetensors by ``tensors`` and fix plan.json's tensor list and sha256 to match
    (what a writer of another format, or a corruption that kept the digest consistent, would leave)."""
    import hashlib
    import json

    from safetensors.torch import save

    blob = save(tensors)
    (d / "plan.safetensors").write_bytes(blob)
    header = json.loads((d / PLAN_JSON).read_text())
    header["heads"]["tensors"] = sorted(tensors)
    header["meta"]["tensors_sha256"] = hashlib.sha256(blob).hexdigest()
    (d / PLAN_JSON).write_text(json.dumps(header))


def _stored(d) -> dict:
    from safetensors.torch import load

    return load((d / "plan.safetensors").read_bytes())  # a copy: load_file's mmap would see later rewrites


def test_packed_block_maps_round_trip_at_any_block_count():
    g = torch.Generator().manual_seed(3)
    for n in (1, 7, 8, 9, 13, 34, 64):
        maps = torch.rand(3, n, n, generator=g) < 0.4
        bits = pack_block_maps(maps)
        assert bits.dtype == torch.uint8 and tuple(bits.shape) == (3, n, (n + 7) // 8)
        if n % 8:
            assert not (bits[..., -1] >> (n % 8)).any()  # padding bits are zero
        assert torch.equal(unpack_block_maps(bits, "x"), maps)
        assert unpack_block_maps(bits, "x").dtype == torch.bool
    assert packed_maps_bytes(3, 34) == pack_block_maps(torch.ones(3, 34, 34, dtype=torch.bool)).numel()
    # little-endian bit order: key block k is bit k % 8 of byte k // 8
    row = torch.zeros(1, 1, 10, dtype=torch.bool)
    row[0, 0, [1, 8]] = True
    assert pack_block_maps(row).flatten().tolist() == [0b10, 0b1]


def test_plan_files_store_block_maps_bit_packed(tmp_path):
    maps = _random_maps(2)
    plan = AttentionPlan(block_size=BS, heads=_table(maps))
    stored = _stored(save_plan(plan, tmp_path / "p", PlanMeta(model=FP, layout=LAYOUT)))
    assert "block_maps" not in stored and N % 8  # 34 blocks: a ragged last byte
    bits = stored["block_maps_bits"]
    assert bits.dtype == torch.uint8 and tuple(bits.shape) == (2, N, (N + 7) // 8)
    assert torch.equal(unpack_block_maps(bits, "x"), maps)
    # packed maps say format_version 2: a fastattn from before the packing refuses the file by its version
    header = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert header["format_version"] == 2


def test_plan_files_without_block_maps_stay_format_version_1(tmp_path):
    table = HeadTable.uniform(DenseConfig(), num_layers=2, num_heads=4)
    for name, plan in {"no table": AttentionPlan(block_size=BS), "table": AttentionPlan(heads=table)}.items():
        d = save_plan(plan, tmp_path / name.replace(" ", "-"), PlanMeta(model=FP, layout=LAYOUT))
        assert json.loads((d / "plan.json").read_text())["format_version"] == 1, name


def test_old_plan_files_with_bool_block_maps_still_load(tmp_path):
    maps = _random_maps(2)
    plan = AttentionPlan(block_size=BS, heads=_table(maps))
    d = save_plan(plan, tmp_path / "old", PlanMeta(model=FP, layout=LAYOUT))
    _rewrite_tensors(d, plan.heads.tensors())  # what fastattn wrote before packing: bool block_maps [M, n, n]
    assert _stored(d)["block_maps"].dtype == torch.bool
    back = load_plan(d, fingerprint=FP, layout=LAYOUT).plan.heads
    assert torch.equal(back.block_maps, maps) and torch.equal(back.map_index, plan.heads.map_index)
    # saved again, the same table in the packed format
    new = save_plan(load_plan(d).plan, tmp_path / "new", PlanMeta(model=FP, layout=LAYOUT))
    again = load_plan(new).plan.heads
    assert "block_maps_bits" in _stored(tmp_path / "new") and torch.equal(again.block_maps, maps)


def test_corrupt_packed_block_maps_are_refused(tmp_path):
    maps = _random_maps(2)
    plan = AttentionPlan(block_size=BS, heads=_table(maps))
    d = save_plan(plan, tmp_path / "p", PlanMeta(model=FP, layout=LAYOUT))
    good = _stored(d)
    bits = good["block_maps_bits"]

    def refused(match, bad_bits=None, **more):
        tensors = good | more | ({"block_maps_bits": bad_bits} if bad_bits is not None else {})
        _rewrite_tensors(d, tensors)
        with pytest.raises(PlanFileError, match=match):
            load_plan(d)

    padded = bits.clone()
    padded[1, 7, -1] |= 0x80  # key block 39 of a row of 34: a padding bit
    refused(r"block_maps_bits\[1\] sets padding bits past key block 33 in query block 7", padded)
    refused(r"rows of 34 key blocks take 5 bytes, not 4", bits[..., :4].clone())
    refused(r"dtype 'I8', expected one of \['U8'\]", bits.to(torch.int8))
    refused(r"at most one of 'block_maps_bits' / 'block_maps'", block_maps=maps)
    holed = bits.clone()
    holed[0, 3] = 0
    refused(r"block_maps\[0\] leaves query block 3 with no key block", holed)
    _rewrite_tensors(d, good)
    assert torch.equal(load_plan(d).plan.heads.block_maps, maps)


def test_identical_maps_are_stored_once():
    maps = _random_maps(3)
    dup = torch.stack([maps[0], maps[1], maps[0], maps[2], maps[1]])
    index = torch.tensor([[[4, 0, -1], [2, 3, 1]], [[-1, 2, 4], [0, -1, 3]]], dtype=torch.int16)
    kept, new = unique_maps(dup, index)
    assert torch.equal(kept, maps) and new.dtype == index.dtype
    assert new.tolist() == [[[1, 0, -1], [0, 2, 1]], [[-1, 0, 1], [0, -1, 2]]]
    for i, j in zip(index.flatten().tolist(), new.flatten().tolist()):
        assert (i < 0 and j < 0) or torch.equal(dup[i], kept[j])  # every head keeps its map
    same, same_index = unique_maps(maps, index.clamp(max=2))
    assert same is maps and same_index is not None and torch.equal(same_index, index.clamp(max=2))


def test_saving_stores_identical_maps_once(tmp_path):
    maps = _random_maps(2)
    table = _table(torch.stack([maps[0], maps[0], maps[1]]))  # heads 0 and 1 name maps 0 and 1: the same map
    d = save_plan(AttentionPlan(block_size=BS, heads=table), tmp_path / "p", PlanMeta(model=FP))
    assert _stored(d)["block_maps_bits"].shape[0] == 2
    back = load_plan(d).plan.heads
    assert back.map_index[0, 0].tolist() == [0, 0, -1, -1]
    assert torch.equal(back.block_maps, maps)
    assert back.heads_at(0, 1) == table.heads_at(0, 1)


def test_saving_a_table_over_the_file_limit_says_its_size_and_what_to_do(tmp_path, monkeypatch):
    import fastattn.plans.files as files

    monkeypatch.setattr(files, "MAX_TENSORS_BYTES", 300)
    d = tmp_path / "big"
    with pytest.raises(ValueError) as e:
        save_plan(AttentionPlan(block_size=BS, heads=_table(_random_maps(2))), d, PlanMeta(model=FP))
    msg = str(e.value)
    assert f"2 distinct block maps of {N} x {N} blocks take {packed_maps_bytes(2, N)}" in msg
    assert "more than a plan file may hold (300 bytes" in msg
    assert "fewer step groups" in msg and "larger block_size" in msg
    assert not (d / PLAN_JSON).exists() and not (d / "plan.safetensors").exists()  # nothing written


def test_calibration_leaves_block_maps_out_early_when_their_plan_file_could_not_hold_them(monkeypatch):
    """Every head may end on a map of its own: when the plan file could not hold them, the observer says so at
    the first call instead of the plan failing to save after the observation."""
    import fastattn.calibration.observe as observe

    layout = TokenLayout.video(3, 4, 6, text_len=10)
    n = BlockGeometry(layout, 16).num_blocks
    obs = observe.CalibrationObserver(("blockmap", "band"), 2, 3, (0.0, 0.5, 1.0), 2, ("none",), 16)
    monkeypatch.setattr(observe, "MAX_TENSORS_BYTES", packed_maps_bytes(2 * 2 * 3, n) - 1)
    with pytest.warns(UserWarning, match=r"block-map candidates left out.*plan file.*fewer step_groups"):
        cs = obs.candidate_set(layout)
    assert not cs.map_orders and "blockmap" not in obs.methods
    monkeypatch.setattr(observe, "MAX_TENSORS_BYTES", packed_maps_bytes(2 * 2 * 3, n))
    fits = observe.CalibrationObserver(("blockmap", "band"), 2, 3, (0.0, 0.5, 1.0), 2, ("none",), 16)
    assert fits.candidate_set(layout).map_orders


def test_old_plan_files_without_maps_still_load(tmp_path):
    table = HeadTable((BandConfig(window=12), DenseConfig()), torch.tensor([[[0, 1, 0, 1], [1, 1, 0, 0]]]))
    d = save_plan(AttentionPlan(block_size=BS, heads=table), tmp_path / "old", PlanMeta(model=FP, layout=LAYOUT))
    import json

    assert json.loads((d / PLAN_JSON).read_text())["heads"]["tensors"] == ["method_index"]
    back = load_plan(d, fingerprint=FP).plan
    assert back.heads.block_maps is None and back.heads.map_index is None


def test_block_map_tables_are_validated():
    maps = _random_maps(2)
    methods = (BlockMapConfig(), DenseConfig())
    idx = torch.tensor([[[0, 1]]])
    with pytest.raises(ValueError, match="no block_maps"):
        HeadTable(methods, idx)
    with pytest.raises(ValueError, match="map_index -1"):
        HeadTable(methods, idx, map_index=torch.tensor([[[-1, -1]]]), block_maps=maps)
    with pytest.raises(ValueError, match="not 'blockmap'"):
        HeadTable(methods, idx, map_index=torch.tensor([[[0, 1]]]), block_maps=maps)
    with pytest.raises(ValueError, match=r"outside \[-1, 1\]"):
        HeadTable(methods, idx, map_index=torch.tensor([[[2, -1]]]), block_maps=maps)
    with pytest.raises(TypeError, match="bool tensor"):
        HeadTable(methods, idx, map_index=torch.tensor([[[0, -1]]]), block_maps=maps.float())
    with pytest.raises(ValueError, match="square"):
        HeadTable(methods, idx, map_index=torch.tensor([[[0, -1]]]), block_maps=maps[:, :, :-1])
    holed = maps.clone()
    holed[1, 5] = False
    with pytest.raises(ValueError, match=r"block_maps\[1\] leaves query block 5 with no key block"):
        HeadTable(methods, idx, map_index=torch.tensor([[[0, -1]]]), block_maps=holed)
    with pytest.raises(ValueError, match="needs a head table|cannot be a plan's method"):
        AttentionPlan(BlockMapConfig())
    with pytest.raises(TypeError, match="data of a plan's head table"):
        build_mask(BlockMapConfig(), LAYOUT, BS)


# ------------------------------------------------------------------------------------------ runtime


def test_runtime_runs_block_map_heads_as_masked_attention_in_their_axis_order():
    maps = _random_maps(2)
    plan = AttentionPlan(block_size=BS, heads=_table(maps))
    rt = AttentionRuntime(plan, num_layers=2)
    q, k, v = _qkv()
    out = _attend(rt, LAYOUT, q, k, v)
    masks = [
        BlockMask.from_block_map(maps[0], LAYOUT, BS),
        BlockMask.from_block_map(maps[1], LAYOUT, BS),  # the map is in the head's order (HWF)
        build_mask(BandConfig(window=12), LAYOUT, BS),
        build_mask(DenseConfig(), LAYOUT, BS),
    ]
    ref = _oracle_per_head(q, k, v, masks, head_permutations(LAYOUT, ["FHW", "HWF", "FHW", "FHW"]))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the reordered head really reads its map in HWF order: the same map in FHW gives another output
    plain = _oracle_per_head(q, k, v, masks, None)
    assert (plain[:, :, 1] - out[:, :, 1]).abs().max() > 1e-3
    st = rt.stats.as_dict()
    want = (maps[0].float().mean() + maps[1].float().mean() + masks[2].block_density() + 1.0) / 4
    assert st["sparse_calls"] == 1 and st["density"] == pytest.approx(float(want), abs=1e-6)
    assert st["fallbacks"] == {} and not st["notes"].get("blockmap", 0)


def test_block_map_heads_on_another_block_grid_run_a_full_mask_and_are_counted():
    maps = _random_maps(2)
    rt = AttentionRuntime(AttentionPlan(block_size=BS, heads=_table(maps)), num_layers=2)
    other = TokenLayout.video(4, 8, 16, text_len=10)
    q, k, v = _qkv(other.seq_len)
    out = _attend(rt, other, q, k, v)
    dense = build_mask(DenseConfig(), other, BS)
    masks = [dense, dense, build_mask(BandConfig(window=12), other, BS), dense]
    ref = _oracle_per_head(q, k, v, masks, head_permutations(other, ["FHW", "HWF", "FHW", "FHW"]))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    notes = rt.stats.as_dict()["notes"]
    assert [n for n, c in notes.items() if "another block grid" in n and c == 2], notes


# ------------------------------------------------------------------------------------------ calibration


def test_observer_pools_block_mass_and_scores_block_maps_cross_fitted_as_masked_attention():
    from fastattn.calibration.candidates import position_blocks, threshold_maps
    from fastattn.calibration.observe import CalibrationObserver
    from fastattn.masks.permutations import axis_order_permutation

    layout = TokenLayout.video(3, 4, 6, text_len=10)  # text first, ragged blocks
    bs = 16
    obs = CalibrationObserver(("blockmap",), 1, 2, (0.0, 1.0), 1, ("none",), bs, rows_per_block=3, seed=5)
    cs = obs.candidate_set(layout)
    assert len(cs.map_orders) == 6
    sc = obs._scratch_for(layout, cs, torch.device("cpu"))
    rows = sc["rows"]
    half = torch.arange(rows.numel()) % 2
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, layout.seq_len, 16, generator=g) * 2 for _ in range(3))
    scale = 0.25
    n = sc["n_blocks"]
    prev = torch.rand(2, 6, 2, n, n, generator=g) * 3  # mass of earlier calls
    out, err, _, _, pooled = obs._score(q[:, rows], k, v, scale, cs, sc, prev)
    p = torch.softmax(q @ k.transpose(-1, -2) * scale, -1)
    exact = p @ v
    pos_block = position_blocks(layout, bs)
    checked = 0
    for om in cs.map_orders:
        perm = axis_order_permutation(layout, om.order)
        qb = pos_block[torch.argsort(perm)[rows]]
        # pooled mass per half: the mean over a query block's sampled rows of the attention each key block gets
        per_block = torch.zeros(2, rows.numel(), n).index_add_(2, pos_block, p[:, rows][:, :, perm])
        mass = torch.zeros(2, 2, n, n)
        for i in (0, 1):
            for b in range(n):
                sel = (qb == b) & (half == i)
                if sel.any():
                    mass[:, i, b] = per_block[:, sel].mean(1)
        torch.testing.assert_close(pooled[:, om.map_slot], mass, rtol=1e-5, atol=1e-6)
        for j, ci in enumerate(om.map_index.tolist()):
            for head in range(2):
                want = torch.zeros(())
                for i in (0, 1):  # rows of half 1 - i are scored against the map of half i
                    m = prev[head, om.map_slot, i] + mass[head, i]
                    forced = om.forced | ~torch.zeros(n, dtype=torch.bool).index_fill_(0, qb[half == i], True)[:, None]
                    count = max(int(om.map_counts[j]), int(forced.sum()))
                    bm = threshold_maps(m, forced, torch.tensor([count]))[0]
                    assert int(bm.sum()) == count and bool(bm[forced].all())
                    tok = BlockMask.from_block_map(bm, layout, bs).to_token_mask()[0, 0]
                    qp, kp, vp = q[head, perm], k[head, perm], v[head, perm]
                    o = torch.softmax((qp @ kp.T * scale).masked_fill(~tok, -math.inf), -1) @ vp
                    o_orig = torch.empty_like(o)
                    o_orig[perm] = o
                    scored = rows[half == 1 - i]
                    want = want + (o_orig[scored] - exact[head, scored]).pow(2).sum(-1).sum()
                want = want / rows.numel()
                assert torch.allclose(err[head, ci], want, rtol=1e-4, atol=1e-6), cs.candidates[ci].label
                checked += 1
        # the plan's map: both halves summed, thresholded with the forced blocks of all rows
        full = cs.block_map(int(om.map_index[0]), pooled[0])
        assert full.equal(threshold_maps(mass[0].sum(0), om.forced, om.map_counts[:1])[0])
    assert checked >= 6 * 2  # every order, both heads (the densities under the forced blocks collapse)


def test_threshold_keeps_forced_blocks_then_the_most_attended():
    from fastattn.calibration.candidates import threshold_maps

    mass = torch.tensor([[[5.0, 1.0, 4.0], [0.0, 2.0, 6.0], [3.0, 3.0, 3.0]]])
    forced = torch.eye(3, dtype=torch.bool)
    maps = threshold_maps(mass, forced, torch.tensor([3, 5]))
    assert maps.shape == (1, 2, 3, 3)
    assert maps[0, 0].equal(forced)
    # next by share of their row: (1, 2) 0.75, then (0, 2) 0.4
    want = forced.clone()
    want[1, 2] = want[0, 2] = True
    assert maps[0, 1].equal(want)


def test_calibration_chooses_block_maps_where_they_beat_the_fixed_candidates(tmp_path):
    """The learned testbed setup of test_calibration.py: one observation, the selection with and without the
    block-map candidates at the same target work; the plan with block maps picks some and its final latents
    are no further from dense (held-out clips)."""
    import dataclasses

    from fastattn.calibration import build as B
    from fastattn.calibration import run_calibration
    from fastattn.calibration.select import select
    from fastattn.evaluation.metrics import rel_l2
    from fastattn.testbed.fast import enable
    from fastattn.testbed.sample import load_testbed, sample

    learned = load_testbed()
    kw = dict(frames=4, size=32)  # grid (4, 8, 8): 256 tokens, 16 blocks of 16
    steps, block, work, bits = 3, 16, 0.2, ("none",)
    held = [(4, 7), (13, 8)]

    def final(plan=None):
        h = enable(learned, plan=plan) if plan is not None else None
        try:
            outs = [sample(learned, [lab], num_steps=steps, seed=s, return_latents=True, **kw)[1] for lab, s in held]
            return torch.cat(outs), h.stats() if h is not None else None
        finally:
            if h is not None:
                h.disable()

    res = run_calibration(learned, [(1, 100)], target_density=work, steps=steps, block_size=block, bits=bits,
                          rows_per_block=4, sensitivity_prompts=0, progress=False, **kw)  # fmt: skip
    cs, options = res.candidates, res.options
    is_map = torch.tensor([isinstance(cs.candidates[ci].method, BlockMapConfig) for ci, _ in options.pairs])
    assert is_map.any()
    without = dataclasses.replace(options.problem, valid=options.problem.valid & ~is_map)
    sel_without = select(without, target_density=work)
    plan_without = B.make_plan(dataclasses.replace(options, problem=without), sel_without, cs, bits,
                               res.plan.heads.step_bounds, block)  # fmt: skip
    plan_with = res.plan
    table = plan_with.heads
    assert table.block_maps is not None and plan_without.heads.block_maps is None
    chosen = sum(isinstance(table.methods[m], BlockMapConfig) for m in table.method_index.flatten().tolist())
    assert chosen >= 5, table.describe()
    assert res.selection.error <= sel_without.error  # a superset of options never estimates worse
    # the maps survive the plan file
    back = AttentionPlan.load(res.save(tmp_path / "plan"))
    assert torch.equal(back.heads.block_maps, table.block_maps)

    dense, _ = final()
    out_with, st_with = final(back)
    out_without, st_without = final(plan_without)
    assert st_with["density"] <= work + 1e-6 and st_without["density"] <= work + 1e-6
    assert st_with["fallbacks"] == {} and not [n for n in st_with["notes"] if "blockmap" in n]
    e_with, e_without = float(rel_l2(out_with, dense)), float(rel_l2(out_without, dense))
    assert e_with <= e_without, (e_with, e_without)
