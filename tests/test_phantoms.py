"""Phantoms: landmarks agree with the drawn image, generation is deterministic, absent means absent."""
import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from nnlandmark_h3de.demo.phantoms import LANDMARK_NAMES, STRUCTURES, generate_phantom_cases
from nnlandmark_h3de.landmarks import ImageGeometry, read_landmarks

SHAPE = (48, 44, 40)  # z, y, x: distinct sizes catch any axis swap
SPACING = (2.0, 2.2, 2.4)  # x, y, z mm: anisotropic for the same reason


def _load(pair):
    image_path, landmark_path = pair
    img = sitk.ReadImage(str(image_path))
    return sitk.GetArrayFromImage(img).astype(np.float64), ImageGeometry.from_file(image_path), read_landmarks(landmark_path)


@pytest.fixture(scope="module")
def full_and_empty(tmp_path_factory):
    """The same cases drawn with every structure and with none (absent_fraction=1)."""
    root = tmp_path_factory.mktemp("phantoms")
    kw = dict(n_cases=2, shape=SHAPE, spacing=SPACING, seed=7, oblique_deg=25.0, progress=False)
    full = generate_phantom_cases(root / "full", absent_fraction=0.0, **kw)
    empty = generate_phantom_cases(root / "empty", absent_fraction=1.0, **kw)
    return full, empty


def _world_grid(geometry):
    idx = np.stack(np.meshgrid(*(np.arange(n, dtype=float) for n in geometry.shape_zyx), indexing="ij"), -1)
    return geometry.array_index_to_world(idx)


def _component_at(diff, geometry, point):
    """The connected drawn region (diff != 0) that contains the voxel nearest to `point`."""
    labels, _ = ndimage.label(diff != 0)
    k = labels[tuple(np.round(geometry.world_to_array_index(point)).astype(int))]
    assert k > 0, f"nothing drawn at {point}"
    return labels == k


def test_files_layout_and_names(full_and_empty, tmp_path):
    full, _ = full_and_empty
    assert sorted(full) == ["phantom_000", "phantom_001"]
    image_path, landmark_path = full["phantom_000"]
    assert image_path.name == "phantom_000.nii.gz" and landmark_path.name == "phantom_000.mrk.json"
    doc = json.loads(landmark_path.read_text())
    assert doc["markups"][0]["coordinateSystem"] == "LPS"
    arr, geometry, ls = _load(full["phantom_000"])
    assert arr.shape == SHAPE
    assert np.allclose(geometry.spacing, SPACING)
    assert not np.allclose(geometry.direction_matrix, np.eye(3), atol=1e-3)  # oblique_deg > 0
    assert ls.names == LANDMARK_NAMES and ls.present.all()
    assert 6 <= len(LANDMARK_NAMES) <= 10
    assert {"L_eye", "R_eye", "L_ear", "R_ear"} <= set(LANDMARK_NAMES)
    # every landmark lies inside the image
    assert geometry.contains_array_index(geometry.world_to_array_index(ls.points_lps), margin=-3).all()


def test_centre_landmarks_at_drawn_centre_of_mass(full_and_empty):
    """Full minus empty is exactly the drawn structures (noise, bias and pose are shared)."""
    full, empty = full_and_empty
    centre_names = [s.landmarks[0] for s in STRUCTURES if s.kind == "ellipsoid"]
    for case in full:
        arr, geometry, ls = _load(full[case])
        arr0, _, ls0 = _load(empty[case])
        assert not ls0.present.any()
        diff = arr - arr0
        world = _world_grid(geometry)
        for name in centre_names:
            p = ls.points_lps[ls.names.index(name)]
            w = np.abs(diff) * _component_at(diff, geometry, p)
            centroid = (world * w[..., None]).sum((0, 1, 2)) / w.sum()
            err = np.linalg.norm(centroid - p)
            assert err < 0.25, f"{case}/{name}: drawn centre {centroid} is {err:.3f} mm from landmark {p}"


