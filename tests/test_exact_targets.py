"""Exact landmark targets: keypoints through nnU-Net's crop, rotation, scaling, mirroring (pair swap)
and dummy-2D augmentation land where the image moved, and the heatmap peaks there (< 0.05 voxel); the
loader carries only those points (B x L x ndim) and the trainer draws, on its device, exactly the
heatmaps the loader used to draw.

The truth never uses our keypoint formulas: the image is made of coordinate maps (channel d holds
each voxel's index along axis d), so after any affine augmentation the output image tells, voxel by
voxel, where in the input it sampled; an affine fit of that inverted gives where a point went."""
import numpy as np
import pytest
import torch

from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnlandmark_h3de.heatmaps import (GaussianTargets, LandmarkHeatmapTransform, LandmarkPointsTransform,
                                      SpatialTransformWithKeypoints, keypoint_centres, make_landmark_aware)
from nnlandmark_h3de.inference.peaks import decode_peaks
from nnlandmark_h3de.training.landmark_data_loader import nnLandmarkDataLoader


def coordinate_image(shape, with_ones=False):
    """Channel d = index along axis d; with_ones adds a channel of ones (1 after sampling = no padding)."""
    grids = list(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij"))
    return torch.stack(grids + ([torch.ones(shape)] if with_ones else []))


def where_points_went(out_coords: torch.Tensor, in_shape, points: np.ndarray, affine_only: bool = True) -> np.ndarray:
    """From an augmented coordinate image (ndim + 1, *patch): output index of each input point (affine fit).
    affine_only=False: the augmentation may be nonlinear (elastic); the fit is then its affine part."""
    nd = out_coords.shape[0] - 1
    c = out_coords[:nd].reshape(nd, -1).T.double().numpy()  # sampled input position per output voxel
    o = np.stack(np.unravel_index(np.arange(c.shape[0]), out_coords.shape[1:]), 1).astype(np.float64)
    inside = np.abs(out_coords[nd].reshape(-1).double().numpy() - 1) < 1e-5  # no padding in the interpolation
    assert inside.sum() > 50, "augmented patch saw too little of the input"
    design = np.hstack([o[inside], np.ones((inside.sum(), 1))])
    coef, *_ = np.linalg.lstsq(design, c[inside], rcond=None)  # c = o @ M^T + t
    m, t = coef[:nd].T, coef[nd]
    if affine_only:
        assert np.abs(design @ coef - c[inside]).max() < 1e-2, "augmentation is not affine on this patch"
    return (points - t) @ np.linalg.inv(m).T


def heatmap_peaks(heatmaps: torch.Tensor) -> np.ndarray:
    idx, _, _ = decode_peaks(heatmaps.float())
    return np.asarray(idx)


def nnunet_pipeline(patch, rotation, mirror_axes, dummy_2d, lr_axis, perm, n_landmarks, force=True, last=None):
    """nnU-Net's own training pipeline (intensity transforms dropped: they would scramble the coordinate
    image and never touch keypoints), made landmark-aware, `last` (default: dense heatmaps) last."""
    compose = nnUNetTrainer.get_training_transforms(patch, rotation, None, mirror_axes, dummy_2d)
    compose.transforms = [t for t in compose.transforms if type(t).__name__ in
                          ("SpatialTransform", "Convert3DTo2DTransform", "Convert2DTo3DTransform", "MirrorTransform",
                           "RemoveLabelTansform")]
    compose = make_landmark_aware(compose, lr_axis, perm, exact_points=True)
    for t in compose.transforms:
        if isinstance(t, SpatialTransform) and force:
            t.p_rotation, t.p_scaling = 1.0, 1.0
    compose.transforms.append(last or LandmarkHeatmapTransform(n_landmarks, sigma=2.0, from_keypoints=True))
    return compose


@pytest.mark.parametrize("dummy_2d", [False, True])
def test_keypoints_follow_nnunet_augmentation_and_heatmap_peaks_there(dummy_2d):
    rng = np.random.default_rng(1 if dummy_2d else 0)
    torch.manual_seed(0)
    np.random.seed(0)
    patch = (20, 24, 28)
    in_shape = (20 if dummy_2d else 34, 40, 44)  # dummy 2D: nnU-Net's loader already cut axis 0 to the patch
    rotation = (-30 / 360 * 2 * np.pi, 30 / 360 * 2 * np.pi)  # nnU-Net's 3D range
    names_perm = [1, 0, 2, 3]  # landmarks 0/1 are a left/right pair
    lr_axis = 2
    errs, swaps, n_present = [], 0, 0
    for trial in range(40):
        pipe = nnunet_pipeline(patch, rotation, (0, 1, 2), dummy_2d, lr_axis, names_perm, 4)
        centre = (np.asarray(in_shape) - 1) / 2
        pts = centre + rng.uniform(-6, 6, (4, 3)) * ([0.5, 1, 1] if dummy_2d else 1)
        pts[3] = np.nan  # absent landmark
        out = pipe(image=coordinate_image(in_shape, True), segmentation=torch.zeros((1, *in_shape), dtype=torch.int16),
                   keypoints=torch.from_numpy(pts))
        went = where_points_went(out["image"], in_shape, pts[:3])
        heat = out["segmentation"]
        assert heat.shape == (4, *patch)
        assert torch.count_nonzero(heat[3]) == 0
        # which channel carries which point: the pair swaps exactly when the left/right axis was mirrored
        kp = out["keypoints"].numpy()
        swapped = np.allclose(kp[1], went[0], atol=1e-3)
        swaps += swapped
        expected = went[[1, 0, 2]] if swapped else went
        np.testing.assert_allclose(kp[:3], expected, atol=1e-3)
        present = np.all((expected >= -0.5) & (expected <= np.asarray(patch) - 0.5), 1)
        peaks = heatmap_peaks(heat[:3][torch.from_numpy(present)])
        if present.any():
            errs.append(np.abs(peaks - expected[present]).max())
            n_present += int(present.sum())
        assert all(torch.count_nonzero(heat[k]) == 0 for k in np.flatnonzero(~present))
    assert 5 <= swaps <= 35, swaps  # mirroring happened both ways
    assert n_present > 60
    assert max(errs) < 0.05, max(errs)


def test_crop_only_path_and_scaling_extremes():
    """No rotation/scaling: an integer crop; scaling 0.7 and 1.4 explicitly: still exact."""
    in_shape, patch = (30, 30, 30), (16, 18, 20)
    pts = np.array([[14.3, 15.7, 13.1], [10.0, 20.2, 16.9]])
    for scale in (None, 0.7, 1.4):
        t = SpatialTransformWithKeypoints(patch, 0, False, p_rotation=0, p_scaling=0 if scale is None else 1,
                                          scaling=(scale or 1, scale or 1), p_synchronize_scaling_across_axes=1)
        out = ComposeTransforms([t])(image=coordinate_image(in_shape, True), keypoints=torch.from_numpy(pts))
        went = where_points_went(out["image"], in_shape, pts)
        np.testing.assert_allclose(out["keypoints"].numpy(), went, atol=1e-3)


def test_point_outside_patch_gives_zeros_and_border_rule():
    shape = (10, 12, 14)
    kp = torch.tensor([[-0.6, 5, 5], [-0.4, 5, 5], [9.5, 11.5, 13.5], [9.6, 5, 5], [np.nan] * 3], dtype=torch.float64)
    _, present = keypoint_centres(kp, shape)
    assert present.tolist() == [False, True, True, False, False]
    out = LandmarkHeatmapTransform(5, from_keypoints=True, ds_scales=[(1, 1, 1), (0.5, 0.5, 0.5)])(
        segmentation=torch.zeros((1, *shape)), keypoints=kp)["segmentation"]
    for scale in out:
        assert [bool(torch.count_nonzero(c)) for c in scale] == [False, True, True, False, False]
    with pytest.raises(ValueError, match="no 'keypoints'"):
        LandmarkHeatmapTransform(5, from_keypoints=True)(segmentation=torch.zeros((1, *shape)))


def test_deep_supervision_scales_put_the_peak_at_the_scaled_point():
    shape = (16, 16, 16)
    kp = torch.tensor([[7.3, 8.6, 5.2]], dtype=torch.float64)
    outs = LandmarkHeatmapTransform(1, sigma=3.0, from_keypoints=True, ds_scales=[(1, 1, 1), (0.5, 0.5, 0.5)])(
        segmentation=torch.zeros((1, *shape)), keypoints=kp)["segmentation"]
    np.testing.assert_allclose(heatmap_peaks(outs[0])[0], kp[0].numpy(), atol=1e-3)
    np.testing.assert_allclose(heatmap_peaks(outs[1])[0], (kp[0].numpy() + 0.5) * 0.5 - 0.5, atol=1e-3)


class _FakeDataset:
    """What nnUNetDataLoader reads from a dataset: identifiers and load_case."""

    def __init__(self, shape):
        self.identifiers = ["a", "b"]
        self.shape = shape

    def load_case(self, identifier):
        data = coordinate_image(self.shape).numpy() + (1000 if identifier == "b" else 0)
        seg = np.zeros((1, *self.shape), dtype=np.int16)
        z = min(1, self.shape[0] - 1)
        seg[0, z, 1, 1] = 1
        return data, seg, None, {"class_locations": {1: np.array([[0, z, 1, 1]])}}


def test_loader_shifts_points_by_each_patch_origin_near_borders():
    """Patches near the border (nnU-Net pads with need_to_pad): each case's own points, moved by the crop."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    shape = (12, 14, 16)
    points = {"a": np.array([[1.2, 1.7, 2.1], [10.5, 12.0, 14.9]]), "b": np.array([[6.0, 7.0, 8.0], [np.nan] * 3])}
    last = ComposeTransforms([LandmarkPointsTransform(2, from_keypoints=True)])
    lm = LabelManager({"background": 0, "p": 1, "q": 2}, regions_class_order=None)
    dl = nnLandmarkDataLoader(_FakeDataset(shape), 4, (10, 10, 10), (10, 10, 10), lm, oversample_foreground_percent=0.5,
                              transforms=last, points_by_case=points, pad_sides=(4, 4, 4))
    np.random.seed(3)
    checked = 0
    for _ in range(10):
        batch = dl.generate_train_batch()
        assert batch["target"].shape == (4, 2, 3) and batch["target"].dtype == torch.float64  # no dense target
        for j, key in enumerate(batch["keys"]):
            coords = batch["data"][j]
            offset = 1000 if key == "b" else 0
            real = (coords[0] >= offset) if key == "b" else (coords.abs().sum(0) > 0)
            vox = torch.nonzero(real)[0]
            origin = coords[:, vox[0], vox[1], vox[2]].numpy() - offset - vox.numpy()  # input index of patch voxel 0
            expected = points[key] - origin
            for k in range(2):
                inside = np.all((expected[k] >= -0.5) & (expected[k] <= 9.5))
                point = batch["target"][j, k].numpy()
                assert bool(np.isfinite(point).all()) == bool(inside and np.isfinite(expected[k]).all())
                if inside:
                    np.testing.assert_allclose(point, expected[k], atol=1e-9)
                    checked += 1
    assert checked >= 10


def test_local_stage_patches_are_centred_on_a_landmark_within_the_jitter():
    """centre_jitter: every foreground patch is centred (up to nnU-Net's border clipping) on one landmark
    moved by at most the jitter; without it, nnU-Net centres on the label voxel (1, 1, 1)."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    shape = (40, 44, 48)
    points = {"a": np.array([[20.2, 21.7, 24.1], [12.5, 30.0, 33.9]]), "b": np.array([[26.0, 17.0, 20.0], [np.nan] * 3])}
    last = ComposeTransforms([LandmarkPointsTransform(2, from_keypoints=True)])
    lm = LabelManager({"background": 0, "p": 1, "q": 2}, regions_class_order=None)
    jitter = np.array([3.0, 2.0, 4.0])
    dl = nnLandmarkDataLoader(_FakeDataset(shape), 4, (16, 16, 16), (16, 16, 16), lm, oversample_foreground_percent=1.0,
                              transforms=last, points_by_case=points, centre_jitter=jitter)
    np.random.seed(0)
    offsets = []
    for _ in range(20):
        batch = dl.generate_train_batch()
        for j, key in enumerate(batch["keys"]):
            coords = batch["data"][j] - (1000 if key == "b" else 0)
            centre = coords[:, 8, 8, 8].numpy()  # input index at the patch centre voxel
            d = np.abs(points[key] - centre)
            nearest = np.nanmin(np.max(d / (jitter + 0.5 + 1e-6), axis=1))
            assert nearest <= 1.0, (key, centre)
            offsets.append(np.nanmin(np.linalg.norm(points[key] - centre, axis=1)))
    assert np.std(offsets) > 0.3  # jittered, not always on the point


@pytest.mark.parametrize("n_slices", [1, 6])
def test_loader_2d_patches_keep_the_points_of_their_slice(n_slices):
    """A 2D configuration (patch (py, px)): nnU-Net crops one slice of the (z, y, x) array (a 2D image
    is (1, y, x)); a point is in the patch's heatmaps when it lies within half a voxel of that slice,
    at its (y, x) moved by the crop."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    shape = (n_slices, 14, 16)
    z = [0.0, 0.3] if n_slices == 1 else [2.0, 2.4]
    points = {"a": np.array([[z[0], 3.2, 4.7], [z[1], 9.5, 12.9], [np.nan] * 3]),
              "b": np.array([[z[1], 6.0, 7.0], [z[0], 1.0, 1.0], [z[0] + 1.0, 8.0, 8.0]])}
    last = ComposeTransforms([LandmarkPointsTransform(3, from_keypoints=True)])
    lm = LabelManager({"background": 0, "p": 1, "q": 2, "r": 3}, regions_class_order=None)
    dl = nnLandmarkDataLoader(_FakeDataset(shape), 4, (10, 10), (10, 10), lm, oversample_foreground_percent=0.0,
                              transforms=last, points_by_case=points, pad_sides=(2, 2))
    np.random.seed(5)
    checked, seen_slices = 0, set()
    for _ in range(12):
        batch = dl.generate_train_batch()
        assert batch["data"].shape == (4, 3, 10, 10) and batch["target"].shape == (4, 3, 2)
        for j, key in enumerate(batch["keys"]):
            coords = batch["data"][j] - (1000 if key == "b" else 0)
            real = coords[1:].abs().sum(0) > 0 if key == "a" else coords[1] >= 0
            vox = torch.nonzero(real)[0]
            slice_index = float(coords[0, vox[0], vox[1]])
            seen_slices.add(slice_index)
            origin = coords[1:, vox[0], vox[1]].numpy() - vox.numpy()
            for k in range(3):
                p = points[key][k]
                expected = p[1:] - origin
                inside = (np.isfinite(p).all() and abs(p[0] - slice_index) <= 0.5
                          and np.all((expected >= -0.5) & (expected <= 9.5)))
                point = batch["target"][j, k].numpy()
                assert bool(np.isfinite(point).all()) == bool(inside), (key, k, slice_index)
                if inside:
                    np.testing.assert_allclose(point, expected, atol=1e-9)
                    checked += 1
    assert checked >= 10
    if n_slices > 1:
        assert len(seen_slices) > 2


class _TrainerDrawing:
    """The trainer's own target drawing (nnLandmarkTrainer.targets_from_points with nnU-Net's
    deep-supervision scales) on a plans-free stand-in, so the batches need no planned dataset."""
    from nnlandmark_h3de.training.nnLandmarkTrainer import nnLandmarkTrainer as _T
    heatmap_sigma = 2.0
    enable_deep_supervision = True
    targets_from_points = _T.targets_from_points
    build_heatmap_targets = _T.build_heatmap_targets
    _get_deep_supervision_scales = nnUNetTrainer._get_deep_supervision_scales

    def __init__(self, pool_op_kernel_sizes):
        from types import SimpleNamespace
        self.configuration_manager = SimpleNamespace(pool_op_kernel_sizes=pool_op_kernel_sizes)


@pytest.mark.parametrize("dummy_2d", [False, True])
def test_trainer_draws_on_the_device_what_the_loader_drew(dummy_2d):
    """The same batches (same seeds) through nnU-Net's augmentation, once ending in the dense transform
    of before, once in LandmarkPointsTransform + the trainer's drawing: every deep-supervision scale
    equal (< 1e-5), while the loader's target shrinks from (B, L, *patch) per scale to (B, L, 3)."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    shape, patch, n = (34, 40, 44), (20, 24, 28), 4
    pools = [[1, 1, 1], [2, 2, 2], [2, 2, 2], [1, 2, 2]]  # odd-sized scales (24 -> 12 -> 6 -> 3; 20 -> 10 -> 5 -> 5)
    trainer = _TrainerDrawing(pools)
    scales = trainer._get_deep_supervision_scales()
    rotation = (-30 / 360 * 2 * np.pi, 30 / 360 * 2 * np.pi)
    rng = np.random.default_rng(4)
    points = {k: (np.asarray(shape) - 1) / 2 + rng.uniform(-8, 8, (n, 3)) for k in ("a", "b")}
    points["b"][2] = np.nan
    lm = LabelManager({"background": 0, **{f"l{i}": i + 1 for i in range(n)}}, regions_class_order=None)

    def batches(last):
        pipe = nnunet_pipeline(patch, rotation, (0, 1, 2), dummy_2d, 2, [1, 0, 2, 3], n, last=last)
        dl = nnLandmarkDataLoader(_FakeDataset(shape), 3, patch, patch, lm, oversample_foreground_percent=0.3,
                                  transforms=pipe, points_by_case=points)
        np.random.seed(11)
        torch.manual_seed(11)
        return [dl.generate_train_batch() for _ in range(3)]

    old = batches(LandmarkHeatmapTransform(n, sigma=2.0, ds_scales=scales, from_keypoints=True))
    new = batches(LandmarkPointsTransform(n, from_keypoints=True))
    n_present = 0
    for o, b in zip(old, new):
        assert torch.equal(o["data"], b["data"])  # the same augmentation draws
        assert b["target"].shape == (3, n, 3)
        drawn = trainer.targets_from_points(b["target"], b["data"].shape[2:])
        assert [tuple(t.shape) for t in drawn] == [tuple(t.shape) for t in o["target"]]
        for dense, device in zip(o["target"], drawn):
            assert device.dtype == torch.float32 and (dense - device).abs().max() < 1e-5
        present = torch.isfinite(b["target"]).all(-1)
        assert torch.equal(present, o["target"][0].flatten(2).amax(2) > 0)
        n_present += int(present.sum())
    assert n_present >= 10, n_present


@pytest.mark.parametrize("ndim", [2, 3])
def test_keypoints_follow_an_elastic_deformation(ndim):
    """With elastic offsets (plus rotation and scaling) the output image, sampled where the keypoint went,
    holds the keypoint's own input coordinates: the point moved with the image."""
    from nnlandmark_h3de.heatmaps.keypoint_transforms import _linear_at
    torch.manual_seed(0)
    np.random.seed(0)
    rng = np.random.default_rng(0)
    in_shape, patch = (40, 44, 48)[:ndim], (24, 28, 32)[:ndim]
    t = SpatialTransformWithKeypoints(patch, 0, False, p_elastic_deform=1, elastic_deform_scale=(0.1, 0.2),
                                      elastic_deform_magnitude=(2, 4), p_rotation=1, rotation=(-0.5, 0.5),
                                      p_scaling=1, scaling=(0.8, 1.2))
    errors, moved = [], []
    for _ in range(10):
        pts = (np.asarray(in_shape) - 1) / 2 + rng.uniform(-6, 6, (5, ndim))
        pts[4] = np.nan
        out = ComposeTransforms([t])(image=coordinate_image(in_shape, True), keypoints=torch.from_numpy(pts))
        kp = out["keypoints"]
        assert torch.isnan(kp[4]).all()
        sampled = _linear_at(torch.movedim(out["image"].double(), 0, -1), kp[:4])
        assert torch.all(torch.abs(sampled[:, ndim] - 1) < 1e-5)  # all inside the input image
        errors.append(np.abs(sampled[:, :ndim].numpy() - pts[:4]).max())
        rigid = where_points_went(out["image"], in_shape, pts[:4], affine_only=False)
        moved.append(np.abs(kp[:4].numpy() - rigid).max())
    assert max(errors) < 0.05, max(errors)
    assert max(moved) > 0.5  # the elastic part really moved the points (not an affine-only pass)


def test_a_trainers_elastic_deformation_reaches_nnunets_spatial_transform():
    from types import SimpleNamespace
    from nnlandmark_h3de.training.nnLandmarkTrainer import nnLandmarkTrainer
    from nnlandmark_h3de.training.variants import nnLandmarkTrainerLocalElastic
    for cls in (nnLandmarkTrainer, nnLandmarkTrainerLocalElastic):
        compose = nnUNetTrainer.get_training_transforms((16, 16, 16), (-0.5, 0.5), None, (0, 1, 2), False)
        fake = SimpleNamespace(elastic_deformation=cls.elastic_deformation, left_right_axis=2,
                               pair_permutation=[1, 0], exact_points=object())
        compose = nnLandmarkTrainer._with_landmark_transforms(fake, compose)
        spatial = [t for t in compose.transforms if isinstance(t, SpatialTransform)]
        assert len(spatial) == 1 and isinstance(spatial[0], SpatialTransformWithKeypoints)
        expected = cls.elastic_deformation or (0, (0, 0.2), (0, 0.2))  # nnU-Net's: off
        assert spatial[0].p_elastic_deform == expected[0]
        assert tuple(spatial[0].elastic_deform_magnitude) == tuple(expected[2])
