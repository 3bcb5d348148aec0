"""Heatmap targets: sub-voxel centres, presence rule, deep-supervision scales, left/right pair swap."""
import numpy as np
import pytest
import torch

from nnlandmark_h3de.heatmaps import (LandmarkHeatmapTransform, MirrorWithPairSwapTransform, ball_centres,
                                      expected_ball_voxels, left_right_axis, pair_permutation)


def draw_ball(seg, centre, radius, value):
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in seg.shape], indexing="ij"), -1)
    seg[np.linalg.norm(grid - np.asarray(centre), axis=-1) <= radius] = value
    return seg


def parabola_peak(h):
    """Independent sub-voxel peak: 3-point log-parabola per axis (exact for a Gaussian)."""
    idx = np.unravel_index(int(np.argmax(h)), h.shape)
    out = []
    for a in range(h.ndim):
        lo, hi = list(idx), list(idx)
        lo[a] -= 1
        hi[a] += 1
        fm, f0, fp = np.log(h[tuple(lo)]), np.log(h[idx]), np.log(h[tuple(hi)])
        out.append(idx[a] + 0.5 * (fm - fp) / (fm - 2 * f0 + fp))
    return np.array(out)


def make_seg(shape, balls):
    seg = np.zeros(shape, dtype=np.int16)
    for value, (centre, radius) in balls.items():
        draw_ball(seg, centre, radius, value)
    return torch.from_numpy(seg)[None]


def test_subvoxel_centre_recovered():
    true_centre = np.array([14.3, 17.71, 12.45])
    seg = make_seg((32, 36, 28), {1: (true_centre, 4.0), 2: ((6.2, 8.9, 20.1), 2.5)})
    out = LandmarkHeatmapTransform(num_landmarks=3, sigma=4.0)(segmentation=seg)["segmentation"]
    assert out.shape == (3, 32, 36, 28) and out.dtype == torch.float32
    h = out.numpy()
    voxels = np.argwhere(seg[0].numpy() == 1)
    # the heatmap peak is the label's centre of mass, and that lies within 0.05 voxel of the ball centre
    assert np.abs(parabola_peak(h[0]) - voxels.mean(0)).max() < 1e-3
    assert np.linalg.norm(parabola_peak(h[0]) - true_centre) < 0.05
    assert np.linalg.norm(parabola_peak(h[1]) - np.argwhere(seg[0].numpy() == 2).mean(0)) < 1e-3
    # peak height 1 (up to the sub-voxel offset), Gaussian width sigma = 4
    assert 0.97 < h[0].max() <= 1.0
    i = np.unravel_index(int(np.argmax(h[0])), h[0].shape)
    c = voxels.mean(0)
    expected = np.exp(-0.5 * ((i[0] + 4 - c[0]) ** 2 + (i[1] - c[1]) ** 2 + (i[2] - c[2]) ** 2) / 16)
    assert h[0][i[0] + 4, i[1], i[2]] == pytest.approx(expected, rel=1e-5)
    # landmark 3 has no ball: all zeros
    assert not out[2].any()


def test_presence_rule_for_balls_cut_by_the_border():
    shape = (24, 24, 24)
    expected = expected_ball_voxels(3.0, (1.0, 1.0, 1.0))
    seg = make_seg(shape, {1: ((1.0, 12, 12), 3.0),    # mostly visible, touches the border
                           2: ((-2.0, 5, 5), 3.0),     # a sliver
                           3: ((12, 12, 22.0), 1.5)})  # small, fully visible, touches the border
    centres, present = ball_centres(seg[0], 4, expected_voxels=expected, min_visible_fraction=0.5)
    assert present.tolist() == [True, False, False, False]
    assert torch.isnan(centres[1]).all() and torch.isnan(centres[3]).all()
    # without a known ball volume every ball touching the border is absent
    _, present = ball_centres(seg[0], 4, expected_voxels=None)
    assert present.tolist() == [False, False, False, False]
    # a ball that does not touch the border is present whatever its size (scaling augmentation)
    seg = make_seg(shape, {1: ((12, 12, 12), 1.0)})
    _, present = ball_centres(seg[0], 1, expected_voxels=expected)
    assert present.tolist() == [True]
    out = LandmarkHeatmapTransform(2, expected_voxels=expected)(segmentation=make_seg(shape, {2: ((-2.0, 5, 5), 3.0)}))
    assert not out["segmentation"].any()


def test_label_beyond_landmark_count_is_an_error():
    seg = make_seg((16, 16, 16), {3: ((8, 8, 8), 2.0)})
    with pytest.raises(ValueError, match="label value 3"):
        LandmarkHeatmapTransform(2)(segmentation=seg)


