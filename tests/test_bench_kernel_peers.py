"""bench/kernel_peers.py on its tiny CPU shape: the JSON's structure, ratios against the run's own baseline,
absent GPU peers recorded (not crashes), the FlexAttention mask conversion, and the markdown renderer."""

import json
import math

import pytest
import torch


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from fastattn.bench import kernel_peers

    out = tmp_path_factory.mktemp("peers") / "peers.json"
    kernel_peers.main(["--tiny", "--out", str(out)])
    return json.loads(out.read_text())


def _rec(data, variant, mask="dense"):
    (r,) = [r for r in data["records"] if r["variant"] == variant and r["mask"] == mask]
    return r


def test_tiny_run_records_baseline_ours_and_absent_peers(tiny):
    assert tiny["bench"] == "kernel_peers" and tiny["device"]
    for key in ("torch", "triton", "flash-attn-4", "cutlass-dsl", "comfy-kitchen", "sageattention", "python"):
        assert key in tiny["versions"]
    assert {"structured", "random", "accuracy", "timing"} <= set(tiny["inputs"])
    assert list(tiny["shapes"]) == ["tiny_video"] and tiny["skipped_shapes"] == []

    base = _rec(tiny, "sdpa_default")  # the CPU baseline (no cuDNN): every ratio is against it, same run
    assert base["status"] == "ok" and base["ratio"] == 1.0 and base["ms"] > 0
    cudnn = _rec(tiny, "sdpa_cudnn")
    assert cudnn["status"] == "unavailable" and "CUDA" in cudnn["error"] and cudnn["ratio"] is None
    ok = [r for r in tiny["records"] if r["status"] == "ok"]
    assert all(math.isclose(r["ratio"], base["ms"] / r["ms"]) for r in ok)
    assert all(r["ratio_vs_cudnn"] is None for r in ok)  # the baseline was not cuDNN

    bf16 = _rec(tiny, "ours_triton_bf16")
    assert bf16["backend"] == "cpu" and bf16["first_call_ms"] > 0 and bf16["bits"] == 16
    assert bf16["rel_l2_dense"] < 5e-3  # bf16 rounding of the exact result
    fp8 = _rec(tiny, "ours_triton_fp8")
    assert fp8["bits"] == 8 and 0 < fp8["rel_l2_dense"] < 0.1 and 0 < fp8["rel_l2_dense_random"] < 0.1
    assert "rel_l2_dense_random" not in bf16  # random inputs score the 8-bit variants only
    for mask in ("band_0.5", "band_0.25", "band_0.1", "window3d_0.2"):
        r = _rec(tiny, "ours_triton_bf16", mask)
        assert r["status"] == "ok" and 0 < r["density"] < 1 and r["rel_l2_sparse"] < 5e-3
        flex = _rec(tiny, "flex", mask)  # eager flex over the converted mask equals our sparse reference
        assert flex["status"] == "ok" and flex["rel_l2_sparse"] < 5e-3 and flex["backend"] == "flex_eager"
    assert _rec(tiny, "ours_auto_bf16", "window3d_0.2")["backend"] == "cpu"

    # GPU-only peers: recorded with the reason, the run went on
    for variant, mask in (("fa4_direct", "dense"), ("kitchen_int8", "dense"), ("sage", "dense"),
                          ("kitchen_sol_tau1.3", None), ("sdpa_fa2", "dense")):  # fmt: skip
        r = _rec(tiny, variant, mask)
        assert r["status"] in ("unavailable", "error") and r["error"] and r["ms"] is None
    fa4 = _rec(tiny, "ours_fa4_bf16", "band_0.25")
    assert fa4["status"] == "error" and "FA4 runs on CUDA" in fa4["error"]
    assert _rec(tiny, "kitchen_sol_tau2.0", None)["tau"] == 2.0


