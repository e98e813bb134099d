"""The FlashAttention-4 adapter (attn_kernels/fa4.py) and the backend choice in ops.py, on the CPU.

FA4 itself needs an sm90/sm100 GPU (``bench/fa4_check.py`` runs it). Here:
- the conversion of our block lists into FA4's block-sparse tensors, checked against the token mask of the
  lists through an independent reading of FA4's form (:func:`fa4_token_mask`);
- the dispatch: ``backend="auto"`` on the CPU keeps our path bit for bit, ``backend="fa4"`` says why it
  cannot serve, and with FA4's entry point replaced by :func:`emulated_fa4` (FA4's documented contract in
  PyTorch, including its backward walk over a list that masks the sequence end on the first tile only) the
  op serves FA4 calls through the same plumbing, falls back to our path when FA4 fails, and says which
  backend served.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch
from fastattn.attn_kernels import KernelGeometry, attention_reference, cpu_sparse, fa4, ops, run_attention
from fastattn.attn_kernels.geometry import BlockLists, dense_lists, token_mask


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    monkeypatch.delenv("FASTATTN_FA4", raising=False)
    ops.reset_backend_stats()
    fa4._failed.clear()
    fa4._converted.clear()
    yield
    fa4._failed.clear()
    fa4._converted.clear()
    ops.reset_backend_stats()


def random_lists(geom: KernelGeometry, bm=2, hm=3, density=0.4, seed=0, pad=0) -> BlockLists:
    """Random lists in random order, garbage in the padding slots, one empty row, ``pad`` spare slots."""
    g = torch.Generator().manual_seed(seed)
    nq, nk = geom.q_blocks, geom.kv_blocks
    bmap = torch.rand(bm, hm, nq, nk, generator=g) < density
    bmap[0, 0, min(1, nq - 1)] = False
    bmap[-1, -1, 0] = True  # some row reads every key block
    counts = bmap.sum(-1, dtype=torch.int32)
    order = torch.rand(bm, hm, nq, nk, generator=g)
    # listed blocks first, in random order (our contract says ascending; FA4 needs it, so the adapter sorts)
    indices = torch.argsort(torch.where(bmap, order, order + 2.0), dim=-1).to(torch.int32)
    if pad:
        indices = torch.cat(
            [indices, torch.randint(0, nk, (bm, hm, nq, pad), generator=g, dtype=torch.int32)], -1
        )
    # garbage after each count (but in range: ops checks index ranges on every slot before the count only)
    slots = torch.arange(indices.shape[-1])
    garbage = torch.randint(0, nk, indices.shape, generator=g, dtype=torch.int32)
    indices = torch.where(slots < counts[..., None], indices, garbage)
    return BlockLists(counts, indices, geom)


def fa4_token_mask(blocks: fa4.FA4Blocks, q_len: int, kv_len: int) -> torch.Tensor:
    """Boolean ``[Bm, Hm, Sq, Skv]``: which keys each query reads, read from FA4's form as FA4 documents it
    (uniform tiles of ``block_size`` from token 0; full and mask lists both read; dense reads all)."""
    bq, bk = blocks.block_size
    bm, hm, nq = blocks.full_cnt.shape
    if blocks.dense:
        return torch.ones(bm, hm, q_len, kv_len, dtype=torch.bool)
    tiles = torch.zeros(bm, hm, nq, math.ceil(kv_len / bk), dtype=torch.bool)
    for cnt, idx in ((blocks.full_cnt, blocks.full_idx), (blocks.mask_cnt, blocks.mask_idx)):
        for b in range(bm):
            for h in range(hm):
                for i in range(nq):
                    tiles[b, h, i, idx[b, h, i, : cnt[b, h, i]].long()] = True
    rows = torch.arange(q_len) // bq
    cols = torch.arange(kv_len) // bk
    return tiles[:, :, rows][..., cols]


# (q_len, kv_len, q_split, kv_split): one segment, ragged tails, Sq != Skv, two segments on block boundaries
GEOMETRIES = {
    "square_full": (384, 384, 0, 0),
    "square_ragged": (300, 300, 0, 0),
    "q_short_kv_long": (200, 520, 0, 0),
    "two_segments_aligned": (400, 400, 128, 128),
    "split_at_end_ragged": (300, 270, 300, 270),
    "q_aligned_kv_aligned_differ": (260, 390, 256, 128),
}


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_conversion_reads_the_same_tokens(name):
    q_len, kv_len, qs, ks = GEOMETRIES[name]
    geom = KernelGeometry(q_len, kv_len, 128, qs, ks)
    lists = random_lists(geom, pad=2)
    blocks = fa4.to_fa4(lists)
    assert blocks.block_size == (128, 128) and not blocks.dense
    assert blocks.full_cnt.dtype == blocks.full_idx.dtype == torch.int32
    assert blocks.full_idx.shape[-1] <= geom.kv_blocks and blocks.full_idx.is_contiguous()
    assert int(blocks.mask_cnt.abs().sum()) == 0 and blocks.mask_idx.shape[-1] == 1
    # each list ascending (FA4 masks the sequence end only on the tile it reads first: the last listed)
    idx, cnt = blocks.full_idx, blocks.full_cnt
    valid = torch.arange(idx.shape[-1]) < cnt[..., None]
    steps = idx[..., 1:] - idx[..., :-1]
    assert bool((steps[valid[..., 1:]] > 0).all())
    assert torch.equal(fa4_token_mask(blocks, q_len, kv_len), token_mask(lists))


def test_dense_lists_and_empty_lists():
    geom = KernelGeometry(300, 300, 128)
    nk = geom.kv_blocks
    dense = BlockLists(
        torch.full((1, 1, 3), nk, dtype=torch.int32),
        torch.arange(nk, dtype=torch.int32).expand(1, 1, 3, nk),
        geom,
    )
    blocks = fa4.to_fa4(dense)
    assert blocks.dense and fa4_token_mask(blocks, 300, 300).all()
    empty = BlockLists(
        torch.zeros(1, 1, 3, dtype=torch.int32), torch.zeros(1, 1, 3, 0, dtype=torch.int32), geom
    )
    blocks = fa4.to_fa4(empty)
    assert not blocks.dense and blocks.full_idx.shape == (1, 1, 3, 1)
    assert not fa4_token_mask(blocks, 300, 300).any()


def test_query_block_pairs_for_sm100():
    """FA4 on sm100 runs 256-query blocks: lists whose rows 2i, 2i+1 agree convert; others are refused."""
    geom = KernelGeometry(600, 300, 128)  # 5 query blocks: the last pairs with itself
    base = random_lists(geom, bm=1, hm=2, seed=3)
    keep = torch.tensor([0, 0, 2, 2, 4])
    paired = BlockLists(base.counts[..., keep], base.indices[..., keep, :], geom)
    blocks = fa4.to_fa4(paired, q_group=2)
    assert blocks.block_size == (256, 128) and blocks.full_cnt.shape[-1] == 3
    assert torch.equal(fa4_token_mask(blocks, 600, 300), token_mask(paired))
    with pytest.raises(fa4.NotExpressible, match="256-query blocks"):
        fa4.to_fa4(random_lists(geom, bm=1, hm=2, seed=4), q_group=2)


@pytest.mark.parametrize(
    "geom, expected",
    [
        (KernelGeometry(512, 512, 64), "block_size 64"),
        (KernelGeometry(400, 400, 128, 100, 100), "q_split 100"),
        (KernelGeometry(400, 400, 128, 0, 77), "kv_split 77"),
    ],
)
def test_geometry_off_fa4_grid_is_refused(geom, expected):
    assert expected in fa4.geometry_reason(geom)
    with pytest.raises(fa4.NotExpressible, match=expected):
        fa4.to_fa4(random_lists(geom, bm=1, hm=1))


def test_conversion_is_remembered_while_the_lists_live_unchanged():
    geom = KernelGeometry(300, 300, 128)
    lists = random_lists(geom)
    first = fa4.fa4_blocks(lists)
    assert fa4.fa4_blocks(lists) is first
    lists.counts[0, 0, 0] = 0  # in place: a new version, converted again
    again = fa4.fa4_blocks(lists)
    assert again is not first and int(again.full_cnt[0, 0, 0]) == 0
    off_grid = random_lists(KernelGeometry(300, 300, 64))
    for _ in range(2):  # the refusal is remembered too
        with pytest.raises(fa4.NotExpressible):
            fa4.fa4_blocks(off_grid)


# ----------------------------------------------------------------------------- dispatch


def qkv(q_len, kv_len, b=2, h=3, d=64, dtype=torch.float32, seed=0, bshd=False):
    g = torch.Generator().manual_seed(seed)
    shapes = [(b, q_len, h, d), (b, kv_len, h, d), (b, kv_len, h, d)]
    ts = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    if bshd:  # diffusers' memory order, seen as [B, H, S, D]
        return [t.transpose(1, 2) for t in ts]
    return [t.transpose(1, 2).contiguous() for t in ts]


def test_auto_on_cpu_is_our_path_bit_for_bit():
    geom = KernelGeometry(300, 300, 128)
    lists = random_lists(geom)
    q, k, v = qkv(300, 300, dtype=torch.bfloat16)
    res = run_attention(q, k, v, *lists)
    out, lse = cpu_sparse.listed_blocks_attention(q, k, v, lists, 1 / math.sqrt(64), "none", None)
    assert res.backend == "cpu" and res.fallback is None
    assert torch.equal(res.out, out) and torch.equal(res.lse, lse)
    assert ops.backend_stats() == {"served": {"cpu": 1}, "fa4_skipped": {}}


def test_forced_fa4_on_cpu_says_why():
    geom = KernelGeometry(300, 300, 128)
    q, k, v = qkv(300, 300, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"backend='fa4' cannot serve this call: tensors on cpu .*CUDA"):
        run_attention(q, k, v, *random_lists(geom), backend="fa4")
    with pytest.raises(ValueError, match="backend must be one of"):
        run_attention(q, k, v, *random_lists(geom), backend="flash")


def test_missing_fa4_names_the_extra():
    try:
        import flash_attn.cute  # noqa: F401
    except Exception:
        fa4.import_error.cache_clear()
        assert "fastattn[fa4]" in fa4.import_error()
    else:
        pytest.skip("flash-attn-4 is installed here")


class FakeBlockSparse(NamedTuple):
    """The fields of FA4's BlockSparseTensorsTorch the adapter fills."""

    mask_block_cnt: torch.Tensor
    mask_block_idx: torch.Tensor
    full_block_cnt: torch.Tensor | None = None
    full_block_idx: torch.Tensor | None = None
    cu_total_m_blocks: torch.Tensor | None = None
    cu_block_idx_offsets: torch.Tensor | None = None
    block_size: tuple[int, int] | None = None


