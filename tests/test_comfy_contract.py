"""Contract tests of fastattn's ComfyUI side, against fakes of ComfyUI's runtime contract.

No ComfyUI core is installable from a package index, and none of its GPL code may enter this repository, so
these fakes are written from the contract's description (``shared/reference/comfyui.md``), not from its code:

- a ``wrap_attn``-style dispatcher: if ``transformer_options`` holds ``optimized_attention_override``, it
  returns ``override(func, *args, **kwargs)`` (with ``_inside_attn_wrapper`` set in kwargs), else
  ``func(*args, **kwargs)``; newer cores hand single-owner containers to ``override.container_function``;
- the host attention signature ``(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
  skip_output_reshape=False, **kwargs)`` with both layouts;
- a ``ModelPatcher`` with ``clone()`` (deep-copied ``model_options``), ``add_wrapper_with_key`` /
  ``add_callback_with_key`` and their ``remove_*``; ``model_sampling.percent_to_sigma``;
- a sampler that sets ``sample_sigmas``, ``sigmas`` and ``cond_or_uncond``, runs ``APPLY_MODEL`` wrappers and
  the ``ON_PRE_RUN`` / ``ON_PREPARE_STATE`` / ``ON_CLEANUP`` callbacks;
- tiny diffusion models named like ComfyUI's (``Flux``: joint ``(B, H, L, D)`` calls; ``WanModel``: ``(B, L,
  H*D)`` self- and cross-attention calls).

A real ComfyUI runs the same nodes in ``tests/test_comfyui_host.py`` (where ``COMFYUI_DIR`` is set).
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fastattn.attention.runtime import kernel_attention
from fastattn.masks import TokenLayout
from fastattn.nodes import fast_attention as fa
from fastattn.nodes.host import AttentionOverride, ScheduleBook, cfg_branch, find_patch
from fastattn.plans import AttentionPlan, BandConfig, DenseConfig, Window3DConfig, build_mask
from fastattn.plans.meta import ModelFingerprint, PlanMeta

OVERRIDE = "optimized_attention_override"


# ================================================================================ fakes of the host contract


def host_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
                   **kwargs):  # fmt: skip
    """The host's default attention, per the described signature and layouts."""
    if skip_reshape:
        b, _, _, d = q.shape
    else:
        b, _, c = q.shape
        d = c // heads
        q, k = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k))
        v = v.view(b, -1, heads, d).transpose(1, 2)
    gqa = bool(kwargs.get("enable_gqa", False))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=kwargs.get("scale"), enable_gqa=gqa)
    return out if skip_output_reshape else out.transpose(1, 2).reshape(b, -1, heads * d)


def wrap_attn(func):
    """The dispatcher: the override is consulted at the outermost call only, and only with transformer_options;
    containers go to ``override.container_function`` where the override has one, else they are unwrapped."""

    def wrapper(*args, **kwargs):
        outer = "_inside_attn_wrapper" not in kwargs
        kwargs["_inside_attn_wrapper"] = True
        try:
            override = (kwargs.get("transformer_options") or {}).get(OVERRIDE) if outer else None
            containers = isinstance(args[0], Container)
            if override is not None and containers and hasattr(override, "container_function"):
                return override.container_function(*args, **kwargs)
            if containers:
                args = tuple(c.take() for c in args[:3]) + tuple(args[3:])
            if override is not None:
                return override(func, *args, **kwargs)
            return func(*args, **kwargs)
        finally:
            if outer:
                del kwargs["_inside_attn_wrapper"]

    return wrapper


optimized_attention = wrap_attn(host_attention)


class Container:
    """A single-owner tensor holder (``peek`` / ``take``), as newer cores pass q/k/v."""

    def __init__(self, t):
        self.tensor = t

    def peek(self):
        if self.tensor is None:
            raise RuntimeError("consumed")
        return self.tensor

    def take(self):
        t, self.tensor = self.peek(), None
        return t


class ModelSampling:
    """Flow-matching sigmas in [0, 1]: percent p -> sigma 1 - p."""

    def percent_to_sigma(self, p):
        return 1.0 - p


def _weight(fan_in, fan_out, g):
    return torch.randn(fan_in, fan_out, generator=g) / math.sqrt(fan_in)