def test_tiny_run_summary(tiny):
    s = tiny["summary"]["tiny_video"]
    assert {"best_dense_16bit", "best_8bit", "per_mask", "targets", "seconds"} <= set(s)
    assert s["best_8bit"]["variant"] in ("ours_triton_fp8", "ours_triton_int8-fp8")  # the only 8-bit that ran
    assert set(s["per_mask"]) == {"band_0.5", "band_0.25", "band_0.1", "window3d_0.2"}
    assert "same mask" in s["rule"]
    for mask, m in s["per_mask"].items():
        assert m["ours"]["variant"].startswith("ours_") and isinstance(m["ours_fastest"], bool)
        assert m["ours"]["ms"] == min(m["ours_variants"].values()) and m["ours"]["mask"] == mask
        assert m["rel_l2_limit"] == pytest.approx(1.5 * m["ours"]["rel_l2_dense"])
        assert m["competitors"]["dense"] == ["sdpa_default@dense"]  # the only dense peer that runs on the CPU
        assert m["competitors"]["same_mask"] == [f"flex@{mask}"]
        assert "sage@dense (unavailable)" in m["peers_not_run"]
        assert m["fastest_peer"]["mask"] in (mask, "dense")
    t = s["targets"]
    assert t["dense_16bit_vs_cudnn"]["target"] == 1.0 and isinstance(t["dense_16bit_vs_cudnn"]["met"], bool)
    assert t["dense_8bit_vs_cudnn"]["target"] == 1.6
    sp = t["sparse_vs_our_dense"]["band_0.25"]
    assert sp["target"] == pytest.approx(0.9 / sp["density"])
    dense16 = [
        r for r in tiny["records"] if r["method"] == "ours" and r["mask"] == "dense" and r["bits"] == 16
    ]
    assert sp["our_dense"]["ms"] == min(r["ms"] for r in dense16 if r["ms"])
    assert sp["speedup"] == pytest.approx(sp["our_dense"]["ms"] / sp["our_sparse"]["ms"])
    assert sp["met"] == (sp["speedup"] >= sp["target"])
    bf = sp["same_kernel_speedup"]["ours_triton_bf16"]
    dense_ms = _rec(tiny, "ours_triton_bf16")["ms"]
    assert bf == pytest.approx(dense_ms / _rec(tiny, "ours_triton_bf16", "band_0.25")["ms"])


def test_flex_mask_conversion_matches_our_block_map():
    """The GPU path compiles flex with our lists as full blocks: they must name exactly our mask's blocks."""
    from fastattn.bench import kernel_peers
    from fastattn.masks import patterns

    heads, layout = kernel_peers.TINY_SHAPES["tiny_video"]
    mask = patterns.window3d_for_density(layout, 0.2)
    fm = kernel_peers.flex_block_mask(mask, heads, "cpu", exact_mask_mod=False)
    want = mask.to_block_map().expand(1, heads, -1, -1).to(torch.int32)
    assert torch.equal(fm.to_dense(), want)
    with pytest.raises(kernel_peers.Unavailable, match="text segment"):
        txt = patterns.dense(type(layout).video(3, 10, 30, text_len=77))
        kernel_peers.flex_block_mask(txt, heads, "cpu", exact_mask_mod=False)


def test_bad_arguments_say_what_was_expected():
    from fastattn.bench import kernel_peers

    with pytest.raises(SystemExit, match="unknown shape"):
        kernel_peers.main(["--tiny", "--shapes", "wan1.3b_480p_81f"])
    with pytest.raises(SystemExit, match="--reps"):
        kernel_peers.main(["--tiny", "--reps", "0"])


def test_summarize_renders_kernel_peers(tiny):
    from fastattn.bench import summarize

    md = summarize.kernel_peers_table(tiny)
    lines = md.splitlines()
    assert lines[0].startswith("| variant | mask | tiny_video |")
    row = next(line for line in lines if line.startswith("| ours_triton_bf16 | band_0.25 |"))
    r = _rec(tiny, "ours_triton_bf16", "band_0.25")
    assert f"{r['ratio']:.2f}×" in row and f"{r['rel_l2_dense']:.4f}" in row
    assert any(line.startswith("| sage | dense | n/a") for line in lines)  # unavailable, said so
    assert "| shape | dense 16-bit ≥ 1.0× cuDNN |" in md  # the targets table follows
    m = tiny["summary"]["tiny_video"]["per_mask"]["band_0.25"]
    row = next(line for line in lines if line.startswith("| tiny_video | band_0.25 |"))
    sp = tiny["summary"]["tiny_video"]["targets"]["sparse_vs_our_dense"]["band_0.25"]
    assert f"{m['ours']['variant']} {m['ours']['ms']:.2f} ms" in row and f"{sp['target']:.2f}×" in row
    assert f"{m['fastest_peer']['variant']}@{m['fastest_peer']['mask']}" in row
    assert "Rule: per mask: ours = the fastest of our variants" in md


# ----------------------------------------------------------------------------- the summary rule, on synthetic records


