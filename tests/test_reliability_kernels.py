"""Reliability of the mask and kernel layers (issue 18): absurd sizes fail fast with the limit in the
message, loose types are refused, and gradients flow through the kernels and through an enabled model.

Gradients: the dense and reference paths must equal eager attention's gradients (float32, tight), the
backward formula passes ``gradcheck`` in float64 (masked-product and block-loop paths, a permutation,
ragged blocks and rows that read no key), the Triton and quantized forwards share it (straight-through),
and a tiny diffusers transformer trains with fastattn enabled: a dense plan gives the unpatched model's
parameter gradients, a sparse plan the gradients of the masked dense model.
"""

from __future__ import annotations

import functools
import math
import time

import pytest
import torch
from fastattn.attn_kernels import KernelGeometry, run_attention, sparse_attention
from fastattn.attn_kernels import backward as kernel_backward
from fastattn.masks import BlockMask, TokenLayout, axis_order_permutation, head_permutations, patterns
from fastattn.masks.layout import BlockGeometry

# ----------------------------------------------------------------------------------- absurd sizes

HUGE_VIDEO = TokenLayout.video(1000, 1000, 1000)  # 10^9 tokens


def _fails_fast(fn, match="limit"):
    t = time.perf_counter()
    with pytest.raises(ValueError, match=match):
        fn()
    assert time.perf_counter() - t < 2.0, "the size check must come before any work"


@pytest.mark.parametrize(
    "build",
    [
        lambda: patterns.dense(TokenLayout(10**9)),
        lambda: BlockMask.dense(TokenLayout(10**7)),
        lambda: BlockMask.dense(TokenLayout(10**6), kv_layout=TokenLayout(10**9)),
        lambda: patterns.window3d(HUGE_VIDEO, (1, 1, 1)),
        lambda: patterns.window3d_builder(HUGE_VIDEO),
        lambda: patterns.radial(HUGE_VIDEO, (4, 4)),
        lambda: patterns.window3d_density_table(HUGE_VIDEO, [(1, 1), (2, 2)]),
        lambda: patterns.window3d_for_density(HUGE_VIDEO, 0.3),
        lambda: patterns.band(TokenLayout(10**9), 5),
        lambda: patterns.arrow(TokenLayout(10**9), 4),
        lambda: patterns.band_for_density(TokenLayout(10**9), 0.3),
        lambda: patterns.multi_diagonal(HUGE_VIDEO, 4, (-1, 0, 1)),
        lambda: patterns.vertical_stripes(TokenLayout(10**9), [(0, 10)]),
        # a broadcast map costs nothing to hand over, but building the lists would sort 10^10 entries
        lambda: BlockMask.from_block_map(
            torch.ones(1, 1, dtype=torch.bool).expand(78125, 78125), TokenLayout(10**7), 128
        ),
    ],
)
def test_absurd_sizes_fail_fast_with_the_limit(build):
    _fails_fast(build)


def test_size_errors_say_what_was_asked_and_what_to_do():
    with pytest.raises(ValueError) as e:
        BlockMask.dense(TokenLayout(10**7))
    msg = str(e.value)
    assert "78125 x 78125" in msg and "block_size" in msg and f"{1 << 28:,}" in msg, msg


def test_thin_grids_bound_the_segment_work():
    """A one-token-wide grid cuts every 128-token block into 128 row segments: the pairwise segment
    work (n^2 k^2) is what explodes there, before the mask size does."""
    layout = TokenLayout.video(1, 1 << 17, 1)
    _fails_fast(lambda: patterns.window3d(layout, (0, 2, 0)), match="segment")
    _fails_fast(lambda: patterns.window3d_density_table(layout, [(1, 1)]), match="segment")


def test_token_mask_is_refused_past_its_limit():
    mask = patterns.dense(TokenLayout(200_000), 4096)  # 49 blocks: a fine mask, a 40 GB token mask
    _fails_fast(mask.to_token_mask)


def test_realistic_sizes_still_build():
    """HunyuanVideo 720p with 64-token blocks (1,862 blocks per side) stays under every limit."""
    layout = TokenLayout.video(33, 45, 80, text_len=256, text_first=False)
    geom = BlockGeometry(layout, 64)
    assert geom.num_blocks**2 < patterns.MAX_BLOCK_PAIRS
    mask = patterns.band(layout, 2048, 64)
    assert mask.num_blocks == geom.num_blocks and 0 < mask.block_density() < 1


