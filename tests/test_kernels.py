"""The Triton kernels (run in Triton's interpreter on CPU) against the PyTorch reference.

Every variant: quantization mode x reordering (none, shared, per head) x token layout (video only,
text prefix, text suffix; all with ragged block tails) x head_dim; plus LSE, empty rows, fallbacks,
layouts with strides, torch.compile and bad input.
"""

import math

import pytest
import torch
from fastattn.attn_kernels import (
    attention_reference,
    sparse_attention,
)
from fastattn.masks import (
    AXIS_ORDERS,
    BlockMask,
    TokenLayout,
    axis_order_permutation,
    head_permutations,
    patterns,
)

LAYOUTS = {
    "video": TokenLayout.video(3, 4, 7),  # 84 tokens: ragged last block
    "text_prefix": TokenLayout.video(3, 4, 5, text_len=13, text_first=True),
    "text_suffix": TokenLayout.video(3, 4, 6, text_len=9, text_first=False),
}
BS = 16
# rel-L2 of the kernel against the fp32 masked reference of unquantized attention (the bars:
# bf16 1e-2, int8-fp8 3e-2 at realistic sizes; tiny random problems are harsher, see bench/results)
DENSE_TOL = {"none": 1e-2, "int8": 3e-2, "int8-fp8": 5e-2, "int4": 2.5e-1, "int4-fp8": 2.5e-1, "fp8": 8e-2}


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def inputs(layout, heads=2, d=64, dtype=torch.bfloat16, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, layout.seq_len, d, generator=g).to(dtype) for _ in range(3)]


def masked_sdpa(q, k, v, mask: BlockMask, perm=None):
    """Independent oracle: fp32 SDPA with the token-level boolean mask (small sizes only)."""
    tok = mask.to_token_mask()
    if perm is not None:  # mask is in reordered order: map it back to original token order
        p = perm.long() if perm.dim() == 2 else perm.long()[None].expand(q.shape[1], -1)
        inv = torch.argsort(p, -1)
        tok = tok.expand(1, q.shape[1], -1, -1)
        tok = torch.stack([tok[0, h][inv[h]][:, inv[h]] for h in range(q.shape[1])])[None]
    return torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=tok)


@pytest.mark.parametrize("layout_name", list(LAYOUTS))
@pytest.mark.parametrize("quant", ["none", "int8", "int8-fp8", "int4-fp8", "fp8"])
@pytest.mark.parametrize("reorder", ["none", "shared", "per_head"])
def test_kernel_matches_reference(layout_name, quant, reorder):
    layout = LAYOUTS[layout_name]
    q, k, v = inputs(layout)
    perm = {
        "none": None,
        "shared": axis_order_permutation(layout, "WHF"),
        "per_head": head_permutations(layout, ["HWF", "FWH"]),
    }[reorder]
    mask = patterns.window3d(layout, (0, 1, 2), block_size=BS)
    assert 0 < mask.block_density() < 1
    out, lse = sparse_attention(q, k, v, mask, quant=quant, perm=perm, return_lse=True, backend="triton")
    # the exact quantized computation in PyTorch: same codes, scales and rounding
    ref_q, ref_q_lse = attention_reference(q, k, v, mask, quant=quant, perm=perm)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    assert rel(out, ref_q) < (1e-2 if quant in ("none", "int8", "int4") else 3e-2)
    # the LSE takes the same codes and scales (FP8 P only rounds the output): equal up to fp32 sums
    assert (lse - ref_q_lse).abs().max() < 1e-3
    # fidelity to unquantized masked attention, checked by an independent oracle
    oracle = masked_sdpa(q, k, v, mask, perm)
    assert rel(out, oracle) < DENSE_TOL[quant]
    _, ref_lse = attention_reference(q.float(), k.float(), v.float(), mask, perm=perm)
    assert (lse - ref_lse).abs().max() < (1e-3 if quant == "none" else 0.2)


