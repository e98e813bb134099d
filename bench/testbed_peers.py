"""diffusers' own caches on the testbed DiT: ``FirstBlockCache``, ``MagCache``, ``TaylorSeer``, ``FasterCache`` and
``PyramidAttentionBroadcast`` as diffusers ships them (their ``apply_*`` functions and hooks, unchanged), made to
see the testbed from the bench side only (nothing in ``fastattn.testbed`` knows diffusers).

What a diffusers transformer has and the testbed lacks, added for a run and taken off by :meth:`PeerCache.remove`:

- **Block metadata** (FirstBlockCache, MagCache read the block's hidden states and output layout from diffusers'
  ``TransformerBlockRegistry``): the testbed's ``Block`` is registered there. It returns the hidden states as a
  tensor (no text stream) and names them ``x``: MagCache reads the name from ``hidden_states_argument_name``;
  FirstBlockCache asks for ``"hidden_states"`` by that literal name, so the metadata maps it to ``x``.
- **Attention classes** (FasterCache and PyramidAttentionBroadcast hook only instances of diffusers' attention
  classes, ``isinstance(m, AttentionModuleMixin)``): for the run each block's ``SelfAttention`` gets a subclass
  that adds the mixin and nothing else (the testbed's own forward is what runs and what is cached).
- **The cache context**: a pipeline wraps each denoiser call in ``transformer.cache_context("cond", ...)``; a
  forward pre-hook on the model sets the same ``CacheContext`` from the sampler's step arguments (through
  ``diffusers.hooks.hooks._set_cache_context``, what ``cache_context`` calls) and a forward hook clears it.
  :meth:`PeerCache.reset` after each generation resets the stateful hooks, as a pipeline's
  ``maybe_free_model_hooks`` does.
- **A timestep clock** for FasterCache's and PAB's ``current_timestep_callback``: diffusers' timestep scale,
  ``1000 * t`` of the testbed's flow time ``t`` (1 = noise).

TaylorSeer needs none of it: its default patterns (``^blocks.*attn``) match the testbed's attention modules.
"""

from __future__ import annotations

import ast
import contextlib
import io

import torch

PEERS = ("FirstBlockCache", "MagCache", "TaylorSeer", "FasterCache", "PyramidAttentionBroadcast")
NEEDS_ATTENTION_CLASS = ("FasterCache", "PyramidAttentionBroadcast")
_MIXED: dict[type, type] = {}


def _spec(name: str):
    """``(config class, apply function, hook names)`` of diffusers' cache ``name``."""
    import diffusers.hooks as dh
    from diffusers.hooks import (
        faster_cache,
        first_block_cache,
        mag_cache,
        pyramid_attention_broadcast,
        taylorseer_cache,
    )

    specs = {
        "FirstBlockCache": (dh.FirstBlockCacheConfig, dh.apply_first_block_cache,
                            (first_block_cache._FBC_LEADER_BLOCK_HOOK, first_block_cache._FBC_BLOCK_HOOK)),
        "MagCache": (dh.MagCacheConfig, dh.apply_mag_cache,
                     (mag_cache._MAG_CACHE_LEADER_BLOCK_HOOK, mag_cache._MAG_CACHE_BLOCK_HOOK)),
        "TaylorSeer": (dh.TaylorSeerCacheConfig, dh.apply_taylorseer_cache, (taylorseer_cache._TAYLORSEER_CACHE_HOOK,)),
        "FasterCache": (dh.FasterCacheConfig, dh.apply_faster_cache,
                        (faster_cache._FASTER_CACHE_DENOISER_HOOK, faster_cache._FASTER_CACHE_BLOCK_HOOK)),
        "PyramidAttentionBroadcast": (dh.PyramidAttentionBroadcastConfig, dh.apply_pyramid_attention_broadcast,
                                      (pyramid_attention_broadcast._PYRAMID_ATTENTION_BROADCAST_HOOK,)),
    }  # fmt: skip
    if name not in specs:
        raise ValueError(f"unknown diffusers cache {name!r}; known: {list(PEERS)}")
    return specs[name]


def register_testbed_block() -> None:
    """The testbed's ``Block`` in diffusers' ``TransformerBlockRegistry`` (idempotent; only fastattn's own class)."""
    from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
    from fastattn.testbed.model import Block

    class TestbedBlockMetadata(TransformerBlockMetadata):
        # FirstBlockCache asks for "hidden_states" by that name; the testbed's block calls the argument ``x``.
        def _get_parameter_from_args_kwargs(self, identifier, args=(), kwargs=None):
            name = self.hidden_states_argument_name if identifier == "hidden_states" else identifier
            return super()._get_parameter_from_args_kwargs(name, args, kwargs)

    TransformerBlockRegistry.register(
        Block,
        TestbedBlockMetadata(
            return_hidden_states_index=0,
            return_encoder_hidden_states_index=None,
            hidden_states_argument_name="x",
        ),
    )


def _with_attention_mixin(cls: type) -> type:
    """``cls`` plus diffusers' ``AttentionModuleMixin`` (the testbed's methods first in the MRO)."""
    from diffusers.models.attention import AttentionModuleMixin

    if cls not in _MIXED:
        doc = f"{cls.__name__} seen as a diffusers attention module (bench only)."
        _MIXED[cls] = type(
            cls.__name__, (cls, AttentionModuleMixin), {"__doc__": doc, "__module__": __name__}
        )
    return _MIXED[cls]


