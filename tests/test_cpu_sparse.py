"""The CPU sparse path (attn_kernels/cpu_sparse.py) against the exact reference.

It computes only the listed blocks, batched by count; it must give the reference's output and
log-sum-exp for every geometry the kernels take: ragged tails, two segments per side, Sq != Skv,
per-batch and per-head lists, empty rows, token permutations, quantized modes and 16-bit inputs.
"""

import pytest
import torch
from fastattn.attn_kernels import KernelGeometry, attention_reference, cpu_sparse, run_attention
from fastattn.attn_kernels.geometry import BlockLists
from fastattn.masks import head_permutations, patterns
from fastattn.masks.layout import TokenLayout

# (q_len, kv_len, block_size, q_split, kv_split)
GEOMETRIES = {
    "square_full_blocks": (64, 64, 16, 0, 0),
    "square_ragged_tail": (84, 84, 16, 0, 0),
    "square_two_segments": (77, 77, 16, 13, 13),
    "q_shorter": (37, 77, 16, 7, 13),
    "q_longer": (70, 35, 16, 61, 30),
}


def random_lists(geom: KernelGeometry, batch: int, heads: int, density=0.4, seed=0) -> BlockLists:
    """Per-batch, per-head random lists; (batch 0, head 0) query block 1 reads nothing."""
    g = torch.Generator().manual_seed(seed)
    bm = torch.rand(batch, heads, geom.q_blocks, geom.kv_blocks, generator=g) < density
    bm[0, 0, 1] = False
    counts = bm.sum(-1, dtype=torch.int32)
    indices = torch.sort((~bm).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    return BlockLists(counts, indices, geom)


def qkv(q_len, kv_len, batch=2, heads=3, d=64, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, d, generator=g).to(dtype)
    return q, *(torch.randn(batch, heads, kv_len, d, generator=g).to(dtype) for _ in range(2))


def check_equal_to_reference(out, lse, ref, ref_lse, atol=1e-5):
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty) and (lse[empty] < 0).all()
    assert (out[empty] == 0).all()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=atol)
    torch.testing.assert_close(lse[~empty], ref_lse[~empty], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_listed_blocks_equal_reference(name):
    q_len, kv_len, bs, q_split, kv_split = GEOMETRIES[name]
    geom = KernelGeometry(q_len, kv_len, bs, q_split, kv_split)
    q, k, v = qkv(q_len, kv_len)
    lists = random_lists(geom, 2, 3)
    assert bool((lists.counts == 0).any()) and len(set(lists.counts.flatten().tolist())) > 2
    out, lse = cpu_sparse.listed_blocks_attention(q, k, v, lists)
    check_equal_to_reference(out, lse, *attention_reference(q, k, v, lists))


@pytest.mark.parametrize("reorder", ["shared", "per_head"])
def test_permutation_equals_reference(reorder):
    layout = TokenLayout.video(3, 4, 7, text_len=9)  # text prefix, ragged segment tails
    geom = KernelGeometry.square(layout.seq_len, 16, layout.split)
    q, k, v = qkv(layout.seq_len, layout.seq_len, heads=2)
    perm = head_permutations(layout, ["HWF", "WFH"])
    if reorder == "shared":
        perm = perm[0]
    lists = random_lists(geom, 2, 2, seed=1)
    out, lse = cpu_sparse.listed_blocks_attention(q, k, v, lists, scale=0.3, perm=perm)
    check_equal_to_reference(out, lse, *attention_reference(q, k, v, lists, scale=0.3, perm=perm))


def test_broadcast_lists_small_chunks_and_both_softmax_paths(monkeypatch):
    """Lists shared by batch and heads ([1, 1, nQ]); groups cut into one-block chunks; the plain-product
    softmax (used where aten's fused CPU attention is missing) gives the same result."""
    layout = TokenLayout.video(4, 6, 6)
    mask = patterns.window3d(layout, (1, 2, 2), block_size=16)
    q, k, v = qkv(layout.seq_len, layout.seq_len)
    ref, ref_lse = attention_reference(q, k, v, mask)
    lists = mask.block_lists()
    assert lists.counts.shape[:2] == (1, 1)
    out, lse = cpu_sparse.listed_blocks_attention(q, k, v, lists)
    check_equal_to_reference(out, lse, ref, ref_lse)
    monkeypatch.setattr(cpu_sparse, "CHUNK_KEYS", 1)
    check_equal_to_reference(*cpu_sparse.listed_blocks_attention(q, k, v, lists), ref, ref_lse)
    monkeypatch.setattr(cpu_sparse, "_FLASH_CPU", None)
    check_equal_to_reference(*cpu_sparse.listed_blocks_attention(q, k, v, lists), ref, ref_lse)


def test_computes_only_the_listed_blocks(monkeypatch):
    """Every batched product reads exactly the key blocks its query blocks list: no masked dense work."""
    geom = KernelGeometry(64, 96, 16)
    lists = random_lists(geom, 2, 3, density=0.3)
    q, k, v = qkv(64, 96)
    seen = []
    real = cpu_sparse._softmax_attention

    def spy(qb, kb, vb, bias, scale):
        seen.append((qb.shape[0], kb.shape[1]))
        return real(qb, kb, vb, bias, scale)

    monkeypatch.setattr(cpu_sparse, "_softmax_attention", spy)
    cpu_sparse.listed_blocks_attention(q, k, v, lists)
    assert sum(n for n, _ in seen) == int((lists.counts > 0).sum())  # each query block once
    assert sum(n * keys for n, keys in seen) == int(lists.counts.sum()) * 16  # its listed keys only


def test_run_attention_on_cpu_takes_this_path(monkeypatch):
    from fastattn.attn_kernels import ops, reference

    layout = TokenLayout.video(3, 4, 5, text_len=6, text_first=False)
    mask = patterns.window3d(layout, (0, 1, 1), block_size=8)
    q, k, v = (x.transpose(1, 2) for x in qkv(layout.seq_len, layout.seq_len, heads=2))  # [B, S, H, D] memory
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    expected = attention_reference(q, k, v, mask)

    def refuse(*args, **kwargs):
        raise AssertionError("the CPU path must not run the reference for unquantized attention")

    monkeypatch.setattr(reference, "reference_attention", refuse)
    monkeypatch.setattr(ops, "reference_attention", refuse)
    res = run_attention(q, k, v, mask)
    assert res.fallback is None
    check_equal_to_reference(res.out, res.lse, *expected)


@pytest.mark.parametrize("quant", ["int8", "int8-fp8", "fp8"])
def test_quantized_modes_are_the_reference_bit_for_bit(quant):
    geom = KernelGeometry.square(84, 16)
    q, k, v = qkv(84, 84, dtype=torch.bfloat16)
    lists = random_lists(geom, 2, 3)
    out, lse = cpu_sparse.listed_blocks_attention(q, k, v, lists, quant=quant)
    ref, ref_lse = attention_reference(q, k, v, lists, quant=quant)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)


def test_bf16_inputs_come_back_in_bf16():
    geom = KernelGeometry.square(84, 16, 20)
    q, k, v = qkv(84, 84, dtype=torch.bfloat16)
    lists = random_lists(geom, 2, 3)
    out, lse = cpu_sparse.listed_blocks_attention(q, k, v, lists)
    ref, ref_lse = attention_reference(q, k, v, lists)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    check_equal_to_reference(out.float(), lse, ref.float(), ref_lse, atol=1e-2)