def emulated_fa4(calls: list):
    """FA4's ``flash_attn_func`` contract in PyTorch: [B, S, H, D] in, (out [B, S, H, D], lse [B, H, S]) out;
    full/mask lists per query tile, walked from the end; only the first tile walked is masked at the
    sequence end (tokens past Skv in the other tiles read garbage keys, as out-of-range tiles would)."""

    def flash_attn_func(q, k, v, softmax_scale=None, block_sparse_tensors=None, return_lse=False):
        calls.append(block_sparse_tensors)
        b, sq, h, d = q.shape
        skv = k.shape[1]
        assert k.shape == v.shape == (b, skv, h, d) and return_lse
        assert all(t.stride(-1) == 1 for t in (q, k, v)), "FA4 wants channels contiguous"
        bs = block_sparse_tensors
        bq, bk = (128, 128) if bs is None else bs.block_size
        nq, nk = math.ceil(sq / bq), math.ceil(skv / bk)
        if bs is not None:
            for t in (bs.mask_block_cnt, bs.mask_block_idx, bs.full_block_cnt, bs.full_block_idx):
                assert t.dtype == torch.int32 and t.stride(-1) == 1 and t.shape[2] == nq
            assert bs.full_block_idx.shape[3] <= nk and int(bs.mask_block_cnt.abs().sum()) == 0
        pad = nk * bk - skv
        kp = torch.cat([k, torch.full((b, pad, h, d), 50.0, dtype=k.dtype)], 1)  # garbage past the end
        vp = torch.cat([v, torch.full((b, pad, h, d), 1e3, dtype=v.dtype)], 1)
        out = torch.zeros(b, sq, h, d, dtype=torch.float32)
        lse = torch.full((b, h, sq), -math.inf)
        for bi in range(b):
            for hi in range(h):
                for i in range(nq):
                    if bs is None:
                        tiles = list(range(nk))
                    else:
                        cb, ch = (
                            min(bi, bs.full_block_cnt.shape[0] - 1),
                            min(hi, bs.full_block_cnt.shape[1] - 1),
                        )
                        n = int(bs.full_block_cnt[cb, ch, i])
                        tiles = bs.full_block_idx[cb, ch, i, :n].tolist()
                    if not tiles:
                        continue
                    rows = slice(i * bq, min((i + 1) * bq, sq))
                    cols = torch.cat([torch.arange(j * bk, (j + 1) * bk) for j in tiles])
                    ok = torch.ones(len(cols), dtype=torch.bool)
                    first = len(tiles) - 1  # walked backwards: the last listed tile is read first
                    ok[first * bk : (first + 1) * bk] = cols[first * bk : (first + 1) * bk] < skv
                    s = q[bi, rows, hi].float() @ kp[bi, cols, hi].float().T * softmax_scale
                    s = s.masked_fill(~ok, -math.inf)
                    lse[bi, hi, rows] = torch.logsumexp(s, -1)
                    out[bi, rows, hi] = torch.softmax(s, -1) @ vp[bi, cols, hi].float()
        return out.to(q.dtype), lse

    return flash_attn_func