@pytest.mark.parametrize("quant", ["int8", "fp8"])
def test_k_smoothing_vector_is_exact_whatever_it_is(monkeypatch, quant):
    """Softmax ignores a shift of K shared by all keys and the kernel adds ``q . m`` back to the LSE, so
    the strided estimate of K's mean (long sequences), or any vector at all, changes only the rounding."""
    from fastattn.attn_kernels import quantize as Qz

    layout = LAYOUTS["text_prefix"]
    q, k, v = inputs(layout)
    k = k + 3.0  # an offset shared by every key: what smoothing removes
    mask = patterns.window3d(layout, (0, 1, 2), block_size=BS)
    oracle = masked_sdpa(q, k, v, mask)
    _, oracle_lse = attention_reference(q.float(), k.float(), v.float(), mask)
    monkeypatch.setattr(Qz, "SMOOTH_SAMPLES", 8)  # 73 tokens: every 9th token estimates the mean
    estimate = Qz.k_smoothing_mean(k)
    assert not torch.allclose(estimate, k.float().mean(2))
    out, lse = sparse_attention(q, k, v, mask, quant=quant, return_lse=True, backend="triton")
    ref, ref_lse = attention_reference(q, k, v, mask, quant=quant)
    assert rel(out, ref) < 3e-2 and (lse - ref_lse).abs().max() < 5e-2
    assert rel(out, oracle) < DENSE_TOL[quant] and (lse - oracle_lse).abs().max() < 0.2
    g = torch.Generator().manual_seed(1)
    arbitrary = torch.randn(estimate.shape, generator=g) * 2
    monkeypatch.setattr(Qz, "k_smoothing_mean", lambda k: arbitrary)
    out, lse = sparse_attention(q, k, v, mask, quant=quant, return_lse=True, backend="triton")
    # a poor vector widens K's codes' range: noisier, but unbiased
    assert rel(out, oracle) < 2 * DENSE_TOL[quant] and (lse - oracle_lse).abs().max() < 0.3


def test_fp8_keys_have_one_scale_per_head_from_their_extremes():
    from fastattn.attn_kernels import quantize as Qz

    k = inputs(LAYOUTS["video"], heads=3)[1] * torch.linspace(0.5, 4, 64)  # channels of unequal range
    mean = Qz.k_smoothing_mean(k)
    spec = Qz.QuantSpec.parse("fp8")
    assert spec.k_granularity == "head" and Qz.QuantSpec.parse("int8-fp8").k_granularity == "block"
    expected = (k.float() - mean[:, :, None]).abs().amax(dim=(2, 3)) / Qz.FP8_MAX
    assert torch.equal(Qz.k_head_scale(k, mean, spec.qmax), expected)
    codes, scale = Qz.quantize_qk_reference(k, spec, mean=mean)
    assert torch.equal(scale, expected[:, :, None].expand_as(scale))
    assert codes.float().abs().max() == Qz.FP8_MAX  # the extreme element lands on e4m3's largest value


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_head_dims_and_dtypes(d, dtype):
    layout = TokenLayout.video(2, 2, 9, text_len=5)
    q, k, v = inputs(layout, d=d, dtype=dtype, batch=2)
    mask = patterns.band(layout, 8, block_size=BS)
    out = sparse_attention(q, k, v, mask, backend="triton")
    assert rel(out, masked_sdpa(q, k, v, mask)) < 1e-2


def test_dense_default_equals_sdpa_and_lse_is_logsumexp():
    layout = TokenLayout(50)
    q, k, v = inputs(layout, dtype=torch.float16)
    out, lse = sparse_attention(q, k, v, patterns.dense(layout, BS), return_lse=True, backend="triton")
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert rel(out, ref) < 2e-3
    scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(64)
    assert torch.allclose(lse, torch.logsumexp(scores, -1), atol=1e-3)


def test_empty_rows_give_zeros_not_nan():
    layout = TokenLayout(40)
    n = BlockMask.dense(layout, BS).num_blocks
    bm = torch.ones(2, n, n, dtype=torch.bool)
    bm[0, 1] = False  # one query block of head 0 reads nothing
    bm[1] = False  # head 1 skipped entirely
    mask = BlockMask.from_block_map(bm, layout, BS)
    q, k, v = inputs(layout)
    for quant in ("none", "int8-fp8"):
        out, lse = sparse_attention(q, k, v, mask, quant=quant, return_lse=True, backend="triton")
        assert torch.isfinite(out).all()
        assert (out[0, 1] == 0).all() and (out[0, 0, BS : 2 * BS] == 0).all()
        assert torch.isinf(lse[0, 1]).all() and torch.isinf(lse[0, 0, BS : 2 * BS]).all()
        assert (out[0, 0, :BS] != 0).any()