# ----------------------------------------------------------------------------------- loose types


@pytest.mark.parametrize(
    "build, exc",
    [
        (lambda: TokenLayout(True), TypeError),
        (lambda: TokenLayout(64.0), TypeError),
        (lambda: TokenLayout(64, 8.0), TypeError),
        (lambda: TokenLayout(64, 8, text_first="yes"), TypeError),
        (lambda: TokenLayout(12, 0, True, (1.0, 3, 4)), TypeError),
        (lambda: TokenLayout(12, 0, True, (True, 3, 4)), TypeError),
        (lambda: TokenLayout.video(1, 2.5, 4), TypeError),
        (lambda: BlockGeometry(TokenLayout(64), True), TypeError),
        (lambda: BlockGeometry(TokenLayout(64), 16.0), TypeError),
        (lambda: KernelGeometry(64, 64, True), TypeError),
        (lambda: KernelGeometry(64.0, 64, 16), TypeError),
        (lambda: KernelGeometry(64, 64, 16, q_split=True), TypeError),
        (lambda: patterns.dense(TokenLayout(64), block_size=True), TypeError),
        (lambda: BlockMask.dense(TokenLayout(64), 16.0), TypeError),
        (lambda: patterns.window3d(TokenLayout.video(2, 4, 4), (1.5, 1, 1), 8), TypeError),
        (lambda: patterns.window3d(TokenLayout.video(2, 4, 4), (True, 1, 1), 8), TypeError),
        (lambda: patterns.window3d(TokenLayout.video(2, 4, 4), "abc", 8), TypeError),
        (lambda: patterns.window3d(TokenLayout.video(2, 4, 4), (1, 2), 8), ValueError),
        (lambda: patterns.radial(TokenLayout.video(2, 4, 4), (2.5, 2), block_size=8), TypeError),
        (lambda: patterns.radial(TokenLayout.video(2, 4, 4), (2, 2), 1.5, block_size=8), TypeError),
        (lambda: patterns.radial(TokenLayout.video(2, 4, 4), (2, 2), -1, block_size=8), ValueError),
        (lambda: patterns.radial(TokenLayout.video(2, 4, 4), (-1, 2), block_size=8), ValueError),
        (lambda: patterns.band(TokenLayout(64), 2.5, 16), TypeError),
        (lambda: patterns.band(TokenLayout(64), 4, 16, text="none"), ValueError),
        (lambda: patterns.arrow(TokenLayout(64), 1.5, 16), TypeError),
        (lambda: patterns.arrow(TokenLayout(64), True, 16), TypeError),
        (lambda: patterns.multi_diagonal(TokenLayout.video(2, 4, 4), 2, (0.5,), 8), TypeError),
        (lambda: patterns.vertical_stripes(TokenLayout(64), [(0.0, 8)], 16), TypeError),
        (lambda: patterns.band_for_density(TokenLayout(64), True, 16), TypeError),
        (lambda: patterns.band_for_density(TokenLayout(64), float("nan"), 16), ValueError),
    ],
)
def test_loose_numbers_are_refused_in_masks(build, exc):
    with pytest.raises(exc, match="must be|expected|got"):
        build()


def test_blockmask_constructor_checks_what_it_is_given():
    good = patterns.dense(TokenLayout(64), 16)
    c, i = good.kv_counts, good.kv_indices
    with pytest.raises(TypeError, match="int32"):
        BlockMask(c.long(), i, TokenLayout(64), 16)
    with pytest.raises(TypeError, match="TokenLayout"):
        BlockMask(c, i, 64, 16)
    with pytest.raises(TypeError, match="block_size"):
        BlockMask(c, i, TokenLayout(64), True)
    with pytest.raises(ValueError, match="query blocks"):
        BlockMask(c, i, TokenLayout(64), 8)  # 8 query blocks expected, the lists hold 4
    with pytest.raises(ValueError, match=r"\[Bm, Hm, nQ\]"):
        BlockMask(c[0], i, TokenLayout(64), 16)
    with pytest.raises(TypeError, match="kv_layout"):
        BlockMask(c, i, TokenLayout(64), 16, kv_layout=(64,))


