"""Where an attention call is: layer, denoising step, CFG branch and token layout.

The runtime sees only tensors; the adapters (``pipelines/``) fill a :class:`ForwardState` once per
transformer forward and the runtime derives one :class:`AttentionContext` per attention call from it. Step
and branch tracking live in :class:`StepTracker`, which follows the timestep the model receives, so it
works for every pipeline (batched CFG, CFG as two passes, no CFG) without the pipeline's cooperation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..masks.layout import TokenLayout


@dataclass(frozen=True)
class AttentionContext:
    """Identity of one self-attention call.

    Args:
        layer: index of the self-attention call within this transformer forward (0-based, in call order;
            cross-attention calls are not counted).
        step: denoising step index within the current pipeline call (0-based).
        num_steps: total denoising steps when known (from the pipeline's scheduler), else ``None``.
        cfg_branch: transformer pass within the step: 0 for the first pass (conditional in diffusers'
            pipelines), 1 for the second (unconditional when CFG runs as two passes). Batched CFG is one
            pass, branch 0, with both branches in the batch.
        layout: token layout of this call (text position, latent grid).
        timestep: the timestep value the transformer received (first batch element), if any.
    """

    layer: int
    step: int
    num_steps: int | None
    cfg_branch: int
    layout: TokenLayout
    timestep: float | None = None

    @property
    def progress(self) -> float | None:
        """Fraction of the denoising run done before this step, in ``[0, 1)``; ``None`` if unknown."""
        if not self.num_steps:
            return None
        return self.step / self.num_steps


@dataclass
class ForwardState:
    """What one transformer forward tells the runtime (set by the adapter's root hook)."""

    layout: TokenLayout | None
    step: int
    num_steps: int | None
    cfg_branch: int
    timestep: float | None
    layer_counter: int = 0


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
