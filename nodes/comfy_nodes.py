"""The fastattn node pack in ComfyUI's V3 schema (``comfy_api.latest``). Imported only inside ComfyUI, by
``comfy_entrypoint()``; every class is thin: the logic is in ``fast_attention.py`` and ``prompt_enhancer.py``.

Only schema features present since ComfyUI 0.3.6x are used (no DynamicCombo / advanced inputs), so the pack
loads on the cores between 0.3.64 and today.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import calibrate as cal
from . import fast_attention as fa
from . import fast_cache as fc
from . import multigpu as mg
from . import text_encoder_cache as tec
from .prompt_enhancer import KV_BITS, check_kv_bits, enhance_prompt

CATEGORY = "fastattn"
Plan = io.Custom(fa.PLAN_TYPE)


class FastAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastAttnApply",
            display_name="Fast Attention",
            category=CATEGORY,
            description="Replaces the model's self-attention with fastattn's block-sparse / quantized attention "
            "(on a copy of the model). Calls it cannot serve run the model's own attention and are counted in "
            "the Fast Attention Report.",
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="The diffusion model (Flux, Chroma, Wan 2.1/2.2, HunyuanVideo, "
                    "Qwen-Image, SD3/3.5, LTXV). Other models pass through unchanged.",
                ),
                io.Combo.Input(
                    "preset",
                    options=list(fa.PRESETS),
                    default="balanced",
                    tooltip="safe / balanced / fast: the model family's structural preset (denser is "
                    "closer to the original). custom: use method and density below.",
                ),
                io.Combo.Input(
                    "method",
                    options=list(fa.METHODS),
                    default="window3d",
                    tooltip="With preset 'custom': window3d (3-D local window), radial (window that "
                    "narrows with frame distance), band (1-D window), arrow (band + all text), "
                    "dynamic (top-p of estimated block scores), dense (exact, for checks).",
                ),
                io.Float.Input(
                    "density",
                    default=0.3,
                    min=0.02,
                    max=1.0,
                    step=0.01,
                    tooltip="With preset 'custom': fraction of 128x128 attention blocks computed "
                    "(text rows and columns included). Ignored by dynamic and dense.",
                ),
                io.Combo.Input(
                    "quant",
                    options=list(fa.QUANTS),
                    default="default",
                    tooltip="Attention bit-width. default: what the preset or plan says; none: 16-bit; "
                    "int8: INT8 Q.K; int8-fp8: INT8 Q.K + FP8 P.V; fp8: FP8 Q.K and P.V (Ada/Hopper; "
                    "older GPUs run int8).",
                ),
                io.Float.Input(
                    "start_percent",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Sparse attention starts at this point of the run (by sigma, like core "
                    "nodes); before it attention is dense.",
                ),
                io.Float.Input(
                    "end_percent",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Sparse attention ends at this point of the run (by sigma); after it "
                    "attention is dense.",
                ),
                io.String.Input(
                    "dense_blocks",
                    default="",
                    tooltip="Self-attention blocks that always run dense, e.g. '0,1,38-39' (counted "
                    "in forward order from 0; Flux: double blocks 0-18, single blocks 19-56).",
                ),
                Plan.Input(
                    "plan",
                    optional=True,
                    tooltip="A plan from a Fast Attention Plan node; replaces preset, method and density "
                    "(quant and dense_blocks still apply).",
                ),
            ],
            outputs=[io.Model.Output(tooltip="The model with fastattn's attention.")],
        )

    @classmethod
    def execute(cls, model, preset, method, density, quant, start_percent, end_percent, dense_blocks,
                plan=None) -> io.NodeOutput:  # fmt: skip
        return io.NodeOutput(fa.apply_fast_attention(model, preset, method, density, quant, start_percent,
                                                     end_percent, dense_blocks, plan))  # fmt: skip


class FastAttentionCache(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastAttnCache",
            display_name="Fast Attention Cache",
            category=CATEGORY,
            description="Reuses work across denoising steps and CFG branches (on a copy of the model): skips "
            "transformer blocks whose output barely changes (a trigger on the first block, or the Delta-DiT "
            "schedule) and shares attention outputs across steps and CFG branches. Combines with a Fast "
            "Attention node applied before it; the Fast Attention Report shows blocks skipped and cache memory.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model, or the MODEL output of a Fast Attention node."),
                io.Combo.Input(
                    "preset",
                    options=list(fc.PRESETS),
                    default="balanced",
                    tooltip="safe / balanced / fast: block skipping by the first-block trigger (faster skips "
                    "more); delta: Delta-DiT schedule (rear blocks cached early, front blocks late); custom: the "
                    "widgets below; off: no block skipping (attention sharing below still applies).",
                ),
                io.Combo.Input(
                    "blocks",
                    options=list(fc.BLOCK_MODES),
                    default="auto",
                    tooltip="With preset 'custom': auto (skip while the first block's residual changes less than "
                    "threshold), delta (Delta-DiT schedule), fixed (skip half the steps), off.",
                ),
                io.Float.Input(
                    "threshold",
                    default=0.1,
                    min=0.0,
                    max=2.0,
                    step=0.01,
                    tooltip="With preset 'custom', auto: accumulated relative change of the first block's "
                    "output up to which the other blocks are skipped (higher: more skips, less exact).",
                ),
                io.Int.Input("max_skips", default=2, min=1, max=16,
                             tooltip="With preset 'custom': most steps in a row that skip blocks."),  # fmt: skip
                io.Float.Input(
                    "first_steps",
                    default=0.1,
                    min=0.0,
                    max=0.99,
                    step=0.01,
                    tooltip="With preset 'custom': fraction of the run at its start that is always computed.",
                ),
                io.Int.Input("last_steps", default=1, min=0, max=100,
                             tooltip="With preset 'custom': steps at the end of the run that are always computed."),  # fmt: skip
                io.Int.Input(
                    "attn_share_interval",
                    default=0,
                    min=0,
                    max=16,
                    tooltip="Attention sharing across steps: 0 off; k: self-attention is computed every k-th "
                    "step and reused on the steps between.",
                ),
                io.Boolean.Input(
                    "cfg_share",
                    default=False,
                    tooltip="Attention sharing across CFG: batched CFG computes self-attention for the positive "
                    "prompt and copies it to the negative; CFG as two passes: the second pass of a step reuses the "
                    "first one's.",
                ),
                io.Float.Input(
                    "cache_budget_gb",
                    default=0.0,
                    min=0.0,
                    max=1024.0,
                    step=0.25,
                    tooltip="Most GiB of cached tensors; over it the cache recomputes instead. 0: unbounded.",
                ),
                io.Combo.Input(
                    "cache_storage",
                    options=["auto", "bf16", "int8"],
                    default="auto",
                    tooltip="How cached tensors are kept: auto (as computed), bf16, int8 (half of bf16).",
                ),
                io.Boolean.Input(
                    "cache_offload", default=False, tooltip="Keep cached tensors in CPU memory (saves VRAM)."
                ),
                # last: saved workflows keep their widget values by position
                io.Combo.Input(
                    "extrapolate",
                    options=list(fc.EXTRAPOLATE),
                    default="preset",
                    tooltip="What skipped blocks add back. off: the change they made the last time they ran; "
                    "first-order: that change carried forward along its trend over the last two runs, which drifts "
                    "less on long skips but keeps twice the cached block memory (plain reuse until two runs are "
                    "cached, or when the budget cannot hold both); preset: the preset's choice (safe, balanced, "
                    "fast: first-order; delta: off; custom: first-order).",
                ),
            ],
            outputs=[io.Model.Output(tooltip="The model with fastattn's cache.")],
        )

    @classmethod
    def execute(cls, model, preset, blocks, threshold, max_skips, first_steps, last_steps, attn_share_interval,
                cfg_share, cache_budget_gb, cache_storage, cache_offload, extrapolate="preset") -> io.NodeOutput:  # fmt: skip
        return io.NodeOutput(fc.apply_fast_cache(model, preset, blocks, threshold, max_skips, first_steps, last_steps,
                                                 attn_share_interval, cfg_share, cache_budget_gb, cache_storage,
                                                 cache_offload, extrapolate=extrapolate))  # fmt: skip


class FastAttentionPlan(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastAttnPlan",
            display_name="Fast Attention Plan",
            category=CATEGORY,
            description="Loads a fastattn plan: a shipped one, a local plan directory, or one on the Hugging "
            "Face Hub. The Fast Attention node refuses a plan made for another model family.",
            inputs=[
                io.Combo.Input(
                    "source",
                    options=fa.plan_sources(),
                    default=fa.PLAN_PATH,
                    tooltip="A shipped plan (<family>-<preset>), or 'path or hf://' to load the plan "
                    "named in location.",
                ),
                io.String.Input(
                    "location",
                    default="",
                    tooltip="With source 'path or hf://': a plan directory, its plan.json, or "
                    "hf://owner/repo[/subdir][@revision] (HF_HUB_OFFLINE=1 reads the Hub cache only).",
                ),
            ],
            outputs=[
                Plan.Output(display_name="plan", tooltip="The plan, for a Fast Attention node's plan input.")
            ],
        )

    @classmethod
    def execute(cls, source, location="") -> io.NodeOutput:
        return io.NodeOutput(fa.load_plan_choice(source, location))


class FastAttentionReport(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastAttnReport",
            display_name="Fast Attention Report",
            category=CATEGORY,
            description="What fastattn ran in the model's last sampling run: density achieved, calls by method, "
            "dense calls and fallbacks with their reasons, time per step.",
            inputs=[
                io.Model.Input(
                    "model", tooltip="The MODEL output of a Fast Attention node (the one the sampler used)."
                ),
                io.AnyType.Input(
                    "after",
                    optional=True,
                    tooltip="Connect the sampler's output here so the report is made after sampling.",
                ),
                io.Clip.Input(
                    "clip",
                    optional=True,
                    tooltip="The CLIP output of a Fast Attention Text Encoder Cache node: adds what its cache did "
                    "(prompts encoded from the cache, those that were not and why).",
                ),
            ],
            outputs=[io.String.Output(display_name="report", tooltip="The report as text.")],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return float("nan")  # never cached: the report changes with every run

    @classmethod
    def execute(cls, model, after=None, clip=None) -> io.NodeOutput:
        text = fa.report_text(model)
        if clip is not None:
            text += "\n\n" + tec.report_text(clip)
        return io.NodeOutput(text, ui={"text": [text]})


class PromptEnhancer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastAttnPromptEnhancer",
            display_name="Prompt Enhancer (fastattn, quantized KV)",
            category=CATEGORY,
            description="Rewrites a prompt with a local causal LM whose KV cache is quantized.",
            inputs=[
                io.String.Input("prompt", multiline=True, default="", tooltip="The prompt to rewrite."),
                io.String.Input(
                    "model_path",
                    default="",
                    tooltip="A local causal LM: a transformers directory, a directory with a .gguf, "
                    "or a .gguf file.",
                ),
                io.Int.Input(
                    "max_new_tokens",
                    default=120,
                    min=1,
                    max=2048,
                    tooltip="Most tokens the rewrite may have.",
                ),
                io.Combo.Input(
                    "kv_bits",
                    options=list(KV_BITS),
                    default="4",
                    tooltip="Bits per KV-cache value (4 keeps quality at a quarter of 16-bit memory).",
                ),
                io.String.Input(
                    "instruction",
                    multiline=True,
                    optional=True,
                    default=_default_instruction(),
                    tooltip="How the LM is told to rewrite the prompt.",
                ),
                io.Boolean.Input(
                    "keep_loaded",
                    optional=True,
                    default=True,
                    tooltip="Keep the LM in memory for the next run (one LM at a time; ComfyUI's Unload Models "
                    "frees it). Off: free it after each rewrite.",
                ),
            ],
            outputs=[io.String.Output(display_name="prompt", tooltip="The rewritten prompt.")],
        )

    @classmethod
    def validate_inputs(cls, kv_bits):
        return check_kv_bits(kv_bits) or True

    @classmethod
    def execute(
        cls, prompt, model_path, max_new_tokens=120, kv_bits="4", instruction=None, keep_loaded=True
    ) -> io.NodeOutput:
        return io.NodeOutput(
            enhance_prompt(prompt, model_path, max_new_tokens, kv_bits, instruction, keep_loaded)
        )


class TextEncoderCache(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastAttnTextEncoderCache",
            display_name="Fast Attention Text Encoder Cache",
            category=CATEGORY,
            description="Encodes the prompt template of LLM text encoders (HunyuanVideo's Llama, Qwen-Image's "
            "Qwen 2.5, ...) once and keeps its keys/values quantized, so each prompt runs only its own tokens "
            "(on a copy of the CLIP). Other encoders pass through; the report says why.",
            inputs=[
                io.Clip.Input(
                    "clip",
                    tooltip="The CLIP from a (Dual)CLIPLoader. Decoder-LM encoders with a prompt template take "
                    "the cache; CLIP-L, T5 and the like are left as they are.",
                ),
                io.Combo.Input(
                    "bits",
                    options=list(tec.BITS),
                    default="8",
                    tooltip="Bits per cached key/value of the template prefix (8 is near-lossless; 4 and 2 save "
                    "more memory with more error). off: the CLIP passes through unchanged.",
                ),
            ],
            outputs=[
                io.Clip.Output(tooltip="The CLIP with the template-prefix cache."),
                io.String.Output(
                    display_name="report",
                    tooltip="What was cached, its memory vs bf16, the encode time saved per prompt and the "
                    "error on a probe prompt; why an encoder was left as it is.",
                ),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, clip, bits="8") -> io.NodeOutput:
        patched, report = tec.apply_text_encoder_cache(clip, bits)
        return io.NodeOutput(patched, report, ui={"text": [report]})


def _sampler_options() -> tuple[list[str], list[str]]:
    """The host's sampler and scheduler names (a minimal pair when comfy.samplers is not importable)."""
    try:
        import comfy.samplers

        return list(comfy.samplers.KSampler.SAMPLERS), list(comfy.samplers.KSampler.SCHEDULERS)
    except ImportError:
        return ["euler"], ["simple"]


