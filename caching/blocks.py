"""Block-level caching: skip a range of transformer blocks and add the residual that range last produced.

Host-neutral. The adapter (diffusers block hooks, ComfyUI ``patches_replace``) tells :class:`BlockCache` how
the model's blocks are grouped (:meth:`BlockCache.set_blocks`: one length per block list, e.g. Flux's 19
double and 38 single blocks), starts each transformer forward with :meth:`BlockCache.begin_forward` and
routes every block call through :meth:`BlockForward.block` with the block's hidden states, its text stream
(joint blocks; ``None`` where the block has none) and a function that runs the block.

A skipped range returns its input unchanged from every block but the last of each block list it covers,
which returns ``input + residual``, the residual being what that part of the range added the last time it
ran (captured per CFG branch on the steps that compute it). Each block list keeps its own residual, so
whatever the model does between lists (Flux in ComfyUI concatenates text and image) still happens.

Which forwards skip (``CacheConfig.blocks``): ``"auto"`` decides after the probe blocks from the accumulated
relative change of their residual; ``"delta"`` and ``"fixed"`` follow a schedule. A skip that cannot be served
(nothing captured yet, the capture refused over the memory budget, the input shape changed) runs the blocks
instead, counted with its reason.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .config import CacheConfig, steps_for
from .store import CacheStore

Range = tuple[int, int]


@dataclass
class BlockStats:
    """Counters of one runtime's block cache (reset with the runtime's stats)."""

    forwards: int = 0
    skipping_forwards: int = 0  # forwards that skipped at least one block
    blocks_run: int = 0
    blocks_skipped: int = 0
    extrapolated: int = 0  # skipping forwards whose residuals were extrapolated from the last two (order=1)
    recomputes: Counter = field(default_factory=Counter)  # wanted to skip, ran the blocks: why
    schedule: list = field(default_factory=list)  # (step, branch, blocks skipped) of the current run

    def as_dict(self) -> dict:
        total = self.blocks_run + self.blocks_skipped
        return {
            "forwards": self.forwards,
            "skipping_forwards": self.skipping_forwards,
            "blocks_run": self.blocks_run,
            "blocks_skipped": self.blocks_skipped,
            "block_work_skipped": self.blocks_skipped / total if total else 0.0,
            "extrapolated": self.extrapolated,
            "recomputes": dict(self.recomputes),
            "schedule": [list(s) for s in self.schedule],
        }


@dataclass
class _Branch:
    """What one CFG branch carries from step to step."""

    change: float = 0.0  # accumulated relative change of the probe residual since the last full compute
    skips: int = 0  # steps in a row whose blocks were skipped
    refused: bool = False  # the last capture did not fit the memory budget


class BlockCache:
    """Block skipping for one transformer, per CFG branch, across the steps of a run."""

    def __init__(self, config: CacheConfig, store: CacheStore):
        self.config = config
        self.store = store
        self.lengths: tuple[int, ...] = ()
        self.calls: tuple[int, ...] = ()  # self-attention calls of each block
        self.branches: dict[int, _Branch] = {}
        self.stats = BlockStats()

    def set_blocks(self, lengths, attention_calls=None) -> None:
        """Blocks per block list, in forward order (``(19, 38)`` for Flux; ``(30,)`` for Wan 1.3B), and the
        self-attention calls of each block over all lists (default one each): a skipped block's calls are
        passed to ``on_skip`` so the runtime's layer numbering stays aligned."""
        lengths = tuple(int(n) for n in lengths)
        if not lengths or any(n < 0 for n in lengths):
            raise ValueError(f"set_blocks takes the block count of each block list, got {lengths}")
        calls = tuple(int(c) for c in attention_calls) if attention_calls is not None else (1,) * sum(lengths)
        if len(calls) != sum(lengths):
            raise ValueError(f"attention_calls has {len(calls)} entries for {sum(lengths)} blocks")
        self.lengths, self.calls = lengths, calls

    @property
    def num_blocks(self) -> int:
        return sum(self.lengths)

    def reset_run(self) -> None:
        """A new run: the residuals of the last one describe other latents (the last run's schedule stays
        in the stats until the next run starts)."""
        self.branches.clear()
        for key in self.store.keys("blocks") + self.store.keys("probe"):
            self.store.drop(key)

    # ------------------------------------------------------------------ per forward
    def begin_forward(self, step: int, num_steps: int | None, branch: int,
                      on_skip: Callable[[int], None] | None = None) -> BlockForward | None:  # fmt: skip
        """The block decisions of one forward (None: caching off or no blocks known). ``on_skip(n)`` is told
        the self-attention calls of every skipped block."""
        cfg = self.config
        if cfg.blocks == "off" or self.num_blocks == 0:
            return None
        self.stats.forwards += 1
        state = self.branches.setdefault(branch, _Branch())
        now, later = self._range(step, num_steps), self._range(step + 1, num_steps)
        window, next_window = cfg.in_window(step, num_steps), cfg.in_window(step + 1, num_steps)
        first = steps_for(cfg.first_steps, num_steps)
        if cfg.blocks == "auto":
            skip = None if window else False  # decided after the probe blocks
        elif cfg.blocks == "fixed":
            j = step - first
            skip = window and int((j + 1) * cfg.skip_fraction) > int(j * cfg.skip_fraction)
        else:  # delta: every interval-th step of the window refreshes, the steps between skip
            skip = window and (step - first) % cfg.interval != 0
        if skip is False or now is None:
            state.change, state.skips = 0.0, 0
        capture = later if next_window and skip is not True else None
        return BlockForward(self, branch, state, step, now, capture, skip, on_skip)

    def _range(self, step: int, num_steps: int | None) -> Range | None:
        """The blocks a forward at ``step`` may skip (None: none)."""
        n, cfg = self.num_blocks, self.config
        if cfg.blocks in ("auto", "fixed"):
            probe = min(cfg.probe_blocks, self.lengths[0])
            return (probe, n) if probe < n else None
        span = max(1, round(cfg.span * n))
        early = not num_steps or step / num_steps < cfg.boundary
        return (n - span, n) if early else (0, span)

    def segment(self, index: int, rng: Range) -> tuple[int, int, int]:
        """``(block list, first, last)`` of the part of ``rng`` in the block list holding ``index``."""
        start = 0
        for s, n in enumerate(self.lengths):
            if index < start + n:
                return s, max(rng[0], start), min(rng[1], start + n) - 1
            start += n
        raise IndexError(f"block {index} is outside the model's {self.num_blocks} blocks")

    def key(self, branch: int, rng: Range, seg: int, part: str) -> tuple:
        return ("blocks", branch, rng[0], rng[1], seg, part)

    def as_dict(self) -> dict:
        return self.stats.as_dict()


