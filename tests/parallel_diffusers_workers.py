"""Workers of tests/test_parallel_diffusers.py: tiny random-weight diffusers transformers under ``parallel=``.

Every rank builds the same model and inputs (seeded), computes the one-process references itself (the model
unpatched, and enabled without ``parallel=``), then enables it with ``parallel=`` and compares. Imported by name
from the spawned ranks (tests/ is on sys.path).
"""

from __future__ import annotations

import torch

BS = 8  # mask block size of the tiny models


# ----------------------------------------------------------------------------------------- tiny models


def _wan(grid=(3, 8, 12), heads=2):
    from diffusers import WanTransformer3DModel

    m = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        text_dim=32,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    f, h, w = grid
    inputs = dict(
        hidden_states=torch.randn(1, 4, f, h, w),
        timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, 12, 32),
        return_dict=False,
    )
    return m, inputs


def _flux():
    from diffusers import FluxTransformer2DModel

    m = FluxTransformer2DModel(
        patch_size=1,
        in_channels=8,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    )
    h, w, t = 6, 8, 10
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    inputs = dict(
        hidden_states=torch.randn(1, h * w, 8),
        encoder_hidden_states=torch.randn(1, t, 32),
        pooled_projections=torch.randn(1, 16),
        timestep=torch.tensor([0.5]),
        img_ids=ids.reshape(-1, 3),
        txt_ids=torch.zeros(t, 3),
        return_dict=False,
    )
    return m, inputs


def _qwen(text=10):
    from diffusers import QwenImageTransformer2DModel

    m = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 6, 6),
    )
    h, w = 6, 8
    mask = torch.ones(1, text, dtype=torch.long)
    mask[:, 8:] = 0  # padded prompt: rank 1's text chunk holds the padding
    inputs = dict(
        hidden_states=torch.randn(1, h * w, 16),
        encoder_hidden_states=torch.randn(1, text, 32),
        encoder_hidden_states_mask=mask,
        timestep=torch.tensor([0.5]),
        img_shapes=[(1, h, w)],
        return_dict=False,
    )
    return m, inputs


def _hunyuan():
    from diffusers import HunyuanVideoTransformer3DModel

    m = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=2,
        patch_size_t=1,
        text_embed_dim=32,
        pooled_projection_dim=16,
        rope_axes_dim=(4, 6, 6),
        guidance_embeds=True,
    )
    f, h, w, t = 3, 8, 12, 10
    mask = torch.ones(1, t, dtype=torch.long)
    mask[:, 7:] = 0
    inputs = dict(
        hidden_states=torch.randn(1, 4, f, h, w),
        timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, t, 32),
        encoder_attention_mask=mask,
        pooled_projections=torch.randn(1, 16),
        guidance=torch.tensor([3500.0]),
        return_dict=False,
    )
    return m, inputs


def _ltx():
    from diffusers import LTXVideoTransformer3DModel

    m = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=16,
        cross_attention_dim=32,
        num_layers=2,
        caption_channels=32,
    )
    f, h, w, t = 3, 6, 8, 10
    mask = torch.ones(1, t, dtype=torch.long)
    mask[:, 8:] = 0
    inputs = dict(
        hidden_states=torch.randn(1, f * h * w, 8),
        encoder_hidden_states=torch.randn(1, t, 32),
        timestep=torch.tensor([500]),
        encoder_attention_mask=mask,
        num_frames=f,
        height=h,
        width=w,
        return_dict=False,
    )
    return m, inputs


MODELS = {
    "wan": _wan,
    "wan_ring": lambda: _wan(grid=(2, 8, 16)),  # 64 tokens: 32 per rank, whole 8-token blocks
    "wan_3heads": lambda: _wan(heads=3),
    "flux": _flux,
    "qwen_image": _qwen,
    "qwen_odd_text": lambda: _qwen(text=9),
    "hunyuan_video": _hunyuan,
    "ltx_video": _ltx,
}


def build(name: str):
    torch.manual_seed(0)
    model, inputs = MODELS[name]()
    return model.eval(), inputs


