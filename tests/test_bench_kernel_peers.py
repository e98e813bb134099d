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
    for m in s["per_mask"].values():
        assert m["ours"]["variant"].startswith("ours_") and isinstance(m["ours_fastest"], bool)
        assert m["rel_l2_limit"] == pytest.approx(1.5 * m["ours"]["rel_l2_dense"])
        assert m["fastest"]["rel_l2_dense"] <= m["rel_l2_limit"]
        assert "sdpa_default@dense" in m["peers_within_limit"] + m["peers_over_limit"]
    t = s["targets"]
    assert t["dense_16bit_vs_cudnn"]["target"] == 1.0 and isinstance(t["dense_16bit_vs_cudnn"]["met"], bool)
    assert t["dense_8bit_vs_cudnn"]["target"] == 1.6
    sp = t["sparse_vs_our_dense"]["band_0.25"]
    assert sp["target"] == pytest.approx(0.9 / sp["density"])
    bf = sp["ours_triton_bf16"]
    dense_ms = _rec(tiny, "ours_triton_bf16")["ms"]
    assert bf["speedup"] == pytest.approx(dense_ms / _rec(tiny, "ours_triton_bf16", "band_0.25")["ms"])
    assert bf["met"] == (bf["speedup"] >= sp["target"])


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