def test_rod_tips_at_drawn_ends(full_and_empty):
    """The rod's centre of mass is the tips' midpoint and its length (from the axial variance of a
    uniform segment, L^2/12) is the tips' distance."""
    full, empty = full_and_empty
    for case in full:
        arr, geometry, ls = _load(full[case])
        arr0, _, _ = _load(empty[case])
        diff = arr - arr0
        top, bottom = (ls.points_lps[ls.names.index(n)] for n in ("rod_top", "rod_bottom"))
        length = np.linalg.norm(top - bottom)
        u = (top - bottom) / length
        world = _world_grid(geometry)
        t = (world - bottom) @ u
        w = np.abs(diff) * _component_at(diff, geometry, (top + bottom) / 2)
        centroid = (world * w[..., None]).sum((0, 1, 2)) / w.sum()
        assert np.linalg.norm(centroid - (top + bottom) / 2) < 0.3, case
        t_mean = (t * w).sum() / w.sum()
        drawn_length = np.sqrt(12 * ((t - t_mean) ** 2 * w).sum() / w.sum())
        assert abs(drawn_length - length) < 1.0, f"{case}: drawn rod {drawn_length:.2f} mm vs tips {length:.2f} mm"


def test_deterministic_for_a_seed(tmp_path):
    kw = dict(n_cases=2, shape=(24, 24, 24), spacing=(3.0, 3.0, 3.0), absent_fraction=0.3, progress=False)
    a = generate_phantom_cases(tmp_path / "a", seed=3, **kw)
    b = generate_phantom_cases(tmp_path / "b", seed=3, **kw)
    c = generate_phantom_cases(tmp_path / "c", seed=4, **kw)
    for case in a:
        arr_a, g_a, ls_a = _load(a[case])
        arr_b, g_b, ls_b = _load(b[case])
        arr_c, _, ls_c = _load(c[case])
        assert np.array_equal(arr_a, arr_b) and g_a == g_b
        np.testing.assert_array_equal(ls_a.points_lps, ls_b.points_lps)
        assert not np.allclose(arr_a, arr_c)
    # the two cases of one run differ from each other (per-case pose and intensities)
    assert not np.allclose(_load(a["phantom_000"])[0], _load(a["phantom_001"])[0])


def test_absent_structures_are_removed_from_the_image(tmp_path):
    kw = dict(n_cases=4, shape=SHAPE, spacing=SPACING, seed=11, progress=False)
    full = generate_phantom_cases(tmp_path / "full", absent_fraction=0.0, **kw)
    part = generate_phantom_cases(tmp_path / "part", absent_fraction=0.4, **kw)
    n_absent = n_present = 0
    for case in full:
        arr, geometry, ls = _load(full[case])
        arr_p, _, ls_p = _load(part[case])
        world = _world_grid(geometry)
        diff = np.abs(arr - arr_p)
        removed_mask = np.zeros(arr.shape, bool)
        brain = np.median(arr[np.linalg.norm(world - ls.points_lps.mean(0), axis=-1) < 20])
        for name, p, present in zip(ls.names, ls.points_lps, ls_p.present):
            if name in ("rod_top", "rod_bottom"):  # look inside the rod, 3 mm in from the tip
                other = ls.points_lps[ls.names.index("rod_bottom" if name == "rod_top" else "rod_top")]
                p = p + 3.0 * (other - p) / np.linalg.norm(other - p)
            near = np.linalg.norm(world - p, axis=-1) < 3.0
            if present:
                n_present += 1
                np.testing.assert_array_equal(ls_p.points_lps[ls_p.names.index(name)], ls.points_lps[ls.names.index(name)])
                assert diff[near].max() == 0, f"{case}/{name}: present structure changed"
            else:
                n_absent += 1
                # the structure was there and is gone: a change of at least a tenth of the brain level
                assert np.median(diff[near]) > 0.1 * abs(brain), f"{case}/{name}: absent but still drawn"
                removed_mask |= np.linalg.norm(world - p, axis=-1) < 20.0
        # nothing else in the image changed
        assert diff[~removed_mask].max() == 0, f"{case}: change away from any removed structure"
    assert n_absent > 0 and n_present > 0, (n_absent, n_present)


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="absent_fraction"):
        generate_phantom_cases(tmp_path, 1, absent_fraction=1.5, progress=False)
    with pytest.raises(ValueError, match="shape"):
        generate_phantom_cases(tmp_path, 1, shape=(8, 64, 64), progress=False)
    with pytest.raises(ValueError, match="n_cases"):
        generate_phantom_cases(tmp_path, 0, progress=False)


