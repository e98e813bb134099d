"""Mask builders against brute-force token-level definitions on small grids."""

import itertools

import pytest
import torch
from fastattn.masks import (
    AXIS_ORDERS,
    BlockGeometry,
    BlockMask,
    TokenLayout,
    head_permutations,
    invert,
    patterns,
)


def token_coords(layout: TokenLayout, order: str = "FHW"):
    """(F, H, W) coordinates of every image position in ``order`` storage, plus a text flag per token."""
    f, h, w = layout.grid
    raster = torch.stack(torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij"), -1)
    stored = raster.permute(*["FHW".index(a) for a in order], 3).reshape(-1, 3)
    coords = torch.full((layout.seq_len, 3), -1)
    coords[layout.image_start : layout.image_start + layout.image_len] = stored
    is_text = coords[:, 0] < 0
    return coords, is_text


def blocks_from_token_rule(layout, block_size, allowed_tokens):
    """Block map where a block pair is on iff some token pair satisfies ``allowed_tokens`` [S, S]."""
    starts, ends = BlockGeometry(layout, block_size).bounds()
    n = len(starts)
    out = torch.zeros(n, n, dtype=torch.bool)
    for i, j in itertools.product(range(n), range(n)):
        out[i, j] = allowed_tokens[starts[i] : ends[i], starts[j] : ends[j]].any()
    return out


def with_text_dense(rule, is_text):
    return rule | is_text[:, None] | is_text[None, :]


LAYOUTS = [
    TokenLayout.video(3, 5, 7),
    TokenLayout.video(4, 3, 9, text_len=11, text_first=True),
    TokenLayout.video(2, 6, 5, text_len=13, text_first=False),
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("order", ["FHW", "HWF", "WFH"])
def test_window3d_matches_token_definition(layout, order):
    window = (1, 1, 2)
    mask = patterns.window3d(layout, window, block_size=8, order=order)
    coords, is_text = token_coords(layout, order)
    diff = (coords[:, None, :] - coords[None, :, :]).abs()
    rule = (diff <= torch.tensor(window)).all(-1) & ~is_text[:, None] & ~is_text[None, :]
    expected = blocks_from_token_rule(layout, 8, with_text_dense(rule, is_text))
    assert torch.equal(mask.to_block_map()[0, 0], expected)


@pytest.mark.parametrize(
    "layout", LAYOUTS + [TokenLayout.video(13, 3, 4, text_len=7), TokenLayout.video(9, 1, 1, text_len=3)]
)
@pytest.mark.parametrize("order", ["FHW", "HWF"])
def test_window3d_density_table_equals_the_built_masks(layout, order):
    f, h, w = layout.grid
    n = max(h, w)
    spatial = [(round(j * (h - 1) / max(n - 1, 1)), round(j * (w - 1) / max(n - 1, 1))) for j in range(n)]
    table = patterns.window3d_density_table(layout, spatial, block_size=8, order=order)
    assert table.shape == (f, n)
    for wf, j in itertools.product(range(f), range(n)):
        built = patterns.window3d(layout, (wf, *spatial[j]), block_size=8, order=order)
        assert table[wf, j].item() == pytest.approx(built.block_density(), abs=1e-6), (wf, j)  # float32 there


def test_window_wider_than_the_grid_is_the_whole_grid():
    layout = TokenLayout.video(3, 4, 4, text_len=20)
    for text in ("dense", "self"):
        full = patterns.window3d(layout, (2, 3, 3), 8, text=text)
        assert torch.equal(
            patterns.window3d(layout, (10**6, 30_000, 40_000), 8, text=text).kv_indices, full.kv_indices
        )


def test_segment_gaps_computed_in_chunks_give_the_same_masks(monkeypatch):
    layout = TokenLayout.video(4, 6, 9, text_len=11)
    cached = patterns.window3d(layout, (1, 2, 3), block_size=8)
    radial = patterns.radial(layout, (4, 4), block_size=8)
    monkeypatch.setattr(patterns.SegmentPairs, "CACHE_ELEMENTS", 200)  # forces uncached, multi-chunk gaps
    assert patterns.SegmentPairs(BlockGeometry(layout, 8))._gaps is None
    assert torch.equal(patterns.window3d(layout, (1, 2, 3), block_size=8).kv_indices, cached.kv_indices)
    assert torch.equal(patterns.radial(layout, (4, 4), block_size=8).kv_indices, radial.kv_indices)
    spatial = [(j, j) for j in range(9)]
    table = patterns.window3d_density_table(layout, spatial, block_size=8)
    assert table[1, 2].item() == pytest.approx(patterns.window3d(layout, (1, 2, 2), 8).block_density())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_radial_matches_token_definition(layout):
    mask = patterns.radial(layout, (4, 4), temporal_window=2, block_size=8)
    coords, is_text = token_coords(layout)
    diff = (coords[:, None, :] - coords[None, :, :]).abs()
    shift = torch.floor(torch.log2(1.0 + diff[..., 0].float())).long()
    rule = (diff[..., 0] <= 2) & (diff[..., 1] <= (4 >> shift)) & (diff[..., 2] <= (4 >> shift))
    rule &= ~is_text[:, None] & ~is_text[None, :]
    expected = blocks_from_token_rule(layout, 8, with_text_dense(rule, is_text))
    assert torch.equal(mask.to_block_map()[0, 0], expected)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_band_multidiagonal_and_stripes(layout):
    s = layout.seq_len
    img = torch.zeros(s, dtype=torch.bool)
    img[layout.image_start : layout.image_start + layout.image_len] = True
    pos = torch.cumsum(img.long(), 0) - 1  # image index of each token
    d = pos[None, :] - pos[:, None]
    both = img[:, None] & img[None, :]
    is_text = ~img

    band = patterns.band(layout, 6, block_size=8)
    expected = blocks_from_token_rule(layout, 8, with_text_dense(both & (d.abs() <= 6), is_text))
    assert torch.equal(band.to_block_map()[0, 0], expected)

    f, h, w = layout.grid
    md = patterns.multi_diagonal(layout, 2, frame_offsets=(-1, 0, 1), block_size=8)
    rule = torch.zeros(s, s, dtype=torch.bool)
    for off in (-1, 0, 1):
        rule |= (d - off * h * w).abs() <= 2
    expected = blocks_from_token_rule(layout, 8, with_text_dense(both & rule, is_text))
    assert torch.equal(md.to_block_map()[0, 0], expected)

    st = patterns.vertical_stripes(layout, [(0, 5), (20, 23)], block_size=8, text="self")
    cols = ((pos >= 0) & (pos < 5)) | ((pos >= 20) & (pos < 23))
    rule = both & cols[None, :] | (is_text[:, None] & is_text[None, :])
    assert torch.equal(st.to_block_map()[0, 0], blocks_from_token_rule(layout, 8, rule))


def test_geometry_blocks_text_segment_separately():
    layout = TokenLayout.video(2, 4, 4, text_len=10, text_first=True)  # 10 text + 32 image
    starts, ends = BlockGeometry(layout, 8).bounds()
    assert starts.tolist() == [0, 8, 10, 18, 26, 34]
    assert ends.tolist() == [8, 10, 18, 26, 34, 42]
    assert BlockGeometry(layout, 8).is_text().tolist() == [True, True, False, False, False, False]
    suffix = TokenLayout.video(2, 4, 4, text_len=10, text_first=False)
    starts, ends = BlockGeometry(suffix, 8).bounds()
    assert starts.tolist() == [0, 8, 16, 24, 32, 40] and ends[-1] == 42


def test_arrow_keeps_text_rows_and_columns_dense():
    layout = TokenLayout.video(1, 8, 16, text_len=40)
    mask = patterns.arrow(layout, factor=8, block_size=16)
    bm = mask.to_block_map()[0, 0]
    text = BlockGeometry(layout, 16).is_text()
    assert bm[text].all() and bm[:, text].all()
    assert not bm.all()


def test_block_map_round_trip_and_density():
    torch.manual_seed(0)
    layout = TokenLayout(100, 7)
    n = BlockGeometry(layout, 16).num_blocks
    bm = torch.rand(3, n, n) < 0.4
    bm[0, 2] = False  # an empty row
    mask = BlockMask.from_block_map(bm, layout, 16)
    assert torch.equal(mask.to_block_map()[0], bm)
    assert mask.kv_counts[0, 0, 2] == 0
    tok = mask.to_token_mask()
    assert tok.shape == (1, 3, 100, 100)
    assert abs(mask.density() - tok.double().mean().item()) < 1e-9


def test_union_stack_skip_heads():
    layout = TokenLayout.video(2, 4, 8)
    a = patterns.band(layout, 4, block_size=8)
    b = patterns.vertical_stripes(layout, [(0, 8)], block_size=8)
    u = a.union(b)
    assert torch.equal(u.to_block_map(), a.to_block_map() | b.to_block_map())
    stacked = BlockMask.stack_heads([a, b, u])
    assert stacked.kv_counts.shape[1] == 3
    skipped = stacked.skip_heads([1])
    assert int(skipped.kv_counts[0, 1].sum()) == 0 and torch.equal(skipped.kv_counts[0, 0], a.kv_counts[0, 0])


def test_bad_inputs_are_explained():
    with pytest.raises(ValueError, match="grid"):
        TokenLayout(50, 0, True, (2, 3, 4))
    with pytest.raises(ValueError, match="needs the latent grid"):
        patterns.window3d(TokenLayout(64), (1, 1, 1), 16)
    with pytest.raises(ValueError, match="order must be one of"):
        patterns.window3d(TokenLayout.video(2, 2, 2), (1, 1, 1), 4, order="XYZ")
    with pytest.raises(ValueError, match=r"block_map must be \[\.\.\., 4, 4\]"):
        BlockMask.from_block_map(torch.ones(3, 3, dtype=torch.bool), TokenLayout(64), 16)
    with pytest.raises(TypeError, match="torch.bool"):
        BlockMask.from_block_map(torch.ones(4, 4), TokenLayout(64), 16)
    with pytest.raises(ValueError, match="density"):
        patterns.band_for_density(TokenLayout(64), 0.0, 16)


def test_permutations_are_axis_orders_with_text_fixed():
    layout = TokenLayout.video(2, 3, 4, text_len=5, text_first=False)
    perms = head_permutations(layout, AXIS_ORDERS)
    assert perms.shape == (6, 29)
    for p in perms:
        assert torch.equal(p[24:], torch.arange(24, 29))  # text suffix stays
        assert torch.equal(torch.sort(p).values, torch.arange(29))
        assert torch.equal(p[invert(p)], torch.arange(29, dtype=p.dtype))
    hwf = perms[AXIS_ORDERS.index("HWF")]
    # in HWF order the first F tokens are the same spatial position (0, 0) across frames
    assert hwf[:2].tolist() == [0, 12]


def test_large_layout_builds_from_blocks_only():
    """HunyuanVideo 720p: 119,056 tokens; building must not touch S x S (it would be 56 GB)."""
    layout = TokenLayout.video(33, 45, 80, text_len=256, text_first=False)
    mask = patterns.window3d(layout, (3, 12, 12), 128)
    assert mask.num_blocks == 931
    assert 0.0 < mask.block_density() < 0.5


def test_rectangular_mask_views_and_kernel_geometry():
    """A query layout against a key layout: block map, token mask, density and the kernels' geometry."""
    from fastattn.attn_kernels import KernelGeometry

    q_layout, kv_layout = TokenLayout(37, 7), TokenLayout(90, 20, text_first=False)
    nq, nk = BlockGeometry(q_layout, 16).num_blocks, BlockGeometry(kv_layout, 16).num_blocks
    assert (nq, nk) == (3, 7)
    bm = torch.rand(2, nq, nk, generator=torch.Generator().manual_seed(0)) < 0.5
    bm[1, 2] = False
    mask = BlockMask.from_block_map(bm, q_layout, 16, kv_layout)
    assert mask.num_blocks == nq and mask.num_kv_blocks == nk and (mask.seq_len, mask.kv_len) == (37, 90)
    assert torch.equal(mask.to_block_map()[0], bm)
    tok = mask.to_token_mask()
    assert tok.shape == (1, 2, 37, 90)
    q_starts, q_ends = BlockGeometry(q_layout, 16).bounds()
    kv_starts, kv_ends = BlockGeometry(kv_layout, 16).bounds()
    for h, i, j in itertools.product(range(2), range(nq), range(nk)):
        block = tok[0, h, q_starts[i] : q_ends[i], kv_starts[j] : kv_ends[j]]
        assert bool(block.all()) == bool(bm[h, i, j]) and bool(block.any()) == bool(bm[h, i, j])
    assert abs(mask.density() - tok.double().mean().item()) < 1e-9
    assert mask.block_density() == pytest.approx(bm.float().mean().item())
    geom = mask.kernel_geometry()
    assert geom == KernelGeometry(37, 90, 16, q_split=7, kv_split=70)
    assert (geom.q_blocks, geom.kv_blocks, geom.q_blocks_first, geom.kv_blocks_first) == (3, 7, 1, 5)
    assert [t.tolist() for t in geom.kv_bounds()] == [t.tolist() for t in (kv_starts, kv_ends)]
    counts, indices, g = mask.block_lists()
    assert counts is mask.kv_counts and indices is mask.kv_indices and g == geom
    # composition keeps the key layout; a square mask's key layout is its layout
    assert mask.union(mask).kv_layout == kv_layout and mask.skip_heads([0]).kv_len == 90
    square = BlockMask.dense(q_layout, 16, kv_layout=q_layout)
    assert square.kv_layout is None and square.kernel_geometry().is_square
    assert "kv_len=90" in repr(mask) and "kv_len" not in repr(square)
    with pytest.raises(ValueError, match="masks differ"):
        mask.union(BlockMask.dense(q_layout, 16, TokenLayout(90, 20)))


def test_rectangular_mask_checks_say_what_was_expected():
    q_layout, kv_layout = TokenLayout(37, 7), TokenLayout(90, 20)
    with pytest.raises(ValueError, match=r"block_map must be \[\.\.\., 3, 7\] .* against kv_len 90"):
        BlockMask.from_block_map(torch.ones(4, 4, dtype=torch.bool), q_layout, 16, kv_layout)
    mask = BlockMask.dense(q_layout, 16, kv_layout)
    mask.validate(2, 3, 37, 90)
    with pytest.raises(ValueError, match="built for kv_len 90 keys, attention has 37"):
        mask.validate(2, 3, 37)
    with pytest.raises(ValueError, match="built for seq_len 37"):
        mask.validate(2, 3, 90, 90)
    bad = BlockMask(mask.kv_counts, mask.kv_indices + 1, q_layout, 16, kv_layout)
    with pytest.raises(ValueError, match=r"outside \[0, 7\)"):
        bad.validate(1, 1, 37, 90)
    with pytest.raises(ValueError, match="does not fit"):
        mask.mark_valid(1, 1, 37)
    assert mask.mark_valid(1, 1, 37, 90) is mask