@pytest.fixture
def emulated(monkeypatch):
    """FA4 "available" on the CPU: its entry point emulated, the device checks passed."""
    calls: list = []

    def call_reason(q, k, v, quant, perm, geometry):
        if quant != "none" or perm is not None:
            return "quantized or permuted"
        return fa4.geometry_reason(geometry)

    monkeypatch.setattr(fa4, "call_reason", call_reason)
    monkeypatch.setattr(fa4, "q_group_for", lambda q: 1)
    monkeypatch.setattr(fa4, "_api", lambda: (emulated_fa4(calls), FakeBlockSparse))
    monkeypatch.setattr(ops, "FA4_MIN_WORK", 0)  # these calls are tiny; the size threshold has its own test
    return calls


@pytest.mark.parametrize("bshd", [True, False])
@pytest.mark.parametrize("backend", ["auto", "fa4"])
def test_emulated_fa4_serves_through_the_op(emulated, backend, bshd):
    geom = KernelGeometry(300, 300, 128)
    lists = random_lists(geom, seed=1)
    q, k, v = qkv(300, 300, bshd=bshd)
    res = run_attention(q, k, v, *lists, scale=0.2, backend=backend)
    assert res.backend == "fa4" and res.fallback is None and len(emulated) == 1
    ref, ref_lse = attention_reference(q, k, v, lists, scale=0.2)
    empty = torch.isinf(ref_lse)
    assert empty.any() and torch.equal(torch.isinf(res.lse), empty) and (res.out[empty] == 0).all()
    torch.testing.assert_close(res.out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res.lse[~empty], ref_lse[~empty], rtol=1e-5, atol=1e-5)
    assert res.out.stride() == torch.empty_like(q).stride()  # the op's promise, either memory order
    assert ops.backend_stats()["served"] == {"fa4": 1}


