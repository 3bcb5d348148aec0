"""Random nonlinear deformations: landmarks are carried exactly (the deformed image at a moved point
shows what the template showed at the original), the inverse is exact, the requested RMS is met,
the map is nonlinear and diffeomorphic, rms 0 is the identity, a seed is reproducible."""
import numpy as np
import pytest
import SimpleITK as sitk

from nnlandmark_h3de.landmarks import ImageGeometry, LandmarkSet, read_image, read_landmarks
from nnlandmark_h3de.synthesis.deformation import (deform_case, displacement_summary, landmark_displacement_summary,
                                                   random_deformation)
from nnlandmark_h3de.synthesis.rotations import random_rotation

WAVES = np.array([[7.0, 0.0, 0.0], [0.0, 9.0, 0.0], [0.0, 0.0, 8.0], [11.0, -13.0, 0.0]])


def smooth_value(points: np.ndarray) -> np.ndarray:
    """A smooth test function of world points (mm), range about [-4, 4], gradients ~0.3 / mm."""
    p = np.atleast_2d(points)
    return sum(np.sin(p @ (w / np.dot(w, w)) + k) for k, w in enumerate(WAVES))


def geometry_3d() -> ImageGeometry:
    """40^3-ish oblique anisotropic grid."""
    direction = random_rotation(np.random.default_rng(5), 30.0)
    return ImageGeometry((40, 36, 42), (2.0, 2.2, 1.8), (-30.0, 10.0, 5.0), tuple(direction.ravel()))


def smooth_case(geometry: ImageGeometry, n_landmarks: int = 12, seed: int = 0):
    """The smooth function drawn on `geometry` and landmarks inside it (the last one absent)."""
    idx = np.stack(np.meshgrid(*(np.arange(n, dtype=float) for n in geometry.shape_zyx), indexing="ij"), -1)
    array = smooth_value(geometry.array_index_to_world(idx).reshape(-1, 3)).reshape(geometry.shape_zyx)
    ijk = np.random.default_rng(seed).uniform(0.25, 0.75, size=(n_landmarks, 3)) * (np.asarray(geometry.shape_ijk) - 1)
    pts = geometry.itk_index_to_world(ijk)
    pts[-1] = np.nan
    names = [f"p{i}" for i in range(n_landmarks)]
    return geometry.to_sitk_image(array.astype(np.float32)), LandmarkSet(names, pts, source="smooth")


def sample_image(image, points: np.ndarray) -> np.ndarray:
    """Linear interpolation of an image at world points (2D images: their x, y)."""
    d = image.GetDimension()
    return np.array([image.EvaluateAtPhysicalPoint(tuple(float(v) for v in p[:d]), sitk.sitkLinear) for p in points])


def grid_points(geometry: ImageGeometry, stride: int = 3) -> np.ndarray:
    """World points of every `stride`-th voxel centre."""
    axes = [np.arange(0, n, stride, dtype=float) for n in geometry.shape_zyx]
    return geometry.array_index_to_world(np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3))


def affine_residual_rms(before: np.ndarray, after: np.ndarray) -> float:
    """RMS residual of the least-squares affine map before -> after."""
    a = np.c_[before, np.ones(len(before))]
    coef, *_ = np.linalg.lstsq(a, after, rcond=None)
    return float(np.sqrt(np.mean(np.sum((a @ coef - after) ** 2, axis=1))))


@pytest.mark.parametrize("ndim", [3, 2])
def test_deformed_image_at_moved_landmark_shows_the_original_anatomy(ndim):
    if ndim == 3:
        geometry = geometry_3d()
    else:
        geometry = ImageGeometry.create((60, 50), (1.5, 1.8), (5.0, -20.0), (0.8, -0.6, 0.6, 0.8))
    image, ls = smooth_case(geometry)
    if ndim == 2:
        ls = LandmarkSet(ls.names, ls.points_lps * [1, 1, 0], source="smooth")
    new_image, new_ls, displacement = deform_case(image, ls, np.random.default_rng(1), rms_mm=4.0,
                                                  control_spacing_mm=20)
    assert new_image.GetDimension() == ndim and new_image.GetSize() == image.GetSize()
    present = ls.present
    assert not new_ls.present[-1] and np.isnan(displacement[-1])
    assert new_ls.present[:-1].all(), "central landmarks must stay in the field of view"
    moved, original = new_ls.points_lps[present], ls.points_lps[present]
    np.testing.assert_allclose(displacement[present], np.linalg.norm(moved - original, axis=1))
    assert displacement[present].mean() > 1.5, "the deformation hardly moved anything: the test would prove nothing"
    if ndim == 2:
        assert np.all(moved[:, 2] == 0.0), "a 2D image is deformed in its plane"
    truth = smooth_value(original)
    err = np.abs(sample_image(new_image, moved) - truth)
    unmoved = np.abs(sample_image(new_image, original) - truth)
    assert err.max() < 0.05, f"deformed image at the moved landmarks differs by {err.max():.3f}"
    assert np.median(unmoved) > 5 * err.max(), "sampling at the unmoved points should be clearly wrong"


def test_move_then_sample_returns_within_a_hundredth_mm():
    geometry = geometry_3d()
    deformation = random_deformation(geometry, np.random.default_rng(2), rms_mm=5.0, control_spacing_mm=20)
    pts = grid_points(geometry, 5)
    moved = deformation.move_points(pts)
    back_numpy = moved + deformation.sample_displacement(moved)
    transform = deformation.sampling_transform()  # what sitk.Resample uses
    back_sitk = np.array([transform.TransformPoint(tuple(p)) for p in moved])
    assert np.abs(back_numpy - pts).max() < 0.01
    assert np.abs(back_sitk - pts).max() < 0.01
    assert np.linalg.norm(moved - pts, axis=1).max() > 3.0
    nan_rows = deformation.move_points(np.array([[np.nan] * 3, pts[0]]))
    assert np.isnan(nan_rows[0]).all() and np.isfinite(nan_rows[1]).all()


