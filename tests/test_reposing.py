"""Re-posing: a bright dot drawn at a landmark ends exactly at the moved landmark; crops make
landmarks absent only when they leave the field of view; a nonlinear deformation composed with the
pose carries the landmarks through both, and without one the result is the pose-only one, bit for bit."""
import numpy as np
import pytest
import SimpleITK as sitk

from nnlandmark_h3de.synthesis.rotations import random_rotation
from nnlandmark_h3de.synthesis.reposing import (IntensityChange, change_intensity, image_centre, random_crop,
                                                random_pose, repose_case, resample_posed)
from nnlandmark_h3de.landmarks import ImageGeometry, LandmarkSet

SIGMA_MM = 2.0


def _dot_image(ndim: int = 3):
    """Anisotropic, oblique grid with a Gaussian dot at each of 5 landmarks (one absent); ndim = 2: the
    same in a 2D image (its z = 0 plane)."""
    offsets = np.array([[0, 0, 0], [12, -8, 5], [-14, 6, -10], [8, 15, 12], [-6, -14, 14], [1, 2, 3]], float)
    if ndim == 2:
        a = np.deg2rad(30.0)
        geom = ImageGeometry.create((32, 36), (1.6, 1.8), (0.0, 0.0), (np.cos(a), -np.sin(a), np.sin(a), np.cos(a)))
        offsets[:, 2] = 0.0
    else:
        direction = random_rotation(np.random.default_rng(5), 30.0)
        geom = ImageGeometry((32, 36, 40), (1.6, 1.8, 2.0), (0.0, 0.0, 0.0), tuple(direction.ravel()))
    shape_zyx = geom.shape_zyx
    centre = geom.itk_index_to_world((np.asarray(geom.shape_ijk) - 1) / 2)
    pts = centre + offsets
    pts[-1] = np.nan
    names = ["a", "b", "c", "d", "e", "gone"]
    idx = np.stack(np.meshgrid(*(np.arange(n, dtype=float) for n in shape_zyx), indexing="ij"), -1)
    world = geom.array_index_to_world(idx)
    arr = np.zeros(shape_zyx)
    for p in pts[:-1]:
        arr += 1000 * np.exp(-np.sum((world - p) ** 2, -1) / (2 * SIGMA_MM ** 2))
    return geom.to_sitk_image(arr.astype(np.float32)), LandmarkSet(names, pts, source="dots")


def _centroid_near(image, point, radius_mm):
    geom = ImageGeometry.from_sitk(image)
    arr = sitk.GetArrayFromImage(image).astype(np.float64)
    idx = np.stack(np.meshgrid(*(np.arange(n, dtype=float) for n in geom.shape_zyx), indexing="ij"), -1)
    world = geom.array_index_to_world(idx)
    w = arr * (np.linalg.norm(world - point, axis=-1) < radius_mm)
    return (world * w[..., None]).sum((0, 1, 2)) / w.sum()


@pytest.mark.parametrize("ndim", [3, 2])
def test_dot_follows_its_landmark(ndim):
    image, ls = _dot_image(ndim)
    moved_some = False
    for seed in range(3):
        new_image, new_ls = repose_case(image, ls, np.random.default_rng(seed), max_rotation_deg=30,
                                        max_translation_mm=6, scale_range=(0.85, 1.15), intensity=None)
        assert new_ls.names == ls.names
        assert not new_ls.present[-1], "an absent landmark must stay absent"
        assert new_image.GetDimension() == ndim
        if ndim == 2:
            assert np.all(new_ls.points_lps[:-1, 2] == 0.0), "a 2D image's landmarks stay on its plane"
        for name, p_old, p in zip(ls.names[:-1], ls.points_lps[:-1], new_ls.points_lps[:-1]):
            assert np.isfinite(p).all(), f"seed {seed}: {name} left the unchanged field of view"
            moved_some |= np.linalg.norm(p - p_old) > 3.0
            c = _centroid_near(new_image, p, 3 * SIGMA_MM * 1.15)
            err = np.linalg.norm(c - p)
            assert err < 0.1, f"seed {seed}: dot of {name} at {c}, landmark at {p} ({err:.3f} mm)"
    assert moved_some, "the random poses did not move anything: the test would prove nothing"