def test_emulated_fa4_dense_lists_and_sm100_pairs(emulated, monkeypatch):
    q, k, v = qkv(600, 300)
    geom = KernelGeometry(600, 300, 128)
    dense = run_attention(q, k, v, *dense_lists(geom, q.device))
    assert dense.backend == "fa4" and emulated[-1] is None  # dense lists: FA4's dense kernel, no lists
    torch.testing.assert_close(dense.out, attention_reference(q, k, v)[0], rtol=1e-5, atol=1e-5)

    monkeypatch.setattr(fa4, "q_group_for", lambda q: 2)
    base = random_lists(geom, seed=5)
    keep = torch.tensor([0, 0, 2, 2, 4])
    paired = BlockLists(base.counts[..., keep].contiguous(), base.indices[..., keep, :].contiguous(), geom)
    res = run_attention(q, k, v, *paired)
    assert res.backend == "fa4" and emulated[-1].block_size == (256, 128)
    torch.testing.assert_close(res.out, attention_reference(q, k, v, paired)[0], rtol=1e-5, atol=1e-5)
    # rows that differ within a pair: auto serves them with our path and says why
    unpaired = random_lists(geom, seed=6)
    assert run_attention(q, k, v, *unpaired).backend == "cpu"
    assert "256-query blocks" in ops._fa4_skip_reason(q, k, v, "none", None, unpaired)
    with pytest.raises(ValueError, match="256-query blocks"):
        run_attention(q, k, v, *random_lists(geom, seed=6), backend="fa4")


