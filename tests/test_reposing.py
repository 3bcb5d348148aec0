"""Re-posing: a bright dot drawn at a landmark ends exactly at the moved landmark; crops make
landmarks absent only when they leave the field of view."""
import numpy as np
import pytest
import SimpleITK as sitk

from nnlandmark_h3de.demo.phantoms import random_rotation
from nnlandmark_h3de.demo.reposing import IntensityChange, random_pose, repose_case
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