def test_bshd_strided_inputs_keep_layout():
    layout = TokenLayout(48)
    x = [t.transpose(1, 2).contiguous() for t in inputs(layout)]  # [B, S, H, D] memory
    q, k, v = (t.transpose(1, 2) for t in x)  # [B, H, S, D] views
    mask = patterns.band(layout, 10, block_size=BS)
    out = sparse_attention(q, k, v, mask, backend="triton")
    assert out.stride() == q.stride()
    assert rel(out, masked_sdpa(q, k, v, mask)) < 1e-2


def test_per_batch_mask():
    layout = TokenLayout(40)
    n = BlockMask.dense(layout, BS).num_blocks
    bm = torch.rand(2, 2, n, n, generator=torch.Generator().manual_seed(3)) < 0.6
    bm |= torch.eye(n, dtype=torch.bool)
    mask = BlockMask.from_block_map(bm, layout, BS)
    q, k, v = inputs(layout, batch=2)
    out = sparse_attention(q, k, v, mask, backend="triton")
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=mask.to_token_mask()
    )
    assert rel(out, ref) < 1e-2


def test_unsupported_head_dim_falls_back_and_says_so():
    layout = TokenLayout(32)
    q, k, v = inputs(layout, d=40)
    with pytest.warns(UserWarning, match=r"dense attention fallback \(head_dim 40"):
        out = sparse_attention(q, k, v, patterns.band(layout, 4, block_size=BS), backend="triton")
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(out.float(), ref.float(), atol=1e-2)


def test_cpu_auto_backend_is_exact_reference():
    layout = TokenLayout.video(2, 3, 4, text_len=6)
    q, k, v = inputs(layout, dtype=torch.float32)
    mask = patterns.window3d(layout, (0, 1, 1), block_size=8)
    out = sparse_attention(q, k, v, mask)
    assert torch.allclose(out, masked_sdpa(q, k, v, mask), atol=1e-5)


def test_torch_compile_traces_the_custom_op():
    layout = TokenLayout(64)
    q, k, v = inputs(layout, dtype=torch.float32)
    mask = patterns.band(layout, 16, block_size=BS)

    def f(q, k, v):
        return sparse_attention(q, k, v, mask) * 2

    compiled = torch.compile(f, backend="eager", fullgraph=True)
    assert torch.allclose(compiled(q, k, v), f(q, k, v))


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda q, k, v, m: sparse_attention(q[0], k, v, m), ValueError, r"4-D \[B, H, S, D\]"),
        (lambda q, k, v, m: sparse_attention(q, k[:, :, :-1], v, m), ValueError, "must share"),
        (lambda q, k, v, m: sparse_attention(q, k.half(), v, m), TypeError, "dtypes differ"),
        (lambda q, k, v, m: sparse_attention(q.int(), k, v, m), TypeError, "float16, bfloat16 or float32"),
        (lambda q, k, v, m: sparse_attention(q, k, v, "dense"), TypeError, "BlockMask"),
        (lambda q, k, v, m: sparse_attention(q, k, v, m, quant="int3"), ValueError, "quant must be one of"),
        (lambda q, k, v, m: sparse_attention(q, k, v, m, scale=-0.1), ValueError, "scale must be a positive"),
        (lambda q, k, v, m: sparse_attention(q, k, v, m, scale=0.0), ValueError, "scale must be a positive"),
        (lambda q, k, v, m: sparse_attention(q, k, v, m, backend="cuda"), ValueError, "backend must be"),
        (
            lambda q, k, v, m: sparse_attention(q, k, v, m, perm=torch.zeros(48, dtype=torch.long)),
            ValueError,
            "permutation",
        ),
        (
            lambda q, k, v, m: sparse_attention(q, k, v, m, perm=torch.arange(47)),
            ValueError,
            r"perm must be \[S\]",
        ),
        (lambda q, k, v, m: sparse_attention(q, k, v, m, perm=torch.arange(48.0)), TypeError, "int32/int64"),
    ],
)
def test_bad_input_raises_clear_errors(make, exc, match):
    layout = TokenLayout(48)
    q, k, v = inputs(layout)
    with pytest.raises(exc, match=match):
        make(q, k, v, patterns.band(layout, 8, block_size=BS))


