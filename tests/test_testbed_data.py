"""Procedural sprite videos: determinism, ranges, labels, motion."""

from __future__ import annotations

import torch
from fastattn.testbed.data import (
    MOTIONS,
    NUM_CLASSES,
    SHAPES,
    SpriteVideos,
    class_index,
    class_name,
    shape_sdf,
)


def test_same_seed_same_clip_other_seed_other_clip():
    gen = SpriteVideos(size=32)
    a, ya = gen(3, 4, seed=11)
    b, yb = gen(3, 4, seed=11)
    c, _ = gen(3, 4, seed=12)
    assert torch.equal(a, b) and torch.equal(ya, yb)
    assert (a - c).abs().mean() > 0.01


def test_shapes_ranges_and_labels():
    video, labels = SpriteVideos(size=32)(6, 5, seed=3)
    assert video.shape == (6, 5, 3, 32, 32) and video.dtype == torch.float32
    assert video.min() >= 0 and video.max() <= 1 and video.std() > 0.05
    assert labels.shape == (6,) and ((labels >= 0) & (labels < NUM_CLASSES)).all()
    assert NUM_CLASSES == len(SHAPES) * len(MOTIONS)
    assert class_name(class_index("star", "orbit")) == "star/orbit"


def test_frames_move_but_stay_correlated():
    video, _ = SpriteVideos(size=32)(4, 6, seed=5)
    step = (video[:, 1:] - video[:, :-1]).abs().mean()
    unrelated = (video[:, 1:] - video.roll(1, dims=0)[:, :-1]).abs().mean()
    assert step > 1e-3  # something moves
    assert step < 0.5 * unrelated  # consecutive frames are far more alike than frames of other clips


def test_short_clip_is_prefix_of_long_clip_and_labels_can_be_forced():
    gen = SpriteVideos(size=32)
    long, _ = gen(2, 6, seed=9)
    short, _ = gen(2, 3, seed=9)
    torch.testing.assert_close(short, long[:, :3], atol=1e-5, rtol=0)
    forced = torch.tensor([class_index("disc", "zoom"), class_index("cross", "rotate")])
    _, y = gen(2, 2, seed=9, labels=forced)
    assert torch.equal(y, forced)


def test_shape_sdf_inside_outside():
    centre, far = torch.zeros(1, 2), torch.tensor([[3.0, 3.0]])
    d_centre, d_far = shape_sdf(centre)[:, 0], shape_sdf(far)[:, 0]
    # the ring is hollow; every other shape contains its centre; nothing reaches (3, 3)
    inside = torch.tensor([s != "ring" for s in SHAPES])
    assert ((d_centre < 0) == inside).all() and (d_far > 0).all()