class FastAttentionCalibrate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        samplers, schedulers = _sampler_options()
        return io.Schema(
            node_id="FastAttnCalibrate",
            display_name="Fast Attention Calibrate",
            category=CATEGORY,
            description="Runs the sampler a few times on a copy of the model while fastattn observes every "
            "self-attention head, then chooses per step group, layer and head what to run (3-D windows in the "
            "best axis order, bands, stripes, skipped or reused heads, bit-width) for the least error at the "
            "target attention work. Outputs a PLAN for Fast Attention or Save Plan.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model, before any Fast Attention node."),
                io.Conditioning.Input("positive", tooltip="The prompt conditioning the observed runs use."),
                io.Conditioning.Input("negative", tooltip="The negative conditioning."),
                io.Latent.Input("latent_image", tooltip="Sets the size (and frames) the plan is calibrated at."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, tooltip="Run i uses seed + i."),
                io.Int.Input("runs", default=2, min=1, max=16, tooltip="Sampler runs observed (more: steadier plan)."),
                io.Int.Input("steps", default=20, min=1, max=200, tooltip="Steps of each run (use your own)."),
                io.Float.Input("cfg", default=5.0, min=0.0, max=100.0, step=0.1, tooltip="CFG scale of the runs."),
                io.Combo.Input("sampler_name", options=samplers, tooltip="Sampler of the runs."),
                io.Combo.Input("scheduler", options=schedulers, tooltip="Scheduler of the runs."),
                io.Float.Input(
                    "target_density",
                    default=0.3,
                    min=0.02,
                    max=1.0,
                    step=0.01,
                    tooltip="Share of the attention work the plan may do (dense steps included); the plan "
                    "with the least estimated error at that work is chosen.",
                ),
                io.Boolean.Input(
                    "residual",
                    default=False,
                    optional=True,  # prompts saved before it existed stay valid
                    tooltip="Residual sharing (WA-RS) on top of the plan: the first step runs exact and its "
                    "correction is added to later steps' approximate heads (the exact step counts in "
                    "target_density).",
                ),
            ],
            outputs=[
                Plan.Output(display_name="plan", tooltip="The calibrated plan, for Fast Attention or Save Plan."),
                io.String.Output(display_name="report", tooltip="What was chosen and the expected work and error."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed=0, runs=2, steps=20, cfg=5.0,
                sampler_name="euler", scheduler="simple", target_density=0.3, residual=False) -> io.NodeOutput:  # fmt: skip
        try:
            import comfy.utils

            bar = comfy.utils.ProgressBar(runs)
            progress = lambda done, total: bar.update_absolute(done, total)  # noqa: E731
        except ImportError:
            progress = None
        plan, text = cal.calibrate_model(model, positive, negative, latent_image, seed=seed, runs=runs, steps=steps,
                                         cfg=cfg, sampler_name=sampler_name, scheduler=scheduler,
                                         target_density=target_density, residual=residual,
                                         on_progress=progress)  # fmt: skip
        return io.NodeOutput(plan, text, ui={"text": [text]})


class SavePlan(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastAttnSavePlan",
            display_name="Save Plan",
            category=CATEGORY,
            description="Writes a fastattn plan (plan.json + plan.safetensors, with the calibration report) to "
            "output/fastattn_plans/<name>, and pushes it to the Hugging Face Hub when a repo is given (with the "
            "token of HF_TOKEN or huggingface-cli login: no token is stored in the workflow).",
            inputs=[
                Plan.Input("plan", tooltip="A PLAN from Fast Attention Calibrate (or Fast Attention Plan)."),
                io.String.Input("name", default="calibrated-plan", tooltip="Folder name under output/fastattn_plans."),
                io.String.Input(
                    "hub_repo",
                    default="",
                    tooltip="owner/name of a Hub model repo to push to (created if missing); empty: local only.",
                ),
                io.Boolean.Input("private", default=True, tooltip="Create the Hub repo private."),
            ],
            outputs=[io.String.Output(display_name="saved", tooltip="Where the plan went.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, plan, name="calibrated-plan", hub_repo="", private=True) -> io.NodeOutput:
        text = cal.save_plan(plan, name, hub_repo, private)
        return io.NodeOutput(text, ui={"text": [text]})


def _default_instruction() -> str:
    from ..prompt import DEFAULT_INSTRUCTION

    return DEFAULT_INSTRUCTION


class FastAttentionMultiGPU(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastAttnMultiGPU",
            display_name="Fast Attention Multi-GPU",
            category=CATEGORY,
            description="Runs the model's forwards on several GPUs (on a copy of the model): ComfyUI's GPU and one "
            "worker process per extra GPU split every transformer block's tokens (sequence parallelism: Ulysses "
            "and/or ring attention, sparse work balanced across GPUs). The ordinary KSampler drives it; combine "
            "with a Fast Attention node (either order) to run its plan on every GPU.",
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="A Flux or Wan 2.1/2.2 diffusion model (or a Fast Attention node's MODEL).",
                ),
                io.String.Input(
                    "devices",
                    default="all",
                    tooltip="GPUs to use: 'all', or indices like '0,1' (ComfyUI's own GPU must be one of them); "
                    "'cpu,cpu' runs CPU ranks (ComfyUI started with --cpu).",
                ),
                io.Combo.Input(
                    "ulysses",
                    options=list(mg.DEGREES),
                    default="auto",
                    tooltip="Ulysses degree (GPUs that exchange heads by all-to-all); auto: the largest that "
                    "divides the GPU count and the model's heads.",
                ),
                io.Combo.Input(
                    "ring",
                    options=list(mg.DEGREES),
                    default="auto",
                    tooltip="Ring degree (GPUs that pass key/value chunks around); ulysses x ring must equal the "
                    "number of GPUs.",
                ),
                io.Boolean.Input(
                    "balance",
                    default=True,
                    tooltip="Balance sparse attention work across GPUs (db-SP: heads and blocks assigned by the "
                    "plan's work); off: contiguous split.",
                ),
                io.Float.Input(
                    "timeout_s",
                    default=300.0,
                    min=5.0,
                    max=3600.0,
                    step=5.0,
                    tooltip="Seconds a GPU may wait for another before the run stops with an error.",
                ),
            ],
            outputs=[io.Model.Output(tooltip="The model, run on several GPUs.")],
        )

    @classmethod
    def execute(cls, model, devices, ulysses, ring, balance, timeout_s) -> io.NodeOutput:
        return io.NodeOutput(mg.apply_multigpu(model, devices, ulysses, ring, balance, timeout_s))


NODES = [FastAttention, FastAttentionCache, FastAttentionPlan, FastAttentionReport, PromptEnhancer, TextEncoderCache,
         FastAttentionCalibrate, SavePlan, FastAttentionMultiGPU]


class FastAttnExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