def test_mask_for_other_sequence_or_bad_indices_is_rejected():
    layout = TokenLayout(48)
    q, k, v = inputs(layout)
    with pytest.raises(ValueError, match="built for seq_len 64"):
        sparse_attention(q, k, v, patterns.dense(TokenLayout(64), BS))
    mask = patterns.dense(layout, BS)
    bad = BlockMask(mask.kv_counts, mask.kv_indices + 5, layout, BS)
    with pytest.raises(ValueError, match="outside"):
        sparse_attention(q, k, v, bad, backend="triton")
    wide = BlockMask(mask.kv_counts.expand(1, 3, -1), mask.kv_indices.expand(1, 3, -1, -1), layout, BS)
    with pytest.raises(ValueError, match="must be 1 or match"):
        sparse_attention(q, k, v, wide)


def test_all_axis_orders_are_exact_with_dense_mask():
    """Reordering with a dense mask changes nothing but accumulation order."""
    layout = TokenLayout.video(2, 3, 4, text_len=4)
    q, k, v = inputs(layout, heads=6)
    perm = head_permutations(layout, AXIS_ORDERS)
    out = sparse_attention(q, k, v, patterns.dense(layout, BS), perm=perm, backend="triton")
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert rel(out, ref) < 1e-2


@pytest.mark.parametrize("quant", ["none", "int8", "int8-fp8", "fp8"])
@pytest.mark.parametrize("reorder", [False, True])
def test_tma_descriptor_path_matches_reference(quant, reorder):
    """The Hopper path (Q/K/V tiles through tensor descriptors) run in the interpreter."""
    from fastattn.attn_kernels.triton_attention import triton_attention

    layout = TokenLayout.video(3, 4, 5, text_len=16)  # a text prefix, aligned as transposed FP8 V needs
    q, k, v = inputs(layout, batch=2)
    perm = head_permutations(layout, ["HWF", "WFH"]) if reorder else None
    mask = patterns.window3d(layout, (0, 1, 2), block_size=BS)
    out, lse = triton_attention(q, k, v, mask, quant=quant, perm=perm, use_tma=True)
    ref, ref_lse = attention_reference(q, k, v, mask, quant=quant, perm=perm)
    assert rel(out, ref) < (1e-2 if quant in ("none", "int8") else 3e-2)
    assert (lse - ref_lse).abs().max() < (1e-2 if quant in ("none", "int8") else 5e-2)


@pytest.mark.parametrize("quant", ["none", "int8-fp8"])
@pytest.mark.parametrize("use_tma", [False, True])
def test_query_block_split_over_programs_matches_reference(quant, use_tma):
    """``Tiles.rows`` < block size: each query block is served by several programs (ragged tail included)."""
    from fastattn.attn_kernels.triton_attention import Tiles, triton_attention

    layout = TokenLayout.video(3, 4, 5, text_len=16)
    q, k, v = inputs(layout, batch=2)
    mask = patterns.window3d(layout, (0, 1, 2), block_size=32)  # 76 tokens: the last block is ragged
    out, lse = triton_attention(q, k, v, mask, quant=quant, tiles=Tiles(16, 4, 1, rows=16), use_tma=use_tma)
    ref, ref_lse = attention_reference(q, k, v, mask, quant=quant)
    assert rel(out, ref) < (1e-2 if quant == "none" else 3e-2)
    assert (lse - ref_lse).abs().max() < (1e-2 if quant == "none" else 5e-2)
    with pytest.raises(ValueError, match="must divide"):
        triton_attention(q, k, v, mask, tiles=Tiles(16, 4, 1, rows=24))