def _qkv(b=1, h=2, s=40, d=16, dtype=torch.float32, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, s, d, generator=g, dtype=dtype).requires_grad_(requires_grad) for _ in range(3)]


@pytest.mark.parametrize(
    "scale, exc",
    [
        (math.inf, ValueError),
        (-1.0, ValueError),
        (0.0, ValueError),
        (math.nan, ValueError),
        (True, TypeError),
        ("0.1", TypeError),
    ],
)
def test_scale_must_be_a_finite_positive_number(scale, exc):
    q, k, v = _qkv()
    mask = patterns.dense(TokenLayout(40), 8)
    for call in (
        lambda: sparse_attention(q, k, v, mask, scale=scale, backend="reference"),
        lambda: run_attention(q, k, v, mask, scale=scale, backend="reference"),
    ):
        with pytest.raises(exc, match="scale"):
            call()


def test_empty_dims_are_refused_not_divided_by():
    q, k, v = _qkv(d=16)
    z = [x[..., :0] for x in (q, k, v)]
    with pytest.raises(ValueError, match="head_dim"):
        sparse_attention(*z, backend="reference")
    with pytest.raises(ValueError, match="head_dim"):
        run_attention(*z, patterns.dense(TokenLayout(40), 8), backend="reference")
    with pytest.raises(ValueError, match="empty"):
        sparse_attention(*(x[:, :, :0] for x in (q, k, v)), backend="reference")


def test_run_attention_refuses_bool_flags_as_numbers():
    q, k, v = _qkv()
    mask = patterns.dense(TokenLayout(40), 8)
    counts, indices, geom = mask.block_lists()
    with pytest.raises(TypeError, match="need_lse"):
        run_attention(q, k, v, counts, indices, geom, need_lse="yes", backend="reference")
    with pytest.raises(TypeError, match="quant"):
        run_attention(q, k, v, mask, quant=8, backend="reference")


# ----------------------------------------------------------------------------------- gradients