def _affine_residual_mm(before: np.ndarray, after: np.ndarray) -> float:
    """RMS residual (mm) of the least-squares affine map between two landmark sets."""
    a = np.c_[before, np.ones(len(before))]
    coef, *_ = np.linalg.lstsq(a, after, rcond=None)
    return float(np.sqrt(np.mean(np.sum((a @ coef - after) ** 2, axis=1))))


def _pairwise_affine_residuals(cases):
    sets = [_load(pair)[2].points_lps for pair in cases.values()]
    return [_affine_residual_mm(sets[i], sets[j]) for i in range(len(sets)) for j in range(i + 1, len(sets))]


def test_deformed_phantoms_vary_nonlinearly_with_exact_landmarks(tmp_path):
    """deform_mm > 0: landmark sets of different cases are no longer affine images of each other, and
    each structure's drawn centre is still its (moved) landmark."""
    kw = dict(n_cases=3, shape=SHAPE, spacing=SPACING, seed=7, oblique_deg=25.0, progress=False)
    rigid = generate_phantom_cases(tmp_path / "rigid", **kw)
    deformed = generate_phantom_cases(tmp_path / "deformed", deform_mm=4.0, control_spacing_mm=24.0, **kw)
    empty = generate_phantom_cases(tmp_path / "empty", deform_mm=4.0, absent_fraction=1.0, **kw)
    r_rigid, r_deformed = _pairwise_affine_residuals(rigid), _pairwise_affine_residuals(deformed)
    assert max(r_rigid) < 1e-6, r_rigid  # similarity poses of one canonical phantom
    assert min(r_deformed) > 0.5, r_deformed
    assert json.loads((tmp_path / "deformed" / "phantoms.json").read_text())["deform_mm"] == 4.0
    centre_names = [s.landmarks[0] for s in STRUCTURES if s.kind == "ellipsoid"]
    for case in deformed:
        arr, geometry, ls = _load(deformed[case])
        arr0, _, _ = _load(empty[case])
        _, _, ls_rigid = _load(rigid[case])
        shift = np.linalg.norm(ls.points_lps - ls_rigid.points_lps, axis=1)
        assert shift.mean() > 1.5, f"{case}: the deformation hardly moved the landmarks ({shift})"
        diff, world = arr - arr0, _world_grid(geometry)
        for name in centre_names:
            p = ls.points_lps[ls.names.index(name)]
            w = np.abs(diff) * _component_at(diff, geometry, p)
            err = np.linalg.norm((world * w[..., None]).sum((0, 1, 2)) / w.sum() - p)
            # the landmark is exact; a curved map moves a blob's centroid off its centre's image a little
            assert err < 0.35, f"{case}/{name}: drawn centre {err:.3f} mm from the moved landmark"


def test_structure_occupancy_in_its_box_equals_the_whole_volume_computation():
    """The small structures are drawn only inside a box around them; outside it their occupancy must be
    exactly 0, so the phantoms are the same as when every voxel was evaluated."""
    from nnlandmark_h3de.demo.phantoms import STRUCTURES, _occupancy, _structure_occupancy, _structure_sd
    rng = np.random.default_rng(0)
    p = rng.uniform(-1.2, 1.2, size=(200_000, 3))
    for ramp in (0.01, 0.05, 0.2):
        for s in STRUCTURES:
            full = _occupancy(_structure_sd(p, s), ramp)
            near, occ = _structure_occupancy(p, s, ramp)
            assert np.array_equal(full[~near], np.zeros(int((~near).sum())))
            assert np.array_equal(full[near], occ) and near.mean() < 0.5
