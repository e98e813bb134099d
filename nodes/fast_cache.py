"""The Fast Attention Cache node's logic (MODEL -> MODEL) as a plain function: testable without ComfyUI, called
by the thin V3 class in ``comfy_nodes.py``.

:func:`apply_fast_cache` adds caching across steps and CFG branches to a model: block skipping (a
calibration-free trigger on the first block, or the Delta-DiT schedule), attention output sharing across
steps (AST) and across the CFG branches (ASC), within a memory budget. On a model a Fast Attention node
already patched, the cache joins that node's plan (sparse attention and caching in one plan, one report);
on any other supported model the plan's attention is the model's own (exact) and only the cache acts. The
input model is never changed: everything goes on a ``clone()``.
"""

from __future__ import annotations

from ..caching import CACHE_PRESETS, STORAGES, CacheConfig
from ..plans.schema import AttentionPlan
from .fast_attention import NodeError, diffusion_model_of
from .host.blocks import block_lists
from .host.families import detect_family
from .host.install import find_patch, install
from .host.patch import FastAttentionPatch
from .host.schedule import SCHEDULES

PRESETS = ("balanced", "safe", "fast", "delta", "custom", "off")
BLOCK_MODES = ("auto", "delta", "fixed", "off")
# The extrapolate widget: the CacheConfig order each choice sets (None: the preset's own).
EXTRAPOLATE = {"preset": None, "off": 0, "first-order": 1}


def cache_config(preset: str = "balanced", blocks: str = "auto", threshold: float = 0.1, max_skips: int = 2,
                 first_steps: float = 0.1, last_steps: int = 1, attn_share_interval: int = 0,
                 cfg_share: bool = False, *, extrapolate: str = "preset") -> CacheConfig:  # fmt: skip
    """The node's cache config: a preset, or (``"custom"``) the block mode and trigger widgets; the attention
    sharing widgets apply on top of either, and ``extrapolate`` (:data:`EXTRAPOLATE`) sets what a skipped
    block range adds back: ``"preset"`` the preset's own order (``custom``: first order, as the block presets)."""
    if preset not in PRESETS:
        raise NodeError(f"unknown cache preset {preset!r}; choose one of {list(PRESETS)}")
    if extrapolate not in EXTRAPOLATE:
        raise NodeError(f"unknown extrapolate {extrapolate!r}; choose one of {list(EXTRAPOLATE)}")
    try:
        if preset == "custom":
            if blocks not in BLOCK_MODES:
                raise NodeError(f"unknown block mode {blocks!r}; choose one of {list(BLOCK_MODES)}")
            fields = dict(blocks=blocks, threshold=threshold, max_skips=max_skips, first_steps=float(first_steps),
                          last_steps=int(last_steps), order=1)  # fmt: skip
            base = CacheConfig.from_value(fields)
        else:
            base = CACHE_PRESETS[preset]
        order = base.order if EXTRAPOLATE[extrapolate] is None else EXTRAPOLATE[extrapolate]
        shared = {"attn_share_interval": int(attn_share_interval), "cfg_share": bool(cfg_share)}
        return CacheConfig.from_value({**base.to_dict(), "order": order, **shared})
    except NodeError:
        raise
    except (TypeError, ValueError) as e:
        raise NodeError(str(e)) from None


def apply_fast_cache(model, preset: str = "balanced", blocks: str = "auto", threshold: float = 0.1,
                     max_skips: int = 2, first_steps: float = 0.1, last_steps: int = 1, attn_share_interval: int = 0,
                     cfg_share: bool = False, cache_budget_gb: float = 0.0, cache_storage: str = "auto",
                     cache_offload: bool = False, *, extrapolate: str = "preset", book=SCHEDULES, sparse_fn=None,
                     default_attention=None):  # fmt: skip
    """A ``clone()`` of ``model`` with caching (node *Fast Attention Cache*). ``cache_budget_gb`` 0: unbounded."""
    cfg = cache_config(preset, blocks, threshold, max_skips, first_steps, last_steps, attn_share_interval, cfg_share,
                       extrapolate=extrapolate)  # fmt: skip
    if cache_storage not in STORAGES:
        raise NodeError(f"unknown cache_storage {cache_storage!r}; choose one of {list(STORAGES)}")
    if (
        isinstance(cache_budget_gb, bool)
        or not isinstance(cache_budget_gb, (int, float))
        or cache_budget_gb < 0
    ):
        raise NodeError(
            f"cache_budget_gb must be a number of GiB >= 0 (0: unbounded), got {cache_budget_gb!r}"
        )
    dm = diffusion_model_of(model)
    family, reason = detect_family(dm)
    existing = find_patch(model)
    settings = dict(existing.settings) if existing is not None else {}
    settings.update(cache=preset if preset != "custom" else cfg.describe(), cache_budget_gb=cache_budget_gb or "none",
                    cache_storage=cache_storage, extrapolate=extrapolate)  # fmt: skip
    if family is None:
        patch = FastAttentionPatch(None, settings=settings, reason=reason, book=book)
    else:
        if cfg.blocks != "off":
            try:
                block_lists(dm, family.family)
            except ValueError as e:
                raise NodeError(str(e)) from None
        base = existing.plan if existing is not None and existing.plan is not None else AttentionPlan()
        plan = base.replace(cache=cfg, cache_budget_gb=float(cache_budget_gb) or None, cache_storage=cache_storage,
                            cache_offload=bool(cache_offload))  # fmt: skip
        window = (existing.sigma_start, existing.sigma_end) if existing is not None else (None, None)
        patch = FastAttentionPatch(family, plan, sigma_start=window[0], sigma_end=window[1], settings=settings,
                                   book=book, sparse_fn=sparse_fn or _kept(existing, "sparse_fn"),
                                   default_attention=default_attention or _kept(existing, "default_attention"))  # fmt: skip
    patched = model.clone()
    install(patched, patch, dm)
    return patched


def _kept(existing, name: str):
    """What the Fast Attention node below set up (its kernel, the host's default attention), or None."""
    if existing is None:
        return None
    if name == "sparse_fn":
        return existing.runtime.sparse_fn if existing.runtime is not None else None
    return existing.default_attention
