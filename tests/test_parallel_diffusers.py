"""``fastattn.enable(model, ..., parallel=...)`` on tiny diffusers transformers, 2 gloo ranks against one process.

The sequence is split by diffusers' own context-parallel hooks (Wan, Flux, Qwen-Image, LTX) or our plan in their
format (HunyuanVideo); the processors' calls go to SequenceParallel with the positions of the rank's tokens.
A dense plan reproduces the unpatched model, a sparse preset the one-process sparse output (positions matter
there: Flux, Qwen-Image and HunyuanVideo hold text and image chunks); disable() restores the model exactly; bad
settings raise before anything is patched. One launch of 2 processes runs every case (importing diffusers in
the spawned ranks is most of the time).
"""

from __future__ import annotations

import os
import sys

import pytest

pytest.importorskip("diffusers")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import parallel_diffusers_workers as pdw  # noqa: E402
import parallel_workers as pw  # noqa: E402

TOL = 1e-5  # float32: each rank computes its heads over the whole sequence; the ring merges partial results
RING_NOT_WHOLE = (
    "ring: ring shards are not whole blocks of the global layout: Q/K/V all-gathered, every row computed"
)

CASES = [
    dict(model="wan", plan="dense"),
    dict(model="flux", plan="dense"),
    dict(model="wan", plan="sparse"),
    dict(model="flux", plan="sparse"),  # [text chunk, image chunk] per rank
    dict(model="qwen_image", plan="sparse"),  # a key-padding mask per rank, assembled across ranks
    dict(model="hunyuan_video", plan="sparse"),  # our split plan; [image chunk, text chunk], global mask
    dict(model="ltx_video", plan="sparse"),  # text not split: the cross-attention runs locally
    dict(model="wan_ring", plan="sparse", ulysses=1, ring=2),  # whole blocks per rank: the ring runs natively
    dict(model="flux", plan="sparse", ulysses=1, ring=2),  # 5 text tokens per rank: the counted fallback
]


@pytest.fixture(scope="module")
def launched():
    return pw.values(pw.launch(pdw.everything, 2, CASES, deadline_s=300))


@pytest.fixture(scope="module")
def results(launched):
    return [r["exact"] for r in launched]


def _by_case(results):
    return {(r["case"]["model"], r["case"]["plan"], r["case"].get("ring", 1)): r for r in results[0]}


def test_parallel_equals_one_process(results):
    for rank_results in results:
        for r in rank_results:
            assert r["err"] <= TOL and r["err_again"] <= TOL, r
            assert r["calls"] > 0 and r["calls_all_ranks"] == 2 * r["calls"], r  # gather_stats sums the ranks
            assert r["fallbacks"] == {}, r
            if r["case"]["plan"] == "sparse":
                assert r["sparse_calls"] == r["calls"], r
                # the sparse plan changes the output, so the comparison above can fail
                assert r["sparse_vs_dense"] > 1e-3, r


def test_ring_fallback_counted_only_where_shards_are_not_whole_blocks(results):
    by = _by_case(results)
    assert by[("wan_ring", "sparse", 2)]["parallel_fallbacks"] == {}
    assert by[("flux", "sparse", 2)]["parallel_fallbacks"] == {RING_NOT_WHOLE: 4}
    for key in (("wan", "dense", 1), ("flux", "sparse", 1), ("hunyuan_video", "sparse", 1)):
        assert by[key]["parallel_fallbacks"] == {}, key  # Ulysses serves every call as planned


def test_one_mesh_per_settings(results):
    # enabling again with the same degrees reuses the process groups instead of making new ones
    meshes = {(r["case"].get("ulysses", 2), r["case"].get("ring", 1)): set() for r in results[0]}
    for r in results[0]:
        meshes[(r["case"].get("ulysses", 2), r["case"].get("ring", 1))].add(r["mesh_id"])
    assert {k: len(v) for k, v in meshes.items()} == {(2, 1): 1, (1, 2): 1}