def test_similarity_transform_scales_all_distances_equally():
    image, ls = _dot_image()
    _, new_ls = repose_case(image, ls, np.random.default_rng(1), scale_range=(0.9, 0.95), intensity=None)
    p, q = ls.points_lps[:5], new_ls.points_lps[:5]
    d_old = np.linalg.norm(p[:, None] - p[None], axis=-1)[np.triu_indices(5, 1)]
    d_new = np.linalg.norm(q[:, None] - q[None], axis=-1)[np.triu_indices(5, 1)]
    ratio = d_new / d_old
    assert np.ptp(ratio) < 1e-9 and 0.9 <= ratio[0] <= 0.95


def test_random_pose_respects_its_limits():
    rng = np.random.default_rng(0)
    for _ in range(50):
        pose = random_pose(rng, np.zeros(3), max_rotation_deg=15, max_translation_mm=4, scale_range=(0.9, 1.1))
        s = np.cbrt(np.linalg.det(pose.matrix))
        rot = pose.matrix / s
        np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-12)
        angle = np.degrees(np.arccos(np.clip((np.trace(rot) - 1) / 2, -1, 1)))
        assert angle <= 15 + 1e-9 and 0.9 <= s <= 1.1 and np.abs(pose.translation).max() <= 4


def test_crop_makes_outside_landmarks_absent_and_keeps_inside_ones():
    image, ls = _dot_image()
    seen_absent = seen_present = False
    for seed in range(10):
        # same seed: the pose is drawn before the crop, so both calls move the anatomy identically
        _, full = repose_case(image, ls, np.random.default_rng(seed), intensity=None)
        cropped_image, cropped = repose_case(image, ls, np.random.default_rng(seed), crop_fraction=(0.4, 0.6),
                                             intensity=None)
        geom = ImageGeometry.from_sitk(cropped_image)
        assert all(c < f for c, f in zip(geom.shape_ijk, image.GetSize()))
        for i in range(len(ls) - 1):
            inside = geom.contains_array_index(geom.world_to_array_index(full.points_lps[i]), margin=0.0)[0]
            if cropped.present[i]:
                seen_present = True
                np.testing.assert_allclose(cropped.points_lps[i], full.points_lps[i])
                assert inside
            else:
                seen_absent = True
                assert not inside, f"seed {seed}: landmark {ls.names[i]} inside the crop but marked absent"
        assert not cropped.present[-1]
    assert seen_absent and seen_present


def test_intensity_change_and_determinism():
    image, ls = _dot_image()
    a, la = repose_case(image, ls, np.random.default_rng(3), intensity=IntensityChange())
    b, lb = repose_case(image, ls, np.random.default_rng(3), intensity=IntensityChange())
    c, _ = repose_case(image, ls, np.random.default_rng(3), intensity=None)
    arr_a, arr_b, arr_c = (sitk.GetArrayFromImage(x) for x in (a, b, c))
    assert np.array_equal(arr_a, arr_b)
    np.testing.assert_array_equal(la.points_lps, lb.points_lps)
    assert not np.allclose(arr_a, arr_c)
    assert a.GetSpacing() == c.GetSpacing() and a.GetOrigin() == c.GetOrigin() and a.GetDirection() == c.GetDirection()


def test_bad_crop_fraction_is_refused():
    image, ls = _dot_image()
    with pytest.raises(ValueError, match="crop_fraction"):
        repose_case(image, ls, np.random.default_rng(0), crop_fraction=(0.0, 0.5))