@pytest.mark.parametrize("quant", ["none", "int8-fp8"])
def test_reference_block_loop_equals_masked_product(monkeypatch, quant):
    """The reference has two exact paths (one masked product for short sequences, a per-block loop for
    long ones): they agree with each other, with empty rows, and with masked SDPA."""
    from fastattn.attn_kernels import reference

    layout = LAYOUTS["text_prefix"]
    n = BlockMask.dense(layout, BS).num_blocks
    g = torch.Generator().manual_seed(3)
    bm = torch.rand(2, n, n, generator=g) < 0.5
    bm[1, 2] = False  # an empty query block row
    mask = BlockMask.from_block_map(bm, layout, BS)
    q, k, v = inputs(layout, dtype=torch.float32)
    short, lse_short = attention_reference(q, k, v, mask, quant=quant)
    monkeypatch.setattr(reference, "MASKED_PRODUCT_LIMIT", 0)
    loop, lse_loop = attention_reference(q, k, v, mask, quant=quant)
    torch.testing.assert_close(short, loop, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse_short, lse_loop, rtol=1e-5, atol=1e-5)
    lo, hi = (int(x[2]) for x in mask.geometry.bounds())
    assert (short[0, 1, lo:hi] == 0).all() and torch.isinf(lse_short[0, 1, lo:hi]).all()
    if quant == "none":
        ref = masked_sdpa(q, k, v, mask)
        rows = lse_short.isfinite()
        torch.testing.assert_close(short[rows], ref[rows], rtol=1e-5, atol=1e-5)


def test_fp8_without_fp8_tensor_cores_is_served_as_int8_and_says_so(monkeypatch):
    from fastattn.attn_kernels import ops

    layout = TokenLayout.video(2, 3, 4, text_len=4)
    q, k, v = inputs(layout)
    mask = patterns.dense(layout, BS)
    monkeypatch.setattr(ops, "pv_fp8_supported", lambda device: False)
    monkeypatch.setattr(ops, "_warned", set())
    with pytest.warns(UserWarning, match="quant 'fp8' served as 'int8'"):
        out = sparse_attention(q, k, v, mask, quant="fp8", backend="reference")
    ref = sparse_attention(q, k, v, mask, quant="int8", backend="reference")
    torch.testing.assert_close(out, ref)


# ----------------------------------------------------------------------------- rectangular calls (run_attention)

# (query layout, key layout): Sq < Skv and Sq > Skv, text prefix/suffix on each side, every segment ragged
RECT = {
    "q_short": (TokenLayout(37, 7), TokenLayout(77, 13)),
    "q_long": (TokenLayout(70, 9, text_first=False), TokenLayout(35, 5, text_first=False)),
    "mixed": (TokenLayout(45, 11), TokenLayout(50, 0)),
}


def rect_inputs(q_len, kv_len, heads=2, d=64, dtype=torch.bfloat16, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, d, generator=g).to(dtype)
    k, v = (torch.randn(batch, heads, kv_len, d, generator=g).to(dtype) for _ in range(2))
    return q, k, v


def rect_mask(name, heads=2, seed=0, empty_row=True):
    """A random per-head rectangular mask (each key block read by someone); head 0's query block 1 reads
    nothing when ``empty_row``."""
    q_layout, kv_layout = RECT[name]
    nq = BlockMask.dense(q_layout, BS).num_blocks
    nk = BlockMask.dense(kv_layout, BS).num_blocks
    bm = torch.rand(heads, nq, nk, generator=torch.Generator().manual_seed(seed)) < 0.5
    bm[:, torch.arange(nq), torch.arange(nq) % nk] = True
    if empty_row:
        bm[0, 1] = False
    return BlockMask.from_block_map(bm, q_layout, BS, kv_layout)


def check_rows(out, lse, ref, ref_lse, tol, lse_tol):
    """``out``/``lse`` against a reference on rows that read keys; rows that read none: 0 and -inf."""
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty) and (lse[empty] < 0).all()
    assert (out[empty] == 0).all() and torch.isfinite(out).all()
    assert rel(out[~empty], ref[~empty]) < tol
    assert (lse[~empty] - ref_lse[~empty]).abs().max() < lse_tol