class Flux(torch.nn.Module):
    """Joint [text, image] self-attention in (B, H, L, D), patch 2, like ComfyUI's Flux."""

    patch_size = 2

    def __init__(self, channels=4, heads=2, head_dim=16, double=1, single=2, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.num_heads, self.hidden_size = heads, heads * head_dim
        self.double_blocks, self.single_blocks = [None] * double, [None] * single
        self.w_in = _weight(channels * 4, self.hidden_size, g)
        self.w_txt = _weight(8, self.hidden_size, g)
        self.w_qkv = [_weight(self.hidden_size, 3 * self.hidden_size, g) for _ in range(double + single)]
        self.w_out = _weight(self.hidden_size, channels * 4, g)

    def forward(self, x, t, context=None, transformer_options=None, attn=None, **kwargs):
        b, c, h, w = x.shape
        img = (
            x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * 4) @ self.w_in
        )
        txt = context @ self.w_txt
        seq = torch.cat([txt, img], 1)
        for wq in self.w_qkv:
            q, k, v = (seq @ wq).view(b, seq.shape[1], 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
            out = (attn or optimized_attention)(q, k, v, self.num_heads, skip_reshape=True,
                                                 transformer_options=transformer_options)  # fmt: skip
            seq = seq + out
        out = seq[:, txt.shape[1] :] @ self.w_out
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


class WanModel(torch.nn.Module):
    """Video-only self-attention and text cross-attention in (B, L, H*D), patch (1, 2, 2), like ComfyUI's Wan."""

    patch_size = (1, 2, 2)

    def __init__(self, channels=4, heads=2, head_dim=16, layers=2, seed=1):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.num_heads, self.dim = heads, heads * head_dim
        self.blocks = [None] * layers
        self.w_in = _weight(channels * 4, self.dim, g)
        self.w_txt = _weight(8, self.dim, g)
        self.w = [_weight(self.dim, 4 * self.dim, g) for _ in range(layers)]
        self.w_out = _weight(self.dim, channels * 4, g)

    def forward(self, x, t, context=None, transformer_options=None, **kwargs):
        b, c, f, h, w = x.shape
        seq = (
            x.reshape(b, c, f, h // 2, 2, w // 2, 2).permute(0, 2, 3, 5, 1, 4, 6).reshape(b, -1, c * 4)
            @ self.w_in
        )
        txt = context @ self.w_txt
        for wl in self.w:
            q, k, v, cq = (seq @ wl).chunk(4, -1)
            seq = seq + optimized_attention(
                q, k, v, heads=self.num_heads, transformer_options=transformer_options
            )
            ck, cv = txt, txt
            seq = seq + optimized_attention(
                cq, ck, cv, heads=self.num_heads, transformer_options=transformer_options
            )
        out = seq @ self.w_out
        return out.view(b, f, h // 2, w // 2, c, 2, 2).permute(0, 4, 1, 2, 5, 3, 6).reshape(b, c, f, h, w)


class NextDiT(torch.nn.Module):  # a family that passes through (lumina2)
    def forward(self, x, t, context=None, transformer_options=None, **kwargs):
        return x


class BaseModel:
    """``apply_model`` runs the ``APPLY_MODEL`` wrappers around the diffusion model."""

    def __init__(self, diffusion_model):
        self.diffusion_model = diffusion_model
        self.model_sampling = ModelSampling()

    def apply_model(
        self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs
    ):
        wrappers = [
            w for ws in transformer_options.get("wrappers", {}).get("apply_model", {}).values() for w in ws
        ]

        def call(i, *args, **kw):
            if i == len(wrappers):
                return self._apply_model(*args, **kw)
            return wrappers[i](lambda *a, **k: call(i + 1, *a, **k), *args, **kw)

        return call(0, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    def _apply_model(self, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        return self.diffusion_model(
            x, t, context=c_crossattn, transformer_options=transformer_options, **kwargs
        )


class ModelPatcher:
    def __init__(self, model):
        self.model = model
        self.model_options = {"transformer_options": {}}
        self.wrappers: dict = {}
        self.callbacks: dict = {}

    def clone(self):
        n = ModelPatcher(self.model)
        n.model_options = copy.deepcopy(self.model_options)
        n.wrappers = {t: {k: list(v) for k, v in d.items()} for t, d in self.wrappers.items()}
        n.callbacks = {t: {k: list(v) for k, v in d.items()} for t, d in self.callbacks.items()}
        return n

    def get_model_object(self, name):
        return getattr(self.model, name)

    def add_wrapper_with_key(self, kind, key, fn):
        self.wrappers.setdefault(kind, {}).setdefault(key, []).append(fn)

    def remove_wrappers_with_key(self, kind, key):
        self.wrappers.get(kind, {}).pop(key, None)

    def add_callback_with_key(self, kind, key, fn):
        self.callbacks.setdefault(kind, {}).setdefault(key, []).append(fn)

    def remove_callbacks_with_key(self, kind, key):
        self.callbacks.get(kind, {}).pop(key, None)

    def callbacks_of(self, kind):
        return [c for cs in self.callbacks.get(kind, {}).values() for c in cs]


def sample(patcher, x, sigmas, context, *, batched=True, new_core=True, callbacks=True, conds=None):
    """One sampler call: per step the model runs on cond+uncond (batched) or as two passes; Euler update."""
    sigmas = torch.tensor(sigmas, dtype=torch.float32)
    opts = {k: (dict(v) if isinstance(v, dict) else v) for k, v in patcher.model_options.items()}
    to = opts.setdefault("transformer_options", {})
    to["sample_sigmas"] = sigmas
    to["wrappers"] = patcher.wrappers
    if callbacks:
        for cb in patcher.callbacks_of("on_pre_run"):
            cb(patcher)
    try:
        for i in range(len(sigmas) - 1):
            if callbacks:
                for cb in patcher.callbacks_of("on_prepare_state"):
                    cb(patcher, sigmas[i], opts) if new_core else cb(patcher, sigmas[i])
            chunks = [[0, 1]] if batched else [[1], [0]]
            den = []
            for cu in chunks:
                topt = dict(opts["transformer_options"])
                topt.update(sigmas=sigmas[i].expand(len(cu)), cond_or_uncond=cu)
                xb = torch.cat([x] * len(cu))
                ctx = torch.cat([context * (1.0 if c == 0 else 0.5) for c in cu])
                den.append(patcher.model.apply_model(xb, sigmas[i].expand(len(cu)), c_crossattn=ctx,
                                                     transformer_options=topt, **(conds or {})))  # fmt: skip
            d = torch.cat(den)[:1]
            x = x + (sigmas[i + 1] - sigmas[i]) * d
    finally:
        if callbacks:
            for cb in patcher.callbacks_of("on_cleanup"):
                cb(patcher)
    return x


def flux_patcher(**kw):
    return ModelPatcher(BaseModel(Flux(**kw)))


def wan_patcher(**kw):
    return ModelPatcher(BaseModel(WanModel(**kw)))


FLUX_X = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
WAN_X = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
CTX = torch.randn(1, 6, 8, generator=torch.Generator().manual_seed(4))
SIGMAS = [1.0, 0.75, 0.5, 0.25, 0.0]


def choice(plan: AttentionPlan, family=None) -> fa.PlanChoice:
    meta = PlanMeta(model=ModelFingerprint(family)) if family else None
    return fa.PlanChoice("test plan", plan, meta)


@pytest.fixture
def book():
    return ScheduleBook()


# ================================================================================ contract tests


def test_contract_dense_plan_is_bit_exact_in_both_layouts(book):
    dense = choice(AttentionPlan(DenseConfig()))
    for patcher, x in ((flux_patcher(), FLUX_X), (wan_patcher(), WAN_X)):
        ref = sample(patcher, x, SIGMAS, CTX)
        patched = fa.apply_fast_attention(patcher, plan=dense, book=book)
        assert torch.equal(sample(patched, x, SIGMAS, CTX), ref)
        stats = find_patch(patched).report()
        assert stats["calls"] > 0 and stats["planned_dense"] == {"method dense": stats["calls"]}
    # the input model is never changed: only the clone carries fastattn
    assert OVERRIDE not in patcher.model_options["transformer_options"] and not patcher.wrappers


@pytest.mark.parametrize(
    "skip_reshape,skip_output_reshape", [(True, False), (True, True), (False, False), (False, True)]
)
def test_contract_sparse_plan_equals_masked_dense_oracle(book, skip_reshape, skip_output_reshape):
    plan = AttentionPlan(Window3DConfig(window=(0, 1, 1)), block_size=8)
    patched = fa.apply_fast_attention(flux_patcher(), plan=choice(plan), book=book)
    patch = find_patch(patched)
    ov = patched.model_options["transformer_options"][OVERRIDE]
    layout = TokenLayout(6 + 64, 6, True, (1, 8, 8))
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, layout.seq_len, 16, generator=g) for _ in range(3))  # (B, H, L, D)
    mask = build_mask(plan.method, layout, plan.block_size)
    assert 0 < mask.block_density() < 1
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to_token_mask())  # [B, H, L, D]
    args = (
        (q, k, v, 2)
        if skip_reshape
        else tuple(t.transpose(1, 2).reshape(1, layout.seq_len, 32) for t in (q, k, v)) + (2,)
    )

    def executor(x, t, c_concat, c_crossattn, control, to, **kw):
        return ov(host_attention, *args, skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape,
                  transformer_options=to)  # fmt: skip

    to = {"sigmas": torch.tensor([0.5]), "sample_sigmas": torch.tensor(SIGMAS), "cond_or_uncond": [0]}
    x = torch.zeros(1, 4, 16, 16)
    got = patch.run_forward(executor, (x, torch.tensor([0.5]), None, torch.zeros(1, 6, 8), None, to), {})
    if not skip_output_reshape:
        got = got.view(1, layout.seq_len, 2, 16).transpose(1, 2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert patch.report()["sparse_calls"] == 1


def test_contract_stacks_on_previous_override_and_declines_reach_it_unchanged(book):
    seen = []

    def previous(func, *args, **kwargs):
        seen.append((args, dict(kwargs)))
        return func(*args, **kwargs)

    base = flux_patcher()
    base.model_options["transformer_options"][OVERRIDE] = previous
    patched = fa.apply_fast_attention(
        base, plan=choice(AttentionPlan(BandConfig(window=16), block_size=8)), book=book
    )
    ov = patched.model_options["transformer_options"][OVERRIDE]
    assert isinstance(ov, AttentionOverride) and ov.previous is previous
    patch = find_patch(patched)
    to = dict(patched.model_options["transformer_options"], sigmas=torch.tensor([0.5]),
              sample_sigmas=torch.tensor(SIGMAS), cond_or_uncond=[0])  # fmt: skip
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 70, 16, generator=g) for _ in range(3))
    mask = torch.zeros(1, 1, 70, 70)
    kv_short = torch.randn(1, 2, 9, 16, generator=g)
    calls = [  # (args, kwargs) of calls fastattn declines, and the reason it counts
        ((q, k, v, 2), {"mask": mask, "skip_reshape": True, "scale": 0.3, "extra": "kept"}),  # a mask
        ((q, kv_short, kv_short, 2), {"skip_reshape": True}),  # cross-attention
        ((q, k, v, 2), {"skip_reshape": True, "low_precision_attention": False}),
        ((q, k[:, :1], v[:, :1], 2), {"skip_reshape": True, "enable_gqa": True}),  # GQA
    ]

    def executor(*a, **kw):
        outs = []
        for args, kwargs in calls:
            kwargs = dict(kwargs, transformer_options=a[5])
            want = host_attention(*args, **kwargs)
            outs.append(torch.equal(optimized_attention(*args, **kwargs), want))
            assert seen[-1][0] == args and seen[-1][1] == dict(kwargs, _inside_attn_wrapper=True)
            assert all(x is y for x, y in zip(seen[-1][0], args))  # the very same tensors, not copies
        return outs

    x = torch.zeros(1, 4, 16, 16)
    assert all(patch.run_forward(executor, (x, None, None, torch.zeros(1, 6, 8), None, to), {}))
    r = patch.report()
    assert r["fallbacks"] == {"attention mask": 1, "low_precision_attention=False": 1,
                              "grouped-query attention (k/v heads differ from q)": 1}  # fmt: skip
    assert r["host_calls"] == {"cross-attention (q and k lengths differ)": 1}
    # a served call's planned-dense attention is the host's for that call too: the previous override
    seen.clear()
    dense_first = choice(AttentionPlan(BandConfig(window=16), dense_steps=2, block_size=8))
    patched = fa.apply_fast_attention(base, plan=dense_first, book=book)
    ref = sample(base, FLUX_X, SIGMAS, CTX)
    n_ref = len(seen)
    seen.clear()
    out = sample(patched, FLUX_X, SIGMAS, CTX)
    assert len(seen) == n_ref // 2  # steps 0-1 of 4 ran the previous override, steps 2-3 ran fastattn
    assert not torch.equal(out, ref) and torch.isfinite(out).all()


def test_contract_without_previous_declines_call_func_and_reapplying_replaces(book):
    patched = fa.apply_fast_attention(flux_patcher(), plan=choice(AttentionPlan(DenseConfig())), book=book)
    again = fa.apply_fast_attention(patched, preset="custom", method="band", density=0.5, book=book)
    ov = again.model_options["transformer_options"][OVERRIDE]
    assert (
        isinstance(ov, AttentionOverride) and ov.previous is None
    )  # the earlier fastattn override is replaced
    assert len(again.wrappers["apply_model"]["fastattn"]) == 1 and find_patch(again) is ov.patch
    got = []

    def func(*args, **kwargs):
        got.append((args, kwargs))
        return host_attention(*args, **kwargs)

    q = torch.randn(1, 2, 5, 16)
    out = ov(func, q, q, q, 2, mask=None, skip_reshape=True, transformer_options={})  # no forward bracket
    assert got[0][0][0] is q and got[0][1] == {"mask": None, "skip_reshape": True, "transformer_options": {}}
    assert torch.equal(out, host_attention(q, q, q, 2, skip_reshape=True))
    assert ov.patch.host_calls == {
        "no forward context (the APPLY_MODEL wrapper did not run for this call)": 1
    }


def test_contract_fallbacks_and_unknown_layouts_are_counted_with_reasons(book):
    patched = fa.apply_fast_attention(flux_patcher(), preset="custom", method="band", density=0.5, book=book)
    sample(patched, FLUX_X, SIGMAS, CTX, conds={"ref_latents": [torch.zeros(1, 4, 8, 8)]})
    r = find_patch(patched).last
    assert r["fallbacks"] == {"ref_latents adds tokens the token layout does not describe yet": 4 * 3}
    text = fa.report_text(patched)
    assert "ref_latents adds tokens" in text and "density achieved: 1.000" in text
    # a Wan latent whose token count equals the text length: self- and cross-attention cannot be told apart
    wan = fa.apply_fast_attention(wan_patcher(), preset="custom", method="window3d", density=0.5, book=book)
    sample(wan, torch.zeros(1, 4, 1, 6, 2), SIGMAS, CTX)  # 1 x 3 x 1 = 3 tokens... of 6 text: distinct
    assert find_patch(wan).last["host_calls"] == {"cross-attention (q and k lengths differ)": 4 * 2}
    sample(wan, torch.zeros(1, 4, 2, 6, 2), SIGMAS, CTX)  # 2 x 3 x 1 = 6 tokens == 6 text tokens
    r = find_patch(wan).last
    assert list(r["fallbacks"]) == ["6 image tokens equal the text length (self/cross-attention ambiguous)"]


def test_contract_state_resets_per_sampling_run(book):
    plan = choice(AttentionPlan(BandConfig(window=16), block_size=8, residual=True, dense_steps=1))
    patched = fa.apply_fast_attention(flux_patcher(), plan=plan, book=book)
    patch = find_patch(patched)
    sample(patched, FLUX_X, SIGMAS, CTX)
    first = patch.last
    assert first["steps_seen"] == [0, 1, 2, 3] and first["calls"] == 4 * 3
    assert patch.runtime.residuals == {}  # ON_CLEANUP freed the run's caches
    sample(patched, FLUX_X, SIGMAS[:3] + [0.0], CTX)
    assert patch.last["steps_seen"] == [0, 1, 2] and patch.last["calls"] == 3 * 3  # only the last run
    # without ON_PRE_RUN / ON_CLEANUP a new sample_sigmas still starts a new run
    sample(patched, FLUX_X, SIGMAS, CTX, callbacks=False)
    sample(patched, FLUX_X, SIGMAS[:2] + [0.0], CTX, callbacks=False)
    assert patch.report()["steps_seen"] == [0, 1] and patch.last["steps_seen"] == [0, 1, 2, 3]


def test_contract_steps_follow_one_schedule_across_two_samplers(book):
    """Wan 2.2: a high-noise model samples steps 0-1, a low-noise model steps 2-3 of the same schedule."""
    plan = choice(AttentionPlan(Window3DConfig(window=(0, 1, 1)), dense_steps=3, block_size=8))
    high = fa.apply_fast_attention(wan_patcher(seed=1), plan=plan, book=book)
    low = fa.apply_fast_attention(wan_patcher(seed=2), plan=plan, book=book)
    contexts = []
    for p in (high, low):
        rt = find_patch(p).runtime
        rt.begin_forward = (lambda f: lambda ctx: (contexts.append(ctx), f(ctx))[1])(rt.begin_forward)
    x = sample(high, WAN_X, SIGMAS[:3], CTX)  # leftover noise: ends at 0.5
    sample(low, x, SIGMAS[2:], CTX)
    assert [(c.step, c.num_steps) for c in contexts] == [(0, None), (1, None), (2, 4), (3, 4)]
    lo = find_patch(low).last
    assert lo["steps_seen"] == [2, 3] and lo["schedule_offset"] == 2 and lo["steps_total"] == 4
    assert (
        lo["planned_dense"] == {"dense_steps": 2} and lo["sparse_calls"] == 2
    )  # step 2 dense, step 3 sparse
    # a sampler evaluating between two schedule points stays on its step; a fresh schedule starts at 0
    assert book.place([1.0, 0.5, 0.0]).step_of(0.7) == 0 and book.place([0.9, 0.0]).offset == 0


def test_contract_cfg_branch_from_cond_or_uncond(book):
    assert cfg_branch([0]) == 0 and cfg_branch([1]) == 1 and cfg_branch([1, 0]) == 0 and cfg_branch(None) == 0
    patched = fa.apply_fast_attention(flux_patcher(), plan=choice(AttentionPlan(DenseConfig())), book=book)
    contexts = []
    rt = find_patch(patched).runtime
    rt.begin_forward = (lambda f: lambda ctx: (contexts.append(ctx), f(ctx))[1])(rt.begin_forward)
    sample(patched, FLUX_X, SIGMAS[:2] + [0.0], CTX, batched=False)
    assert [(c.step, c.cfg_branch) for c in contexts] == [(0, 1), (0, 0), (1, 1), (1, 0)]
    assert contexts[0].sigma == 1.0 and contexts[0].layout == TokenLayout(6 + 64, 6, True, (1, 8, 8))


def test_contract_sigma_window_from_start_and_end_percent(book):
    patched = fa.apply_fast_attention(flux_patcher(), preset="custom", method="band", density=0.5,
                                      start_percent=0.2, end_percent=0.6, book=book)  # fmt: skip
    patch = find_patch(patched)
    assert (patch.sigma_start, patch.sigma_end) == pytest.approx((0.8, 0.4))
    sample(patched, FLUX_X, SIGMAS, CTX)  # sigmas 1.0 and 0.25 are outside [0.4, 0.8]
    r = patch.last
    assert r["planned_dense"] == {"outside start_percent/end_percent": 2 * 3} and r["calls"] == 4 * 3
    with pytest.raises(fa.NodeError, match="start_percent 0.8 is after end_percent 0.2"):
        fa.apply_fast_attention(flux_patcher(), start_percent=0.8, end_percent=0.2)


def test_contract_dense_blocks_parsing_and_errors():
    assert fa.parse_dense_blocks("0,1,38-39") == (0, 1, 38, 39)
    assert fa.parse_dense_blocks(" 3 , 1-2,, ") == (1, 2, 3) and fa.parse_dense_blocks("") == ()
    for bad, match in (("0;1", "not a block number or range"), ("a-b", "not a block number"),
                       ("-1", "not a block number"), ("5-3", "runs backwards"), ("1.5", "not a block number")):  # fmt: skip
        with pytest.raises(fa.NodeError, match=match):
            fa.parse_dense_blocks(bad)
    with pytest.raises(
        fa.NodeError, match=r"block 3 does not exist; this model has 3 self-attention blocks \(0-2\)"
    ):
        fa.apply_fast_attention(flux_patcher(), dense_blocks="0,3")
    patched = fa.apply_fast_attention(flux_patcher(), preset="balanced", dense_blocks="1-2")
    assert set(find_patch(patched).plan.dense_layers) >= {1, 2}


def test_contract_plan_node_and_a_plan_for_another_family_is_refused(tmp_path, book):
    wan_plan = fa.load_plan_choice("wan-balanced")
    assert wan_plan.meta.model.family == "wan" and "wan-balanced" in fa.plan_sources()
    with pytest.raises(
        fa.NodeError,
        match=r"plan wan-balanced: this plan was made for another model.*family: plan 'wan', model 'flux'",
    ):
        fa.apply_fast_attention(flux_patcher(), plan=wan_plan)
    with pytest.raises(fa.NodeError, match="location is empty"):
        fa.load_plan_choice(fa.PLAN_PATH, " ")
    with pytest.raises(fa.NodeError, match="could not load plan .*no plan.json"):
        fa.load_plan_choice(fa.PLAN_PATH, str(tmp_path))
    with pytest.raises(fa.NodeError, match="unknown plan 'nope'"):
        fa.load_plan_choice("nope")
    AttentionPlan(BandConfig(window=16), block_size=8).save(
        tmp_path / "mine", PlanMeta(model=ModelFingerprint("flux"))
    )
    mine = fa.load_plan_choice(fa.PLAN_PATH, str(tmp_path / "mine"))
    patched = fa.apply_fast_attention(flux_patcher(), plan=mine, quant="int8", dense_blocks="0", book=book)
    plan = find_patch(patched).plan
    assert plan.method == BandConfig(window=16) and plan.quant == "int8" and plan.dense_layers == (0,)
    with pytest.raises(fa.NodeError, match="unknown quant 'int3'"):
        fa.apply_fast_attention(flux_patcher(), quant="int3")
    with pytest.raises(fa.NodeError, match="unknown preset 'turbo'"):
        fa.apply_fast_attention(flux_patcher(), preset="turbo")


def test_contract_container_function_takes_what_it_serves_and_passes_declines_on(book):
    plan = choice(AttentionPlan(BandConfig(window=16), block_size=8))
    patched = fa.apply_fast_attention(
        flux_patcher(), plan=plan, book=book, default_attention=optimized_attention
    )
    patch = find_patch(patched)
    to = dict(patched.model_options["transformer_options"], sigmas=torch.tensor([0.5]),
              sample_sigmas=torch.tensor(SIGMAS), cond_or_uncond=[0])  # fmt: skip
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 70, 16, generator=g) for _ in range(3))
    served = [Container(t) for t in (q, k, v)]
    declined = [Container(t) for t in (q, k, v)]
    mask = torch.zeros(1, 1, 70, 70)

    def executor(*a, **kw):
        out = optimized_attention(*served, 2, skip_reshape=True, transformer_options=a[5])
        assert all(c.tensor is None for c in served)  # taken
        ref = host_attention(q, k, v, 2, mask=mask, skip_reshape=True)
        got = optimized_attention(*declined, 2, mask=mask, skip_reshape=True, transformer_options=a[5])
        assert torch.equal(got, ref) and all(c.tensor is None for c in declined)  # the host unwrapped them
        return out

    out = patch.run_forward(
        executor, (torch.zeros(1, 4, 16, 16), None, None, torch.zeros(1, 6, 8), None, to), {}
    )
    assert out.shape == (1, 70, 32) and torch.isfinite(out).all()
    assert patch.report()["sparse_calls"] == 1 and patch.report()["fallbacks"] == {"attention mask": 1}


