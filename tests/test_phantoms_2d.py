"""2D X-ray phantoms: 2D files with their spacing, landmarks on the drawn structures to sub-pixel
accuracy, deterministic, absent means absent (and nothing else changes), landmarks inside and apart."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnlandmark_h3de.demo import phantoms_2d as P
from nnlandmark_h3de.demo.phantoms_2d import (LANDMARK_NAMES_2D, STRUCTURES_2D, generate_phantom_cases_2d,
                                              make_geometry_2d, render_phantom_2d)
from nnlandmark_h3de.landmarks import ImageGeometry, read_landmarks

SHAPE = (100, 84)  # y, x: distinct sizes catch an axis swap
SPACING = (0.9, 1.1)  # x, y mm: anisotropic for the same reason
SEED = 5


def _load(pair):
    image_path, landmark_path = pair
    img = sitk.ReadImage(str(image_path))
    arr = sitk.GetArrayFromImage(img).astype(np.float64)
    return img, arr, ImageGeometry.from_file(image_path), read_landmarks(landmark_path)


def _to_px(geometry, xyz):
    """World LPS -> continuous (y, x) pixel index."""
    return geometry.world_to_array_index(np.asarray(xyz, dtype=np.float64))[..., 1:]


def _xy(ls, name):
    return ls.points_lps[ls.names.index(name)][:2]


def _frame_points(geometry, frame_to_world):
    """Frame (u, v) coordinates and world (x, y) mm of every pixel centre."""
    yy, xx = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in geometry.shape_zyx[1:]), indexing="ij")
    world = geometry.array_index_to_world(np.stack([np.zeros_like(yy), yy, xx], axis=-1))[..., :2]
    p = (world - frame_to_world[:2, 3]) @ np.linalg.inv(frame_to_world[:2, :2]).T
    return p, world


def _px(geometry, vector_xy):
    """Length in pixels of a world (x, y) mm displacement (the spacing is anisotropic)."""
    return float(np.linalg.norm(np.asarray(vector_xy) / np.asarray(geometry.spacing[:2])))


def _footprints(case):
    """Per landmark structure: the pixels it can touch (its partial-volume ramp plus half a pixel)."""
    p, _ = _frame_points(case.geometry, case.frame_to_world)
    ramp = np.mean(case.geometry.spacing[:2]) / np.sqrt(abs(np.linalg.det(case.frame_to_world[:2, :2])))
    return {s.name: P._structure_sd(p, s) < ramp for s in STRUCTURES_2D}


@pytest.fixture(scope="module")
def full_and_empty(tmp_path_factory):
    """The same cases with every structure and with none (absent_fraction=1); no bias field, so the
    difference is each structure's own drawing with a flat intensity."""
    root = tmp_path_factory.mktemp("phantoms_2d")
    kw = dict(n_cases=3, shape=SHAPE, spacing=SPACING, seed=SEED, bias_strength=0.0, progress=False)
    full = generate_phantom_cases_2d(root / "full", absent_fraction=0.0, **kw)
    empty = generate_phantom_cases_2d(root / "empty", absent_fraction=1.0, **kw)
    cases = {cid: render_phantom_2d(cid, make_geometry_2d(SHAPE, SPACING), SEED, i, bias_strength=0.0)
             for i, cid in enumerate(sorted(full))}
    return full, empty, cases


