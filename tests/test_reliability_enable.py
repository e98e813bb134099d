"""What a new user hits at ``enable()`` (issue 18): the whole plan validated before a model is touched, plans
that do nothing say so, one owner per transformer, processors installed after enable, compiled models, the
CPU, and residuals freed when a run ends. Tiny random-weight diffusers models on the CPU."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import fastattn.api as fa  # noqa: E402
from fastattn.plans import make_plan  # noqa: E402

_spec = importlib.util.spec_from_file_location("_fa_tiny_rel", Path(__file__).with_name("test_diffusers.py"))
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)
BS = tiny.BS


def _wan_pipe():
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()  # fmt: skip
    return WanPipeline(
        tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer,
    )  # fmt: skip


def _call(pipe, steps):
    torch.manual_seed(1)
    return pipe(
        prompt_embeds=torch.randn(1, 12, 32), negative_prompt_embeds=torch.randn(1, 12, 32), height=32,
        width=48, num_frames=5, num_inference_steps=steps, guidance_scale=5.0, output_type="latent",
    ).frames  # fmt: skip


def _steps(model, inputs, timesteps):
    """One bare-transformer run: a forward per timestep (decreasing, as a scheduler gives them)."""
    return [tiny.run(model, {**inputs, "timestep": torch.tensor([t])}) for t in timesteps]


def _messages(record) -> list[str]:
    return [str(w.message) for w in record]


# ------------------------------------------------------------------------------ 1. validation up front


@pytest.mark.parametrize(
    "settings, error, match",
    [
        # every one of these used to pass enable() and fail (or output zeros) at the first forward
        (dict(method="radial", window=(0, 0), temporal_window=-1), ValueError, "temporal_window"),
        (dict(method="window3d", window=(-1, -1, -1)), ValueError, "ints >= 0"),
        (dict(method="window3d", window=(1, 2)), ValueError, "must be 3 ints"),
        (dict(method="window3d", window="abc"), ValueError, "must be 3 ints"),
        (dict(method="window3d", window=(1.0, 2.0, 2.0)), ValueError, "ints >= 0"),
        (dict(method="band", window=-5), ValueError, "ints >= 0"),
        (dict(method="band", window=2.0), ValueError, "ints >= 0"),
        (dict(method="arrow", factor=0), ValueError, "ints >= 1"),
        (dict(method="arrow", factor=True), ValueError, "ints >= 1"),
        (dict(method="band", window=4, block_size=True), ValueError, "block_size must be a positive int"),
        (dict(method="band", window=4, dense_steps=True), ValueError, "dense_steps"),
        (dict(method="dynamic", top_p=True), ValueError, "top_p must be a number"),
        (dict(method="dynamic", sample_rows=True), ValueError, "sample_rows must be a positive int"),
        (dict(method="dynamic", min_density="a"), ValueError, "min_density must be a number"),
        (dict(method="dynamic", reuse_steps=2.0), ValueError, "reuse_steps must be a positive int"),
        (dict(method="band", window=4, num_steps=-5), ValueError, "num_steps must be a positive int"),
        (dict(method="band", window=4, num_steps=0), ValueError, "num_steps must be a positive int"),
        (dict(method="band", window=4, num_steps=2.5), ValueError, "num_steps must be a positive int"),
        (dict(method="band", window=4, num_steps=True), ValueError, "num_steps must be a positive int"),
        (dict(method="band", window=4, dense_layers=[100]), ValueError, r"dense_layers \[100\] out of range"),
        (dict(method="band", window=4, dense_layers=[-100]), ValueError, r"dense_layers \[-100\] out of"),
        (dict(method="band", window=4, dense_layers=[0.7]), TypeError, "dense_layers must hold ints"),
        (dict(method="band", window=4, dense_layers=5), TypeError, "dense_layers must be a list"),
    ],
)
def test_enable_refuses_bad_plans_before_touching_the_model(settings, error, match):
    model, _, _ = tiny.build("wan")
    before = tiny.snapshot(model)
    with pytest.raises(error, match=match):
        fa.enable(model, **settings)
    assert tiny.snapshot(model) == before and "_diffusers_hook" not in model.__dict__
    assert "_fastattn_handle" not in model.__dict__


def test_json_preset_with_an_absurd_window_is_refused_at_enable(tmp_path):
    model, _, _ = tiny.build("wan")
    path = tmp_path / "huge.json"
    path.write_text(json.dumps({"method": "window3d", "window": [1e30, 1, 1]}))
    with pytest.raises(ValueError, match=r"huge\.json.*window \(wf, wh, ww\) must hold ints >= 0"):
        fa.enable(model, preset=str(path))
    assert "_fastattn_handle" not in model.__dict__


def test_a_mask_that_leaves_queries_without_keys_is_refused_not_zeros():
    """multi_diagonal offsets past the video's frames would leave query rows with no key at all: the
    output was all zeros, counted as sparse work. Now a clear error at the first call."""
    model, inputs, _ = tiny.build("wan")  # 3 frames, no text tokens in self-attention
    h = fa.enable(model, method="multi_diagonal", window=0, frame_offsets=(5,), block_size=BS)
    with pytest.raises(ValueError, match="multi_diagonal.*query blocks with no key block"):
        tiny.run(model, inputs)
    h.disable()


# ------------------------------------------------------------------------------ 2. plans that do nothing


def test_presets_dense_steps_are_a_fraction_of_the_run():
    """A preset must run sparse on a 4-step distilled run and keep its tuned dense steps on long runs."""
    from fastattn.presets import structural_presets

    long_run = {"flux": 28, "sd3": 28, "testbed": 16}  # the pipelines' default steps (others: 50)
    for family, levels in structural_presets().items():
        for level in levels:
            plan = make_plan(family, f"{family}/{level}")
            assert isinstance(plan.dense_steps, float) and 0 < plan.dense_steps < 1, (family, level)
            assert plan.dense_steps_for(4) < 4, (family, level)
            assert plan.dense_steps_for(long_run.get(family, 50)) >= 1, (family, level)


def test_preset_on_a_4_step_pipeline_runs_sparse():
    pipe = _wan_pipe()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        h = pipe.enable_fast_attention(preset="safe", block_size=BS)
        _call(pipe, steps=4)
    st = h.stats()
    assert st["sparse_calls"] > 0, st  # before: dense_steps 10 of 4 steps, 0 sparse calls, no warning
    assert not [m for m in _messages(rec) if "no step" in m]
    h.disable()


def test_a_run_the_method_never_serves_warns_and_is_noted():
    pipe = _wan_pipe()
    h = pipe.enable_fast_attention(method="band", window=6, block_size=BS, dense_steps=5)
    with pytest.warns(UserWarning, match=r"dense_steps=5.*no step of this 4-step run"):
        _call(pipe, steps=4)
    st = h.stats()
    assert st["sparse_calls"] == 0 and any("no step of this 4-step run" in n for n in st["notes"]), st
    h.disable()
    h = pipe.enable_fast_attention(method="band", window=6, block_size=BS, start_percent=0.9)
    with pytest.warns(UserWarning, match="start_percent=0.9.*no step of this 4-step run"):
        _call(pipe, steps=4)
    h.disable()


def test_step_settings_on_a_bare_transformer_without_num_steps_say_so():
    model, inputs, _ = tiny.build("wan")
    h = fa.enable(model, method="band", window=6, block_size=BS, start_percent=0.5)
    with pytest.warns(UserWarning, match=r"start_percent.*step count.*num_steps="):
        _steps(model, inputs, (900, 600))
    st = h.stats()
    assert any("num_steps=" in n for n in st["notes"]), st
    h.disable()
    # With the step count it is honoured: steps 0, 1 of 4 dense, 2, 3 sparse.
    h = fa.enable(model, method="band", window=6, block_size=BS, start_percent=0.5, num_steps=4)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        _steps(model, inputs, (900, 700, 500, 300))
    assert not [m for m in _messages(rec) if "num_steps" in m]
    st = h.stats()
    assert st["planned_dense"] == {"outside start_percent/end_percent": 4} and st["sparse_calls"] == 4, st
    h.disable()


def test_dense_layers_covering_every_layer_warn_at_enable():
    model, _, _ = tiny.build("wan")  # 2 self-attention layers
    with pytest.warns(UserWarning, match=r"dense_layers \[0, -1\] cover all 2 self-attention layers"):
        fa.enable(model, method="band", window=6, block_size=BS, dense_layers=[0, -1]).disable()


# ------------------------------------------------------------------------------ 3. mixing levels


def test_transformer_enabled_through_its_pipeline_is_not_enabled_again_directly():
    pipe = _wan_pipe()
    before = tiny.snapshot(pipe.transformer)
    pipe.enable_fast_attention(method="band", window=6, block_size=BS)
    with pytest.raises(ValueError, match=r"already enabled through WanPipeline.*pipe\.enable_fast_attention"):
        fa.enable(pipe.transformer, method="band", window=2, block_size=BS)
    assert pipe.disable_fast_attention() is True
    assert tiny.snapshot(pipe.transformer) == before  # nothing left patched
    assert "_diffusers_hook" not in pipe.transformer.__dict__
    # The other order: enabled directly, then through the pipeline.
    h = fa.enable(pipe.transformer, method="band", window=6, block_size=BS)
    with pytest.raises(ValueError, match=r"already enabled directly.*fastattn\.disable"):
        pipe.enable_fast_attention(method="band", window=2, block_size=BS)
    assert h.enabled
    assert fa.disable(pipe.transformer) is True
    assert tiny.snapshot(pipe.transformer) == before
    # Enabling the same object again still replaces its plan.
    pipe.enable_fast_attention(method="band", window=6, block_size=BS)
    h2 = pipe.enable_fast_attention(method="dense")
    assert h2.enabled and pipe.disable_fast_attention() is True
    assert tiny.snapshot(pipe.transformer) == before


# ------------------------------------------------------------------------------ 4. processors after enable


def test_processors_replaced_after_enable_are_noticed_and_kept_on_disable():
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    model, inputs, _ = tiny.build("wan")
    h = fa.enable(model, method="band", window=6, block_size=BS)
    tiny.run(model, inputs)
    assert h.stats()["sparse_calls"] == 2
    mine = {p: WanAttnProcessor() for p in model.attn_processors}
    model.set_attn_processor(dict(mine))  # e.g. what loading an IP-Adapter does
    h.reset_stats()
    with pytest.warns(UserWarning, match=r"2 of 2 self-attention layers got a new processor or backend"):
        tiny.run(model, inputs)
    tiny.run(model, inputs)
    st = h.stats()
    assert st["sparse_calls"] == 0 and len(st["replaced_processors"]) == 2, st
    assert sum(v for k, v in st["notes"].items() if "got a new processor or backend" in k) == 4, st  # calls
    h.disable()
    assert all(model.attn_processors[p] is proc for p, proc in mine.items())  # the user's stay


def test_attention_backend_set_after_enable_is_noticed_and_kept():
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    active = _AttentionBackendRegistry._active_backend  # set_attention_backend also sets the global one
    model, inputs, _ = tiny.build("flux")
    h = fa.enable(model, method="band", window=6, block_size=BS)
    model.set_attention_backend("native")
    with pytest.warns(UserWarning, match="got a new processor or backend after enable"):
        tiny.run(model, inputs)
    assert h.stats()["sparse_calls"] == 0
    h.disable()
    backends = {str(p._attention_backend) for p in model.attn_processors.values()}
    _AttentionBackendRegistry.set_active_backend(active)
    assert backends == {"AttentionBackendName.NATIVE"}, backends  # not reset to what it was before


@pytest.mark.parametrize("name", ["sd3", "cogvideox"])
def test_replacing_families_restore_only_the_processors_they_replaced(name):
    model, inputs, _ = tiny.build(name)
    before = tiny.snapshot(model)
    h = fa.enable(model, method="band", window=6, block_size=BS)
    path = next(iter(model.attn_processors))
    users = type(before[path][0])()  # the user installs a processor of their own on one layer
    model.set_attn_processor({**model.attn_processors, path: users})
    with pytest.warns(UserWarning, match="1 of 2 self-attention layers got a new processor"):
        tiny.run(model, inputs)
    h.disable()
    after = tiny.snapshot(model)
    assert after[path][0] is users  # kept: before the fix disable() put the original back over it
    assert {p: v for p, v in after.items() if p != path} == {p: v for p, v in before.items() if p != path}


# ------------------------------------------------------------------------------ 5. compiled models


def test_enable_on_a_compiled_model_patches_the_original():
    model, inputs, _ = tiny.build("wan")
    before = tiny.snapshot(model)
    ref = tiny.run(model, inputs)
    h = fa.enable(model, method="band", window=6, block_size=BS)
    eager = tiny.run(model, inputs)
    h.disable()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    assert torch.equal(tiny.run(compiled, inputs), ref)  # compiled (and run) before enabling
    h = fa.enable(compiled, method="band", window=6, block_size=BS)
    assert model.__dict__["_fastattn_handle"] is h.models[0]
    torch.testing.assert_close(tiny.run(model, inputs), eager, rtol=0, atol=0)  # the uncompiled path
    torch.testing.assert_close(tiny.run(compiled, inputs), eager, rtol=0, atol=0)  # recompiled, not stale
    assert h.stats()["sparse_calls"] == 4
    assert fa.disable(compiled) is True
    assert tiny.snapshot(model) == before and "_diffusers_hook" not in model.__dict__
    assert torch.equal(tiny.run(compiled, inputs), ref)
    torch._dynamo.reset()


def test_pipeline_with_a_compiled_transformer():
    pipe = _wan_pipe()
    model = pipe.transformer
    before = tiny.snapshot(model)
    pipe.transformer = torch.compile(model, backend="eager")
    h = pipe.enable_fast_attention(method="band", window=6, block_size=BS)
    assert h.models[0].model_ref() is model
    assert pipe.disable_fast_attention() is True
    assert tiny.snapshot(model) == before and "_diffusers_hook" not in model.__dict__


# ------------------------------------------------------------------------------ 6. the CPU


def test_cpu_model_warns_at_enable_and_in_stats():
    model, inputs, _ = tiny.build("wan")
    with pytest.warns(UserWarning, match="on the CPU.*can be slower than dense attention"):
        h = fa.enable(model, method="band", window=6, block_size=BS)
    tiny.run(model, inputs)
    st = h.stats()
    assert st["device"] == "cpu"
    assert sum(v for k, v in st["notes"].items() if "on the CPU" in k) == st["sparse_calls"] == 2, st
    h.disable()
    with warnings.catch_warnings(record=True) as rec:  # the exact dense plan costs nothing on the CPU
        warnings.simplefilter("always")
        fa.enable(model, method="dense").disable()
    assert not [m for m in _messages(rec) if "CPU" in m]


# ------------------------------------------------------------------------------ 7. residuals freed


def test_residuals_of_a_bare_transformer_are_freed_when_the_run_ends():
    model, inputs, _ = tiny.build("wan")
    h = fa.enable(model, method="band", window=6, block_size=BS, dense_steps=1, residual=True, num_steps=3)
    _steps(model, inputs, (900, 600, 300))
    st = h.stats()
    assert st["residual_peak_bytes"] > 0 and st["sparse_calls"] == 4, st
    assert st["residual_bytes"] == 0, st  # before: kept until the next run or disable()
    h.disable()
    # Without num_steps the end of a run is unknown: handle.reset_run() frees them.
    h = fa.enable(model, method="band", window=6, block_size=BS, dense_steps=1, residual=True)
    _steps(model, inputs, (900, 600, 300))
    assert h.stats()["residual_bytes"] > 0
    h.reset_run()
    assert h.stats()["residual_bytes"] == 0
    h.disable()