def test_deep_supervision_scales_shapes_and_centres():
    seg = make_seg((40, 48, 32), {1: ((17.3, 22.6, 14.2), 3.0), 2: ((30.1, 9.4, 20.7), 3.0)})
    scales = [[1, 1, 1], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25], [0.25, 0.125, 0.125]]
    outs = LandmarkHeatmapTransform(2, sigma=4.0, ds_scales=scales)(segmentation=seg)["segmentation"]
    assert [tuple(o.shape) for o in outs] == [(2, 40, 48, 32), (2, 20, 24, 16), (2, 10, 12, 8), (2, 10, 6, 4)]
    full = outs[0].numpy()
    c = np.array([parabola_peak(full[k]) for k in range(2)])
    for out, s in zip(outs[:3], scales[:3]):
        for k in range(2):
            expected = (c[k] + 0.5) * np.asarray(s) - 0.5
            assert np.linalg.norm(parabola_peak(out[k].numpy()) - expected) < 1e-3
    # the mapping is the one of average pooling (nnU-Net's decoder voxel covers s input voxels)
    pooled = torch.nn.functional.avg_pool3d(outs[0][None], 2)[0].numpy()
    for k in range(2):
        assert np.linalg.norm(parabola_peak(pooled[k]) - parabola_peak(outs[1][k].numpy())) < 0.05


def test_pair_swap_under_left_right_mirroring():
    names = ["L0", "mid", "R0"]
    perm = pair_permutation(names, [["L0", "R0"]])
    assert perm == [2, 1, 0]
    seg = make_seg((20, 20, 30), {1: ((10, 10, 5.5), 2.0), 2: ((10, 10, 14.5), 2.0), 3: ((10, 10, 24.5), 2.0)})
    seg[0, 0, 0, 0] = -1  # nnU-Net's padding value survives
    mirror = MirrorWithPairSwapTransform(allowed_axes=(0, 1, 2), lr_axis=2, permutation=perm)
    flipped = mirror.apply({"segmentation": seg.clone()}, axes=[2])["segmentation"]
    # L0's ball is now where R0's was mirrored to, and carries R0's value; the midline one keeps its own
    assert torch.equal(flipped == 3, torch.flip(seg == 1, [3]))
    assert torch.equal(flipped == 1, torch.flip(seg == 3, [3]))
    assert torch.equal(flipped == 2, torch.flip(seg == 2, [3]))
    assert flipped[0, 0, 0, -1] == -1
    # a flip of another axis does not swap
    other = mirror.apply({"segmentation": seg.clone()}, axes=[0])["segmentation"]
    assert torch.equal(other, torch.flip(seg, [1]))
    # heatmap channels follow: channel L0 peaks at the mirrored position of R0's ball
    heat = LandmarkHeatmapTransform(3)(segmentation=flipped)["segmentation"].numpy()
    assert np.allclose(parabola_peak(heat[0]), [10, 10, 29 - 24.5], atol=1e-3)
    assert np.allclose(parabola_peak(heat[2]), [10, 10, 29 - 5.5], atol=1e-3)


def test_pair_permutation_errors():
    with pytest.raises(ValueError, match="unknown landmarks"):
        pair_permutation(["a", "b"], [["a", "c"]])
    with pytest.raises(ValueError, match="overlaps"):
        pair_permutation(["a", "b", "c"], [["a", "b"], ["b", "c"]])


def test_left_right_axis_from_direction_and_transpose():
    identity = {"sitk_stuff": {"direction": (1, 0, 0, 0, 1, 0, 0, 0, 1)}}
    assert left_right_axis(identity, (0, 1, 2)) == 2  # ITK x is numpy axis 2
    assert left_right_axis(identity, (2, 1, 0)) == 0
    # image whose first ITK axis runs along world y and second along world x (a permuted direction)
    permuted = {"sitk_stuff": {"direction": (0, -1, 0, 1, 0, 0, 0, 0, 1)}}
    assert left_right_axis(permuted, (0, 1, 2)) == 1
    c, s = np.cos(np.pi / 4), np.sin(np.pi / 4)
    oblique = {"sitk_stuff": {"direction": (c, -s, 0, s, c, 0, 0, 0, 1)}}
    assert left_right_axis(oblique, (0, 1, 2)) is None
    assert left_right_axis({"nibabel_stuff": {}}, (0, 1, 2)) is None