def test_files_are_2d_with_the_spacing(full_and_empty):
    full, _, cases = full_and_empty
    assert sorted(full) == ["xray_000", "xray_001", "xray_002"]
    image_path, landmark_path = full["xray_000"]
    assert image_path.name == "xray_000.nii.gz" and landmark_path.name == "xray_000.mrk.json"
    img, arr, geometry, ls = _load(full["xray_000"])
    assert img.GetDimension() == 2
    assert img.GetSize() == SHAPE[::-1] and arr.shape == SHAPE
    np.testing.assert_allclose(img.GetSpacing(), SPACING, rtol=1e-6)
    assert geometry.ndim == 2 and geometry.shape_zyx == (1,) + SHAPE
    assert json.loads(landmark_path.read_text())["markups"][0]["coordinateSystem"] == "LPS"
    assert ls.names == LANDMARK_NAMES_2D and ls.present.all()
    assert 8 <= len(LANDMARK_NAMES_2D) <= 12 and len(set(LANDMARK_NAMES_2D)) == len(LANDMARK_NAMES_2D)
    assert np.all(ls.points_lps[:, 2] == 0.0)
    # the file holds what render_phantom_2d draws (the generator's one source)
    np.testing.assert_allclose(ls.points_lps, cases["xray_000"].landmarks.points_lps, atol=1e-9)
    np.testing.assert_array_equal(arr, cases["xray_000"].array_zyx[0])
    params = json.loads((image_path.parent.parent / "phantoms.json").read_text())
    assert params["generator"] == "nnlandmark_h3de.demo.phantoms_2d" and params["landmarks"] == LANDMARK_NAMES_2D
    assert params["shape_yx"] == list(SHAPE) and params["spacing_xy"] == list(SPACING)


def _drawn(full_and_empty, case_id):
    full, empty, cases = full_and_empty
    _, arr, geometry, ls = _load(full[case_id])
    _, arr0, _, ls0 = _load(empty[case_id])
    assert not ls0.present.any()
    return arr - arr0, geometry, ls, cases[case_id]


def _moments(weights, xy):
    """Centre of mass and covariance (world mm) of the weights at the pixel centres xy."""
    w = weights / weights.sum()
    c = (xy * w[..., None]).sum((0, 1))
    d = xy - c
    return c, np.einsum("yxi,yxj,yx->ij", d, d, w)


def test_every_drawn_pixel_belongs_to_a_landmark_structure(full_and_empty):
    """Full minus empty is exactly the landmark structures (pose, noise and the anatomy are shared)."""
    for case_id in full_and_empty[0]:
        diff, _, _, case = _drawn(full_and_empty, case_id)
        masks = _footprints(case)
        union = np.any(list(masks.values()), axis=0)
        assert np.all(diff[~union] == 0)
        for name, m in masks.items():
            assert (diff[m] > 0).sum() > 5, f"{case_id}/{name}: not drawn"
        assert np.sum(list(masks.values()), axis=0).max() == 1, "structures' footprints overlap"


def test_centre_landmarks_at_the_drawn_centre_of_mass(full_and_empty):
    """Dots, teeth and rings: the intensity-weighted centre of the drawing is the landmark (< 0.15 px)."""
    for case_id in full_and_empty[0]:
        diff, geometry, ls, case = _drawn(full_and_empty, case_id)
        _, xy = _frame_points(geometry, case.frame_to_world)
        masks = _footprints(case)
        for s in STRUCTURES_2D:
            if s.kind not in ("ellipse", "ring"):
                continue
            centroid, _ = _moments(np.abs(diff) * masks[s.name], xy)
            err = _px(geometry, centroid - _xy(ls, s.landmarks[0]))
            assert err < 0.15, f"{case_id}/{s.name}: drawn centre {err:.3f} px from the landmark"


def test_bar_ends_at_the_drawn_ends(full_and_empty):
    """ANS/PNS: the bar's centre of mass is the ends' midpoint and its length (a uniform segment has
    axial variance L^2/12) is the ends' distance, so each end is where the drawing ends."""
    for case_id in full_and_empty[0]:
        diff, geometry, ls, case = _drawn(full_and_empty, case_id)
        _, xy = _frame_points(geometry, case.frame_to_world)
        (name,) = [s.name for s in STRUCTURES_2D if s.kind == "bar"]
        c, cov = _moments(np.abs(diff) * _footprints(case)[name], xy)
        a, b = _xy(ls, "ANS"), _xy(ls, "PNS")
        length = np.linalg.norm(b - a)
        u = (b - a) / length
        assert _px(geometry, c - (a + b) / 2) < 0.2, case_id
        drawn_length = np.sqrt(12 * u @ cov @ u)
        err = _px(geometry, (drawn_length - length) / 2 * u)
        assert err < 0.25, f"{case_id}: the drawn bar ends {err:.3f} px from the landmarks"