def test_contract_unsupported_family_passes_through_with_the_reason(book):
    model = ModelPatcher(BaseModel(NextDiT()))
    model.model_options["transformer_options"][OVERRIDE] = "theirs"
    patched = fa.apply_fast_attention(model, book=book)
    assert patched.model_options["transformer_options"][OVERRIDE] == "theirs"  # left as it was
    assert fa.report_text(patched).startswith("fastattn: nothing ran yet")
    sample(patched, FLUX_X, SIGMAS, CTX)
    assert "passed through (family not supported yet: lumina2 (NextDiT))" in fa.report_text(patched)
    assert "not applied to this model" in fa.report_text(model)


def test_contract_rearms_on_top_once_per_run_and_clones_share_the_patch(book):
    patched = fa.apply_fast_attention(flux_patcher(), preset="custom", method="band", density=0.5, book=book)
    patch = find_patch(patched)
    later = patched.clone()
    assert later.model_options["transformer_options"][OVERRIDE].patch is patch  # deepcopy keeps the patch

    def theirs(func, *args, **kwargs):
        return func(*args, **kwargs)

    later.model_options["transformer_options"][OVERRIDE] = theirs  # a node applied later replaced ours
    sample(later, FLUX_X, SIGMAS, CTX)  # newer cores pass model_options to ON_PREPARE_STATE: back on top
    assert patch.last["calls"] == 4 * 3 and later.model_options["transformer_options"][OVERRIDE] is theirs
    sample(later, FLUX_X, SIGMAS, CTX, new_core=False)  # older cores: no model_options, nothing to re-arm
    assert patch.last["forwards"] == 4 and "calls" in patch.last and patch.last["calls"] == 0
    # a node that wrapped ours (and calls it) gets wrapped in turn: each call is still counted once
    ours = patched.model_options["transformer_options"][OVERRIDE]
    wrapping = patched.clone()
    wrapping.model_options["transformer_options"][OVERRIDE] = lambda func, *a, **k: ours(func, *a, **k)
    sample(wrapping, FLUX_X, SIGMAS, CTX, conds={"ref_latents": [torch.zeros(1)]})
    assert patch.last["calls"] == 4 * 3 and patch.last["fallback_calls"] == 4 * 3