def eager_attention(q, k, v, keep=None, scale=None, perm=None):
    """Masked softmax attention in plain autograd ops: ``(out, lse)``; rows with no key give 0, -inf."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    if perm is not None:
        idx = perm.long().expand(q.shape[1], -1)[None, :, :, None]
        q, k, v = (torch.gather(x, 2, idx.expand(x.shape[0], -1, -1, x.shape[-1])) for x in (q, k, v))
    s = (q @ k.transpose(-1, -2)) * scale
    if keep is not None:
        s = s.masked_fill(~keep, -math.inf)
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    safe = torch.where(l > 0, l, torch.ones_like(l))  # no 0/0 in the backward of unselected branches
    out = (p @ v) / safe
    lse = torch.where(l > 0, m + torch.log(safe), torch.full_like(l, -math.inf))[..., 0]
    if perm is not None:
        inv = torch.argsort(perm.long(), dim=-1).expand(q.shape[1], -1)[None, :, :, None]
        out = torch.gather(out, 2, inv.expand(out.shape[0], -1, -1, out.shape[-1]))
        lse = torch.gather(lse, 2, inv[..., 0].expand(lse.shape[0], -1, -1))
    return out, lse


def _grads(fn, inputs, seed=1):
    """Gradients of a fixed random projection of ``fn(*inputs)`` (out, and lse where it is finite)."""
    out, lse = fn(*inputs)
    g = torch.Generator().manual_seed(seed)
    w_out = torch.randn(out.shape, generator=g, dtype=out.dtype)
    w_lse = torch.randn(lse.shape, generator=g, dtype=lse.dtype)
    loss = (out * w_out).sum() + torch.where(torch.isfinite(lse), lse * w_lse, 0).sum()
    return torch.autograd.grad(loss, inputs)


LAYOUT = TokenLayout.video(2, 3, 5, text_len=7, text_first=True)  # 37 tokens, ragged 8-token blocks


def _sparse_mask():
    mask = BlockMask.stack_heads(
        [patterns.window3d(LAYOUT, (0, 1, 1), 8), patterns.band(LAYOUT, 6, 8, text="self")]
    )
    return mask


def test_dense_grads_equal_sdpa():
    q, k, v = _qkv(s=37, requires_grad=True)

    def ours(q, k, v):
        out = sparse_attention(q, k, v, backend="reference")
        return out, torch.zeros(out.shape[:3])  # no lse from SDPA: compare out's gradient only

    def sdpa(q, k, v):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return out, torch.zeros(out.shape[:3])

    for a, b in zip(_grads(ours, (q, k, v)), _grads(sdpa, (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("perm_kind", ["none", "shared", "per_head"])
def test_sparse_reference_grads_equal_eager_masked_attention(perm_kind):
    q, k, v = _qkv(s=LAYOUT.seq_len, requires_grad=True)
    mask = _sparse_mask().skip_heads([1]) if perm_kind == "none" else _sparse_mask()  # head 1: no keys
    perm = {
        "none": None,
        "shared": axis_order_permutation(LAYOUT, "HWF"),
        "per_head": head_permutations(LAYOUT, ["WHF", "FWH"]),
    }[perm_kind]
    keep = mask.to_token_mask()

    def ours(q, k, v):
        res = run_attention(q, k, v, mask, perm=perm, scale=0.3, backend="reference")
        assert res.fallback is None
        return res.out, res.lse

    got = _grads(ours, (q, k, v))
    want = _grads(lambda q, k, v: eager_attention(q, k, v, keep, 0.3, perm), (q, k, v))
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_block_loop_backward_equals_the_masked_product(monkeypatch):
    """Long problems run the backward block row by block row; it is the same math."""
    q, k, v = _qkv(b=2, s=LAYOUT.seq_len, requires_grad=True)
    mask = _sparse_mask()
    perm = head_permutations(LAYOUT, ["HWF", "FHW"])

    def ours(q, k, v):
        res = run_attention(q, k, v, mask, perm=perm, backend="reference")
        return res.out, res.lse

    whole = _grads(ours, (q, k, v))
    monkeypatch.setattr(kernel_backward, "MASKED_PRODUCT_LIMIT", 0)
    looped = _grads(ours, (q, k, v))
    for a, b in zip(looped, whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class _OracleWithOurBackward(torch.autograd.Function):
    """float64 eager forward, fastattn's backward: what gradcheck compares against finite differences."""

    @staticmethod
    def forward(ctx, q, k, v, mask, keep, perm):
        ctx.save_for_backward(q, k, v)
        ctx.mask, ctx.perm = mask, perm
        return eager_attention(q, k, v, keep, 0.7, perm)

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v = ctx.saved_tensors
        dq, dk, dv = kernel_backward.attention_backward(
            q, k, v, dout, dlse, ctx.mask.block_lists(), 0.7, ctx.perm
        )
        return dq, dk, dv, None, None, None


@pytest.mark.parametrize("looped", [False, True])
def test_gradcheck_float64(looped, monkeypatch):
    if looped:
        monkeypatch.setattr(kernel_backward, "MASKED_PRODUCT_LIMIT", 0)
    lay = TokenLayout.video(1, 3, 4, text_len=5, text_first=False)  # 17 tokens, 4-token blocks
    mask = BlockMask.stack_heads(
        [patterns.band(lay, 3, 4, text="self"), patterns.window3d(lay, (0, 1, 0), 4, text="self")]
    )
    # a row of query blocks with no keys in head 0
    bm = mask.to_block_map().clone()
    bm[0, 0, 1] = False
    mask = BlockMask.from_block_map(bm, lay, 4)
    perm = head_permutations(lay, ["WHF", "FHW"])
    q, k, v = _qkv(s=lay.seq_len, d=3, dtype=torch.float64, requires_grad=True)

    keep = mask.to_token_mask()

    def f(q, k, v):
        out, lse = _OracleWithOurBackward.apply(q, k, v, mask, keep, perm)
        return out, torch.where(torch.isfinite(lse), lse, 0)

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-7, fast_mode=True)


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_triton_and_quantized_forwards_share_the_reference_backward(quant):
    """The Triton forward (interpreter) and quantized forwards backpropagate through the unquantized
    reference math over the same block lists and permutation (straight-through for quantization)."""
    lay = TokenLayout.video(2, 4, 4, text_len=5)
    mask = patterns.window3d(lay, (0, 1, 1), 16)
    perm = axis_order_permutation(lay, "HWF")
    q, k, v = _qkv(s=lay.seq_len, d=64, dtype=torch.bfloat16, requires_grad=True)

    def run(backend, quant):
        def fn(q, k, v):
            res = run_attention(q, k, v, mask, perm=perm, quant=quant, backend=backend)
            assert res.fallback is None
            return res.out, res.lse

        return fn

    want = _grads(run("reference", "none"), (q, k, v))
    for got in (_grads(run("reference", quant), (q, k, v)), _grads(run("triton", quant), (q, k, v))):
        for a, b in zip(got, want):
            assert a.dtype == torch.bfloat16
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fallback_paths_keep_their_gradients():
    """head_dim 16 on the Triton path runs exact dense attention: its gradient is SDPA's."""
    q, k, v = _qkv(s=40, d=16, dtype=torch.bfloat16, requires_grad=True)
    res = run_attention(q, k, v, patterns.band(TokenLayout(40), 4, 8), backend="triton", need_lse=False)
    assert res.fallback is not None
    (res.out.float().square().sum()).backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in (q, k, v))