def _r(variant, mask, ms, rel=0.002, method=None, bits=16, density=None, status="ok"):
    """One record as run_variant writes it (only the fields the summary reads, plus shape)."""
    if method is None:
        method = (
            "ours" if variant.startswith("ours_") else ("baseline" if variant == "sdpa_cudnn" else "peer")
        )
    if density is None and mask is not None:
        density = 1.0 if mask == "dense" else float(mask.split("_")[-1])
    ok = status == "ok"
    return {"shape": "s", "variant": variant, "method": method, "mask": mask, "bits": bits, "density": density,
            "status": status, "ms": ms if ok else None, "ratio": 5.0 / ms if ok else None,
            "rel_l2_dense": rel if ok else None, "error": None if ok else "not installed"}  # fmt: skip


def _synthetic(overrides: dict | None = None):
    """The FLUX 2048 situation: every sparse mask has about the same rel-L2 vs dense, so only the mask tells the
    work apart; our fastest at every mask is FA4 bf16. ``overrides``: ``"variant@mask"`` (``@own``: mask-free) ->
    ms."""
    recs = [
        _r("sdpa_cudnn", "dense", 5.0, 0.0017),
        _r("fa4_direct", "dense", 4.4, 0.0017),
        _r("sage", "dense", 8.0, 0.006, bits=8),
        _r("ours_triton_bf16", "dense", 6.6, 0.0017),
        _r("ours_fa4_bf16", "dense", 4.9, 0.0017),
        _r("ours_auto_bf16", "dense", 5.2, 0.0017),
        _r("ours_triton_fp8", "dense", 4.0, 0.037, bits=8),
        _r("kitchen_sol_tau1.0", None, 1.5, 0.0089, bits=8),
        _r("kitchen_int8", "dense", None, status="unavailable", bits=8),
    ]
    for mask, d in (("band_0.5", 0.5), ("band_0.1", 0.1)):
        recs += [
            _r("ours_triton_bf16", mask, 3.4 * d / 0.5, 0.0021),
            _r("ours_fa4_bf16", mask, 2.76 * d / 0.5, 0.0021),
            _r("ours_triton_fp8", mask, 3.1 * d / 0.5, 0.037, bits=8),
            _r("flex", mask, 4.0 * d / 0.5, 0.0021),
        ]
    for key, ms in (overrides or {}).items():
        variant, mask = key.split("@")
        (r,) = [r for r in recs if r["variant"] == variant and (r["mask"] or "own") == mask]
        r["ms"] = ms
    return recs


def test_peer_at_a_sparser_mask_does_not_win():
    from fastattn.bench.kernel_peers import summarize_shape

    m = summarize_shape(_synthetic())["per_mask"]["band_0.5"]
    assert m["ours"]["variant"] == "ours_fa4_bf16" and m["ours"]["ms"] == 2.76
    assert list(m["ours_variants"]) == [
        "ours_fa4_bf16",
        "ours_triton_fp8",
        "ours_triton_bf16",
    ]  # fastest first
    # flex at band_0.1 (0.8 ms, same rel-L2) does a fifth of the work: not a competitor at band_0.5
    assert "flex@band_0.1" not in sum(m["competitors"].values(), [])
    assert m["competitors"]["same_mask"] == ["flex@band_0.5"]
    assert m["competitors"]["dense"] == ["sdpa_cudnn@dense", "fa4_direct@dense", "sage@dense"]
    assert m["ours_fastest"] is True and m["fastest"]["variant"] == "ours_fa4_bf16"
    assert (m["fastest_peer"]["variant"], m["fastest_peer"]["mask"]) == ("flex", "band_0.5")
    assert m["speedup_vs_fastest_peer"] == pytest.approx(4.0 / 2.76)
    assert m["peers_not_run"] == ["kitchen_int8@dense (unavailable)"]


def test_same_mask_flex_faster_wins():
    from fastattn.bench.kernel_peers import summarize_shape

    m = summarize_shape(_synthetic({"flex@band_0.5": 1.9}))["per_mask"]["band_0.5"]
    assert m["ours_fastest"] is False and m["fastest"] == m["fastest_peer"]
    assert (m["fastest"]["variant"], m["fastest"]["mask"]) == ("flex", "band_0.5")
    assert m["speedup_vs_fastest_peer"] == pytest.approx(1.9 / 2.76)


def test_dense_peer_faster_than_our_sparse_wins():
    from fastattn.bench.kernel_peers import summarize_shape

    m = summarize_shape(_synthetic({"fa4_direct@dense": 0.3}))["per_mask"]["band_0.1"]
    assert m["ours_fastest"] is False and m["fastest"]["variant"] == "fa4_direct"