def test_contract_sparse_run_through_the_sampler_matches_the_oracle_kernel(book):
    """The whole path (wrapper, override, runtime, kernel) with the kernel swapped for a masked-dense oracle."""
    calls = []

    def oracle(q, k, v, mask, scale=None, quant="none", perm=None):
        calls.append(mask)
        tok = mask.to_token_mask()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=tok, scale=scale), None

    plan = choice(AttentionPlan(Window3DConfig(window=(0, 1, 1)), block_size=8))
    a = fa.apply_fast_attention(flux_patcher(), plan=plan, book=book, sparse_fn=oracle)
    b = fa.apply_fast_attention(flux_patcher(), plan=plan, book=book, sparse_fn=kernel_attention)
    torch.testing.assert_close(
        sample(a, FLUX_X, SIGMAS, CTX), sample(b, FLUX_X, SIGMAS, CTX), atol=1e-4, rtol=1e-4
    )
    assert len(calls) == 4 * 3 and find_patch(b).last["density"] < 1.0


def test_contract_v3_nodes_are_thin_and_declare_tooltips(monkeypatch, book):
    """The V3 classes against a fake ``comfy_api.latest`` (only what the schema description names)."""
    io = types.SimpleNamespace()

    class Spec:
        def __init__(self, *args, **kwargs):
            self.args, self.kwargs = args, kwargs

    def comfy_type(name):
        return types.SimpleNamespace(io_type=name, Input=type(name + "In", (Spec,), {}),
                                     Output=type(name + "Out", (Spec,), {}))  # fmt: skip

    class ComfyNode:
        pass

    class NodeOutput:
        def __init__(self, *args, ui=None):
            self.args, self.ui = args, ui

    for name in ("Model", "Clip", "Combo", "Float", "Int", "String", "AnyType", "Latent", "Boolean", "Conditioning"):
        setattr(io, name, comfy_type(name))
    io.Custom, io.ComfyNode, io.NodeOutput, io.Schema = comfy_type, ComfyNode, NodeOutput, Spec
    latest = types.ModuleType("comfy_api.latest")
    latest.io, latest.ComfyExtension = io, type("ComfyExtension", (), {})
    monkeypatch.setitem(sys.modules, "comfy_api", types.ModuleType("comfy_api"))
    monkeypatch.setitem(sys.modules, "comfy_api.latest", latest)
    monkeypatch.delitem(sys.modules, "fastattn.nodes.comfy_nodes", raising=False)
    import fastattn

    ext = asyncio.run(fastattn.comfy_entrypoint())
    nodes = asyncio.run(ext.get_node_list())
    schemas = {n.define_schema().kwargs["node_id"]: n for n in nodes}
    assert set(schemas) == {"FastAttnApply", "FastAttnCache", "FastAttnPlan", "FastAttnReport", "FastAttnPromptEnhancer",
                            "FastAttnTextEncoderCache", "FastAttnCalibrate", "FastAttnSavePlan",
                            "FastAttnMultiGPU"}  # fmt: skip
    for node in nodes:
        s = node.define_schema().kwargs
        assert s["category"] == "fastattn" and s["display_name"]
        for spec in s["inputs"]:
            assert spec.kwargs.get("tooltip"), f"{s['node_id']}.{spec.args[0]} has no tooltip"
    fast = schemas["FastAttnApply"]
    out = fast.execute(flux_patcher(), "custom", "band", 0.5, "default", 0.0, 1.0, "0", None)
    patched = out.args[0]
    assert find_patch(patched).plan.dense_layers == (0,)
    cached = schemas["FastAttnCache"].execute(patched, "custom", "delta", 0.1, 2, 0.1, 1, 2, True, 1.0, "int8", False)
    assert find_patch(cached.args[0]).plan.cache.blocks == "delta" and find_patch(cached.args[0]).plan.dense_layers == (0,)
    report = schemas["FastAttnReport"].execute(patched)
    assert report.args[0].startswith("fastattn: nothing ran yet") and report.ui == {"text": [report.args[0]]}
    assert math.isnan(schemas["FastAttnReport"].fingerprint_inputs(model=patched))
    assert schemas["FastAttnPlan"].execute("flux-fast", "").args[0].meta.model.family == "flux"
    enhancer = schemas["FastAttnPromptEnhancer"]
    assert (
        enhancer.validate_inputs("3").startswith("kv_bits must be one of")
        and enhancer.validate_inputs("4") is True
    )
    with pytest.raises(ValueError, match="model_path is empty"):
        enhancer.execute("a cat", " ")