def _pose_only_expectation(image, ls, seed, crop_fraction, margin_vox):
    """Today's pose-only path from its building blocks (default pose ranges, intensity change), and
    the generator's state after it."""
    rng = np.random.default_rng(seed)
    geometry = ImageGeometry.from_sitk(image)
    pose = random_pose(rng, image_centre(geometry), 15.0, 10.0, (0.9, 1.1), geometry.ndim)
    output = random_crop(geometry, rng, crop_fraction)
    arr = sitk.GetArrayFromImage(resample_posed(image, pose, output))
    arr = change_intensity(arr, rng, IntensityChange())
    points = pose.apply(ls.points_lps)
    present = np.isfinite(points).all(axis=1)
    inside = np.zeros(len(points), bool)
    inside[present] = output.contains_array_index(output.world_to_array_index(points[present]), margin=margin_vox)
    points[~inside] = np.nan
    return arr, points, output, rng.bit_generator.state


@pytest.mark.parametrize("ndim", [3, 2])
def test_no_deformation_gives_the_pose_only_result_bit_for_bit(ndim):
    image, ls = _dot_image(ndim)
    for seed in range(3):
        arr, points, output, state = _pose_only_expectation(image, ls, seed, (0.6, 0.9), -1.0)
        rng = np.random.default_rng(seed)
        new_image, new_ls = repose_case(image, ls, rng, crop_fraction=(0.6, 0.9), margin_vox=-1.0, deform_mm=0.0)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(new_image), arr)
        np.testing.assert_array_equal(new_ls.points_lps, points)
        assert ImageGeometry.from_sitk(new_image) == output
        assert rng.bit_generator.state == state, "deform_mm=0 must draw exactly what the pose-only path draws"


def _smooth_image(ndim: int):
    """A smooth function of world position on the dot image's grid (same landmarks)."""
    image, ls = _dot_image(ndim)
    geom = ImageGeometry.from_sitk(image)
    idx = np.stack(np.meshgrid(*(np.arange(n, dtype=float) for n in geom.shape_zyx), indexing="ij"), -1)
    arr = _smooth_value(geom.array_index_to_world(idx))
    return geom.to_sitk_image(arr.astype(np.float32)), ls


def _smooth_value(world):
    return np.sin(world[..., 0] / 6.0) + np.cos(world[..., 1] / 7.0 + 1) + np.sin(world[..., 2] / 5.0 + 2)


@pytest.mark.parametrize("ndim", [3, 2])
def test_deformation_and_pose_carry_landmarks_through_both(ndim):
    image, ls = _smooth_image(ndim)
    kw = dict(max_rotation_deg=25, max_translation_mm=5, intensity=None, control_spacing_mm=20)
    posed_image, posed = repose_case(image, ls, np.random.default_rng(4), **kw)
    new_image, new_ls, displacement = repose_case(image, ls, np.random.default_rng(4), deform_mm=4.0,
                                                  return_displacement=True, **kw)
    assert ImageGeometry.from_sitk(new_image) == ImageGeometry.from_sitk(posed_image), "same seed, same pose and crop"
    present = new_ls.present
    assert present[:-1].all() and not present[-1] and np.isnan(displacement[-1])
    d = image.GetDimension()
    truth = _smooth_value(ls.points_lps[present])

    def sample(points):
        return np.array([new_image.EvaluateAtPhysicalPoint(tuple(p[:d]), sitk.sitkLinear) for p in points])
    err = np.abs(sample(new_ls.points_lps[present]) - truth)
    wrong = np.abs(sample(posed.points_lps[present]) - truth)
    assert err.max() < 0.05 and np.median(wrong) > 4 * err.max(), (err, wrong)
    # the deformation's own displacement, scaled by the pose's isotropic scale, separates the two
    pose = random_pose(np.random.default_rng(4), image_centre(ImageGeometry.from_sitk(image)), 25, 5, (0.9, 1.1), ndim)
    scale = np.cbrt(np.linalg.det(pose.matrix))
    separation = np.linalg.norm(new_ls.points_lps - posed.points_lps, axis=1)[present]
    np.testing.assert_allclose(separation, scale * displacement[present], rtol=1e-9, atol=1e-9)
    assert displacement[present].mean() > 1.5