def test_wedge_apex_is_the_tip_of_the_drawn_wedge(full_and_empty):
    """nasion/menton: the landmark is the analytic apex of the triangle (the pose applied to it), the
    drawn triangle lies where the pose puts it (centroid < 0.2 px), and an image-only estimate of the
    apex (centroid + sqrt(8 x axial variance) towards the landmark: a uniform triangle's apex is 2/3
    of its height from the centroid, height^2 = 18 x variance) agrees to within the partial-volume
    blur of a sharp corner (< 1 px; about 0.6 px at worst)."""
    for case_id in full_and_empty[0]:
        diff, geometry, ls, case = _drawn(full_and_empty, case_id)
        _, xy = _frame_points(geometry, case.frame_to_world)
        masks = _footprints(case)
        F = case.frame_to_world
        pose = lambda q: F[:2, :2] @ q + F[:2, 3]  # noqa: E731
        for s in (s for s in STRUCTURES_2D if s.kind == "wedge"):
            tri = s.vertices()
            np.testing.assert_allclose(tri[0], s.points[0])  # the first vertex is the apex
            apex = _xy(ls, s.landmarks[0])
            np.testing.assert_allclose(apex, pose(tri[0]), atol=1e-9)
            c, cov = _moments(np.abs(diff) * masks[s.name], xy)
            assert _px(geometry, c - pose(tri.mean(0))) < 0.2, f"{case_id}/{s.name}: triangle misplaced"
            axis = (apex - c) / np.linalg.norm(apex - c)
            estimate = c + np.sqrt(8 * axis @ cov @ axis) * axis
            assert _px(geometry, estimate - apex) < 1.0, f"{case_id}/{s.name}: apex estimate {estimate} vs {apex}"


def test_deterministic_for_a_seed(tmp_path):
    kw = dict(n_cases=2, absent_fraction=0.3, progress=False)
    a = generate_phantom_cases_2d(tmp_path / "a", seed=3, **kw)
    b = generate_phantom_cases_2d(tmp_path / "b", seed=3, **kw)
    c = generate_phantom_cases_2d(tmp_path / "c", seed=4, **kw)
    for case in a:
        for f in range(2):
            assert a[case][f].read_bytes() == b[case][f].read_bytes()
        _, arr_a, _, ls_a = _load(a[case])
        _, arr_c, _, ls_c = _load(c[case])
        assert not np.allclose(arr_a, arr_c)
        assert not np.allclose(np.nan_to_num(ls_a.points_lps), np.nan_to_num(ls_c.points_lps))
    assert not np.allclose(_load(a["xray_000"])[1], _load(a["xray_001"])[1])


def test_absent_fraction_changes_only_which_structures_are_drawn(tmp_path):
    kw = dict(n_cases=6, seed=11, progress=False)
    full = generate_phantom_cases_2d(tmp_path / "full", absent_fraction=0.0, **kw)
    part = generate_phantom_cases_2d(tmp_path / "part", absent_fraction=0.4, **kw)
    empty = generate_phantom_cases_2d(tmp_path / "empty", absent_fraction=1.0, **kw)
    geometry = make_geometry_2d()
    n_absent = n_present = 0
    for i, case_id in enumerate(sorted(full)):
        _, arr, _, ls = _load(full[case_id])
        _, arr_p, _, ls_p = _load(part[case_id])
        _, arr_e, _, ls_e = _load(empty[case_id])
        assert ls.present.all() and not ls_e.present.any()
        doc = json.loads(part[case_id][1].read_text())
        status = {p["label"]: p["positionStatus"] for p in doc["markups"][0]["controlPoints"]}
        masks = _footprints(render_phantom_2d(case_id, geometry, 11, i))
        removed = np.zeros(arr.shape, bool)
        for s in STRUCTURES_2D:
            present = [ls_p.present[ls_p.names.index(n)] for n in s.landmarks]
            assert len(set(present)) == 1, f"{case_id}/{s.name}: a structure's landmarks go together"
            for n in s.landmarks:
                assert status[n] == ("defined" if present[0] else "undefined")
                if present[0]:
                    np.testing.assert_array_equal(_xy(ls_p, n), _xy(ls, n))
            n_present += present[0]
            n_absent += not present[0]
            if not present[0]:
                removed |= masks[s.name]
                assert np.any(arr[masks[s.name]] != arr_p[masks[s.name]]), f"{case_id}/{s.name}: absent but drawn"
        # removed structures: the pixels are those of the empty case; everything else is the full case's
        np.testing.assert_array_equal(arr_p[removed], arr_e[removed])
        np.testing.assert_array_equal(arr_p[~removed], arr[~removed])
    assert n_absent > 0 and n_present > 0, (n_absent, n_present)