def test_contract_example_workflows_use_the_nodes_inputs():
    root = Path(__file__).resolve().parents[1] / "workflows"
    widgets = {
        "model",
        "preset",
        "method",
        "density",
        "quant",
        "start_percent",
        "end_percent",
        "dense_blocks",
    }
    for family in ("flux", "sd3", "wan", "hunyuan_video"):
        graph = json.loads((root / f"{family}.json").read_text())
        by_type = {n["class_type"]: (i, n["inputs"]) for i, n in graph.items()}
        unet_id, unet = by_type["UNETLoader"]
        fast_id, fast = by_type["FastAttnApply"]
        ks_id, ks = by_type["KSampler"]
        assert unet["unet_name"] == f"tiny_{family}.safetensors" and fast["model"] == [unet_id, 0]
        assert set(fast) == widgets and ks["model"] == [fast_id, 0]
        assert by_type["SaveLatent"][1]["samples"] == [ks_id, 0]
        assert fast["preset"] in fa.PRESETS and fast["method"] in fa.METHODS and fast["quant"] in fa.QUANTS
        fa.parse_dense_blocks(fast["dense_blocks"])
        for node in graph.values():  # every link points at a node of the graph
            for v in node["inputs"].values():
                assert not isinstance(v, list) or v[0] in graph


def test_contract_import_stays_light_and_exports_only_the_v3_entry_point():
    code = ("import sys, fastattn; assert callable(fastattn.comfy_entrypoint); "
            "assert not hasattr(fastattn, 'NODE_CLASS_MAPPINGS'); "
            "assert not [m for m in sys.modules if m.startswith(('comfy', 'diffusers', 'fastattn.nodes.'))], "
            "[m for m in sys.modules if m.startswith(('comfy', 'diffusers', 'fastattn.nodes.'))]")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")
