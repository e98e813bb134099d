"""Block caching inside ComfyUI: every transformer block of the model goes through the runtime's block cache,
by ComfyUI's documented block replacement (``transformer_options["patches_replace"]["dit"][(kind, i)]``).

ComfyUI's diffusion models look up ``("double_block", i)`` / ``("single_block", i)`` before running block ``i``
and, when an entry is there, call ``entry(args, {"original_block": run})`` instead: ``args`` holds the block's
inputs (``"img"``, ``"txt"``, ...) and ``run(args)`` returns the block's outputs as a dict (``{"img", "txt"}`` for
blocks that update the text stream, ``{"img"}`` otherwise). :class:`BlockPatch` hands that call to the block
decisions of the forward in flight (the ``APPLY_MODEL`` bracket started it), which run the block or skip it.

An entry another node put there first stays in charge of running the block: ours calls it in place of
``original_block``. Entries are installed on the clone's ``model_options`` only and copy as themselves
(clones share the patch).

| family        | block lists (kind)                                 | text stream updated by         |
|---------------|----------------------------------------------------|--------------------------------|
| flux          | double_blocks (double_block), single_blocks (single_block) | double blocks          |
| hunyuan_video | double_blocks (double_block), single_blocks (single_block) | double blocks          |
| qwen_image    | transformer_blocks (double_block)                  | every block                    |
| sd3           | joint_blocks (double_block)                        | every block                    |
| wan, ltx_video| blocks / transformer_blocks (double_block)         | none (text is a condition)     |
"""

from __future__ import annotations

# family -> [(diffusion model attribute, patches_replace kind, the block updates "txt")]
BLOCK_LISTS = {
    "flux": [("double_blocks", "double_block", True), ("single_blocks", "single_block", False)],
    "hunyuan_video": [("double_blocks", "double_block", True), ("single_blocks", "single_block", False)],
    "qwen_image": [("transformer_blocks", "double_block", True)],
    "sd3": [("joint_blocks", "double_block", True)],
    "wan": [("blocks", "double_block", False)],
    "ltx_video": [("transformer_blocks", "double_block", False)],
}
REPLACE, DIT = "patches_replace", "dit"


class BlockPatch:
    """One block's ``patches_replace`` entry: ``entry(args, {"original_block": run}) -> outputs``."""

    def __init__(self, patch, index: int, text_stream: bool, previous=None):
        self.patch = patch
        self.index = index
        self.text_stream = text_stream
        self.previous = previous  # another node's entry for this block: it runs the block

    def __deepcopy__(self, memo):  # ModelPatcher.clone deep-copies model_options: clones share the patch
        return self

    def __copy__(self):
        return self

    def _run(self, args, extra):
        if self.previous is not None:
            return self.previous(args, extra)
        return extra["original_block"](args)

    def __call__(self, args, extra):
        fwd = self.patch.current_forward()
        blocks = fwd.state.blocks if fwd is not None else None
        if blocks is None:
            return self._run(args, extra)
        keys = {}

        def compute():
            out = self._run(args, extra)
            keys.update(out)
            return out["img"], (out.get("txt") if self.text_stream else None)

        encoder = args.get("txt") if self.text_stream else None
        img, txt = blocks.block(self.index, args["img"], encoder, compute)
        out = dict(keys)  # a block that ran: its own outputs (with the cached policy's values in place)
        out["img"] = img
        if self.text_stream:
            out["txt"] = txt
        return out


def block_lists(diffusion_model, family: str) -> list[tuple[str, str, bool, int]]:
    """``[(attribute, kind, updates text, length)]`` of the model's block lists; a clear error when absent."""
    if family not in BLOCK_LISTS:
        raise ValueError(
            f"block caching does not know the blocks of {family!r} models; known: {sorted(BLOCK_LISTS)}"
        )
    out = []
    for attr, kind, text in BLOCK_LISTS[family]:
        blocks = getattr(diffusion_model, attr, None)
        if blocks is not None and len(blocks):
            out.append((attr, kind, text, len(blocks)))
    if not out:
        names = [a for a, _, _ in BLOCK_LISTS[family]]
        raise ValueError(
            f"{type(diffusion_model).__name__} has none of the block lists {names}: cannot cache blocks"
        )
    return out


def attention_calls(diffusion_model, family: str, attr: str, i: int) -> int:
    """Self-attention calls of block ``i`` of ``attr`` (SD3.5's dual-attention blocks make two)."""
    if family == "sd3":
        x_block = getattr(diffusion_model.joint_blocks[i], "x_block", None)
        return 1 + bool(getattr(x_block, "x_block_self_attn", False))
    return 1


def install_block_patches(model, patch, diffusion_model) -> None:
    """Route every block of ``diffusion_model`` through ``patch``'s block cache, on ``model`` (a clone)."""
    family = patch.family.family
    lists = block_lists(diffusion_model, family)
    calls = [attention_calls(diffusion_model, family, attr, i) for attr, _, _, n in lists for i in range(n)]
    patch.runtime.cache.blocks.set_blocks([n for *_, n in lists], calls)
    to = model.model_options.setdefault("transformer_options", {})
    replace = dict(to.get(REPLACE) or {})  # copied, never mutated in place: other clones may share them
    dit = dict(replace.get(DIT) or {})
    index = 0
    for _, kind, text, n in lists:
        for i in range(n):
            previous = dit.get((kind, i))
            while isinstance(previous, BlockPatch):  # re-applying replaces our own entry
                previous = previous.previous
            dit[(kind, i)] = BlockPatch(patch, index, text, previous)
            index += 1
    replace[DIT] = dit
    to[REPLACE] = replace


def remove_block_patches(model) -> None:
    """Take fastattn's entries off ``model``'s block replacements (another node's entry below ours stays)."""
    to = model.model_options.get("transformer_options") or {}
    dit = (to.get(REPLACE) or {}).get(DIT)
    if not dit or not any(isinstance(v, BlockPatch) for v in dit.values()):
        return
    kept = {}
    for key, entry in dit.items():
        while isinstance(entry, BlockPatch):
            entry = entry.previous
        if entry is not None:
            kept[key] = entry
    replace = dict(to[REPLACE])
    if kept:
        replace[DIT] = kept
    else:
        replace.pop(DIT)
    to[REPLACE] = replace