class PeerCache:
    """One of diffusers' caches applied to a testbed model.

    Args:
        model: a :class:`~fastattn.testbed.TestbedDiT`, called by the testbed sampler (which passes
            ``step_index``, ``num_steps`` and ``timestep``).
        name: one of :data:`PEERS`.
        settings: the fields of its diffusers config; ``current_timestep_callback`` defaults to this object's
            clock (FasterCache, PyramidAttentionBroadcast).
    """

    def __init__(self, model: torch.nn.Module, name: str, **settings):
        from diffusers.hooks import HookRegistry

        config_cls, apply, self.hook_names = _spec(name)
        self.model, self.name = model, name
        self.timestep = 1000.0
        if name in NEEDS_ATTENTION_CLASS:
            settings.setdefault("current_timestep_callback", lambda: self.timestep)
        self.config = config_cls(**settings)
        if name == "FasterCache" and self.config.spatial_attention_timestep_skip_range[1] > 1000.0:
            # diffusers 0.42 skips the first call in range before anything is cached, and fails on it
            raise ValueError("FasterCache: spatial_attention_timestep_skip_range must leave out the first step "
                             f"(timestep 1000), got {self.config.spatial_attention_timestep_skip_range}")  # fmt: skip
        # what each module had before, so remove() leaves no trace
        self._before = {
            id(m): ("_diffusers_hook" in m.__dict__, "forward" in m.__dict__) for m in model.modules()
        }
        self._classes = []
        self._hooks = []
        try:
            register_testbed_block()
            if name in NEEDS_ATTENTION_CLASS:
                for blk in model.blocks:
                    self._classes.append((blk.attn, type(blk.attn)))
                    blk.attn.__class__ = _with_attention_mixin(type(blk.attn))
            apply(model, self.config)
            # hooks were registered below the model after any registry walk: context updates must reach them
            HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()
            self._hooks = [
                model.register_forward_pre_hook(self._begin, with_kwargs=True),
                model.register_forward_hook(self._end, always_call=True),
            ]
        except Exception:
            self.remove()
            raise

    # ------------------------------------------------------------------ the pipeline's part
    def _begin(self, module, args, kwargs):
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        t = kwargs.get("timestep")
        if t is None:  # the sampler passes it; else the flow time of the first batch element
            t = args[1] if len(args) > 1 else kwargs["t"]
            t = float(torch.as_tensor(t).reshape(-1)[0])
        self.timestep = 1000.0 * float(t)
        ctx = CacheContext("cond", step_index=kwargs.get("step_index"), num_inference_steps=kwargs.get("num_steps"),
                           timestep=self.timestep, sigma=float(t))  # fmt: skip
        _set_cache_context(module, ctx)

    def _end(self, module, args, output):
        from diffusers.hooks.hooks import _set_cache_context

        _set_cache_context(module, None)

    def reset(self) -> None:
        """A generation ended: reset the stateful hooks (what a pipeline's ``maybe_free_model_hooks`` does)."""
        from diffusers.hooks import HookRegistry

        HookRegistry.check_if_exists_or_initialize(self.model).reset_stateful_hooks(recurse=True)

    def remove(self) -> None:
        """Take every hook, class and registry this cache added off the model."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        root = self.model.__dict__.get("_diffusers_hook")
        if root is not None:
            for hook in self.hook_names:
                root.remove_hook(hook, recurse=True)
        for attn, cls in self._classes:
            attn.__class__ = cls
        self._classes = []
        for m in self.model.modules():
            had_registry, had_forward = self._before.get(id(m), (False, False))
            reg = m.__dict__.get("_diffusers_hook")
            if reg is None or had_registry or reg.hooks:
                continue
            del m.__dict__["_diffusers_hook"]
            if not had_forward:
                m.__dict__.pop("forward", None)
        root = self.model.__dict__.get("_diffusers_hook")
        if root is not None:
            root.invalidate_child_registries_cache()


def calibrate_mag_ratios(model: torch.nn.Module, generate, num_steps: int, runs: int = 1) -> list[float]:
    """MagCache's own calibration (``MagCacheConfig(calibrate=True)``) on the testbed: ``generate()`` runs one
    ``num_steps``-step generation; the ratios MagCache prints at the end of each are read back and averaged."""
    ratios = []
    peer = PeerCache(model, "MagCache", calibrate=True, num_inference_steps=num_steps)
    try:
        for _ in range(runs):
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                generate()
            peer.reset()
            ratios.append(_printed_ratios(buf.getvalue(), num_steps))
    finally:
        peer.remove()
    return [sum(r[i] for r in ratios) / len(ratios) for i in range(num_steps)]


def _printed_ratios(text: str, num_steps: int) -> list[float]:
    """The list MagCache prints after ``Calibration Complete`` (its documented way to hand the ratios over)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if "Calibration Complete" in line:
            for rest in lines[i + 1 :]:
                if rest.strip().startswith("["):
                    values = [float(v) for v in ast.literal_eval(rest.strip())]
                    if len(values) != num_steps:
                        raise ValueError(
                            f"MagCache calibration printed {len(values)} ratios for {num_steps} steps"
                        )
                    return values
    raise ValueError(f"MagCache calibration printed no ratios (got {text[:200]!r})")
