"""One-shot registration baseline on procedural phantoms: pseudo-labels near the truth, a known affine
recovered sub-voxel, confidence that ranks a wrong point below the right one, the pseudo-label
dataset writer (nulls under the threshold, pseudo_labels.json, exact template copies) and the
`nnLandmark_oneshot` command, with bad input named in the errors.

Phantoms: 40^3 voxels of 3 mm; phantom_000 is the template, phantom_001..003 the unlabelled images
(other phantoms: same anatomy up to a similarity transform, other intensities, noise, bias field).
"""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnlandmark_h3de.conversion import ConversionError
from nnlandmark_h3de.demo.phantoms import generate_phantom_cases
from nnlandmark_h3de.synthesis.rotations import random_rotation
from nnlandmark_h3de.synthesis.reposing import IntensityChange, Pose, image_centre, repose_case, resample_posed
from nnlandmark_h3de.landmarks import ImageGeometry, LandmarkSet, read_landmarks, write_landmarks
from nnlandmark_h3de.oneshot import (PSEUDO_LABELS_FILE, OneShotError, OneShotWarning, PseudoLabels,
                                     load_pseudo_labels, read_pseudo_labels_file, save_pseudo_labels)
from nnlandmark_h3de.oneshot.pseudo_dataset import REPOSE_OPTIONS, write_pseudo_label_dataset
from nnlandmark_h3de.oneshot.registration_labels import (local_jacobian, neighbourhood_confidence,
                                                         registration_pseudo_labels, transform_points)

SPACING = 3.0


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    cases = generate_phantom_cases(out, 4, shape=(40, 40, 40), spacing=(SPACING,) * 3, seed=0, progress=False)
    return out, cases


@pytest.fixture(scope="module")
def template(phantoms):
    _, cases = phantoms
    img, lm = cases["phantom_000"]
    return img, lm, sitk.ReadImage(str(img), sitk.sitkFloat32), read_landmarks(lm)


@pytest.fixture(scope="module")
def pseudo(phantoms, template):
    """Registration pseudo-labels (affine + demons) of the three other phantoms."""
    _, cases = phantoms
    images = {c: cases[c][0] for c in ("phantom_001", "phantom_002", "phantom_003")}
    return registration_pseudo_labels(template[0], template[1], images, progress=False)


@pytest.fixture(scope="module")
def known_pose(template):
    """The template moved by a known similarity (14 deg, x1.06, 6 mm), no intensity change: (image, points)."""
    _, _, image, ls = template
    geometry = ImageGeometry.from_sitk(image)
    rot = random_rotation(np.random.default_rng(7), 14.0)
    pose = Pose(1.06 * rot, image_centre(geometry), np.array([4.0, -3.0, 3.0]))
    moved = resample_posed(image, pose, geometry)
    return moved, pose.apply(ls.points_lps)


def _errors(p: PseudoLabels, truth: np.ndarray) -> np.ndarray:
    return np.linalg.norm(p.landmarks.points_lps - truth, axis=1)


# ------------------------------------------------------------------------------ registration
def test_pseudo_labels_of_other_phantoms_within_a_voxel(pseudo, phantoms):
    _, cases = phantoms
    assert sorted(pseudo) == ["phantom_001", "phantom_002", "phantom_003"]
    errs = []
    for case, p in pseudo.items():
        truth = read_landmarks(cases[case][1]).reordered(p.names).points_lps
        errs.append(_errors(p, truth))
        assert p.method == "registration" and p.info["deformable"] == "demons"
        assert np.all((p.confidence >= 0) & (p.confidence <= 1))
        assert p.info["seconds"] > 0 and set(p.info["affine_to_final_mm"]) == set(p.names)
    errs = np.concatenate(errs)
    assert np.isfinite(errs).all()
    # measured: mean 2.4 mm, max 6.6 mm (the ears of one phantom: a residual rotation)
    assert errs.mean() < SPACING, errs  # under one voxel on average
    assert errs.max() < 3 * SPACING, errs


