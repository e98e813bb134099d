"""The testbed's adapter: run :class:`~fastattn.testbed.TestbedDiT` attention through fastattn's runtime.

The same runtime, plans and presets as the diffusers integration (``fastattn.enable``), so what the testbed
measures is what users run: ``enable(model, preset="balanced")`` resolves the ``testbed`` family's preset,
the runtime decides per call (layer, step) between dense, the sparse kernel and residual sharing, and
``handle.stats()`` reports density and every dense call with its reason::

    handle = enable(model, preset="balanced")
    clip = sample(model, labels)
    print(handle.stats())
    handle.disable()            # the model's own SDPA again

``cache=`` (a :class:`~fastattn.caching.CacheConfig`, a preset name or a dict of its fields, as for
``fastattn.enable``) adds caching across steps and CFG branches: block skipping (``blocks="auto" | "delta" |
"fixed"``, through ``testbed/caching.py``) and attention output sharing (AST ``attn_share_interval``, ASC
``cfg_share``: the sampler's batched CFG holds the conditional half first, read from the class labels).
``stats()["cache"]`` reports skipped blocks, reused outputs and cache memory.
"""

from __future__ import annotations

from ..attention.context import ForwardContext, StepTracker
from ..attention.runtime import AttentionRuntime
from ..masks.layout import TokenLayout
from ..plans.build import make_plan
from ..plans.schema import AttentionPlan
from .caching import install_block_cache
from .model import AttentionCall, TestbedDiT

FAMILY = "testbed"


class TestbedHandle:
    """What :func:`enable` returns: ``stats()``, ``reset_stats()``, ``disable()``."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, model: TestbedDiT, plan: AttentionPlan, sparse_fn=None):
        self.model, self.plan = model, plan
        self.runtime = AttentionRuntime(plan, num_layers=len(model.blocks), sparse_fn=sparse_fn)
        self.tracker = StepTracker()  # only when the caller gives no step_index
        self._state = None
        self._hooks = [
            model.register_forward_pre_hook(self._begin, with_kwargs=True),
            model.register_forward_hook(self._end, always_call=True),
        ]
        self._saved_fns = [blk.attn.attention_fn for blk in model.blocks]  # restored exactly by disable()
        model.set_attention_fn(self._attend)
        self._remove_blocks = None
        if plan.cache.blocks != "off":
            self._remove_blocks = install_block_cache(model, self.runtime, lambda: self._state)
        self.enabled = True

    def _begin(self, module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        _, f, _, h, w = x.shape
        p = module.cfg.patch
        t = kwargs.get("timestep")
        t = float(t.flatten()[0]) if hasattr(t, "flatten") else t
        step, branch = self.tracker.advance(t)
        if kwargs.get("step_index") is not None:  # the sampler says where it is
            step = int(kwargs["step_index"])
        chunks = None
        if self.plan.cache.cfg_share:  # only ASC needs to know which batch half is which branch
            y = args[2] if len(args) > 2 else kwargs.get("y")
            chunks = cfg_chunks(y, module.cfg.num_classes)
        layout = TokenLayout.video(f, h // p, w // p)
        ctx = ForwardContext(layout, step, kwargs.get("num_steps"), branch, None, t, chunks)
        self._state = self.runtime.begin_forward(ctx)

    def _end(self, module, args, output):
        if self._state is not None:
            self.runtime.end_forward(self._state)
        self._state = None

    def _attend(self, q, k, v, ctx: AttentionCall):
        # The runtime takes diffusers' [B, S, H, D]; transposes are views. The testbed names the layer.
        out = self.runtime.attend(
            self._state, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layer=ctx.layer_index
        )
        return out.transpose(1, 2)

    def stats(self) -> dict:
        out = {"model": "TestbedDiT", "family": FAMILY, "plan": self.plan.describe()}
        out.update(self.runtime.stats.as_dict())
        out["residual_bytes"] = self.runtime.residual_bytes()
        out["residual_peak_bytes"] = self.runtime.residual_peak_bytes
        out["cache_bytes"] = self.runtime.cache_bytes()
        if self.plan.cache.enabled or self.plan.cache_budget_gb is not None:
            out["cache"] = self.runtime.cache.as_dict()
        return out

    def reset_stats(self) -> None:
        self.runtime.reset_stats()

    def disable(self) -> None:
        if not self.enabled:
            return
        for h in self._hooks:
            h.remove()
        if self._remove_blocks is not None:
            self._remove_blocks()
        for blk, fn in zip(self.model.blocks, self._saved_fns):
            blk.attn.set_attention_fn(fn)
        if self.model.__dict__.get("_fastattn_handle") is self:
            del self.model.__dict__["_fastattn_handle"]
        self.runtime.clear()
        self.enabled = False


def cfg_chunks(y, null_class: int) -> tuple[int, ...] | None:
    """The CFG branch of each batch half (0 conditional, 1 unconditional) when ``y`` holds a batched CFG call,
    one half all ``null_class`` (the unconditional label) and the other none of it; else None."""
    if y is None or not hasattr(y, "reshape") or y.numel() < 2 or y.numel() % 2:
        return None
    halves = [[int(v) == null_class for v in half.tolist()] for half in y.reshape(-1).chunk(2)]
    kinds = [1 if all(h) else 0 if not any(h) else None for h in halves]
    return tuple(kinds) if None not in kinds and kinds[0] != kinds[1] else None


def enable(
    model: TestbedDiT,
    preset: str | None = None,
    *,
    method=None,
    density: float | None = None,
    plan: AttentionPlan | None = None,
    sparse_fn=None,
    **knobs,
) -> TestbedHandle:
    """Route the testbed's attention through fastattn (``preset="balanced"`` when nothing is given).

    Takes the same arguments as :func:`fastattn.enable` (``method=``, ``density=``, ``quant=``,
    ``dense_steps=``, ``residual=``, ``cache=``, ``cache_budget_gb=``...). Enabling an enabled model replaces its
    plan.
    """
    if not isinstance(model, TestbedDiT):
        raise TypeError(f"enable() takes a TestbedDiT, got {type(model).__name__}")
    if preset is None and method is None and plan is None:
        preset = "balanced"
    resolved = make_plan(FAMILY, preset, method, density, plan, **knobs)
    old = model.__dict__.get("_fastattn_handle")
    if old is not None:
        old.disable()
    handle = TestbedHandle(model, resolved, sparse_fn)
    model.__dict__["_fastattn_handle"] = handle
    return handle