@pytest.mark.parametrize("name", list(RECT))
def test_rectangular_kernel_matches_reference_and_oracle(name):
    from fastattn.attn_kernels import KernelGeometry, run_attention

    q_layout, kv_layout = RECT[name]
    q, k, v = rect_inputs(q_layout.seq_len, kv_layout.seq_len)
    mask = rect_mask(name)
    geom = mask.kernel_geometry()
    assert geom == KernelGeometry(q_layout.seq_len, kv_layout.seq_len, BS, q_layout.split, kv_layout.split)
    res = run_attention(q, k, v, mask.kv_counts, mask.kv_indices, geom, backend="triton")
    assert res.fallback is None and res.out.shape == q.shape and res.out.dtype == q.dtype
    assert res.lse.shape == q.shape[:3] and res.lse.dtype == torch.float32
    lo, hi = (int(x[1]) for x in geom.q_bounds())
    assert torch.isinf(res.lse[0, 0, lo:hi]).all()  # the query block that reads nothing
    ref, ref_lse = attention_reference(q, k, v, mask)
    check_rows(res.out, res.lse, ref, ref_lse, 1e-2, 1e-3)
    # independent oracle: fp32 SDPA with the [Sq, Skv] token mask
    oracle = masked_sdpa(q, k, v, mask)
    _, lse32 = attention_reference(q.float(), k.float(), v.float(), mask)
    check_rows(res.out, res.lse, oracle, lse32, 1e-2, 1e-3)
    # the CPU reference through the same entry point, and its block loop (long sequences)
    exact = run_attention(q.float(), k.float(), v.float(), mask.kv_counts, mask.kv_indices, geom)
    check_rows(exact.out, exact.lse, oracle, lse32, 1e-5, 1e-4)


def test_rectangular_reference_block_loop_equals_masked_product(monkeypatch):
    from fastattn.attn_kernels import reference

    for name in RECT:
        q_layout, kv_layout = RECT[name]
        q, k, v = rect_inputs(q_layout.seq_len, kv_layout.seq_len, dtype=torch.float32)
        mask = rect_mask(name)
        short, lse_short = attention_reference(q, k, v, mask)
        monkeypatch.setattr(reference, "MASKED_PRODUCT_LIMIT", 0)
        loop, lse_loop = attention_reference(q, k, v, mask)
        dense, dense_lse = attention_reference(q, k, v)  # dense, one query row per product
        monkeypatch.undo()
        torch.testing.assert_close(short, loop, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lse_short, lse_loop, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dense, attention_reference(q, k, v)[0], rtol=1e-5, atol=1e-6)


def test_lse_merges_key_chunks_like_ring_attention():
    """Attention over keys [0, 77) equals the log-sum-exp merge of attention over two key chunks, each its
    own geometry (the first chunk's text segment is ragged; the second chunk has no text)."""
    from fastattn.attn_kernels import KernelGeometry, run_attention

    q, k, v = rect_inputs(37, 77)
    whole = run_attention(
        q, k, v, BlockMask.dense(TokenLayout(37, 7), BS, TokenLayout(77, 13)), backend="triton"
    )
    parts = []
    for lo, hi, split in ((0, 45, 13), (45, 77, 0)):
        geom = KernelGeometry(37, hi - lo, BS, 7, split)
        n = geom.kv_blocks
        counts = torch.full((1, 1, geom.q_blocks), n, dtype=torch.int32)
        indices = torch.arange(n, dtype=torch.int32).expand(1, 1, geom.q_blocks, n).contiguous()
        if lo:  # the second chunk: query block 1 reads none of it (its row merges from the first chunk alone)
            counts[0, 0, 1] = 0
        parts.append(
            run_attention(q, k[:, :, lo:hi], v[:, :, lo:hi], counts, indices, geom, backend="triton")
        )
    (o1, l1, _), (o2, l2, _) = parts
    rows = torch.ones(37, dtype=torch.bool)
    rows[7 : 7 + BS] = False  # query block 1 (the image segment starts at 7), which skipped the second chunk
    assert torch.isinf(l2[:, :, ~rows]).all() and (o2[:, :, ~rows] == 0).all()
    lse = torch.logaddexp(l1, l2)
    out = (torch.exp(l1 - lse)[..., None] * o1.float()) + (torch.exp(l2 - lse)[..., None] * o2.float())
    scores = q.float() @ k.float().transpose(-1, -2) / 8.0
    assert (lse[..., rows] - torch.logsumexp(scores, -1)[..., rows]).abs().max() < 1e-3
    assert (lse[..., rows] - whole.lse[..., rows]).abs().max() < 1e-3
    assert rel(out[:, :, rows], whole.out[:, :, rows]) < 1e-2
    assert (
        rel(
            out[:, :, rows],
            torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())[:, :, rows],
        )
        < 1e-2
    )
    assert torch.equal(lse[:, :, ~rows], l1[:, :, ~rows])


