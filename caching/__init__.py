"""Caching across denoising steps and CFG branches, host-neutral: what to cache (:class:`CacheConfig`, the plan's
``cache`` field), where cached tensors live within a memory budget (:class:`CacheStore`), block skipping
(:class:`BlockCache`) and attention output sharing (:class:`AttentionCache`).

The runtime owns one :class:`RuntimeCache` per transformer; adapters feed block calls to the
:class:`BlockForward` the runtime hands them with each forward. Nothing here imports a host, the runtime or
the plans package.
"""

from __future__ import annotations

from .attention import AttentionCache
from .blocks import BlockCache, BlockForward, BlockStats
from .config import BLOCK_MODES, CACHE_PRESETS, CacheConfig, steps_for
from .store import GIB, STORAGES, CacheStore


class RuntimeCache:
    """Everything one runtime caches: the store and the policies the config turns on.

    Args:
        config: the plan's cache config.
        num_layers: self-attention layers per forward.
        budget_gb, storage, offload: the plan's ``cache_budget_gb`` / ``cache_storage`` / ``cache_offload``.
    """

    def __init__(self, config: CacheConfig, num_layers: int | None = None, budget_gb: float | None = None,
                 storage: str = "auto", offload: bool = False):  # fmt: skip
        self.config = config
        budget = None if budget_gb is None else int(budget_gb * GIB)
        self.store = CacheStore(budget, storage, offload)
        self.blocks = BlockCache(config, self.store)
        self.attention = AttentionCache(config, self.store, num_layers) if config.attention_enabled else None

    def begin_run(self) -> None:
        """A run starts: its block schedule replaces the last run's (kept readable until then)."""
        self.blocks.stats.schedule.clear()

    def reset_run(self) -> None:
        """Free every cached tensor (a run ended or starts; on disable)."""
        self.blocks.reset_run()
        if self.attention is not None:
            self.attention.reset_run()
        self.store.clear()

    def end_run(self, branch: int) -> None:
        """The last step of a run is done for CFG branch ``branch``: free what it kept for later steps. An ASC
        output it stored stays for the other pass of the same step; one it took from that pass goes."""
        for key in self.store.keys():
            kind = key[0]
            if kind in ("blocks", "probe", "ast") and key[1 if kind != "ast" else 2] == branch:
                self.store.drop(key)
            elif kind == "asc" and self.store.tag(key)[2] != branch:
                self.store.drop(key)

    def reset_stats(self) -> None:
        self.store.reset_stats()
        self.blocks.stats = BlockStats()
        if self.attention is not None:
            self.attention.reset_stats()

    def as_dict(self) -> dict:
        out = {"config": self.config.describe(), "memory": self.store.as_dict()}
        if self.config.blocks != "off":
            out["blocks"] = self.blocks.as_dict()
        if self.attention is not None:
            out["attention"] = self.attention.as_dict()
        return out


__all__ = [
    "BLOCK_MODES", "CACHE_PRESETS", "GIB", "STORAGES", "AttentionCache", "BlockCache", "BlockForward",
    "BlockStats", "CacheConfig", "CacheStore", "RuntimeCache", "steps_for",
]  # fmt: skip