def test_calls_fa4_cannot_serve_stay_on_our_path(emulated):
    q, k, v = qkv(300, 300)
    ragged = random_lists(KernelGeometry(300, 300, 128, 100, 100))
    res = run_attention(q, k, v, *ragged)
    assert res.backend == "cpu" and not emulated
    out, lse = cpu_sparse.listed_blocks_attention(q, k, v, ragged, 1 / 8, "none", None)
    assert torch.equal(res.out, out) and torch.equal(res.lse, lse)
    with pytest.raises(ValueError, match="q_split 100"):
        run_attention(q, k, v, *ragged, backend="fa4")
    perm = torch.randperm(300)
    assert run_attention(q, k, v, *random_lists(KernelGeometry(300, 300, 128)), perm=perm).backend == "cpu"
    assert not emulated


def test_fa4_failure_falls_back_once_and_forced_fa4_raises(emulated, monkeypatch):
    tries = []

    def broken(*args, **kwargs):
        tries.append(1)
        raise RuntimeError("boom: JIT failed")

    monkeypatch.setattr(fa4, "_api", lambda: (broken, FakeBlockSparse))
    geom = KernelGeometry(300, 300, 128)
    lists = random_lists(geom)
    q, k, v = qkv(300, 300)
    with pytest.warns(UserWarning, match="FA4 failed .*boom"):
        res = run_attention(q, k, v, *lists)
    out, lse = cpu_sparse.listed_blocks_attention(q, k, v, lists, 1 / 8, "none", None)
    assert res.backend == "cpu" and torch.equal(res.out, out) and torch.equal(res.lse, lse)
    assert run_attention(q, k, v, *lists).backend == "cpu" and len(tries) == 1  # not tried again
    with pytest.raises(RuntimeError, match="backend='fa4': FlashAttention-4 failed: RuntimeError: boom"):
        run_attention(q, k, v, *lists, backend="fa4")


def test_auto_keeps_small_calls_off_fa4(emulated, monkeypatch):
    """Below the measured size threshold FA4's host overhead loses to Triton: auto keeps those calls, says why."""
    monkeypatch.setattr(ops, "FA4_MIN_WORK", 2 * 3 * 300 * 300 + 1)  # qkv(): B=2, H=3
    q, k, v = qkv(300, 300)
    lists = random_lists(KernelGeometry(300, 300, 128))
    assert run_attention(q, k, v, *lists).backend == "cpu" and not emulated
    assert "size threshold" in ops._fa4_skip_reason(q, k, v, "none", None, lists)
    assert run_attention(q, k, v, *lists, backend="fa4").backend == "fa4"  # forcing still works
    monkeypatch.setattr(ops, "FA4_MIN_WORK", 2 * 3 * 300 * 300)
    assert run_attention(q, k, v, *lists).backend == "fa4"


def test_env_switch_keeps_auto_off_fa4(emulated, monkeypatch):
    monkeypatch.setenv("FASTATTN_FA4", "0")
    q, k, v = qkv(300, 300)
    lists = random_lists(KernelGeometry(300, 300, 128))
    assert run_attention(q, k, v, *lists).backend == "cpu" and not emulated
    assert run_attention(q, k, v, *lists, backend="fa4").backend == "fa4"  # forcing still works


def test_fa4_check_reference_rows_equal_the_reference():
    """bench/fa4_check.py scores FA4 on sampled rows of its own float32 reference: it must be ours."""
    from fastattn.bench import fa4_check

    geom = KernelGeometry(400, 300, 128, 128, 0)
    lists = random_lists(geom, bm=1, hm=3, seed=2)
    q, k, v = qkv(400, 300, b=1)
    blocks = fa4_check.check_blocks(geom)
    out, lse = fa4_check.sampled_reference(q, k, v, lists, geom, blocks, 0.3)
    ref, ref_lse = attention_reference(q, k, v, lists, scale=0.3)
    torch.testing.assert_close(out, fa4_check.rows_of(ref, geom, blocks), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, fa4_check.rows_of(ref_lse[..., None], geom, blocks)[..., 0])
    dense, _ = fa4_check.sampled_reference(q, k, v, None, geom, blocks, 0.3)
    torch.testing.assert_close(
        dense, fa4_check.rows_of(attention_reference(q, k, v, scale=0.3)[0], geom, blocks)
    )