class BlockForward:
    """One forward's block decisions: created by :meth:`BlockCache.begin_forward`, fed every block call."""

    def __init__(self, cache: BlockCache, branch: int, state: _Branch, step: int, skip_range: Range | None,
                 capture_range: Range | None, skip: bool | None, on_skip):  # fmt: skip
        self.cache = cache
        self.branch = branch
        self.state = state
        self.step = step
        self.skip_range = skip_range
        self.capture_range = capture_range
        self.skip = skip if skip_range is not None else False
        self.on_skip = on_skip
        self.skipped = 0
        self.extrapolated = False  # some skipped block list of this forward added an extrapolated residual
        self._mode: dict[int, str] = {}  # block list -> "skip" | "capture" for this forward
        self._inputs: dict[int, tuple] = {}  # block list -> its range input (captures)
        self._probe_in: torch.Tensor | None = None

    @staticmethod
    def _inside(rng: Range | None, index: int) -> bool:
        return rng is not None and rng[0] <= index < rng[1]

    def block(self, index: int, hidden: torch.Tensor, encoder: torch.Tensor | None,
              compute: Callable[[], tuple]) -> tuple:  # fmt: skip
        """Block ``index`` (counted over all block lists) on ``hidden`` (and ``encoder``, the text stream of a
        joint block, or None): ``compute()`` runs it and returns ``(hidden, encoder)``; returns the same."""
        cache = self.cache
        if self.skip and self._inside(self.skip_range, index):
            seg, first, last = cache.segment(index, self.skip_range)
            if index == first:
                self._mode[seg] = self._start_skip(seg, hidden, encoder)
            if self._mode.get(seg) == "skip":
                self.skipped += 1
                cache.stats.blocks_skipped += 1
                if self.on_skip is not None:
                    self.on_skip(cache.calls[index])
                return self._apply(seg, hidden, encoder) if index == last else (hidden, encoder)
        rng, seg = None, None
        if self._inside(self.capture_range, index) and not self.skip:
            rng = self.capture_range
        elif self._inside(self.skip_range, index) and self.skip:
            rng = self.skip_range  # a part of the skip range that could not be skipped: capture it now
        if rng is not None:
            seg, first, last = cache.segment(index, rng)
            if index == first and self._mode.get(seg) != "skip":
                self._mode[seg] = "capture"
                self._inputs[seg] = (hidden.clone(), None if encoder is None else encoder.clone())
        probe = cache.config.blocks == "auto" and self.skip_range is not None
        if probe and index == 0:
            self._probe_in = hidden.clone() if cache.config.probe_blocks > 1 else hidden
        out_h, out_e = compute()
        cache.stats.blocks_run += 1
        if rng is not None and self._mode.get(seg) == "capture" and index == last:
            self._capture(rng, seg, out_h, out_e)
        if probe and index == self.skip_range[0] - 1:
            self._probe(out_h)
        return out_h, out_e

    def end(self) -> None:
        stats = self.cache.stats
        if self.skipped:
            stats.skipping_forwards += 1
            stats.extrapolated += self.extrapolated
            self.state.skips += 1
        stats.schedule.append((self.step, self.branch, self.skipped))

    # ------------------------------------------------------------------ skip
    # The decisions run eagerly (torch.compiler.disable); the blocks themselves (compute) stay compilable.
    @torch.compiler.disable
    def _start_skip(self, seg: int, hidden, encoder) -> str:
        """``"skip"`` when block list ``seg``'s residual is there and fits the input, else ``"capture"``
        (counted): the blocks then run and their residual is captured."""
        cache, store = self.cache, self.cache.store
        kh = cache.key(self.branch, self.skip_range, seg, "h")
        shape = store.shape(kh)
        reason = None
        if shape is None:
            reason = ("the residual did not fit cache_budget_gb" if self.state.refused
                      else "nothing cached for these blocks yet")  # fmt: skip
        elif shape != tuple(hidden.shape):
            reason = f"input shape changed ({list(shape)} -> {list(hidden.shape)})"
        else:
            ke = cache.key(self.branch, self.skip_range, seg, "e")
            se = store.shape(ke)
            if se is not None and (encoder is None or se != tuple(encoder.shape)):
                reason = "text stream shape changed"
        if reason is None:
            return "skip"
        cache.stats.recomputes[reason] += 1
        return "capture"

    @torch.compiler.disable
    def _apply(self, seg: int, hidden, encoder) -> tuple:
        cache = self.cache
        kh, ke = (cache.key(self.branch, self.skip_range, seg, part) for part in ("h", "e"))
        res_h = self._residual(kh, hidden)
        res_e = self._residual(ke, encoder) if encoder is not None and ke in cache.store else None
        return hidden + res_h, (encoder + res_e if res_e is not None else encoder)

    def _residual(self, key: tuple, like: torch.Tensor) -> torch.Tensor:
        """The residual to add back under ``key``: the last one captured, or with ``order=1`` and two captured,
        the line through the last two evaluated at this step (their tags are the steps they were captured on)."""
        store = self.cache.store
        last = store.get(key, like=like)
        prev_key = key[:-1] + (key[-1] + "0",)
        if self.cache.config.order < 1 or prev_key not in store:
            return last
        t1, t0 = store.tag(key), store.tag(prev_key)
        prev = store.get(prev_key, like=like, shape=last.shape)
        if prev is None or t1 is None or t0 is None or t1 <= t0:
            return last
        self.extrapolated = True
        return torch.lerp(prev, last, (self.step - t0) / (t1 - t0))

    @torch.compiler.disable
    def _capture(self, rng: Range, seg: int, out_h, out_e) -> None:
        cache, store = self.cache, self.cache.store
        in_h, in_e = self._inputs.pop(seg)
        for key in store.keys("blocks"):  # residuals of another range of this branch are stale now
            if key[1] == self.branch and (key[2], key[3]) != rng:
                store.drop(key)
        kh, ke = cache.key(self.branch, rng, seg, "h"), cache.key(self.branch, rng, seg, "e")
        keep_prev = cache.config.order >= 1
        for key in (kh, ke):  # order 1: the residual captured before stays as the line's first point
            if keep_prev and key in store:
                # A second capture on one step (Heun, DPM++ 2S: two forwards per step) replaces the first and
                # keeps the older step's point: two points on one step make no line.
                if store.tag(key) != self.step:
                    store.rename(key, key[:-1] + (key[-1] + "0",))
            else:
                store.drop(key[:-1] + (key[-1] + "0",))
            store.drop(key)
        if in_h.shape != out_h.shape:  # the blocks change the shape: nothing to add back later
            store.drop(kh[:-1] + ("h0",))
            return
        ok = self._put(kh, out_h - in_h)
        if ok and in_e is not None and out_e is not None and in_e.shape == out_e.shape:
            ok = self._put(ke, out_e - in_e)
            if not ok:
                store.drop(kh)
        if not ok:
            for key in (kh, ke):
                store.drop(key[:-1] + (key[-1] + "0",))
        self.state.refused = not ok

    def _put(self, key: tuple, residual: torch.Tensor) -> bool:
        """Capture ``residual``; over the budget, the previous one (order 1) goes first, then it is refused."""
        store = self.cache.store
        prev_key = key[:-1] + (key[-1] + "0",)
        if prev_key in store and not store.fits(key, residual):
            store.drop(prev_key)
        return store.put(key, residual, self.step)

    # ------------------------------------------------------------------ auto trigger
    @torch.compiler.disable
    def _probe(self, out_h: torch.Tensor) -> None:
        """After the probe blocks: keep their residual for the next step and, inside the window, skip the
        rest when it changed little since the last full compute (relative L1 change, accumulated step to
        step), at most ``max_skips`` steps in a row."""
        cache, cfg, state = self.cache, self.cache.config, self.state
        probe_in, self._probe_in = self._probe_in, None
        if probe_in is None or probe_in.shape != out_h.shape:
            if self.skip is None:
                cache.stats.recomputes["the probe blocks change the hidden shape"] += 1
                self._compute_rest()
            return
        residual = out_h - probe_in
        key = ("probe", self.branch)
        if self.skip is None:
            prev = cache.store.get(key, like=residual, shape=residual.shape)
            if prev is None:
                cache.stats.recomputes["no probe residual from the previous step"] += 1
                self._compute_rest()
            else:
                state.change += float((residual - prev).abs().mean() / prev.abs().mean().clamp_min(1e-12))
                if state.change <= cfg.threshold and state.skips < cfg.max_skips:
                    self.skip = True
                    self.capture_range = None
                else:
                    self._compute_rest()
        cache.store.put(key, residual, self.step)

    def _compute_rest(self) -> None:
        self.skip = False
        self.state.change, self.state.skips = 0.0, 0