def test_known_affine_is_recovered_sub_voxel_in_the_right_direction(template, known_pose):
    img_path, lm_path, _, ls = template
    moved, truth = known_pose
    res = {}
    for deformable in ("none", "demons"):
        res[deformable] = registration_pseudo_labels(img_path, lm_path, {"moved": moved}, deformable=deformable,
                                                     progress=False)["moved"]
    err_affine, err_demons = _errors(res["none"], truth), _errors(res["demons"], truth)
    # measured: affine 0.1-0.2 mm mean; demons (nothing to fix here) a few tenths more
    assert err_affine.mean() < 0.5 and err_affine.max() < 1.0, err_affine
    assert err_demons.mean() < 1.0 and err_demons.max() < SPACING / 2, err_demons
    # the pose moves the landmarks far (the bounds above are not vacuous), and carrying them the
    # wrong way (through the pose's inverse) would miss by about twice that
    assert np.linalg.norm(ls.points_lps - truth, axis=1).mean() > 5


def test_local_jacobian_of_an_affine_is_its_matrix_and_points_move_forward():
    m = 1.1 * random_rotation(np.random.default_rng(1), 20)
    t = sitk.AffineTransform(3)
    t.SetMatrix(tuple(m.ravel()))
    t.SetTranslation((1.0, 2.0, 3.0))
    np.testing.assert_allclose(local_jacobian(t, [5.0, -3.0, 2.0]), m, atol=1e-9)
    pts = np.array([[1.0, 2.0, 3.0], [np.nan] * 3])
    out = transform_points(t, pts)
    np.testing.assert_allclose(out[0], m @ pts[0] + [1, 2, 3])
    assert np.isnan(out[1]).all()


def test_confidence_ranks_a_shifted_wrong_point_below_the_right_one(template, known_pose):
    _, _, image, ls = template
    moved, truth = known_pose
    right, wrong = [], []
    for k, p in enumerate(ls.points_lps):
        jac = 1.06 * np.eye(3)  # the pose's scale; rotation deliberately ignored (the local map is only roughly known)
        right.append(neighbourhood_confidence(image, p, moved, truth[k], jac))
        for shift in ([10.0, 0, 0], [0, -10.0, 0], [0, 0, 10.0]):
            wrong.append(neighbourhood_confidence(image, p, moved, truth[k] + shift, jac))
    right, wrong = np.array(right), np.array(wrong).reshape(len(right), 3)
    assert np.all((right >= 0) & (right <= 1)) and np.all((wrong >= 0) & (wrong <= 1))
    assert np.all(right[:, None] > wrong), (right, wrong)
    assert right.mean() - wrong.mean() > 0.3, (right.mean(), wrong.mean())
    # the registration's own confidence for the right point is high, and NaN points score 0
    assert neighbourhood_confidence(image, ls.points_lps[0], moved, [np.nan] * 3) == 0.0


def test_failed_cases_are_reported_by_name(tmp_path, phantoms, template):
    _, cases = phantoms
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not an image")
    flat2d = tmp_path / "flat2d.nii.gz"
    sitk.WriteImage(sitk.Image(20, 20, sitk.sitkFloat32), str(flat2d))
    images = {"good": cases["phantom_001"][0], "broken": bad, "flat2d": flat2d}
    with pytest.warns(OneShotWarning, match=r"2 case\(s\).*broken.*flat2d") as rec:
        out = registration_pseudo_labels(template[0], template[1], images, deformable="none", progress=False)
    assert sorted(out) == ["good"]
    msg = str(rec[0].message)
    assert str(bad) in msg and str(flat2d) in msg and "a 2D image, the template is 3D" in msg
    with pytest.raises(OneShotError, match="broken.nii.gz"):
        registration_pseudo_labels(template[0], template[1], {"broken": bad}, progress=False, on_error="raise")
    with pytest.raises(OneShotError, match="every case"):
        registration_pseudo_labels(template[0], template[1], {"broken": bad}, progress=False)


def test_bad_template_input_names_the_file(tmp_path, template):
    img_path, lm_path, _, ls = template
    missing = tmp_path / "nope.mrk.json"
    with pytest.raises(OneShotError, match="nope.mrk.json"):
        registration_pseudo_labels(img_path, missing, {"a": img_path}, progress=False)
    with pytest.raises(OneShotError, match="nope.nii.gz"):
        registration_pseudo_labels(tmp_path / "nope.nii.gz", lm_path, {"a": img_path}, progress=False)
    outside = LandmarkSet(ls.names, ls.points_lps * [-1, -1, 1] + [500, 0, 0], source=str(tmp_path / "ras.fcsv"))
    write_landmarks(outside, tmp_path / "ras.mrk.json")
    with pytest.raises(OneShotError, match=r"ras\.mrk\.json.*outside the template image"):
        registration_pseudo_labels(img_path, tmp_path / "ras.mrk.json", {"a": img_path}, progress=False)
    with pytest.raises(OneShotError, match="deformable"):
        registration_pseudo_labels(img_path, lm_path, {"a": img_path}, deformable="bspline", progress=False)


