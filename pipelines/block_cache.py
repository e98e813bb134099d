"""Block caching on a diffusers transformer: a ``ModelHook`` on every transformer block, in diffusers' hook
registry, handing each block call to the runtime's block cache (:mod:`fastattn.caching.blocks`).

The transformer's context hook (``hooks.py``) starts every forward and makes it active for this thread
(``backend.ACTIVE``); the forward's state carries the block decisions. A block hook reads the block's
``hidden_states`` (and, for joint blocks, ``encoder_hidden_states``, the text stream the block updates),
and lets the policy run the block or skip it. Hooks are not stateful: the pipeline's ``cache_context``
reaches the context hook, which owns the step clock; the block cache's state lives in the runtime and is
reset with it (per pipeline call and on ``disable()``).

Block lists and output layouts per family (tuple outputs: which element is the image stream and which the
text stream; a tensor output is the image stream, and the block's ``encoder_hidden_states`` is then a
condition, not a stream: Wan and LTX cross-attention):

| family        | block lists                                        | tuple output              |
|---------------|----------------------------------------------------|---------------------------|
| flux, flux2   | transformer_blocks, single_transformer_blocks      | (encoder, hidden)         |
| hunyuan_video | transformer_blocks, single_transformer_blocks      | (hidden, encoder)         |
| sd3, qwen     | transformer_blocks                                 | (encoder, hidden)         |
| cogvideox     | transformer_blocks                                 | (hidden, encoder)         |
| wan, ltx      | blocks / transformer_blocks                        | tensor                    |
"""

from __future__ import annotations

import inspect

import torch
from diffusers.hooks import HookRegistry, ModelHook

from .backend import ACTIVE
from .hooks import install_hook

HOOK_NAME = "fastattn_block_cache"

BLOCK_LISTS = {
    "flux": ("transformer_blocks", "single_transformer_blocks"),
    "flux2": ("transformer_blocks", "single_transformer_blocks"),
    "hunyuan_video": ("transformer_blocks", "single_transformer_blocks"),
    "wan": ("blocks",),
    "qwen_image": ("transformer_blocks",),
    "sd3": ("transformer_blocks",),
    "cogvideox": ("transformer_blocks",),
    "ltx_video": ("transformer_blocks",),
}

# block class -> (index of the image stream, index of the text stream) in its tuple output
TUPLE_OUTPUTS = {
    "FluxTransformerBlock": (1, 0),
    "FluxSingleTransformerBlock": (1, 0),
    "Flux2TransformerBlock": (1, 0),
    "Flux2SingleTransformerBlock": (1, 0),
    "JointTransformerBlock": (1, 0),
    "QwenImageTransformerBlock": (1, 0),
    "HunyuanVideoTransformerBlock": (0, 1),
    "HunyuanVideoSingleTransformerBlock": (0, 1),
    "HunyuanVideoTokenReplaceTransformerBlock": (0, 1),
    "HunyuanVideoTokenReplaceSingleTransformerBlock": (0, 1),
    "CogVideoXBlock": (0, 1),
}


def _output_layout(block) -> tuple[int, int] | None:
    for cls in type(block).__mro__:
        if cls.__name__ in TUPLE_OUTPUTS:
            return TUPLE_OUTPUTS[cls.__name__]
    return None


class BlockCacheHook(ModelHook):
    """Routes one block's calls through the active forward's block decisions (plain call when none)."""

    def __init__(self, runtime, index: int, block):
        super().__init__()
        self.runtime = runtime
        self.index = index
        self.layout = _output_layout(block)
        self.params = [p for p in inspect.signature(type(block).forward).parameters if p != "self"]

    def _arg(self, name, args, kwargs):
        if name in kwargs:
            return kwargs[name]
        i = self.params.index(name) if name in self.params else -1
        return args[i] if 0 <= i < len(args) else None

    def new_forward(self, module, *args, **kwargs):
        active = ACTIVE.get()
        fwd = active[1].blocks if active is not None and active[0] is self.runtime else None
        if fwd is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        hidden = self._arg("hidden_states", args, kwargs)
        encoder = self._arg("encoder_hidden_states", args, kwargs) if self.layout is not None else None
        ran = {}  # what the block returned when it ran: a tensor, or a tuple of this length

        def compute():
            out = self.fn_ref.original_forward(*args, **kwargs)
            if isinstance(out, torch.Tensor):
                ran["tensor"] = True
                return out, None
            ran["len"] = len(out)
            h, e = self.layout if self.layout is not None else (0, None)
            return out[h], (out[e] if e is not None else None)

        out_h, out_e = fwd.block(self.index, hidden, encoder, compute)
        # A skipped block answers as the block would: a tensor where the block returns one (no text stream:
        # Wan, LTX, Flux2's single blocks without encoder_hidden_states), else the tuple in its order.
        if self.layout is None or ran.get("tensor") or (not ran and encoder is None):
            return out_h
        result = [None] * ran.get("len", 2)
        result[self.layout[0]], result[self.layout[1]] = out_h, out_e
        return tuple(result)


def block_lists(model, family: str) -> list[tuple[str, torch.nn.ModuleList]]:
    """``[(attribute, blocks)]`` of ``model`` in forward order; a clear error when the model lacks them."""
    names = BLOCK_LISTS.get(family)
    if names is None:
        raise ValueError(
            f"block caching does not know the blocks of {family!r} models; known: {sorted(BLOCK_LISTS)}"
        )
    found = [(n, getattr(model, n, None)) for n in names]
    found = [(n, b) for n, b in found if isinstance(b, torch.nn.ModuleList)]
    if not found or not sum(len(b) for _, b in found):
        raise ValueError(
            f"{type(model).__name__} has none of the block lists {list(names)}: cannot cache blocks"
        )
    return found


def install_block_cache(model, family: str, runtime, self_attention_paths) -> callable:
    """Hook every block of ``model`` into ``runtime``'s block cache; returns the function that removes the
    hooks and leaves no trace (``forward`` attributes and registries the model did not have are dropped)."""
    lists = block_lists(model, family)
    lengths, calls, blocks = [], [], []
    for name, mods in lists:
        lengths.append(len(mods))
        for i, block in enumerate(mods):
            prefix = f"{name}.{i}."
            calls.append(sum(1 for p in self_attention_paths if p.startswith(prefix)))
            blocks.append(block)
    runtime.cache.blocks.set_blocks(lengths, calls)
    removers = []
    try:
        for index, block in enumerate(blocks):
            removers.append(install_hook(block, BlockCacheHook(runtime, index, block), HOOK_NAME))
    except Exception:
        for r in removers:
            r()
        raise
    HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()

    def remove():
        for r in removers:
            r()
        reg = model.__dict__.get("_diffusers_hook")
        if reg is not None:
            reg.invalidate_child_registries_cache()

    return remove
