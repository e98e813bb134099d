"""The testbed's adapter: run :class:`~fastattn.testbed.TestbedDiT` attention through fastattn's runtime.

The same runtime, plans and presets as the diffusers integration (``fastattn.enable``), so what the testbed
measures is what users run: ``enable(model, preset="balanced")`` resolves the ``testbed`` family's preset,
the runtime decides per call (layer, step) between dense, the sparse kernel and residual sharing, and
``handle.stats()`` reports density and every dense call with its reason::

    handle = enable(model, preset="balanced")
    clip = sample(model, labels)
    print(handle.stats())
    handle.disable()            # the model's own SDPA again
"""

from __future__ import annotations

from ..attention.context import ForwardContext, StepTracker
from ..attention.runtime import AttentionRuntime
from ..masks.layout import TokenLayout
from ..plans.build import make_plan
from ..plans.schema import AttentionPlan
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
        ctx = ForwardContext(TokenLayout.video(f, h // p, w // p), step, kwargs.get("num_steps"), branch, None, t)
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
        return out

    def reset_stats(self) -> None:
        self.runtime.stats.reset()

    def disable(self) -> None:
        if not self.enabled:
            return
        for h in self._hooks:
            h.remove()
        for blk, fn in zip(self.model.blocks, self._saved_fns):
            blk.attn.set_attention_fn(fn)
        if self.model.__dict__.get("_fastattn_handle") is self:
            del self.model.__dict__["_fastattn_handle"]
        self.runtime.clear()
        self.enabled = False


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
    ``dense_steps=``, ``residual=``...). Enabling an enabled model replaces its plan.
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
