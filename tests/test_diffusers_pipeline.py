"""Pipeline-level behaviour: the pipeline methods, step/branch tracking reset per call, torch.compile
without per-layer recompiles, CPU offload hooks and a PEFT LoRA (tiny models, CPU, no downloads)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import fastattn.api as fa  # noqa: E402

_spec = importlib.util.spec_from_file_location("_fa_tiny", Path(__file__).with_name("test_diffusers.py"))
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)
BS = tiny.BS


def _wan_pipe(num_layers=2, head_dim=16):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=head_dim,
        in_channels=4,
        out_channels=4,
        text_dim=32,
        freq_dim=16,
        ffn_dim=32,
        num_layers=num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer,
    )
    return pipe


def _call(pipe, steps=2, device="cpu", height=64, width=96):
    torch.manual_seed(1)
    emb = torch.randn(1, 12, 32)
    neg = torch.randn(1, 12, 32)
    return pipe(
        # on the execution device, as the pipeline's own text encoder would give them (diffusers moves only
        # the conditional embeddings there under enable_model_cpu_offload)
        prompt_embeds=emb.to(device),
        negative_prompt_embeds=neg.to(device),
        height=height,
        width=width,
        num_frames=9,
        num_inference_steps=steps,
        guidance_scale=5.0,
        output_type="latent",
    ).frames


def _subprocess(code, **env):
    import os
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
        cwd=os.path.dirname(sys.executable),  # not the repo root: test the installed package
    )
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_pipeline_methods_attach_without_import_hooks_and_opt_out():
    code = (
        "import sys, fastattn; print('diffusers' in sys.modules); "
        "print(any('fastattn' in type(f).__module__ for f in sys.meta_path)); "
        "from diffusers import DiffusionPipeline; import fastattn.api; "
        "print(hasattr(DiffusionPipeline, 'enable_fast_attention')); "
        "from fastattn.pipelines import attach_pipeline_methods; attach_pipeline_methods(); "
        "print(hasattr(DiffusionPipeline, 'enable_fast_attention'))"
    )
    # import fastattn imports no diffusers and installs no import hook; attaching happens when asked
    # (fastattn.enable calls it, and so does `import fastattn` when diffusers is already imported)
    assert _subprocess(code).split() == ["False", "False", "False", "True"]
    assert _subprocess(code, FASTATTN_NO_PIPELINE_METHODS="1").split() == ["False", "False", "False", "False"]
    code2 = "import diffusers, fastattn; print(hasattr(diffusers.DiffusionPipeline, 'enable_fast_attention'))"
    assert _subprocess(code2) == "True"


def test_pipeline_methods_steps_branches_and_reset():
    from fastattn.pipelines import attach_pipeline_methods

    attach_pipeline_methods()  # what fastattn/__init__ runs (diffusers already imported here)
    pipe = _wan_pipe()
    assert hasattr(type(pipe), "enable_fast_attention")
    ref = _call(pipe)
    handle = pipe.enable_fast_attention(method="band", window=6, block_size=BS, dense_steps=1)
    rt = handle.runtimes[0]
    contexts = []
    orig = rt.begin_forward

    def spy(ctx):
        contexts.append((ctx.step, ctx.cfg_branch, ctx.num_steps))
        return orig(ctx)

    rt.begin_forward = spy
    out1 = _call(pipe)
    out2 = _call(pipe)
    # CFG as two passes: (step, branch) = (0,0), (0,1), (1,0), (1,1); reset at the end of every call.
    assert contexts == [(0, 0, 2), (0, 1, 2), (1, 0, 2), (1, 1, 2)] * 2
    assert torch.equal(out1, out2)
    assert not torch.equal(out1, ref)  # step 1 ran sparse
    st = handle.stats()
    assert st["planned_dense"] == {"dense_steps": 8} and st["sparse_calls"] == 8, st
    assert "maybe_free_model_hooks" in pipe.__dict__
    del rt.begin_forward
    assert pipe.disable_fast_attention() is True
    assert "maybe_free_model_hooks" not in pipe.__dict__ and "_fastattn_handle" not in pipe.__dict__
    assert torch.equal(_call(pipe), ref)
    assert pipe.disable_fast_attention() is False


def test_pipeline_dense_plan_exact_and_replace():
    pipe = _wan_pipe()
    ref = _call(pipe)
    pipe.enable_fast_attention(method="window3d", window=(1, 1, 1), block_size=BS)
    h = pipe.enable_fast_attention(method="dense")  # clean replace
    assert torch.equal(_call(pipe), ref)
    h.disable()


def test_compile_no_recompile_per_layer():
    from torch._dynamo.testing import CompileCounter

    model, inputs, _ = tiny.build("wan")
    handle = fa.enable(model, method="band", window=6, block_size=BS, dense_steps=1)
    eager = []
    with torch.no_grad():
        for t in (900, 600, 300):
            eager.append(model(**{**inputs, "timestep": torch.tensor([t])})[0])
    handle.reset_stats()
    handle.runtimes[0].reset_run()
    torch._dynamo.reset()
    cnt = CompileCounter()
    model.compile_repeated_blocks(backend=cnt)
    with torch.no_grad():
        for i, t in enumerate((900, 600, 300)):
            out = model(**{**inputs, "timestep": torch.tensor([t])})[0]
            torch.testing.assert_close(out, eager[i], rtol=0, atol=0)
    # Two identical blocks, three steps, dense and sparse decisions: compiled once.
    assert cnt.frame_count == 1, cnt.frame_count
    st = handle.stats()
    assert st["sparse_calls"] == 4 and st["planned_dense"] == {"dense_steps": 2}, st  # counted under compile
    handle.disable()
    torch._dynamo.reset()


def test_compile_whole_model():
    from torch._dynamo.testing import CompileCounter

    model, inputs, _ = tiny.build("flux")
    handle = fa.enable(model, method="band", window=6, block_size=BS)
    with torch.no_grad():
        ref = model(**inputs)[0]
    torch._dynamo.reset()
    cnt = CompileCounter()
    compiled = torch.compile(model, backend=cnt)
    with torch.no_grad():
        for _ in range(3):
            out = compiled(**inputs)[0]
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    frames = cnt.frame_count
    assert frames <= 3, frames  # the hook graph-breaks once at the top, never per layer
    handle.disable()
    torch._dynamo.reset()


def test_cpu_offload_hooks():
    pytest.importorskip("accelerate")
    from accelerate import cpu_offload_with_hook

    model, inputs, _ = tiny.build("flux")
    ref = tiny.run(model, inputs)
    handle = fa.enable(model, method="band", window=6, block_size=BS)
    sparse = tiny.run(model, inputs)
    # The hook enable_model_cpu_offload installs (accelerate's), on top of ours; execution device CPU here.
    model, hook = cpu_offload_with_hook(model, execution_device="cpu")
    torch.testing.assert_close(tiny.run(model, inputs), sparse, rtol=0, atol=0)
    hook.remove()
    handle.disable()
    torch.testing.assert_close(tiny.run(model, inputs), ref, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="enable_model_cpu_offload needs an accelerator")
def test_enable_model_cpu_offload_pipeline():
    pytest.importorskip("accelerate")
    # What the GPU kernel serves: bf16, head_dim 64, 128-token blocks (3 x 16 x 24 = 1,152 tokens, 9 blocks).
    pipe = _wan_pipe(head_dim=64)
    pipe.transformer.to(torch.bfloat16)
    pipe.enable_model_cpu_offload()
    size = dict(device="cuda", height=256, width=384)
    ref = _call(pipe, **size)
    h = pipe.enable_fast_attention(method="dense")
    assert torch.equal(_call(pipe, **size), ref)
    h.disable()
    h = pipe.enable_fast_attention(method="band", window=2)
    sparse = _call(pipe, **size)
    st = h.stats()
    assert st["sparse_calls"] > 0 and not st["fallbacks"] and not torch.equal(sparse, ref), st
    h.disable()
    assert torch.equal(_call(pipe, **size), ref)


def test_peft_lora():
    pytest.importorskip("peft")
    from peft import LoraConfig

    model, inputs, _ = tiny.build("flux")
    model.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False),
        adapter_name="style",
    )
    ref = tiny.run(model, inputs)
    handle = fa.enable(model, method="dense", block_size=BS)
    assert torch.equal(tiny.run(model, inputs), ref)
    handle.disable()
    handle = fa.enable(model, method="band", window=6, block_size=BS)
    out = tiny.run(model, inputs)
    handle.runtimes[0].sparse_fn = tiny.masked_oracle
    torch.testing.assert_close(out, tiny.run(model, inputs), rtol=1e-5, atol=1e-5)
    handle.disable()
    assert torch.equal(tiny.run(model, inputs), ref)


def test_residual_sharing_on_a_pipeline_with_cfg_as_two_passes():
    """WA-RS keeps one residual per layer and CFG pass, captured at the last dense step, reset per call."""
    pipe = _wan_pipe()
    ref = _call(pipe, steps=3)
    handle = fa.enable(pipe, method="band", window=6, block_size=BS, dense_steps=1, residual=True)
    out = _call(pipe, steps=3)
    st = handle.stats()
    layers = st["layers_per_forward"]
    # step 0 (both CFG passes) captures; steps 1 and 2 (both passes) are sparse + residual
    assert st["planned_dense"] == {"residual capture (WA-RS)": 2 * layers}
    assert st["sparse_calls"] == 4 * layers and st["residual_peak_bytes"] > 0
    assert not torch.equal(out, ref) and torch.isfinite(out).all()
    assert st["residual_bytes"] == 0  # freed when the pipeline call ended
    handle.disable()
    assert torch.equal(_call(pipe, steps=3), ref)