def test_landmarks_inside_and_apart_for_many_poses():
    """Default shape: every landmark >= 2 px inside the image and >= 6 px from every other, for many
    cases (and for the worst poses of the ranges: see check_pose_ranges)."""
    geometry = make_geometry_2d()
    assert geometry.shape_zyx[1:] == (96, 80)
    worst_gap, worst_margin = np.inf, np.inf
    for seed in range(3):
        for i in range(60):
            case = render_phantom_2d("x", geometry, seed, i)
            yx = _to_px(geometry, case.landmarks.points_lps)
            worst_margin = min(worst_margin, yx.min(), (np.asarray(geometry.shape_zyx[1:]) - 1 - yx).min())
            d = np.linalg.norm(yx[:, None] - yx[None], axis=-1) + np.diag(np.full(len(yx), np.inf))
            worst_gap = min(worst_gap, d.min())
    assert worst_margin >= 2.0, worst_margin
    assert worst_gap >= 6.0, worst_gap
    # the smallest scale the pose allows keeps the closest pair 6 px apart (the draws above need not hit it)
    q = np.concatenate([s.landmark_points() for s in STRUCTURES_2D])
    d = np.linalg.norm(q[:, None] - q[None], axis=-1) + np.diag(np.full(len(q), np.inf))
    assert d.min() * P.SCALE_RANGE[0] * P.frame_unit_mm(geometry) >= 6.0


def test_pose_ranges_that_could_lose_a_landmark_are_refused(tmp_path):
    with pytest.raises(ValueError, match="shrink"):
        generate_phantom_cases_2d(tmp_path, 1, max_rotation_deg=60.0, progress=False)
    with pytest.raises(ValueError, match="shrink"):
        generate_phantom_cases_2d(tmp_path, 1, max_translation_fraction=0.5, progress=False)
    with pytest.raises(ValueError, match="scale_range"):
        generate_phantom_cases_2d(tmp_path, 1, scale_range=(1.1, 0.9), progress=False)


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="absent_fraction"):
        generate_phantom_cases_2d(tmp_path, 1, absent_fraction=1.5, progress=False)
    with pytest.raises(ValueError, match="shape"):
        generate_phantom_cases_2d(tmp_path, 1, shape=(8, 64), progress=False)
    with pytest.raises(ValueError, match="shape"):
        generate_phantom_cases_2d(tmp_path, 1, shape=(64, 64, 64), progress=False)
    with pytest.raises(ValueError, match="spacing"):
        generate_phantom_cases_2d(tmp_path, 1, spacing=(1.0, 1.0, 1.0), progress=False)
    with pytest.raises(ValueError, match="n_cases"):
        generate_phantom_cases_2d(tmp_path, 0, progress=False)
    with pytest.raises(ValueError, match="2D geometry"):
        render_phantom_2d("x", ImageGeometry((8, 8, 8), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel())))


def test_render_is_fast():
    import time
    geometry = make_geometry_2d()
    t0 = time.perf_counter()
    for i in range(10):
        render_phantom_2d("x", geometry, 0, i)
    assert (time.perf_counter() - t0) / 10 < 0.1