# ----------------------------------------------------------------------------- pseudo_labels
def test_pseudo_labels_json_round_trip_and_validation(tmp_path):
    ls = LandmarkSet(["a", "b", "c"], [[1, 2, 3], [np.nan] * 3, [4, 5, 6]], source="x")
    p = PseudoLabels(ls, [0.9, 0.7, 0.2], "registration", {"seconds": np.float32(1.5), "n": np.int64(3)})
    assert p.confidence.tolist() == [0.9, 0.0, 0.2]  # absent -> 0
    assert p.thresholded(0.5).present.tolist() == [True, False, False]
    path = save_pseudo_labels({"c1": p}, tmp_path / PSEUDO_LABELS_FILE, min_confidence=0.5)
    header, back = read_pseudo_labels_file(path)
    assert header == {"min_confidence": 0.5}
    q = back["c1"]
    assert q.method == "registration" and q.info == {"seconds": 1.5, "n": 3}
    np.testing.assert_array_equal(q.confidence, p.confidence)
    np.testing.assert_array_equal(q.landmarks.points_lps, p.landmarks.points_lps)
    with pytest.raises(OneShotError, match=r"in \[0, 1\]"):
        PseudoLabels(ls, [1.2, 0, 0], "m")
    with pytest.raises(OneShotError, match="2 confidences for 3"):
        PseudoLabels(ls, [1, 1], "m")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(OneShotError, match="bad.json"):
        load_pseudo_labels(bad)
    bad.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(OneShotError, match="bad.json: not a pseudo-label file"):
        load_pseudo_labels(bad)
    d = json.loads(path.read_text())
    d["cases"]["c1"]["landmarks"]["zz"] = [0, 0, 0]
    bad.write_text(json.dumps(d))
    with pytest.raises(OneShotError, match=r"bad.json: case c1: unknown landmark names \['zz'\]"):
        load_pseudo_labels(bad)


# ------------------------------------------------------------------------------ dataset writer
def test_dataset_writer_thresholds_records_and_adds_exact_template_copies(tmp_path, pseudo, phantoms, template):
    _, cases = phantoms
    img_path, lm_path, image, ls = template
    # a threshold between the confidences so some points are dropped; phantom_003 made hopeless
    conf = np.concatenate([p.confidence for p in pseudo.values()])
    thr = float(np.quantile(conf, 0.3))
    items = {c: (cases[c][0], p) for c, p in pseudo.items()}
    p3 = pseudo["phantom_003"]
    items["phantom_003"] = (cases["phantom_003"][0], PseudoLabels(p3.landmarks, np.full(len(p3.names), thr / 2),
                                                                  p3.method, p3.info))
    with pytest.warns(OneShotWarning, match=r"left out: \['phantom_003'\]"):
        folder = write_pseudo_label_dataset(img_path, lm_path, items, tmp_path / "Dataset990_OneShot",
                                            min_confidence=thr, template_copies=2, seed=5, progress=False)
    lm = json.loads((folder / "landmarks.json").read_text())
    copies = ["phantom_000_atd00", "phantom_000_atd01"]
    assert sorted(lm["cases"]) == sorted(["phantom_000", "phantom_001", "phantom_002"] + copies)
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 5
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == sorted(f"{c}.nii.gz" for c in lm["cases"])
    for case in ("phantom_001", "phantom_002"):
        p = pseudo[case]
        for n, pt, c in zip(p.names, p.landmarks.points_lps, p.confidence):
            if c < thr:
                assert lm["cases"][case][n] is None, (case, n)
            else:
                np.testing.assert_allclose(lm["cases"][case][n], pt)
    assert any(v is None for case in ("phantom_001", "phantom_002") for v in lm["cases"][case].values())
    # the template's and its copies' landmarks are exact
    np.testing.assert_allclose([lm["cases"]["phantom_000"][n] for n in ls.names], ls.points_lps)
    for k, case in enumerate(copies):
        _, expected = repose_case(image, ls, np.random.default_rng([5, k]), intensity=IntensityChange(),
                                  **REPOSE_OPTIONS)
        got = np.array([[np.nan] * 3 if lm["cases"][case][n] is None else lm["cases"][case][n] for n in ls.names])
        np.testing.assert_allclose(got, expected.points_lps, atol=1e-9)
        assert np.isfinite(got).all(1).sum() >= len(ls.names) - 2
    header, records = read_pseudo_labels_file(folder / PSEUDO_LABELS_FILE)
    assert header["method"] == "registration" and header["min_confidence"] == thr
    assert header["template"] == "phantom_000" and header["template_copies"] == copies
    assert header["dropped_cases"] == ["phantom_003"]
    assert {records[c].method for c in copies} == {"template_copy"} and records["phantom_000"].method == "template"
    np.testing.assert_allclose(records["phantom_001"].confidence, pseudo["phantom_001"].confidence)
    # unthresholded points are kept in pseudo_labels.json
    np.testing.assert_allclose(records["phantom_001"].landmarks.points_lps,
                               pseudo["phantom_001"].landmarks.points_lps)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left

    with pytest.raises(ConversionError, match="already exists"):
        write_pseudo_label_dataset(img_path, lm_path, items, folder, min_confidence=thr, progress=False)