def test_linear_ball_target_of_the_public_default():
    from nnlandmark_h3de.heatmaps.linear_ball_heatmap import LinearBallHeatmapTransform

    seg = make_seg((40, 40, 40), {1: ((20, 20, 20), 3.0)})
    outs = LinearBallHeatmapTransform(2, radius=15.0, ds_scales=[[1, 1, 1], [0.5, 0.5, 0.5]])(
        segmentation=seg)["segmentation"]
    full = outs[0].numpy()
    assert full[0, 20, 20, 20] == pytest.approx(1.0)
    assert full[0, 20, 20, 20 + 6] == pytest.approx(1 - 6 / 15, abs=1e-6)
    assert full[0, 20, 20, 36] == 0 and full[0, 20, 36, 36] == 0  # beyond the radius
    assert not outs[0][1].any()
    # half resolution: centre (20 + 0.5) / 2 - 0.5 = 9.75, radius 7.5
    assert outs[1][0, 9, 9, 9].item() == pytest.approx(1 - np.sqrt(3) * 0.75 / 7.5, abs=1e-6)


def test_expected_ball_voxels_counts_a_disk_on_a_2d_grid():
    """2D datasets draw disks: pi r^2 / (sx sy) pixels, not the 3D ball's volume over an area."""
    assert expected_ball_voxels(1.5, (0.1, 0.1)) == pytest.approx(np.pi * 1.5 ** 2 / 0.01)
    assert expected_ball_voxels(1.5, (1.0, 1.0, 2.0)) == pytest.approx(4 / 3 * np.pi * 1.5 ** 3 / 2.0)
    assert expected_ball_voxels(None, (1.0, 1.0)) is None


@pytest.mark.parametrize("profile", ["gaussian", "linear_ball"])
def test_ball_points_drawn_as_a_batch_equal_the_dense_transform_per_sample(profile):
    """Datasets without exact points: the loader's target is the balls' centres (partial-ball rule
    applied in the worker, NaN = absent); drawn for the whole batch at once they equal the dense
    per-sample transform at every deep-supervision scale, also for odd scale sizes."""
    from nnlandmark_h3de.heatmaps import GaussianTargets, LandmarkPointsTransform
    from nnlandmark_h3de.heatmaps.linear_ball_heatmap import LinearBallHeatmapTransform, LinearBallTargets
    shape, scales = (21, 26, 30), [[1, 1, 1], [0.5, 0.5, 0.5], [0.25, 0.25, 0.5]]
    expected = expected_ball_voxels(3.0, (1.0, 1.0, 1.0))
    segs = [make_seg(shape, {1: ((10.3, 12.6, 14.2), 3.0), 3: ((1.0, 12, 12), 3.0)}),  # 3 cut by the border
            make_seg(shape, {2: ((15.1, 9.4, 20.7), 2.5), 3: ((4.2, 20.8, 7.7), 3.0)}),
            make_seg(shape, {})]
    if profile == "gaussian":
        dense, drawing = LandmarkHeatmapTransform(3, 4.0, scales, expected), GaussianTargets(4.0, scales)
    else:
        dense, drawing = LinearBallHeatmapTransform(3, 15.0, scales, expected), LinearBallTargets(15.0, scales)
    points = torch.stack([LandmarkPointsTransform(3, expected)(segmentation=s.clone())["segmentation"] for s in segs])
    assert points.shape == (3, 3, 3) and points.dtype == torch.float64
    assert torch.isfinite(points).all(-1).tolist() == [[True, False, True], [False, True, True], [False] * 3]
    per_sample = [dense(segmentation=s.clone())["segmentation"] for s in segs]
    drawn = drawing(points, shape)
    assert [tuple(d.shape) for d in drawn] == [(3, 3, 21, 26, 30), (3, 3, 10, 13, 15), (3, 3, 5, 6, 15)]
    for k, d in enumerate(drawn):
        reference = torch.stack([p[k] for p in per_sample])
        assert (d - reference).abs().max() < 1e-5
        assert torch.equal(d.flatten(2).amax(2) > 0, torch.isfinite(points).all(-1))
    # an independent dense formula at full resolution for one landmark
    if profile == "gaussian":
        grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"), -1)
        ref = torch.exp(-((grid - points[0, 0]) ** 2).sum(-1) / (2 * 4.0 ** 2))
        assert (drawn[0][0, 0] - ref).abs().max() < 1e-6


def test_targets_refuse_points_of_the_wrong_dimension():
    from nnlandmark_h3de.heatmaps import GaussianTargets
    with pytest.raises(ValueError, match="do not match a 3D patch"):
        GaussianTargets(2.0)(torch.zeros(2, 4, 2, dtype=torch.float64), (8, 8, 8))
