"""Block caching on the testbed: every :class:`~fastattn.testbed.TestbedDiT` block call goes through the runtime's
block cache (:mod:`fastattn.caching.blocks`).

The testbed's counterpart of ``pipelines/block_cache.py`` (diffusers hooks) and ``nodes/host/blocks.py`` (ComfyUI
block replacement): the policy (which forwards skip, what is captured, the memory budget) stays in
``fastattn.caching``; this file only tells it where the blocks are and hands it each block call.

The testbed's blocks are plain modules called as ``block(x, mod, cos, sin, ctx)`` on one stream ``x [B, S, dim]``
(no text tokens: the class and timestep condition through ``mod``) and return the new ``x``. Each block gets a
:class:`BlockCall` as its ``forward`` (an instance attribute: the class and other models are untouched); during a
forward of the handle it routes the call through that forward's block decisions, otherwise it runs the block.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


class BlockCall:
    """Block ``index``'s forward while block caching is on: run by the policy of the forward in flight.

    Args:
        index: the block's position in ``model.blocks``.
        run: the forward it replaces (the block's own, or a wrapper someone installed before).
        current: returns the handle's :class:`~fastattn.attention.context.ForwardState` (None between forwards).
    """

    def __init__(self, index: int, run: Callable, current: Callable):
        self.index = index
        self.run = run
        self.current = current

    def __call__(self, *args, **kwargs):
        state = self.current()
        decisions = state.blocks if state is not None else None
        if decisions is None:  # caching off for this forward, or called outside the handle's forwards
            return self.run(*args, **kwargs)
        x = args[0] if args else kwargs["x"]
        out, _ = decisions.block(self.index, x, None, lambda: (self.run(*args, **kwargs), None))
        return out


def install_block_cache(model: nn.Module, runtime, current: Callable) -> Callable[[], None]:
    """Route every block of ``model`` (a TestbedDiT) through ``runtime``'s block cache; ``current()`` returns the
    forward state the handle holds. Returns the function that takes the wrappers off and leaves no trace."""
    blocks = list(model.blocks)
    if not blocks:
        raise ValueError("the model has no blocks: nothing to cache")
    runtime.cache.blocks.set_blocks([len(blocks)])  # one list, one self-attention call per block
    saved = [blk.__dict__.get("forward") for blk in blocks]
    wrappers = []
    for i, blk in enumerate(blocks):
        wrappers.append(BlockCall(i, blk.forward, current))
        blk.forward = wrappers[-1]

    def remove():
        for blk, old, ours in zip(blocks, saved, wrappers):
            if blk.__dict__.get("forward") is not ours:
                # Something wrapped the block after us: it keeps calling ours, which runs the block unchanged
                # once the handle has no forward in flight (current() is None after disable).
                continue
            if old is None:
                del blk.__dict__["forward"]
            else:
                blk.forward = old

    return remove
