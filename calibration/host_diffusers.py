"""Calibration target: a diffusers pipeline whose transformer fastattn supports (``fastattn.pipelines``).

Prompts are strings (``pipe(prompt=...)``) or dicts of pipeline arguments (``{"prompt_embeds": ...}``);
``steps`` becomes ``num_inference_steps``, each prompt gets a seeded generator, and the pipeline returns
latents where it can (no VAE decode: calibration only needs the attention calls). Extra run arguments
(``height=``, ``width=``, ``num_frames=``, ``guidance_scale=``...) pass through to every call.
"""

from __future__ import annotations

import inspect
import warnings

import torch

from ..pipelines.entry import enable
from ..pipelines.families import adapter_for
from ..pipelines.integration import find_transformers, model_fingerprint, unwrap_compiled


class DiffusersTarget:
    """What calibration needs from a host: enable a plan, run one prompt, describe the model."""

    def __init__(self, pipe, run_kwargs: dict):
        pipe = unwrap_compiled(pipe)
        if hasattr(pipe, "attn_processors") or not callable(pipe):
            raise TypeError(
                f"calibration runs the denoising loop: pass the diffusers pipeline, not the bare "
                f"{type(pipe).__name__} (its transformer is found in it)"
            )
        models, _ = find_transformers(pipe)  # clear error for a family without adapter
        if len(models) != 1:
            raise ValueError(
                f"{type(pipe).__name__} has {len(models)} transformers ({[type(m).__name__ for m in models]}); "
                "calibration makes one plan per transformer and supports pipelines with one"
            )
        for obj in (pipe, models[0]):
            if obj.__dict__.get("_fastattn_handle") is not None:
                raise ValueError(
                    "fastattn is enabled on this pipeline: disable it (pipe.disable_fast_attention()) before "
                    "calibrating, so calibration observes the model's own attention"
                )
        self.pipe, self.model = pipe, models[0]
        params = inspect.signature(pipe.__call__).parameters
        self._params = {n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        self._var_kw = any(p.kind == p.VAR_KEYWORD for p in params.values())
        bad = [k for k in run_kwargs if k not in self._params and not self._var_kw]
        if bad:
            raise TypeError(f"{type(pipe).__name__}.__call__ takes no argument(s) {bad}")
        self.run_kwargs = dict(run_kwargs)
        fp = model_fingerprint(self.model)
        self.family = adapter_for(self.model).family
        self.fingerprint = fp
        self.num_layers, self.num_heads, self.head_dim = fp.num_layers, fp.num_heads, fp.head_dim
        steps = params.get("num_inference_steps")
        default = steps.default if steps is not None else None
        self.default_steps = default if isinstance(default, int) and default > 0 else 20

    def normalize_prompts(self, prompts) -> list:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        out = []
        for p in prompts:
            if isinstance(p, str):
                if not p.strip():
                    raise ValueError("an empty prompt: give text, or a dict of pipeline arguments")
                out.append(p)
            elif isinstance(p, dict):
                bad = [k for k in p if k not in self._params and not self._var_kw]
                if bad:
                    raise ValueError(
                        f"prompt arguments {bad} are not arguments of {type(self.pipe).__name__}.__call__"
                    )
                out.append(p)
            else:
                raise TypeError(
                    f"a prompt is a string or a dict of pipeline arguments, got {type(p).__name__}"
                )
        return out

    def enable(self, plan):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*is on the CPU.*")  # observation runs anywhere
            return enable(self.pipe, plan=plan)

    def describe_run(self) -> dict:
        return {k: v for k, v in self.run_kwargs.items() if isinstance(v, (int, float, str, bool))}

    @torch.no_grad()
    def run(self, prompt, steps: int, seed: int) -> torch.Tensor | None:
        """One pipeline call; returns its output latents (None when the pipeline returns no tensor)."""
        kwargs = dict(self.run_kwargs)
        kwargs.update({"prompt": prompt} if isinstance(prompt, str) else prompt)
        kwargs["num_inference_steps"] = steps
        device = getattr(self.pipe, "_execution_device", None) or getattr(self.pipe, "device", "cpu")
        kwargs.setdefault("generator", torch.Generator(device=torch.device(device).type).manual_seed(seed))
        if "output_type" in self._params or self._var_kw:
            kwargs.setdefault("output_type", "latent")
        if "return_dict" in self._params or self._var_kw:
            kwargs.setdefault("return_dict", False)
        out = self.pipe(**kwargs)
        while isinstance(out, (tuple, list)) and out:
            out = out[0]
        return out.float() if isinstance(out, torch.Tensor) else None


def is_pipeline(obj) -> bool:
    """A diffusers pipeline (has components and is callable), not a model."""
    return isinstance(getattr(obj, "components", None), dict) and callable(obj)