# ----------------------------------------------------------------------------------- a model that trains


@functools.cache
def _tiny():
    """tests/test_diffusers.py's tiny models (loaded by path: the tests folder is not a package)."""
    import importlib.util
    from pathlib import Path

    pytest.importorskip("diffusers")
    spec = importlib.util.spec_from_file_location(
        "_fa_tiny_kgrad", Path(__file__).with_name("test_diffusers.py")
    )
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    return tiny


def _param_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)[0]
    g = torch.Generator().manual_seed(3)
    (out * torch.randn(out.shape, generator=g)).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["flux", "hunyuan_video"])  # hunyuan_video: padded text (attention mask)
def test_dense_plan_trains_with_the_unpatched_gradients(name):
    import fastattn.api as fa

    model, inputs, _ = _tiny().build(name)
    want = _param_grads(model, inputs)
    handle = fa.enable(model, method="dense", block_size=8)
    got = _param_grads(model, inputs)
    assert handle.stats()["calls"] > 0
    handle.disable()
    assert got.keys() == want.keys() and len(got) > 10
    for n in want:
        assert torch.equal(got[n], want[n]), f"{n}: max diff {(got[n] - want[n]).abs().max()}"


@pytest.mark.parametrize(
    "name, method",
    [
        ("flux", dict(method="band", window=6)),
        ("wan", dict(method="window3d", window=(0, 1, 1))),
        ("hunyuan_video", dict(method="band", window=6)),  # sparse over the kept tokens of padded text
    ],
)
def test_sparse_plan_trains_with_the_masked_models_gradients(name, method):
    import fastattn.api as fa

    tiny = _tiny()
    model, inputs, _ = tiny.build(name)
    handle = fa.enable(model, block_size=8, **method)
    got = _param_grads(model, inputs)
    st = handle.stats()
    assert st["sparse_calls"] > 0 and st["density"] < 1.0, st
    # the same model with the kernel replaced by a masked SDPA: autograd through torch's own attention
    handle.runtimes[0].sparse_fn = tiny.masked_oracle
    want = _param_grads(model, inputs)
    handle.disable()
    assert got.keys() == want.keys()
    for n in want:
        assert torch.isfinite(got[n]).all(), n
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-5, msg=n)


def test_runtime_op_called_directly_with_grad_says_how_to_proceed():
    from fastattn.pipelines import backend

    q, k, v = (torch.randn(1, 8, 2, 16, requires_grad=True) for _ in range(3))
    with pytest.raises(RuntimeError, match="fastattn_attention"):
        torch.ops.fastattn.runtime_attention(q, k, v, None, None)
    # the backend function itself serves gradients (no enabled model: exact dense, counted as orphan)
    out = backend.fastattn_attention(q, k, v)
    out.sum().backward()
    assert q.grad is not None


def test_residual_sharing_trains_step_after_step():
    """WA-RS keeps ``dense - sparse`` across steps: it must be held detached, or the second step's backward
    reaches into the first step's freed graph ("backward through the graph a second time")."""
    import fastattn.api as fa

    model, inputs, _ = _tiny().build("wan")
    handle = fa.enable(model, method="band", window=6, block_size=8, dense_steps=0, residual=True, num_steps=3)
    for t in (900, 600, 300):  # step 0 captures the residual, steps 1 and 2 apply it
        _param_grads(model, {**inputs, "timestep": torch.tensor([t])})
    st = handle.stats()
    handle.disable()
    assert st["residual_peak_bytes"] > 0 and st["sparse_calls"] > 0, st