def test_fallback_comes_back_as_a_value(recwarn):
    """head_dim 96 cannot run in the kernel: exact dense attention runs, says so in ``fallback``, and touches
    neither the legacy counter nor the warnings."""
    from fastattn.attn_kernels import AttentionResult, run_attention

    q, k, v = rect_inputs(37, 77, d=96)
    mask = rect_mask("q_short")
    res = run_attention(q, k, v, mask, backend="triton")
    assert isinstance(res, AttentionResult) and "head_dim 96" in res.fallback
    assert not [w for w in recwarn if "fastattn" in str(w.message)]
    scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(96)
    assert (res.lse - torch.logsumexp(scores, -1)).abs().max() < 1e-4  # dense: the mask is ignored
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert rel(res.out, ref) < 1e-2 and res.out.dtype == q.dtype
    assert run_attention(q, k, v, mask).fallback is None  # CPU "auto": the reference serves every head_dim
    # fp32 is served by the reference on the CPU; with backend="triton" it is a fallback too
    assert (
        "dtype"
        in run_attention(
            q.float()[..., :64], k.float()[..., :64], v.float()[..., :64], mask, backend="triton"
        ).fallback
    )


@pytest.mark.parametrize("quant", ["int8", "int8-fp8", "int4", "fp8"])
def test_rectangular_quant_modes_match_reference(quant):
    from fastattn.attn_kernels import run_attention

    name = "q_long" if quant in ("int8", "fp8") else "q_short"
    q_layout, kv_layout = RECT[name]
    q, k, v = rect_inputs(q_layout.seq_len, kv_layout.seq_len)
    mask = rect_mask(name, empty_row=False)
    res = run_attention(q, k, v, mask, quant=quant, backend="triton")
    ref, ref_lse = attention_reference(q, k, v, mask, quant=quant)
    check_rows(res.out, res.lse, ref, ref_lse, 1e-2 if quant in ("int8", "int4") else 3e-2, 1e-3)
    oracle = masked_sdpa(q, k, v, mask)
    _, lse32 = attention_reference(q.float(), k.float(), v.float(), mask)
    check_rows(res.out, res.lse, oracle, lse32, DENSE_TOL[quant], 0.2)


@pytest.mark.parametrize("quant", ["none", "int8-fp8"])
def test_rectangular_tma_and_split_query_blocks(quant):
    """The Hopper descriptor path and query blocks split over programs, in the interpreter, Sq != Skv (the
    key text segment is 16-aligned, as transposed FP8 V's descriptor needs)."""
    from fastattn.attn_kernels.triton_attention import Tiles, triton_attention

    q_layout, kv_layout = TokenLayout(45, 11), TokenLayout(83, 16)
    bm = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(5)) < 0.6
    bm[..., 0] = True
    mask = BlockMask.from_block_map(bm, q_layout, 32, kv_layout)
    q, k, v = rect_inputs(45, 83, batch=2)
    ref, ref_lse = attention_reference(q, k, v, mask, quant=quant)
    tol = 1e-2 if quant == "none" else 3e-2
    for kwargs in ({"use_tma": True}, {"tiles": Tiles(16, 4, 1, rows=16), "use_tma": False}):
        out, lse = triton_attention(q, k, v, mask.block_lists(), quant=quant, **kwargs)
        check_rows(out, lse, ref, ref_lse, tol, 1e-2 if quant == "none" else 5e-2)