def test_mask_free_peer_counts_only_within_the_rel_l2_tolerance():
    from fastattn.bench.kernel_peers import summarize_shape

    # ours bf16 (rel-L2 0.0021): sol_attn's 0.0089 is over 1.5x, so its faster 0.3 ms does not count
    m = summarize_shape(_synthetic({"kitchen_sol_tau1.0@own": 0.3}))["per_mask"]["band_0.1"]
    assert m["ours"]["variant"] == "ours_fa4_bf16" and m["rel_l2_limit"] == pytest.approx(1.5 * 0.0021)
    assert m["competitors"]["mask_free_within_limit"] == []
    assert m["mask_free_excluded"] == ["kitchen_sol_tau1.0@own"]
    assert m["ours_fastest"] is True

    # ours is our fp8 (rel-L2 0.037): sol_attn is within 1.5x, and faster: it wins
    m = summarize_shape(_synthetic({"kitchen_sol_tau1.0@own": 0.3, "ours_triton_fp8@band_0.1": 0.4}))
    m = m["per_mask"]["band_0.1"]
    assert m["ours"]["variant"] == "ours_triton_fp8" and m["rel_l2_limit"] == pytest.approx(1.5 * 0.037)
    assert m["competitors"]["mask_free_within_limit"] == ["kitchen_sol_tau1.0@own"]
    assert m["ours_fastest"] is False and m["fastest"]["variant"] == "kitchen_sol_tau1.0"


def test_sparse_target_against_our_fastest_dense_16bit():
    from fastattn.bench.kernel_peers import SPARSE_EFFICIENCY, summarize_shape

    recs = _synthetic({"ours_triton_fp8@band_0.1": 0.4})
    sp = summarize_shape(recs)["targets"]["sparse_vs_our_dense"]["band_0.1"]
    # our dense: the fastest dense 16-bit of ours (FA4 at 4.9 ms; our fp8 dense at 4.0 ms does not count);
    # at the mask: our fastest 16-bit (FA4 at 0.552 ms; our fp8 at 0.4 ms does not count)
    assert sp["our_dense"] == {"variant": "ours_fa4_bf16", "ms": 4.9}
    assert sp["our_sparse"]["variant"] == "ours_fa4_bf16" and sp["our_sparse"]["ms"] == pytest.approx(0.552)
    assert sp["speedup"] == pytest.approx(4.9 / 0.552)
    assert sp["target"] == pytest.approx(SPARSE_EFFICIENCY / 0.1)
    assert sp["met"] is False  # 8.88x < 9.0x
    assert sp["same_kernel_speedup"]["ours_triton_bf16"] == pytest.approx(6.6 / 0.68)
    assert sp["same_kernel_speedup"]["ours_triton_fp8"] == pytest.approx(4.0 / 0.4)


def test_resummarize_rewrites_the_summary_from_the_records(tmp_path):
    from fastattn.bench import kernel_peers

    recs = _synthetic({"flex@band_0.1": 0.3})
    data = {"bench": "kernel_peers", "shapes": {"s": {}}, "records": recs,
            "summary": {"s": {"per_mask": "stale", "seconds": 12.5}}}  # fmt: skip
    path = tmp_path / "peers.json"
    path.write_text(json.dumps(data))
    kernel_peers.main(["--resummarize", str(path)])
    new = json.loads(path.read_text())
    assert new["records"] == recs  # measured numbers untouched
    s = new["summary"]["s"]
    assert s["seconds"] == 12.5 and "same mask" in s["rule"]
    assert s == {**kernel_peers.summarize_shape(recs), "seconds": 12.5}
    assert s["per_mask"]["band_0.5"]["ours_fastest"] is True  # flex's 0.3 ms at band_0.1 does not count here
    assert s["per_mask"]["band_0.1"]["ours_fastest"] is False

    path.write_text(json.dumps({"bench": "kernels"}))
    with pytest.raises(SystemExit, match="kernel_peers"):
        kernel_peers.main(["--resummarize", str(path)])
    with pytest.raises(SystemExit, match="--resummarize"):
        kernel_peers.main(["--resummarize", str(path), "--tiny"])


def test_committed_results_carry_the_current_summary():
    """A committed kernel_peers result's summary is what its own records give under today's rule."""
    from pathlib import Path

    from fastattn.bench import kernel_peers

    files = sorted((Path(kernel_peers.__file__).parent / "results").glob("kernel-peers-*.json"))
    assert files, "no committed kernel-peers result"
    for f in files:
        data = json.loads(f.read_text())
        for shape, s in data["summary"].items():
            recs = [r for r in data["records"] if r["shape"] == shape]
            assert s == {**kernel_peers.summarize_shape(recs), "seconds": s["seconds"]}, f"{f.name}: {shape}"
