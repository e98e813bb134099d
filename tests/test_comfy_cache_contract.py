"""Contract tests of the Fast Attention Cache node against fakes of ComfyUI's runtime contract.

The fakes of ``tests/test_comfy_contract.py`` (dispatcher, ``ModelPatcher``, sampler with the ``APPLY_MODEL``
wrappers and run callbacks) plus two tiny diffusion models whose block loops honour ComfyUI's documented block
replacement: before block ``i`` they look up ``transformer_options["patches_replace"]["dit"][(kind, i)]`` and
call it as ``entry(args, {"original_block": run})``, ``run(args)`` returning the block's outputs as a dict:

- ``Flux``: double blocks update ``{"img", "txt"}``; text and image are then concatenated and single blocks
  update the joint ``{"img"}`` (the shape changes between the two block lists);
- ``WanModel``: blocks update ``{"img"}``; the text is a cross-attention condition, not a stream.

Written from the contract's description (``shared/reference/comfyui.md``), not from ComfyUI's code.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import types
from pathlib import Path

import pytest
import torch
from fastattn.nodes import fast_attention as fa
from fastattn.nodes import fast_cache as fc
from fastattn.nodes.host import ScheduleBook, find_patch
from fastattn.nodes.host.blocks import BlockPatch

_spec = importlib.util.spec_from_file_location(
    "_comfy_fakes", Path(__file__).with_name("test_comfy_contract.py")
)
fakes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fakes)
sample, ModelPatcher, BaseModel, optimized_attention = (
    fakes.sample, fakes.ModelPatcher, fakes.BaseModel, fakes.optimized_attention
)  # fmt: skip


def _w(fan_in, fan_out, g):
    return torch.randn(fan_in, fan_out, generator=g) / math.sqrt(fan_in)


class _Block(torch.nn.Module):
    """Self-attention over its input sequence plus a small nonlinearity."""

    def __init__(self, dim, heads, g):
        super().__init__()
        self.heads = heads
        self.qkv, self.mlp = _w(dim, 3 * dim, g), _w(dim, dim, g)

    def forward(self, seq, to):
        b, n, _ = seq.shape
        q, k, v = (seq @ self.qkv).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        seq = seq + optimized_attention(q, k, v, self.heads, skip_reshape=True, transformer_options=to)
        return seq + 0.1 * torch.tanh(seq @ self.mlp)


def _replaced(to, kind, i, args, run):
    entry = (to.get("patches_replace") or {}).get("dit", {}).get((kind, i))
    return run(args) if entry is None else entry(args, {"original_block": run})


class Flux(torch.nn.Module):
    """Double blocks on (img, txt), then single blocks on the joint [txt, img] sequence; patch 2."""

    patch_size = 2

    def __init__(self, channels=4, heads=2, head_dim=8, double=2, single=2, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        dim = heads * head_dim
        self.num_heads, self.hidden_size = heads, dim
        self.double_blocks = torch.nn.ModuleList(_Block(dim, heads, g) for _ in range(double))
        self.single_blocks = torch.nn.ModuleList(_Block(dim, heads, g) for _ in range(single))
        self.w_in, self.w_txt, self.w_out = _w(channels * 4, dim, g), _w(8, dim, g), _w(dim, channels * 4, g)

    def forward(self, x, t, context=None, transformer_options=None, **kwargs):
        to = transformer_options
        b, c, h, w = x.shape
        img = (
            x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * 4) @ self.w_in
        )
        txt = context @ self.w_txt
        n_txt = txt.shape[1]
        for i, block in enumerate(self.double_blocks):

            def run(a, block=block):
                seq = block(torch.cat([a["txt"], a["img"]], 1), a["transformer_options"])
                return {"txt": seq[:, :n_txt], "img": seq[:, n_txt:]}

            out = _replaced(to, "double_block", i, {"img": img, "txt": txt, "transformer_options": to}, run)
            img, txt = out["img"], out["txt"]
        seq = torch.cat([txt, img], 1)
        for i, block in enumerate(self.single_blocks):
            run = lambda a, block=block: {"img": block(a["img"], a["transformer_options"])}
            seq = _replaced(to, "single_block", i, {"img": seq, "transformer_options": to}, run)["img"]
        out = seq[:, n_txt:] @ self.w_out
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


class WanModel(torch.nn.Module):
    """Video-only self-attention blocks, text as a cross-attention condition; patch (1, 2, 2)."""

    patch_size = (1, 2, 2)

    def __init__(self, channels=4, heads=2, head_dim=8, layers=3, seed=1):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.num_heads, self.dim = heads, heads * head_dim
        self.blocks = torch.nn.ModuleList(_Block(self.dim, heads, g) for _ in range(layers))
        self.w_in, self.w_txt, self.w_out = (
            _w(channels * 4, self.dim, g),
            _w(8, self.dim, g),
            _w(self.dim, channels * 4, g),
        )

    def forward(self, x, t, context=None, transformer_options=None, **kwargs):
        to = transformer_options
        b, c, f, h, w = x.shape
        seq = (
            x.reshape(b, c, f, h // 2, 2, w // 2, 2).permute(0, 2, 3, 5, 1, 4, 6).reshape(b, -1, c * 4)
            @ self.w_in
        )
        cond = (context @ self.w_txt).mean(1, keepdim=True)
        for i, block in enumerate(self.blocks):
            run = lambda a, block=block: {"img": block(a["img"] + a["txt"], a["transformer_options"])}
            seq = _replaced(to, "double_block", i, {"img": seq, "txt": cond, "transformer_options": to}, run)[
                "img"
            ]
        out = seq @ self.w_out
        return out.view(b, f, h // 2, w // 2, c, 2, 2).permute(0, 4, 1, 2, 5, 3, 6).reshape(b, c, f, h, w)


FLUX_X = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
WAN_X = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(3))
CTX = torch.randn(1, 5, 8, generator=torch.Generator().manual_seed(4))
SIGMAS = [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]
CUSTOM = dict(preset="custom", blocks="fixed", first_steps=0.0, last_steps=0)  # skip every other step


def flux():
    return ModelPatcher(BaseModel(Flux())), FLUX_X


def wan():
    return ModelPatcher(BaseModel(WanModel())), WAN_X


@pytest.fixture
def book():
    return ScheduleBook()


def test_cache_off_is_bit_exact_and_the_input_model_is_untouched(book):
    for make in (flux, wan):
        base, x = make()
        ref = sample(base, x, SIGMAS, CTX)
        for kw in (dict(preset="off"), dict(preset="off", cache_budget_gb=0.5, cache_storage="int8")):
            patched = fc.apply_fast_cache(base, book=book, **kw)
            assert torch.equal(sample(patched, x, SIGMAS, CTX), ref)
        assert not base.wrappers and "patches_replace" not in base.model_options["transformer_options"]


@pytest.mark.parametrize("make", [flux, wan])
def test_skipped_blocks_equal_computed_ones_on_identical_inputs(make, book):
    """Two forwards on the same latent: the second skips the blocks after the probe and adds their cached
    residual per block list, which reproduces the computed output (Flux: across the txt/img concatenation)."""
    base, x = make()
    patched = fc.apply_fast_cache(base, book=book, **CUSTOM)
    patch = find_patch(patched)
    outs, schedule = [], torch.tensor(SIGMAS)
    patch.begin_run()
    for sigma in SIGMAS[:2]:
        to = dict(patched.model_options["transformer_options"], sample_sigmas=schedule,
                  sigmas=torch.tensor([sigma]), cond_or_uncond=[0], wrappers=patched.wrappers)  # fmt: skip
        outs.append(
            patched.model.apply_model(x, torch.tensor([sigma]), c_crossattn=CTX, transformer_options=to)
        )
    patch.end_run()
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    blocks = patch.report()["cache"]["blocks"]
    n = len(getattr(base.model.diffusion_model, "blocks", [])) or 4
    assert blocks["blocks_run"] == n + 1 and blocks["blocks_skipped"] == n - 1
    assert blocks["schedule"] == [[0, 0, 0], [1, 0, n - 1]]
    assert patch.report()["notes"] == {}  # the skipped blocks' attention layers kept their numbering


@pytest.mark.parametrize("batched", [True, False])
def test_runs_per_branch_reset_and_report(book, batched):
    base, x = flux()
    patched = fc.apply_fast_cache(base, book=book, **CUSTOM)
    patch = find_patch(patched)
    out1 = sample(patched, x, SIGMAS, CTX, batched=batched)
    r = patch.report()
    blocks = r["cache"]["blocks"]
    steps = len(SIGMAS) - 1
    branches = [0] if batched else [1, 0]  # ComfyUI runs the negative pass first when it cannot batch
    assert [(s, b) for s, b, _ in blocks["schedule"]] == [(s, b) for s in range(steps) for b in branches]
    assert [k for s, b, k in blocks["schedule"] if b == branches[0]] == [0, 3, 0, 3, 0]  # steps 1 and 3 skip
    assert blocks["recomputes"] == {} and r["cache"]["memory"]["peak_bytes"] > 0
    assert patch.runtime.cache_bytes() == 0  # freed by ON_CLEANUP
    text = fa.report_text(patched)
    assert "blocks skipped: 6 of 20 block calls" in text or "blocks skipped: 12 of 40" in text, text
    assert "cache memory:" in text
    assert torch.equal(sample(patched, x, SIGMAS, CTX, batched=batched), out1)  # state reset between runs
    assert not torch.equal(out1, sample(base, x, SIGMAS, CTX, batched=batched))


def test_budget_over_recomputes_counted_and_output_exact(book):
    base, x = flux()
    ref = sample(base, x, SIGMAS, CTX)
    patched = fc.apply_fast_cache(base, book=book, cache_budget_gb=1e-9, **CUSTOM)
    out = sample(patched, x, SIGMAS, CTX)
    r = find_patch(patched).report()["cache"]
    assert torch.equal(out, ref)  # nothing fit: every block ran
    # steps 1 and 3 wanted to skip the double block 1 and both single blocks: two block lists, two residuals
    assert r["blocks"]["blocks_skipped"] == 0 and r["blocks"]["recomputes"] == {
        "the residual did not fit cache_budget_gb": 4
    }
    assert r["memory"]["refused_over_budget"]["blocks"] > 0 and r["memory"]["peak_bytes"] == 0


def test_composes_with_fast_attention_in_either_order(book):
    base, x = flux()
    sparse = fa.apply_fast_attention(base, "custom", "band", 0.5, book=book)
    both = fc.apply_fast_cache(sparse, book=book, **CUSTOM)
    patch = find_patch(both)
    assert patch.plan.method.name == "band" and patch.plan.cache.blocks == "fixed"
    assert patch.settings["method"] == "band" and patch.settings["cache"]["blocks"] == "fixed"
    sample(both, x, SIGMAS, CTX)
    r = patch.report()
    assert r["sparse_calls"] > 0 and r["cache"]["blocks"]["blocks_skipped"] > 0
    # Fast Attention applied after the cache node keeps the cache; re-applying the cache node replaces ours
    again = fa.apply_fast_attention(both, "custom", "band", 0.3, book=book)
    assert find_patch(again).plan.cache.blocks == "fixed" and find_patch(again).plan.method.density == 0.3
    dit = again.model_options["transformer_options"]["patches_replace"]["dit"]
    assert all(
        isinstance(p, BlockPatch) and p.patch is find_patch(again) and p.previous is None
        for p in dit.values()
    )
    off = fc.apply_fast_cache(again, preset="off", book=book)
    assert "dit" not in off.model_options["transformer_options"].get("patches_replace", {})


def test_block_replacements_of_other_nodes_still_run(book):
    base, x = wan()
    seen = []

    def theirs(args, extra):
        seen.append(1)
        return extra["original_block"](args)

    base.model_options["transformer_options"]["patches_replace"] = {"dit": {("double_block", 1): theirs}}
    ref = sample(base, x, SIGMAS, CTX)
    n_ref, seen[:] = len(seen), []
    patched = fc.apply_fast_cache(base, book=book, **CUSTOM)
    sample(patched, x, SIGMAS, CTX)
    assert 0 < len(seen) < n_ref  # ran where block 1 was computed, not where it was skipped
    off = fc.apply_fast_cache(patched, preset="off", book=book)
    assert off.model_options["transformer_options"]["patches_replace"]["dit"] == {("double_block", 1): theirs}
    assert torch.equal(sample(off, x, SIGMAS, CTX), ref)


@pytest.mark.parametrize("batched", [True, False])
def test_attention_sharing_across_cfg_and_steps(book, batched):
    base, x = wan()
    patched = fc.apply_fast_cache(base, preset="off", cfg_share=True, book=book)
    out = sample(patched, x, SIGMAS, CTX, batched=batched)
    r = find_patch(patched).report()
    layers, steps = 3, len(SIGMAS) - 1
    window = steps - 1 - 1  # first_steps 0.1 of 5 -> 1 step, last_steps 1
    assert r["cache"]["attention"]["cfg_reuses"] == layers * window and torch.isfinite(out).all()
    assert r["reuses"] == {"cfg": layers * window}
    assert 0.5 < r["density"] < 1.0
    ast = fc.apply_fast_cache(base, preset="off", attn_share_interval=2, book=book)
    sample(ast, x, SIGMAS, CTX, batched=batched)
    a = find_patch(ast).report()["cache"]["attention"]
    assert a["step_reuses"] == layers * (1 if batched else 2) and a["recomputes"] == {}


def test_node_errors_and_passthrough(book):
    with pytest.raises(fa.NodeError, match="unknown cache preset"):
        fc.apply_fast_cache(flux()[0], preset="turbo", book=book)
    with pytest.raises(fa.NodeError, match="cache_budget_gb"):
        fc.apply_fast_cache(flux()[0], cache_budget_gb=-1, book=book)
    with pytest.raises(fa.NodeError, match="threshold"):
        fc.apply_fast_cache(flux()[0], preset="custom", threshold=-0.5, book=book)
    other = ModelPatcher(BaseModel(fakes.NextDiT()))
    patched = fc.apply_fast_cache(other, book=book)
    assert find_patch(patched).reason.startswith("family not supported yet: lumina2")


@pytest.mark.parametrize(
    "preset, extrapolate, order",
    [("balanced", "preset", 1), ("balanced", "off", 0), ("balanced", "first-order", 1), ("delta", "preset", 0),
     ("delta", "first-order", 1), ("custom", "preset", 1), ("custom", "off", 0), ("custom", "first-order", 1)],
)  # fmt: skip
def test_extrapolate_sets_the_cache_order(book, preset, extrapolate, order):
    assert fc.cache_config(preset, extrapolate=extrapolate).order == order
    patched = fc.apply_fast_cache(flux()[0], preset=preset, extrapolate=extrapolate, book=book)
    assert find_patch(patched).plan.cache.order == order
    assert find_patch(patched).settings["extrapolate"] == extrapolate
    if extrapolate == "preset":  # the default: callers that predate the widget get the same config
        assert fc.cache_config(preset) == fc.cache_config(preset, extrapolate="preset")


def test_extrapolate_reaches_the_skipped_blocks(book):
    """Fixed skips on steps 1 and 3: step 3 has two captures (steps 0 and 2) to extrapolate from."""
    base, x = flux()
    outs = {}
    for choice in ("off", "first-order"):
        patched = fc.apply_fast_cache(base, book=book, extrapolate=choice, **CUSTOM)
        outs[choice] = sample(patched, x, SIGMAS, CTX)
        blocks = find_patch(patched).report()["cache"]["blocks"]
        assert blocks["blocks_skipped"] > 0
        assert (blocks["extrapolated"] > 0) == (choice == "first-order"), blocks
        text = fa.report_text(patched)  # the Report node's text says how many skips were extrapolated
        assert f"skipped ranges extrapolated (first order): {blocks['extrapolated']};" in text, text
    assert torch.isfinite(outs["first-order"]).all() and not torch.equal(outs["off"], outs["first-order"])


def test_bad_extrapolate_is_a_node_error_naming_the_choices(book):
    for bad in ("second-order", "", 1, None):
        with pytest.raises(fa.NodeError, match=r"extrapolate.*'preset', 'off', 'first-order'"):
            fc.apply_fast_cache(flux()[0], extrapolate=bad, book=book)


def test_node_schema_ends_with_extrapolate_and_execute_passes_it(monkeypatch, book):
    """Saved workflows store widget values by position: the new widget must be the last input."""
    io = types.SimpleNamespace()

    class Spec:
        def __init__(self, *args, **kwargs):
            self.args, self.kwargs = args, kwargs

    def comfy_type(name):
        return types.SimpleNamespace(
            Input=type(name + "In", (Spec,), {}), Output=type(name + "Out", (Spec,), {})
        )

    for name in (
        "Model",
        "Clip",
        "Combo",
        "Float",
        "Int",
        "String",
        "AnyType",
        "Latent",
        "Boolean",
        "Conditioning",
    ):
        setattr(io, name, comfy_type(name))
    io.Custom, io.Schema = comfy_type, Spec
    io.ComfyNode = type("ComfyNode", (), {})
    io.NodeOutput = type(
        "NodeOutput", (), {"__init__": lambda self, *args, ui=None: setattr(self, "args", args)}
    )
    latest = types.ModuleType("comfy_api.latest")
    latest.io, latest.ComfyExtension = io, type("ComfyExtension", (), {})
    monkeypatch.setitem(sys.modules, "comfy_api", types.ModuleType("comfy_api"))
    monkeypatch.setitem(sys.modules, "comfy_api.latest", latest)
    monkeypatch.delitem(sys.modules, "fastattn.nodes.comfy_nodes", raising=False)
    from fastattn.nodes import comfy_nodes

    inputs = comfy_nodes.FastAttentionCache.define_schema().kwargs["inputs"]
    names = [spec.args[0] for spec in inputs]
    assert names[:2] == ["model", "preset"] and names[-2:] == ["cache_offload", "extrapolate"], names
    last = inputs[-1]
    assert isinstance(last, io.Combo.Input) and last.kwargs["options"] == ["preset", "off", "first-order"]
    assert last.kwargs["default"] == "preset" and "custom" in last.kwargs["tooltip"]
    values = dict(preset="fast", blocks="auto", threshold=0.1, max_skips=2, first_steps=0.1, last_steps=1,
                  attn_share_interval=0, cfg_share=False, cache_budget_gb=0.0, cache_storage="auto",
                  cache_offload=False)  # fmt: skip
    for choice, order in (("off", 0), ("first-order", 1)):
        out = comfy_nodes.FastAttentionCache.execute(flux()[0], **values, extrapolate=choice)
        assert find_patch(out.args[0]).plan.cache.order == order
    out = comfy_nodes.FastAttentionCache.execute(flux()[0], *values.values())  # a caller without the widget
    assert find_patch(out.args[0]).plan.cache.order == 1
