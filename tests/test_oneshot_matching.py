"""CC2D: coarse-to-fine feature matching (analytic features on phantoms), the InfoNCE loss, the view
geometry, and the self-supervised trainer through the stock `nnUNetv2_train` command followed by
`cc2d_pseudo_labels` on its checkpoint."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from nnlandmark_h3de.oneshot.feature_matching import match_points, tile_origins
from nnlandmark_h3de.training.contrastive_views import (info_nce_loss, matching_accuracy, random_view_transforms,
                                                        same_cell_mask, sample_corresponding_points, warp_views)

BIN = Path(sys.executable).parent
DATASET_ID = 971
TRAINER = "nnLandmarkSelfSupervisedTrainer_test100"
# The stock trainer with a test schedule (one epoch of 100 batches, seeded), found by nnU-Net in a second
# `nnUNet_extTrainer` folder. Measured on the blob phantoms below (4 seeds): after 40 batches single
# landmarks still land 8-18 mm off (chance: 18-20 mm), after 80-100 the median landmark 1-5 mm.
TEST_TRAINER_SOURCE = """
import random

import numpy as np
import torch

from nnlandmark_h3de.training.self_supervised_trainer import nnLandmarkSelfSupervisedTrainer


class nnLandmarkSelfSupervisedTrainer_test100(nnLandmarkSelfSupervisedTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        random.seed(0)
        np.random.seed(0)
        torch.manual_seed(0)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1, 100, 1
"""


# ------------------------------------------------------------------ matching with analytic features
def descriptor_features(image: np.ndarray, strides=(1, 2, 4)) -> list:
    """A fixed multi-scale extractor: per scale s, the image smoothed at sigma s and 2 s, sampled at
    the 3^nd neighbours 2 sigma apart (a small NCC-like patch descriptor, mean removed), average-pooled
    by s. Stands in for a trained network: the matcher is what is tested."""
    nd = image.ndim
    pool = F.avg_pool3d if nd == 3 else F.avg_pool2d
    out = []
    for s in strides:
        channels = []
        for sigma in (1.0 * s, 2.0 * s):
            g = ndimage.gaussian_filter(image, sigma)
            step = int(round(2 * sigma))
            for off in np.stack(np.meshgrid(*[(-1, 0, 1)] * nd, indexing="ij"), -1).reshape(-1, nd):
                channels.append(np.roll(g, tuple(int(o) * step for o in off), axis=tuple(range(nd))))
        f = np.stack(channels).astype(np.float32)
        f -= f.mean(0, keepdims=True)
        if s > 1:
            f = pool(torch.from_numpy(f)[None], s)[0].numpy()
        out.append(f)
    return out


def _phantom(ndim: int):
    """(image normalised, landmark indices (L, ndim)) of a 3D (48^3) or 2D (96 x 80) phantom."""
    if ndim == 3:
        from nnlandmark_h3de.demo.phantoms import make_geometry, render_phantom
        geom = make_geometry((48, 48, 48), (2.0, 2.0, 2.0), 0.0, np.random.default_rng(0))
        case = render_phantom("p", geom, seed=1, case_index=0, noise_std=0.01)
        arr, idx = case.array_zyx, geom.world_to_array_index(case.landmarks.points_lps)
    else:
        from nnlandmark_h3de.demo.phantoms_2d import render_phantom_2d
        case = render_phantom_2d("p", seed=1, case_index=0, noise_std=0.01)
        arr, idx = case.array_zyx[0], case.geometry.world_to_array_index(case.landmarks.points_lps)[:, 1:]
    present = ~np.isnan(idx).any(1)
    return (arr / arr.std()).astype(np.float32), idx[present]


@pytest.mark.parametrize("ndim", [3, 2])
def test_matching_recovers_points_in_a_warped_phantom_within_one_voxel(ndim, one_torch_thread):
    image, idx = _phantom(ndim)
    shape = np.asarray(image.shape, dtype=np.float64)
    c = (shape - 1) / 2
    ang = np.deg2rad(7.0)
    rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    if ndim == 3:
        rot = np.block([[np.ones((1, 1)), np.zeros((1, 2))], [np.zeros((2, 1)), rot]])
    m = 1.05 * rot
    d = np.array([1.7, -2.3, 1.2][:ndim])
    # target(o) = source(M (o - c) + c + d): source point q is at o = M^-1 (q - c - d) + c in the target
    target = ndimage.affine_transform(image, m, offset=c - m @ c + d, order=1)
    truth = (np.linalg.inv(m) @ (idx - c - d).T).T + c

    strides = [[s] * ndim for s in (1, 2, 4)]
    found, confidence = match_points(descriptor_features(image), idx, descriptor_features(target), strides=strides)
    error = np.linalg.norm(found - truth, axis=1)
    assert found.shape == idx.shape and confidence.shape == (len(idx),)
    assert error.max() < 1.0, f"errors (voxels) {np.round(error, 2)}"
    assert np.all((confidence > 0.5) & (confidence <= 1.0))

    # an absent template landmark (NaN) stays absent, confidence 0; the others are unaffected
    with_nan = np.vstack([idx, np.full((1, ndim), np.nan)])
    found2, conf2 = match_points(descriptor_features(image), with_nan, descriptor_features(target), strides=strides)
    assert np.isnan(found2[-1]).all() and conf2[-1] == 0
    np.testing.assert_allclose(found2[:-1], found)


def test_tile_origins_are_aligned_and_cover():
    assert tile_origins(32, 32, 0.5, 8) == [0]
    o = tile_origins(112, 48, 0.5, 16)
    assert o[0] == 0 and o[-1] == 64 and all(v % 16 == 0 for v in o)
    assert all(b - a <= 48 for a, b in zip(o, o[1:]))


# ------------------------------------------------------------------------ loss and view geometry
def test_info_nce_is_lower_for_matching_features_than_for_shuffled_ones():
    g = torch.Generator().manual_seed(0)
    f1 = F.normalize(torch.randn(2, 64, 16, generator=g), dim=-1)
    f2 = F.normalize(f1 + 0.1 * torch.randn(2, 64, 16, generator=g), dim=-1)
    shuffled = f2[:, torch.randperm(64, generator=g)]
    matched, wrong = info_nce_loss(f1, f2), info_nce_loss(f1, shuffled)
    assert matched < 0.5 * wrong
    assert matched < np.log(64) < wrong + 1.0  # chance level is log N
    assert matching_accuracy(f1, f2) == (128, 128)
    # invalid points are neither queries nor candidates; excluded pairs are no negatives
    valid = torch.ones(2, 64, dtype=torch.bool)
    valid[:, 10:] = False
    assert info_nce_loss(f1, f2, valid) < matched  # fewer negatives
    assert matching_accuracy(f1, f2, valid) == (20, 20)
    everything_else = ~torch.eye(64, dtype=torch.bool).expand(2, 64, 64)
    assert info_nce_loss(f1, shuffled, exclude=everything_else) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("patch, spacing", [((24, 32, 40), (3.0, 1.0, 1.5)), ((40, 56), (1.0, 0.5))])
def test_views_have_analytic_correspondences(patch, spacing):
    """A smooth image sampled at a view-2 point equals view 1 at its partner (away from view 2's
    zero-filled border); distances in mm scale by one factor, so rotations act in millimetres."""
    nd = len(patch)
    axes = torch.meshgrid(*[(2 * torch.arange(s) + 1) / s - 1 for s in patch], indexing="ij")

    def f(p):  # p (..., nd) in normalised array order
        return torch.sin(3 * p[..., 0] + 1) * torch.cos(2 * p[..., -1]) + p[..., 1] ** 2

    image = f(torch.stack(axes, -1))[None, None].repeat(2, 1, *([1] * nd))
    g = torch.Generator().manual_seed(1)
    a, t = random_view_transforms(2, patch, spacing, 20.0, (0.8, 1.2), 0.1, generator=g)
    view2 = warp_views(image, a, t)
    p1, p2, valid = sample_corresponding_points(a, t, 200, generator=g)
    assert valid.all()
    inner = (p2.abs() < 0.85).all(-1)
    grid = p2.flip(-1).reshape((2, 200) + (1,) * (nd - 1) + (nd,))
    sampled = F.grid_sample(view2, grid, align_corners=False).reshape(2, 200)
    assert (sampled - f(p1)).abs()[inner].max() < 0.05
    half = torch.tensor([s * sp / 2 for s, sp in zip(patch, spacing)])
    ratio = ((p1[:, :50] - p1[:, 50:100]) * half).norm(dim=-1) / ((p2[:, :50] - p2[:, 50:100]) * half).norm(dim=-1)
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-4)
    # same-cell mask: at stride 8 on a 24-voxel axis, points in one cell are no negatives of each other
    mask = same_cell_mask(p1, patch, [8] * nd)
    assert not mask.diagonal(dim1=1, dim2=2).any() and torch.equal(mask, mask.transpose(1, 2))


# --------------------------------------------------------- the trainer through nnU-Net's commands
def _run(args, env, cwd):
    proc = subprocess.run([str(BIN / args[0]), *args[1:]], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _known_warp(image_path: Path, landmarks, out_path: Path) -> np.ndarray:
    """Write `image_path` moved by a shift (2.5, -1.5, 3 voxels) and an 8 degree rotation about the array's
    first axis to `out_path` (same grid); returns the landmarks moved exactly (world LPS)."""
    import SimpleITK as sitk

    from nnlandmark_h3de.landmarks import ImageGeometry
    source = sitk.ReadImage(str(image_path))
    arr = sitk.GetArrayFromImage(source).astype(np.float32)
    c = (np.asarray(arr.shape, dtype=np.float64) - 1) / 2
    a = np.deg2rad(8.0)
    m = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    d = np.array([2.5, -1.5, 3.0])
    # moved(o) = source(M (o - c) + c + d): source point q is at o = M^-1 (q - c - d) + c in the moved image
    moved = sitk.GetImageFromArray(ndimage.affine_transform(arr, m, offset=c - m @ c + d, order=1, mode="nearest"))
    moved.CopyInformation(source)
    sitk.WriteImage(moved, str(out_path))
    geometry = ImageGeometry.from_file(image_path)
    q = geometry.world_to_array_index(landmarks.points_lps)
    return geometry.array_index_to_world((np.linalg.inv(m) @ (q - c - d).T).T + c)


def _random_matcher_error(image_path: Path, truth: np.ndarray) -> np.ndarray:
    """Per landmark the mean distance (mm) of uniformly random points of the image to it: chance level."""
    from nnlandmark_h3de.landmarks import ImageGeometry
    geometry = ImageGeometry.from_file(image_path)
    shape = np.asarray(geometry.shape_zyx, dtype=np.float64)
    points = geometry.array_index_to_world(np.random.default_rng(0).uniform(-0.5, shape - 0.5, (20000, 3)))
    return np.array([np.linalg.norm(points - p, axis=1).mean() for p in truth])


def test_self_supervised_trainer_and_cc2d_pseudo_labels(nnunet_env, tmp_path, monkeypatch):
    """Trained through the stock `nnUNetv2_train`, CC2D finds the template's landmarks in a moved copy
    of it (known shift and rotation) far better than chance, then the pseudo-label chain and command."""
    import json

    from nnlandmark_h3de.landmarks.dataset_file import load_dataset_landmarks
    from nnlandmark_h3de.demo.blob_dataset import make_blob_dataset
    from nnlandmark_h3de.landmarks import ImageGeometry
    from nnlandmark_h3de.oneshot.feature_matching import FeatureExtractor, cc2d_pseudo_labels
    from nnlandmark_h3de.oneshot.pseudo_labels import OneShotError

    raw = make_blob_dataset(DATASET_ID, n_cases=5, shape_zyx=(32, 32, 32))
    (tmp_path / "test_trainers").mkdir()
    (tmp_path / "test_trainers" / "ssl_test_trainer.py").write_text(TEST_TRAINER_SOURCE)
    monkeypatch.setenv("nnUNet_extTrainer", os.pathsep.join([os.environ["nnUNet_extTrainer"],
                                                             str(tmp_path / "test_trainers")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread: two spin-wait on a shared machine
    _run(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "1", "-npfp", "1"],
         {**env, "nnUNet_n_proc_DA": "1"}, tmp_path)
    _run(["nnLandmark_add_small_config", "-d", str(DATASET_ID), "--patch_size", "32", "32", "32",
          "--base_features", "4", "--max_features", "16"], env, tmp_path)
    _run(["nnUNetv2_train", str(DATASET_ID), "3d_fullres_small", "0", "-tr", TRAINER, "-device", "cpu"], env,
         tmp_path)

    model = nnunet_env["nnUNet_results"] / raw.name / f"{TRAINER}__nnUNetPlans__3d_fullres_small"
    fold = model / "fold_0"
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    accuracy = ckpt["logging"]["dice_per_class_or_region"]  # matching accuracy per scale, per epoch
    assert len(accuracy) == 1 and all(0.0 <= a <= 1.0 for epoch in accuracy for a in epoch)
    assert ckpt["logging"]["mean_fg_dice"] == [epoch[0] for epoch in accuracy]
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert summary["per_case"] and all(0.0 <= a <= 1.0 for a in summary["mean_per_scale"])
    assert len(summary["mean_per_scale"]) == len(summary["strides"]) >= 2
    assert not list((fold / "validation").glob("*.nii.gz"))  # no segmentation export

    extractor = FeatureExtractor(model, 0)
    image = raw / "imagesTr" / "blob_000_0000.nii.gz"
    feats = extractor(image)
    assert [tuple(s) for s in feats.strides] == [tuple(s) for s in summary["strides"]]
    for f, s in zip(feats.features, feats.strides):
        assert f.shape[0] == 32 and tuple(f.shape[1:]) == tuple(-(-np.asarray(feats.shape) // s))
        torch.testing.assert_close(f.norm(dim=0), torch.ones(f.shape[1:]), atol=1e-4, rtol=0)

    landmarks = load_dataset_landmarks(raw / "landmarks.json")
    # accuracy on a known warp: the template moved by a shift and a rotation, its landmarks moved exactly
    truth = _known_warp(image, landmarks["blob_000"], tmp_path / "moved.nii.gz")
    moved = cc2d_pseudo_labels(extractor, image, landmarks["blob_000"], {"moved": tmp_path / "moved.nii.gz"},
                               progress=False)["moved"][0]
    error = np.linalg.norm(moved.points_lps - truth, axis=1)
    chance = _random_matcher_error(image, truth)
    assert np.median(error) < 6.0 and np.median(error) < np.median(chance) / 3, \
        f"errors {np.round(error, 2)} mm, random points {np.round(chance, 1)} mm"
    images = {c: raw / "imagesTr" / f"{c}_0000.nii.gz" for c in ("blob_001", "blob_002", "blob_003")}
    result = cc2d_pseudo_labels(model, image, landmarks["blob_000"], images, progress=False)
    assert set(result) == set(images)
    for case, (ls, conf) in result.items():
        assert ls.names == ["L0", "R0", "M"] and np.isfinite(ls.points_lps).all()
        assert conf.shape == (3,) and np.all((conf >= 0) & (conf <= 1))
        geometry = ImageGeometry.from_file(images[case])
        ijk = geometry.world_to_array_index(ls.points_lps)
        assert np.all(ijk >= -0.5) and np.all(ijk <= np.asarray(geometry.shape_zyx) - 0.5), (case, ijk)

    with pytest.raises(OneShotError, match="blob_missing"):
        cc2d_pseudo_labels(extractor, image, landmarks["blob_000"], {"blob_missing": tmp_path / "nope.nii.gz"},
                           progress=False)

    # the same through the command: nnLandmark_oneshot --method cc2d writes the pseudo-labelled dataset
    import json
    import shutil
    from nnlandmark_h3de.cli.oneshot import main as oneshot
    from nnlandmark_h3de.landmarks import LandmarkSet, write_landmarks
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    for case, path in images.items():
        shutil.copy(path, unlabelled / f"{case}.nii.gz")
    template_lm = tmp_path / "template.mrk.json"
    write_landmarks(LandmarkSet(["L0", "R0", "M"], landmarks["blob_000"].points_lps), template_lm)
    common = ["-t", str(image), "-l", str(template_lm), "-u", str(unlabelled), "-n", "OneShotCC2D",
              "-o", str(tmp_path / "oneshot"), "--method", "cc2d", "--template_copies", "1", "--min_confidence", "0"]
    assert oneshot([*common, "-d", "971"]) == 1  # no --ssl_model: a clear error, nothing written
    assert not (tmp_path / "oneshot" / "Dataset971_OneShotCC2D").exists()
    assert oneshot([*common, "-d", "972", "--ssl_model", str(model)]) == 0
    written = json.loads((tmp_path / "oneshot" / "Dataset972_OneShotCC2D" / "pseudo_labels.json").read_text())
    cases = written["cases"] if "cases" in written else written
    assert {c for c in images} <= set(cases)