@pytest.mark.parametrize("rms_mm", [2.0, 6.0])
def test_foreground_rms_displacement_matches_the_request(rms_mm):
    geometry = geometry_3d()
    centre = (np.asarray(geometry.shape_zyx) - 1) / 2
    idx = np.stack(np.meshgrid(*(np.arange(n, dtype=float) for n in geometry.shape_zyx), indexing="ij"), -1)
    mask = np.linalg.norm(idx - centre, axis=-1) < 14
    deformation = random_deformation(geometry, np.random.default_rng(3), rms_mm, control_spacing_mm=24, mask=mask)
    fg = geometry.array_index_to_world(np.argwhere(mask).astype(float))
    achieved = np.sqrt(np.mean(np.sum((deformation.move_points(fg) - fg) ** 2, axis=1)))
    assert abs(achieved / rms_mm - 1) < 0.1, f"RMS {achieved:.3f} mm for a request of {rms_mm} mm"


def test_deformation_is_nonlinear_and_diffeomorphic():
    geometry = geometry_3d()
    deformation = random_deformation(geometry, np.random.default_rng(4), rms_mm=6.0, control_spacing_mm=20)
    pts = grid_points(geometry, 3)
    moved = deformation.move_points(pts)
    assert affine_residual_rms(pts, moved) > 2.0, "an affine map explains the deformation: it is not nonlinear"
    # Jacobian determinant of the sampling map x -> x + u(x) over the image and the field's margin
    field = deformation.field_geometry
    x = grid_points(field, 1)
    eps = 0.05
    jac = np.repeat(np.eye(3)[None], len(x), axis=0)
    for a in range(3):
        step = np.eye(3)[a] * eps
        diff = deformation.sample_displacement(x + step) - deformation.sample_displacement(x - step)
        jac[:, :, a] += diff / (2 * eps)
    det = np.linalg.det(jac)
    assert det.min() > 0, f"Jacobian determinant {det.min():.3f}: the deformation folds"
    assert det.min() < 0.8 and det.max() > 1.2, "the test deformation is too weak to test folding"


def test_zero_rms_is_the_identity_and_draws_nothing():
    image, ls = smooth_case(geometry_3d())
    rng = np.random.default_rng(5)
    state = rng.bit_generator.state
    new_image, new_ls, displacement = deform_case(image, ls, rng, rms_mm=0.0)
    assert rng.bit_generator.state == state
    np.testing.assert_array_equal(new_ls.points_lps, ls.points_lps)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(new_image), sitk.GetArrayFromImage(image))
    assert np.all(displacement[ls.present] == 0)


def test_same_seed_same_deformation_other_seed_another():
    geometry = geometry_3d()
    pts = grid_points(geometry, 7)
    a, b, c = (random_deformation(geometry, np.random.default_rng(s), 3.0).move_points(pts) for s in (6, 6, 7))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1.0


def test_bad_arguments_are_refused():
    geometry = geometry_3d()
    with pytest.raises(ValueError, match="rms_mm"):
        random_deformation(geometry, np.random.default_rng(0), -1.0)
    with pytest.raises(ValueError, match="control_spacing_mm"):
        random_deformation(geometry, np.random.default_rng(0), 2.0, control_spacing_mm=0)
    with pytest.raises(ValueError, match="mask"):
        random_deformation(geometry, np.random.default_rng(0), 2.0, mask=np.ones((3, 3, 3), bool))


def test_displacement_summaries():
    before = np.array([[0, 0, 0], [1, 1, 1], [np.nan] * 3, [2, 0, 0]], float)
    after = before + np.array([[3, 4, 0], [0, 0, 1], [0, 0, 0], [0, 0, 0]])
    s = landmark_displacement_summary(before, after)
    assert s == {"mean_mm": 2.0, "max_mm": 5.0, "n": 3}
    assert np.isnan(displacement_summary(np.array([np.nan]))["mean_mm"])
    with pytest.raises(ValueError, match="shape"):
        landmark_displacement_summary(before, after[:2])


def test_afids_template_deformed_with_its_landmarks(afids_dir):
    name = "human_MNI152NLin2009cAsym_T1w_2mm"
    image = read_image(afids_dir / "images" / f"{name}.nii.gz")
    ls = read_landmarks(afids_dir / "landmarks" / f"{name}.fcsv")
    smooth = sitk.SmoothingRecursiveGaussian(sitk.Cast(image, sitk.sitkFloat32), 4.0)  # interpolation error small
    new_image, new_ls, displacement = deform_case(smooth, ls, np.random.default_rng(0), rms_mm=4.0)
    present = new_ls.present
    assert present.sum() >= len(ls) - 1
    summary = displacement_summary(displacement)
    assert 2.0 < summary["mean_mm"] < 8.0 and summary["max_mm"] < 20.0, summary
    truth = sample_image(smooth, ls.points_lps[present])
    err = np.abs(sample_image(new_image, new_ls.points_lps[present]) - truth)
    unmoved = np.abs(sample_image(new_image, ls.points_lps[present]) - truth)
    assert np.median(err) < 0.2 * np.median(unmoved), (np.median(err), np.median(unmoved))
