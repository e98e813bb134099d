"""Where an attention call is: denoising step, CFG branch, noise level and token layout.

Adapters hand the runtime a :class:`ForwardContext` at the start of every transformer forward (read from
the host: diffusers' cache context, ComfyUI's ``transformer_options``, the testbed sampler's arguments) and
get a :class:`ForwardState` back that they pass with every attention call of that forward.
:class:`StepTracker` is the fallback for hosts that say nothing: it derives (step, branch) from the
timesteps the model receives.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..masks.layout import TokenLayout


@dataclass(frozen=True)
class ForwardContext:
    """Where one transformer forward is, as the host adapter says (the runtime never guesses it).

    Args:
        layout: token layout of the joint self-attention sequence (text position, latent grid), or None
            when the adapter cannot tell (every call then runs dense, counted).
        step: denoising step index within the current run (0-based).
        num_steps: total denoising steps when known, else ``None``.
        cfg_branch: 0 for the conditional pass (or batched CFG / no CFG), 1 for the unconditional pass when
            CFG runs as two passes.
        sigma: the noise level of the step when the host knows it (diffusers' cache context, ComfyUI's
            ``transformer_options["sigmas"]``).
        timestep: the timestep value the transformer received (first batch element), if any.
        cfg_chunks: with batched CFG, the branch of each equal batch chunk (0 positive, 1 negative; ComfyUI's
            ``cond_or_uncond``); ``None`` when the forward holds one conditioning (or the host cannot tell).
        one_key_mask: the host gives every self-attention call of this forward the same key-padding mask
            values, possibly as a new tensor per call (Qwen-Image's processor builds one per layer). The
            runtime then reads the values of the first one only and compares the others with it on the device,
            reading that comparison once, at the end of the forward (a forward whose masks differed raises).
    """

    layout: TokenLayout | None
    step: int = 0
    num_steps: int | None = None
    cfg_branch: int = 0
    sigma: float | None = None
    timestep: float | None = None
    cfg_chunks: tuple[int, ...] | None = None
    one_key_mask: bool = False

    @property
    def progress(self) -> float | None:
        """Fraction of the denoising run done before this step, in ``[0, 1)``; ``None`` if unknown."""
        if not self.num_steps:
            return None
        return self.step / self.num_steps


@dataclass
class ForwardState:
    """Per-forward bookkeeping of one runtime: the context and the self-attention calls served so far.

    One per transformer forward, owned by whoever runs that forward (a thread, a ComfyUI sampling call), so
    two forwards of different models, or of one model in two threads, never share a layer counter.
    """

    ctx: ForwardContext
    layer_counter: int = 0
    blocks: object = None  # the forward's block-cache decisions (fastattn.caching.BlockForward) or None
    # What the runtime read from this forward's attention masks, kept for the forward's other calls: hosts
    # pass every self-attention call of a forward the same mask tensor (runtime._once).
    masks: dict = field(default_factory=dict)
    key_masks_differ: object = None  # one_key_mask: bool tensor on the device, a mask differed from the first


@dataclass
class StepTracker:
    """Derives (step, branch) from the sequence of timesteps the transformer receives.

    Within one pipeline call diffusers' schedulers hand the transformer non-increasing timesteps. So: the
    same timestep again is the next CFG pass of the same step; a smaller one is the next step; a larger one
    (or an explicit :meth:`reset`, done at the end of every pipeline call) starts a new run.
    """

    last_timestep: float | None = None
    step: int = 0
    branch: int = 0
    runs: int = 0
    history: list = field(default_factory=list)

    def reset(self) -> None:
        self.last_timestep = None
        self.step = 0
        self.branch = 0
        self.history.clear()

    def advance(self, timestep: float | None) -> tuple[int, int]:
        if timestep is None:
            # No timestep (unusual): every forward counts as one step of one run.
            self.step = self.step + 1 if self.history else 0
            self.branch = 0
            self.history.append((self.step, self.branch))
            return self.step, self.branch
        if self.last_timestep is None or timestep > self.last_timestep:
            self.runs += 1
            self.step, self.branch = 0, 0
        elif timestep == self.last_timestep:
            self.branch += 1
        else:
            self.step += 1
            self.branch = 0
        self.last_timestep = timestep
        self.history.append((self.step, self.branch))
        if len(self.history) > 64:
            del self.history[:32]
        return self.step, self.branch