def test_disable_restores_exactly(results):
    for r in results[0] + results[1]:
        assert r["restored"], r  # processors, backends, no hook registry or instance forward left
        assert r["restored_output"], r  # and the unpatched output bit for bit
        assert r["parallel"]["world_size"] == 2


def test_pipeline_enable_fast_attention_parallel(launched):
    for r in (x["pipeline"] for x in launched):
        assert r["err"] <= TOL, r
        # the same steps ran dense (the preset's first step) and sparse, CFG passes included
        assert r["stats"] == r["ref_stats"] and r["stats"]["sparse_calls"] > 0, r
        assert r["stats"]["planned_dense"], r
        assert r["restored"], r


def test_bad_config_errors_before_patching(launched):
    for e in (r["bad"] for r in launched):
        assert "ulysses 3 x ring 1 = 3 processes, but the process group has 2" in e["world"], e
        assert "unknown field(s) ['ulyses']" in e["unknown_field"], e
        assert "block caching" in e["block_cache"], e
        assert "must divide the 3 attention heads" in e["heads"], e
        assert "does not split equally over 2 ranks" in e["odd_text"], e
        assert "ranks passed different inputs" in e["inputs_differ"], e
        assert all(e[k + "_untouched"] for k in ("world", "unknown_field", "block_cache", "heads")), e
        assert e["restored_after_runtime_errors"], e


def test_no_process_group_or_unsupported_family_errors_in_one_process():
    import fastattn.api as fa
    import torch.distributed as dist

    assert not dist.is_initialized()
    wan, _ = pdw.build("wan")
    before = pdw.snapshot(wan)
    with pytest.raises(RuntimeError, match="needs a started torch.distributed process group.*torchrun"):
        fa.enable(wan, method="dense", parallel=dict(ulysses=2))
    assert pdw.snapshot(wan) == before
    from diffusers import SD3Transformer2DModel

    sd3 = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=16,
    )  # fmt: skip
    before = pdw.snapshot(sd3)
    with pytest.raises(ValueError, match="SD3Transformer2DModel has no sequence split plan"):
        fa.enable(sd3, method="dense", parallel=dict(ulysses=2))
    assert pdw.snapshot(sd3) == before


def test_bench_multigpu_tiny(tmp_path):
    """bench/multigpu.py's logic on 2 gloo processes (it spawns them itself without torchrun); times meaningless."""
    import json

    from fastattn.bench import multigpu

    with pytest.raises(SystemExit, match="torchrun --nproc-per-node N"):
        multigpu.main([])  # the GPU run needs torchrun
    assert multigpu.main(["--tiny", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "multigpu-cpu-tiny-x2.json").read_text())
    assert data["world_size"] == 2 and data["versions"]["diffusers"] and "NCCL_NVLS_ENABLE" in data["env"]
    summaries = {r["arrangement"]: r for r in data["records"] if r.get("summary")}
    assert set(summaries) == {"shuffled", "clustered", "all layers"}
    for r in summaries.values():
        assert r["dbsp_ms"] > 0 and r["ulysses_ms"] > 0 and r["one_gpu_ms"] > 0, r
        assert r["imbalance_ratio_dbsp"] <= r["imbalance_ratio_ulysses"], r
    clustered = summaries["clustered"]
    assert clustered["imbalance_ratio_ulysses"] > 1.3 and clustered["imbalance_ratio_dbsp"] <= 1.05, clustered
    steps = {r["model"]: r for r in data["records"] if r["part"] == "steps"}
    assert set(steps) == {"Wan2.1-T2V-1.3B", "HunyuanVideo"}
    for r in steps.values():
        assert r["one_gpu_ms"] > 0 and r["n_gpu_ms"] > 0 and r["speedup"] > 0, r
        assert r["max_abs_diff_vs_one_gpu"] <= 1e-5 and r["parallel_fallbacks"] == {}, r
        assert r["density_n_gpu"] == pytest.approx(r["density_one_gpu"]), r