def run(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out[0] if isinstance(out, (tuple, list)) else out.sample


def snapshot(model) -> dict:
    """Everything enable/disable may touch: processors and backends, hook registries, instance forwards."""
    procs = {
        p: (proc, getattr(proc, "_attention_backend", "absent")) for p, proc in model.attn_processors.items()
    }
    patched = sorted(
        n for n, mod in model.named_modules() if {"_diffusers_hook", "forward"} & set(mod.__dict__)
    )
    return {"processors": procs, "patched_modules": patched}


# ----------------------------------------------------------------------------------------- the cases

SPARSE = dict(preset="fast", block_size=BS, dense_steps=0)  # the family's sparse preset, sparse from step 0


def exactness(rank: int, world: int, cases: list[dict]) -> list[dict]:
    """Per case (``model``, ``plan``: "dense" | "sparse", ``ulysses``, ``ring``): the worst difference of the
    parallel output from the one-process output of the same plan, the stats, and whether disable() restored."""
    import fastattn.api as fa
    from fastattn.pipelines.parallel import gather_stats

    out = []
    for case in cases:
        model, inputs = build(case["model"])
        before = snapshot(model)
        unpatched = run(model, inputs)
        kwargs = dict(method="dense", block_size=BS) if case["plan"] == "dense" else dict(SPARSE)
        if case["plan"] == "dense":
            ref = unpatched
        else:
            handle = fa.enable(model, **kwargs)
            ref = run(model, inputs)
            handle.disable()
        parallel = dict(ulysses=case.get("ulysses", world), ring=case.get("ring", 1), timeout_s=60)
        handle = fa.enable(model, **kwargs, parallel=parallel)
        got = run(model, inputs)
        again = run(model, inputs)  # a second forward (cached placements, the same answer)
        stats = handle.stats()
        summed = gather_stats(handle)[0]
        mesh_id = id(handle.models[0].parallel.mesh)
        handle.disable()
        after = snapshot(model)
        out.append(
            dict(
                case=case,
                err=float((got - ref).abs().max()),
                err_again=float((again - ref).abs().max()),
                ref_max=float(ref.abs().max()),
                sparse_vs_dense=float((ref - unpatched).abs().max()),
                restored=after == before,
                restored_output=bool(torch.equal(run(model, inputs), unpatched)),
                calls=stats["calls"],
                calls_all_ranks=summed["calls"],
                sparse_calls=stats["sparse_calls"],
                fallbacks=stats["fallbacks"],
                parallel_fallbacks=stats["parallel_fallbacks"],
                parallel=stats["parallel"],
                mesh_id=mesh_id,
            )
        )
    return out


def bad_config(rank: int, world: int) -> dict:
    """The errors ``enable(..., parallel=...)`` raises, and whether the model was left untouched each time."""
    import fastattn.api as fa

    errors = {}

    def catch(name, model, fn):
        before = snapshot(model)
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - the test reads the message
            errors[name] = f"{type(e).__name__}: {e}"
        errors[name + "_untouched"] = snapshot(model) == before

    wan, inputs = build("wan")
    catch("world", wan, lambda: fa.enable(wan, method="dense", parallel=dict(ulysses=3, ring=1)))
    catch("unknown_field", wan, lambda: fa.enable(wan, method="dense", parallel=dict(ulyses=2)))
    catch(
        "block_cache", wan, lambda: fa.enable(wan, method="dense", cache="balanced", parallel=dict(ulysses=2))
    )
    three, _ = build("wan_3heads")
    catch("heads", three, lambda: fa.enable(three, method="dense", parallel=dict(ulysses=2, ring=1)))

    # run-time errors: raised on every rank alike, the handle still disables cleanly
    odd, odd_inputs = build("qwen_odd_text")
    handle = fa.enable(odd, method="dense", parallel=dict(ulysses=2, timeout_s=30))
    catch("odd_text", odd, lambda: run(odd, odd_inputs))
    handle.disable()
    clean = snapshot(wan)
    handle = fa.enable(wan, method="dense", parallel=dict(ulysses=2, timeout_s=30))
    torch.manual_seed(rank)  # another seed on every rank
    other = dict(inputs, hidden_states=torch.randn_like(inputs["hidden_states"]))
    catch("inputs_differ", wan, lambda: run(wan, other))
    handle.disable()
    errors["restored_after_runtime_errors"] = snapshot(wan) == clean
    return errors


def pipeline(rank: int, world: int) -> dict:
    """A tiny WanPipeline (2 steps, CFG as two passes, the family's fast preset, step 0 dense) through
    ``pipe.enable_fast_attention(..., parallel=...)`` against the same call in one process."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    torch.manual_seed(0)
    transformer, _ = MODELS["wan"]()
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer.eval(),
    )

    def call():
        torch.manual_seed(1)
        emb, neg = torch.randn(1, 12, 32), torch.randn(1, 12, 32)
        return pipe(
            prompt_embeds=emb,
            negative_prompt_embeds=neg,
            height=64,
            width=96,
            num_frames=9,
            num_inference_steps=2,
            guidance_scale=5.0,
            output_type="latent",
        ).frames

    import fastattn.api as fa

    fa.enable(pipe, "fast", block_size=BS, dense_steps=1)
    pipe.disable_fast_attention()  # the pipeline methods are attached now
    before = snapshot(transformer)
    pipe.enable_fast_attention("fast", block_size=BS, dense_steps=1)
    ref = call()
    ref_stats = transformer._fastattn_handle.stats()
    pipe.disable_fast_attention()
    pipe.enable_fast_attention(
        "fast", block_size=BS, dense_steps=1, parallel=dict(ulysses=world, timeout_s=60)
    )
    got = call()
    stats = transformer._fastattn_handle.stats()
    pipe.disable_fast_attention()
    return dict(
        err=float((got - ref).abs().max()),
        ref_stats={k: ref_stats[k] for k in ("calls", "sparse_calls", "planned_dense")},
        stats={k: stats[k] for k in ("calls", "sparse_calls", "planned_dense")},
        restored=snapshot(transformer) == before,
    )


def everything(rank: int, world: int, cases: list[dict]) -> dict:
    """:func:`exactness`, :func:`pipeline` and :func:`bad_config` in one launch (spawning ranks that import
    diffusers is the cost)."""
    return {
        "exact": exactness(rank, world, cases),
        "pipeline": pipeline(rank, world),
        "bad": bad_config(rank, world),
    }