def test_run_attention_bad_input_raises_clear_errors():
    from fastattn.attn_kernels import KernelGeometry, run_attention

    q, k, v = rect_inputs(37, 77)
    mask = rect_mask("q_short")
    c, i, g = mask.block_lists()
    cases = [
        (lambda: run_attention(q, k[..., :32], v, c, i, g), ValueError, r"k and v must be \[B, H, Skv, D\]"),
        (lambda: run_attention(q, k, v[:, :, :-1], c, i, g), ValueError, r"k and v must be \[B, H, Skv, D\]"),
        (lambda: run_attention(q, k[:1, :1], v[:1, :1], c, i, g), ValueError, "batch, heads and head_dim"),
        (lambda: run_attention(q, k[:, :, :70], v[:, :, :70], c, i, g), ValueError, "kv_len 77.*have 70"),
        (
            lambda: run_attention(q, k, v, c, i, KernelGeometry(37, 77, BS, 20)),
            ValueError,
            "has 4 .*q_split 20",
        ),
        (lambda: run_attention(q, k, v, c, i + 9, g), ValueError, "outside"),
        (lambda: run_attention(q, k, v, c.long(), i, g), TypeError, "int32"),
        (lambda: run_attention(q, k, v, c, i), TypeError, "counts, indices and geometry"),
        (lambda: run_attention(q, k, v, c, i, g, perm=torch.arange(37)), ValueError, "Sq == Skv"),
        (lambda: run_attention(q, k, v, c, i, g, backend="cuda"), ValueError, "backend must be"),
        (lambda: run_attention(q, k, v, c, i, g, quant="int3"), ValueError, "quant must be one of"),
        (lambda: run_attention(q, k, v, "dense"), TypeError, "BlockMask"),
        (lambda: sparse_attention(q, k, v, mask), ValueError, "must share"),
        (lambda: KernelGeometry(37, 77, BS, 40), ValueError, r"q_split must be in \[0, q_len=37\]"),
    ]
    for make, exc, match in cases:
        with pytest.raises(exc, match=match):
            make()
    square_q = torch.randn(1, 2, 77, 64).to(torch.bfloat16)
    with pytest.raises(ValueError, match="built for seq_len 37"):
        sparse_attention(square_q, k, v, mask)
    with pytest.raises(ValueError, match="built for kv_len 77 keys, attention has 37"):
        sparse_attention(q, q, q, mask)


def test_square_run_attention_equals_sparse_attention():
    """``sparse_attention`` is ``run_attention`` on the mask's geometry: same out and lse, with perm too."""
    from fastattn.attn_kernels import run_attention

    layout = LAYOUTS["text_suffix"]
    q, k, v = inputs(layout)
    mask = patterns.window3d(layout, (0, 1, 2), block_size=BS)
    perm = head_permutations(layout, ["HWF", "FWH"])
    out, lse = sparse_attention(q, k, v, mask, perm=perm, return_lse=True, backend="triton")
    res = run_attention(q, k, v, *mask.block_lists(), perm=perm, backend="triton")
    assert mask.kernel_geometry().is_square
    assert torch.equal(res.out, out) and torch.equal(res.lse, lse) and res.fallback is None


def test_run_attention_traces_under_torch_compile():
    from fastattn.attn_kernels import run_attention

    q, k, v = (t.float() for t in rect_inputs(37, 77))
    mask = rect_mask("q_short")
    lists = mask.block_lists()

    def f(q, k, v):
        a, b = run_attention(q, k, v, *lists), run_attention(q, k, v, mask)
        return a.out * 2, a.lse, b.out, a.fallback

    compiled = torch.compile(f, backend="eager", fullgraph=True)
    for x, y in zip(compiled(q, k, v), f(q, k, v)):
        assert x == y if x is None else torch.allclose(x, y, equal_nan=True)
