"""Calibration target: the learned testbed DiT (``fastattn.testbed``), run with its own sampler.

Prompts are class labels (``3``) or ``(label, seed)`` pairs; each runs one Euler sampling of ``steps``
steps through :func:`fastattn.testbed.sample.sample` (``frames=``, ``size=``, ``cfg_scale=``, ``shift=``
and ``callback=`` pass through).
"""

from __future__ import annotations

import torch

from ..plans.meta import ModelFingerprint
from ..testbed.fast import FAMILY, enable
from ..testbed.model import TestbedDiT
from ..testbed.sample import sample

RUN_KEYS = ("frames", "size", "cfg_scale", "shift", "callback")
DEFAULT_STEPS = 16  # the testbed benchmarks' schedule


class TestbedTarget:
    """What calibration needs from a host: enable a plan, run one prompt, describe the model."""

    __test__ = False

    def __init__(self, model: TestbedDiT, run_kwargs: dict):
        unknown = set(run_kwargs) - set(RUN_KEYS)
        if unknown:
            raise TypeError(
                f"testbed calibration takes {list(RUN_KEYS)} as run arguments, got {sorted(unknown)}"
            )
        if model.__dict__.get("_fastattn_handle") is not None:
            raise ValueError(
                "fastattn is enabled on this model: disable it (handle.disable()) before calibrating, so "
                "calibration observes the model's own attention and leaves nothing of yours replaced"
            )
        self.model = model
        self.run_kwargs = dict(run_kwargs)
        cfg = model.cfg
        self.family = FAMILY
        self.fingerprint = ModelFingerprint(FAMILY, type(model).__name__, cfg.depth, cfg.heads, cfg.head_dim)
        self.num_layers, self.num_heads, self.head_dim = cfg.depth, cfg.heads, cfg.head_dim
        self.default_steps = DEFAULT_STEPS

    def normalize_prompts(self, prompts) -> list:
        """Labels or ``(label, seed)`` pairs, checked against the model's classes."""
        if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__iter__"):
            raise TypeError(
                f"testbed prompts are a list of class labels (ints) or (label, seed) pairs, got {prompts!r}"
            )
        out = []
        n = self.model.cfg.num_classes
        for p in prompts:
            label, seed = p if isinstance(p, (tuple, list)) and len(p) == 2 else (p, None)
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < n:
                raise ValueError(
                    f"testbed prompt {p!r}: a class label is an int in [0, {n}) (or a (label, seed) pair)"
                )
            if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
                raise ValueError(f"testbed prompt {p!r}: the seed of a (label, seed) pair is an int")
            out.append([label, seed])
        return out

    def enable(self, plan):
        handle = enable(self.model, plan=plan)
        handle.runtimes = [handle.runtime]
        return handle

    def describe_run(self) -> dict:
        kw = {k: v for k, v in self.run_kwargs.items() if k != "callback"}
        return kw

    @torch.no_grad()
    def run(self, prompt, steps: int, seed: int) -> torch.Tensor:
        """One sampling run; returns its final latents (model space, float32)."""
        label, own_seed = prompt
        _, latents = sample(self.model, [label], num_steps=steps, seed=own_seed if own_seed is not None else seed,
                            return_latents=True, **self.run_kwargs)  # fmt: skip
        return latents
