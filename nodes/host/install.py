"""Installing fastattn on a ``ModelPatcher.clone()`` (no ComfyUI module is patched), and finding it again.

- **Override.** :class:`AttentionOverride` goes into ``model_options["transformer_options"]
  ["optimized_attention_override"]``, stacked on the override already there: a call it declines goes to
  that previous override, else to the host's ``func``, with the caller's exact arguments. Newer cores may
  hand q/k/v as single-owner ``AttentionTensorContainer``s to ``override.container_function``: it decides
  on ``peek()``, ``take()``s what it serves and passes declined calls on untouched.
- **Bracket and runs.** An ``APPLY_MODEL`` wrapper (``add_wrapper_with_key``) and ``ON_PRE_RUN`` /
  ``ON_CLEANUP`` callbacks (``add_callback_with_key``), all under the key ``"fastattn"``.
- **Staying on top.** ``ON_PREPARE_STATE`` re-arms the override on top of the run's ``transformer_options``
  once per run where the core passes ``model_options`` (newer cores), so a node applied later cannot
  silently replace it.
- ``clone()`` deep-copies ``model_options``: the override (and its patch) copy as themselves, so every clone
  of a patched model shares one patch and one report.
- **Blocks.** With block caching in the plan, every transformer block gets a ``patches_replace`` entry
  (``blocks.py``) on the clone; installing again replaces ours and keeps other nodes' entries.
"""

from __future__ import annotations

from .blocks import install_block_patches, remove_block_patches
from .calls import HostCall
from .patch import FastAttentionPatch

OVERRIDE_KEY = "optimized_attention_override"
KEY = "fastattn"  # wrapper / callback key on the ModelPatcher
APPLY_MODEL, ON_PRE_RUN, ON_PREPARE_STATE, ON_CLEANUP = (
    "apply_model",
    "on_pre_run",
    "on_prepare_state",
    "on_cleanup",
)


class AttentionOverride:
    """The object installed as ``transformer_options["optimized_attention_override"]``.

    ``override(func, *args, **kwargs)``: ``args`` / ``kwargs`` are the caller's (``q, k, v, heads, mask=...,
    skip_reshape=..., transformer_options=...``); they reach ``previous`` / ``func`` unchanged.
    """

    def __init__(self, patch: FastAttentionPatch, previous=None):
        self.patch = patch
        self.previous = previous

    def __deepcopy__(self, memo):  # shared by clones (ModelPatcher.clone deep-copies model_options)
        return self

    def __copy__(self):
        return self

    def _host(self, func, args, kwargs):
        if self.previous is not None:
            return lambda: self.previous(func, *args, **kwargs)
        return lambda: func(*args, **kwargs)

    def __call__(self, func, *args, **kwargs):
        host = self._host(func, args, kwargs)
        return self.patch.handle(HostCall.parse(args, kwargs, host), host)

    def container_function(self, *args, **kwargs):
        """Newer cores' path for q/k/v in single-owner ``AttentionTensorContainer``s (no ``func`` given).

        The decision is made on ``peek()``; a served call ``take()``s the tensors (the host's attention for
        its dense steps then runs on them); a declined call passes the containers on untouched: to the
        previous override's container path, else to the host's default attention, which unwraps them."""
        default = self.patch.host_default_attention()

        def decline():
            prev = self.previous
            if prev is not None and hasattr(prev, "container_function"):
                return prev.container_function(*args, **kwargs)
            if prev is not None:
                return prev(default, *(c.take() for c in args[:3]), *args[3:], **kwargs)
            return default(*args, **kwargs)

        def claim() -> HostCall:
            tensors = tuple(c.take() for c in args[:3]) + tuple(args[3:])
            return HostCall.parse(tensors, kwargs, self._host(default, tensors, kwargs))

        peeked = tuple(c.peek() for c in args[:3]) + tuple(args[3:])
        return self.patch.handle(HostCall.parse(peeked, kwargs, decline), decline, claim)


class ForwardBracket:
    """The ``APPLY_MODEL`` wrapper: ``wrapper(executor, *args, **kwargs)``."""

    def __init__(self, patch: FastAttentionPatch):
        self.patch = patch

    def __call__(self, executor, *args, **kwargs):
        return self.patch.run_forward(executor, args, kwargs)


# ---------------------------------------------------------------------------------------------- install


def install_override(patch: FastAttentionPatch, transformer_options: dict, replace_ours: bool = False):
    """Put ``patch``'s override on top of ``transformer_options`` (idempotent); ``replace_ours`` first drops
    fastattn overrides already on top (re-applying the node replaces its earlier settings)."""
    current = transformer_options.get(OVERRIDE_KEY)
    node = current
    while isinstance(node, AttentionOverride):
        if node.patch is patch:
            return current  # already in the chain
        node = node.previous
    if replace_ours:
        while isinstance(current, AttentionOverride):
            current = current.previous
    override = AttentionOverride(patch, current)
    transformer_options[OVERRIDE_KEY] = override
    return override


def install(model, patch: FastAttentionPatch, diffusion_model=None) -> None:
    """Install ``patch`` on ``model`` (a ``ModelPatcher`` clone): override, bracket, run callbacks, and with
    block caching in the plan the block replacements (``diffusion_model``: the model whose blocks they are;
    default: ``model``'s)."""
    to = model.model_options.setdefault("transformer_options", {})
    remove_block_patches(model)
    if patch.runtime is not None and patch.plan.cache.blocks != "off":
        if diffusion_model is None:
            diffusion_model = model.get_model_object("diffusion_model")
        install_block_patches(model, patch, diffusion_model)
    for kind, remove in ((APPLY_MODEL, "remove_wrappers_with_key"),
                         *((c, "remove_callbacks_with_key") for c in (ON_PRE_RUN, ON_PREPARE_STATE, ON_CLEANUP))):  # fmt: skip
        getattr(model, remove)(kind, KEY)
    if patch.runtime is not None:
        install_override(patch, to, replace_ours=True)
    else:  # pass-through: no override of ours stays on top
        below = to.get(OVERRIDE_KEY)
        while isinstance(below, AttentionOverride):
            below = below.previous
        if below is None:
            to.pop(OVERRIDE_KEY, None)
        else:
            to[OVERRIDE_KEY] = below
    model.add_wrapper_with_key(APPLY_MODEL, KEY, ForwardBracket(patch))
    model.add_callback_with_key(ON_PRE_RUN, KEY, lambda *a, **k: patch.begin_run())
    model.add_callback_with_key(ON_CLEANUP, KEY, lambda *a, **k: patch.end_run())
    model.add_callback_with_key(ON_PREPARE_STATE, KEY, lambda *a, **k: _rearm(patch, a, k))


def _rearm(patch: FastAttentionPatch, args: tuple, kwargs: dict) -> None:
    """``ON_PREPARE_STATE(patcher, timestep[, model_options])``: back on top, once per run."""
    model_options = kwargs.get("model_options", args[2] if len(args) > 2 else None)
    if patch.runtime is None or not isinstance(model_options, dict) or patch.run is None or patch.run.rearmed:
        return
    patch.run.rearmed = True
    install_override(patch, model_options.setdefault("transformer_options", {}))


def find_patch(model) -> FastAttentionPatch | None:
    """The fastattn patch installed on ``model`` (a ModelPatcher), or None."""
    wrappers = getattr(model, "wrappers", None) or {}
    for w in wrappers.get(APPLY_MODEL, {}).get(KEY, []):
        if isinstance(w, ForwardBracket):
            return w.patch
    return None