def test_dataset_writer_bad_input_names_the_problem(tmp_path, pseudo, phantoms, template):
    _, cases = phantoms
    img_path, lm_path, _, _ = template
    p = pseudo["phantom_001"]
    items = {"phantom_001": (cases["phantom_001"][0], p)}
    target = tmp_path / "Dataset991_X"
    with pytest.raises(OneShotError, match="missing.mrk.json"):
        write_pseudo_label_dataset(img_path, tmp_path / "missing.mrk.json", items, target, progress=False)
    with pytest.raises(OneShotError, match="min_confidence"):
        write_pseudo_label_dataset(img_path, lm_path, items, target, min_confidence=1.5, progress=False)
    renamed = LandmarkSet(["x" + n for n in p.names], p.landmarks.points_lps)
    with pytest.raises(OneShotError, match=r"case phantom_001 .*phantom_001.nii.gz"):
        write_pseudo_label_dataset(img_path, lm_path, {"phantom_001": (cases["phantom_001"][0],
                                                                       PseudoLabels(renamed, p.confidence, "m"))},
                                   target, progress=False)
    with pytest.raises(OneShotError, match="clash with the template"):
        write_pseudo_label_dataset(img_path, lm_path, {"phantom_000": items["phantom_001"]}, target, progress=False)
    with pytest.raises(ConversionError, match="nope.nii.gz"):
        write_pseudo_label_dataset(img_path, lm_path, {"c": (tmp_path / "nope.nii.gz", p)}, target, progress=False)
    assert not target.exists() and not [q for q in tmp_path.iterdir() if q.name.startswith(".")]


# ------------------------------------------------------------------------------------- CLI
def test_cli_end_to_end_and_errors(tmp_path, phantoms, template, capsys):
    from nnlandmark_h3de.cli.oneshot import METHODS, main
    root, cases = phantoms
    img_path, lm_path, _, _ = template
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    for c in ("phantom_001", "phantom_002"):
        (unlabelled / f"{c}.nii.gz").write_bytes(cases[c][0].read_bytes())
    (unlabelled / "phantom_000.nii.gz").symlink_to(img_path)  # the template in the folder too: left out
    args = ["-t", str(img_path), "-l", str(lm_path), "-u", str(unlabelled), "-d", "992", "-n", "OneShotCLI",
            "-o", str(tmp_path / "raw"), "--method", "registration", "--deformable", "none",
            "--min_confidence", "0.3", "--template_copies", "1", "--seed", "3"]
    assert main(args) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "raw" / "Dataset992_OneShotCLI"
    assert f"Wrote {folder}: 4 cases" in out
    assert "registration: 2 case(s), landmarks kept" in out and "mean confidence" in out
    header, records = read_pseudo_labels_file(folder / PSEUDO_LABELS_FILE)
    assert sorted(records) == ["phantom_000", "phantom_000_atd00", "phantom_001", "phantom_002"]
    assert header["min_confidence"] == 0.3 and header["seed"] == 3 and header["failed_cases"] == []
    assert records["phantom_001"].info["deformable"] == "none"
    assert sorted(METHODS) == ["cc2d", "registration"]

    # an existing dataset without --overwrite, before any registration
    assert main(args) == 1
    assert "already exists" in capsys.readouterr().err
    bad = args.copy()
    bad[3] = str(tmp_path / "nope.mrk.json")
    assert main(bad + ["--overwrite"]) == 1
    assert "nope.mrk.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(args[:-8] + ["--method", "nonsense"])
