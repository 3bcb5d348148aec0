"""The deformable global stage: affine registration then demons recovers a known smooth nonlinear
deformation clearly better than affine registration alone; its inverse carries points exactly; the
deformable kind is calibrated, chosen by validation MRE and read back like the atlas kind."""
import json
import time
from pathlib import Path

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")

from nnlandmark_h3de.inference.atlas import Atlas, atlas_estimates, register_affine, transform_points  # noqa: E402
from nnlandmark_h3de.inference.deformable_registration import invert_points, register_deformable  # noqa: E402
from nnlandmark_h3de.landmarks import LandmarkSet  # noqa: E402

AFIDS = Path(__file__).resolve().parents[2] / "shared" / "data" / "afids-templates"
AFIDS_CASE = "human_MNI152NLin2009cAsym_T1w_2mm"


# ----------------------------------------------------------------- a known deformation
def known_warp(image, rng, rms_mm: float, mesh_mm: float = 30.0):
    """Sampling transform case point -> template point: a small random affine, then a cubic B-spline
    of random coefficients scaled to `rms_mm` RMS displacement over the brighter 40 % of the image."""
    d = image.GetDimension()
    extent = np.asarray(image.GetSize()) * np.asarray(image.GetSpacing())
    bspline = sitk.BSplineTransformInitializer(image, [max(1, int(round(e / mesh_mm))) for e in extent], 3)
    coefficients = rng.normal(0.0, 1.0, len(bspline.GetParameters()))
    bspline.SetParameters(coefficients.tolist())
    field = sitk.GetArrayFromImage(sitk.TransformToDisplacementField(
        bspline, sitk.sitkVectorFloat64, image.GetSize(), image.GetOrigin(), image.GetSpacing(), image.GetDirection()))
    values = sitk.GetArrayFromImage(image)
    foreground = values > np.percentile(values, 60)
    bspline.SetParameters((coefficients * rms_mm / np.sqrt(np.mean(np.sum(field[foreground] ** 2, -1)))).tolist())
    affine = sitk.AffineTransform(d)
    affine.SetCenter(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
    affine.SetMatrix((np.eye(d) + rng.uniform(-0.04, 0.04, (d, d))).ravel().tolist())
    affine.SetTranslation(rng.uniform(-4, 4, d).tolist())
    return sitk.CompositeTransform([bspline, affine])  # x -> bspline(affine(x))


def warp_case(image, points_lps, sampling):
    """The warped image and its exact landmarks: the p' with sampling(p') = p (fixed-point, 1e-6 mm)."""
    warped = sitk.Resample(image, image, sampling, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    moved = invert_points(sampling, points_lps, tolerance_mm=1e-6)
    ok = np.isfinite(points_lps).all(1)
    back = transform_points(sampling, moved)
    assert np.abs(back[ok] - points_lps[ok]).max() < 1e-5
    return warped, moved


def smooth_volume(shape=(56, 64, 56), spacing=2.0, seed=0):
    """A head-like synthetic volume: an ellipsoid of smooth texture with bright and dark blobs, and
    the blob centres as landmarks (world LPS)."""
    rng = np.random.default_rng(seed)
    zyx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)
    centre = (np.asarray(shape) - 1) / 2
    r = np.sqrt((((zyx - centre) / (0.42 * np.asarray(shape))) ** 2).sum(-1))
    volume = 100.0 / (1 + np.exp((r - 1) * 12))
    blobs = centre + rng.uniform(-0.28, 0.28, (14, 3)) * np.asarray(shape)
    for k, b in enumerate(blobs):
        sigma = rng.uniform(1.5, 3.5)
        volume += (80 if k % 2 else -60) * np.exp(-0.5 * ((zyx - b) ** 2).sum(-1) / sigma ** 2)
    image = sitk.GetImageFromArray(volume.astype(np.float32))
    image.SetSpacing([spacing] * 3)
    image.SetOrigin([-10.0, 5.0, 20.0])
    points = np.array([image.TransformContinuousIndexToPhysicalPoint(b[::-1].tolist()) for b in blobs])
    return image, points


def errors_of(case_image, truth, atlas_image, atlas_points, spacing_mm):
    """(affine errors, deformable errors, seconds {False, True}) of one atlas registered to the case."""
    names = [f"L{k}" for k in range(len(atlas_points))]
    est = atlas_estimates(case_image, [Atlas("a", atlas_image, LandmarkSet(names, atlas_points))], spacing_mm)
    err = {k: np.linalg.norm(e.points_lps - truth, axis=1) for k, e in est.items()}
    return err[False], err[True], {k: e.seconds for k, e in est.items()}


# ----------------------------------------------------------------- recovery
def test_deformable_recovers_a_known_nonlinear_warp_of_a_synthetic_volume():
    image, points = smooth_volume()
    case, truth = warp_case(image, points, known_warp(image, np.random.default_rng(1), rms_mm=3.0, mesh_mm=32.0))
    displaced = np.linalg.norm(truth - points, axis=1)
    affine, deformable, seconds = errors_of(case, truth, image, points, 4.0)
    print(f"synthetic: landmarks moved {displaced.mean():.2f} mm; MRE affine {affine.mean():.2f} mm, "
          f"deformable {deformable.mean():.2f} mm; s/case affine {seconds[False]:.2f}, deformable {seconds[True]:.2f}")
    assert displaced.mean() > 2.0  # a real deformation to undo
    assert deformable.mean() < 0.7 * affine.mean(), (affine.mean(), deformable.mean())
    assert deformable.mean() < 1.5  # below one voxel of the 2 mm image
    assert seconds[True] > seconds[False] > 0


@pytest.mark.skipif(not (AFIDS / "images" / f"{AFIDS_CASE}.nii.gz").is_file(),
                    reason=f"AFIDs templates not found at {AFIDS} (shared data absent)")
def test_deformable_recovers_a_known_nonlinear_warp_of_an_afids_template():
    from nnlandmark_h3de.landmarks.io import read_landmarks
    image = sitk.ReadImage(str(AFIDS / "images" / f"{AFIDS_CASE}.nii.gz"), sitk.sitkFloat32)
    points = read_landmarks(AFIDS / "landmarks" / f"{AFIDS_CASE}.fcsv").points_lps
    case, truth = warp_case(image, points, known_warp(image, np.random.default_rng(0), rms_mm=4.0))
    affine, deformable, seconds = errors_of(case, truth, image, points, 4.0)
    print(f"AFIDs: MRE affine {affine.mean():.2f} mm, deformable {deformable.mean():.2f} mm (max "
          f"{affine.max():.2f} / {deformable.max():.2f}); s/case affine {seconds[False]:.2f}, "
          f"deformable {seconds[True]:.2f}")
    assert deformable.mean() < 0.7 * affine.mean(), (affine.mean(), deformable.mean())
    assert deformable.mean() < 1.2  # the affine stage leaves ~2 mm here; the rater floor is 0.77 mm


def test_deformable_transform_inverts_exactly_keeps_absent_rows_and_2d_in_plane():
    image, points = smooth_volume(shape=(40, 48, 40), seed=2)
    case, _ = warp_case(image, points, known_warp(image, np.random.default_rng(3), rms_mm=3.0, mesh_mm=32.0))
    transform = register_deformable(case, image, spacing_mm=4.0)
    atlas_points = points.copy()
    atlas_points[3] = np.nan
    carried = transform.carry_points(atlas_points)
    assert np.isnan(carried[3]).all() and np.isfinite(np.delete(carried, 3, 0)).all()
    back = transform.transform_points(carried)
    np.testing.assert_allclose(np.delete(back, 3, 0), np.delete(atlas_points, 3, 0), atol=0.01)
    # 2D: a slice registers in its plane; points move by (x, y) and keep z
    plane = sitk.Extract(image, [image.GetSize()[0], image.GetSize()[1], 0], [0, 0, 20])
    warp2d = known_warp(plane, np.random.default_rng(4), rms_mm=2.0, mesh_mm=32.0)
    case2d = sitk.Resample(plane, plane, warp2d, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    t2d = register_deformable(case2d, plane, spacing_mm=4.0)
    p = np.array([[plane.GetOrigin()[0] + 40.0, plane.GetOrigin()[1] + 50.0, 0.0], [np.nan] * 3])
    c = t2d.carry_points(p)
    assert t2d.GetDimension() == 2 and c[0, 2] == 0.0 and np.isnan(c[1]).all()
    np.testing.assert_allclose(t2d.transform_points(c)[0], p[0], atol=0.01)


def test_register_affine_then_deformable_reuses_the_given_affine():
    image, points = smooth_volume(shape=(40, 48, 40), seed=5)
    case, _ = warp_case(image, points, known_warp(image, np.random.default_rng(6), rms_mm=2.0, mesh_mm=32.0))
    affine = register_affine(case, image, 4.0)
    t = register_deformable(case, image, 4.0, affine=affine)
    assert t.affine is affine
    start = time.perf_counter()
    t.carry_points(points)
    assert time.perf_counter() - start < 5.0  # fixed-point per point, no grid inversion


# ----------------------------------------------------------------- calibration and global_stage.json
def _tiny_atlases(names):
    image, points = smooth_volume(shape=(24, 24, 24), seed=7)
    return [Atlas(f"case_{k}", image, LandmarkSet(names, points[:len(names)] + k)) for k in range(2)]


@pytest.mark.parametrize("deformable_mre", [1.0, 3.0])
def test_calibration_keeps_the_lowest_validation_mre_and_round_trips(tmp_path, monkeypatch, deformable_mre):
    """The registration kinds are measured (faked here: fixed errors and seconds), the lowest MRE is
    kept, each kind's seconds per case recorded; load_global_stage reads the deformable kind from the
    atlas folder as a nonlinear atlas stage."""
    from nnlandmark_h3de.inference import global_stage as gs
    names = ["A", "B", "C"]
    fold = tmp_path / "model" / "fold_0"
    fold.mkdir(parents=True)
    (fold.parent / "dataset.json").write_text(json.dumps({"landmarks": {"names": names, "pairs": []}}))
    calls = []

    def fake(raw, train, val, n_atlases, spacing, kinds, record=None, atlases_used=None):
        calls.append(list(kinds))
        stage = gs.AtlasGlobalStage(_tiny_atlases(names), spacing)
        measured = {"atlas": (np.full((2, 3), 2.0), 1.5), "deformable": (np.full((2, 3), deformable_mre), 2.5)}
        return stage, {k: measured[k] for k in kinds}

    monkeypatch.setattr(gs, "registration_validation_errors", fake)
    choice = gs.calibrate_global_stage(fold, tmp_path, ["case_0", "case_1"], ["v0", "v1"], (1.0, 1.0, 1.0))
    assert calls == [["atlas", "deformable"]]  # one pass for both registration kinds
    assert choice.kind == ("deformable" if deformable_mre < 2.0 else "atlas")
    assert choice.validation["deformable"]["seconds_per_case"] == 2.5
    assert choice.validation["atlas"]["seconds_per_case"] == 1.5
    read = gs.GlobalStageChoice.read(fold / gs.GLOBAL_STAGE_FILE)
    assert read == choice
    stage, loaded, kind = gs.load_global_stage(fold, "deformable")
    assert kind == "deformable" and stage.nonlinear and stage.kind == "deformable"
    assert [a.name for a in stage.atlases] == ["case_0", "case_1"] and stage.names == names
    stage, _, kind = gs.load_global_stage(fold, "atlas")
    assert kind == "atlas" and not stage.nonlinear
    with pytest.raises(ValueError, match="unknown global stage kind"):
        gs.calibrate_global_stage(fold, tmp_path, ["case_0"], ["v0"], (1.0, 1.0, 1.0), kinds=("affine",))


def test_calibration_measures_both_registration_kinds_on_a_raw_dataset(tmp_path):
    """Four subjects, each a different smooth warp of one volume: two training cases as atlases, two
    validation cases. The deformable kind validates better, is kept, and is what load_global_stage
    then predicts with (from the stored coarse atlases), with about the validated error."""
    from nnlandmark_h3de.inference import global_stage as gs
    from nnlandmark_h3de.landmarks.dataset_file import landmarks_json_dict
    image, points = smooth_volume(seed=8)
    names = [f"L{k}" for k in range(len(points))]
    raw = tmp_path / "raw"
    (raw / "imagesTr").mkdir(parents=True)
    cases, entries = {}, {}
    for k in range(4):
        warped, moved = warp_case(image, points, known_warp(image, np.random.default_rng(20 + k), 3.0, 32.0))
        sitk.WriteImage(warped, str(raw / "imagesTr" / f"case_{k}_0000.nii.gz"))
        cases[f"case_{k}"] = LandmarkSet(names, moved)
        entries[f"case_{k}"] = {"images": [f"imagesTr/case_{k}_0000.nii.gz"], "label": f"labelsTr/case_{k}.nii.gz"}
    (raw / "dataset.json").write_text(json.dumps({"file_ending": ".nii.gz", "dataset": entries}))
    (raw / "landmarks.json").write_text(json.dumps(landmarks_json_dict(cases, names)))
    fold = tmp_path / "model" / "fold_0"
    fold.mkdir(parents=True)
    (fold.parent / "dataset.json").write_text(json.dumps({"landmarks": {"names": names, "pairs": []}}))
    choice = gs.calibrate_global_stage(fold, raw, ["case_0", "case_1"], ["case_2", "case_3"], (2.0, 2.0, 2.0),
                                       kinds=("atlas", "deformable"), n_atlases=2)
    v = choice.validation
    print(f"calibration: MRE atlas {v['atlas']['mre_mm']:.2f} mm, deformable {v['deformable']['mre_mm']:.2f} mm; "
          f"s/case {v['atlas']['seconds_per_case']:.2f} / {v['deformable']['seconds_per_case']:.2f}")
    assert choice.kind == "deformable" and v["deformable"]["mre_mm"] < 0.8 * v["atlas"]["mre_mm"]
    assert v["deformable"]["seconds_per_case"] > v["atlas"]["seconds_per_case"] > 0
    assert sorted(choice.atlases) == ["case_0", "case_1"] and v["atlas"]["n"] == v["deformable"]["n"] == 2 * len(names)
    stage, _, kind = gs.load_global_stage(fold, "auto")
    assert kind == "deformable" and stage.nonlinear
    est = stage.estimate([str(raw / "imagesTr" / "case_3_0000.nii.gz")])
    err = np.linalg.norm(est.points_lps - cases["case_3"].points_lps, axis=1)
    assert est.source == "deformable global stage" and err.mean() < 1.5 * v["deformable"]["mre_mm"] + 0.5
    # the affine kind alone (what the demo calibrates): the same affine figures, no demons run
    only = gs.calibrate_global_stage(fold, raw, ["case_0", "case_1"], ["case_2", "case_3"], (2.0, 2.0, 2.0),
                                     kinds=("atlas",), n_atlases=2)
    assert set(only.validation) == {"atlas"} and only.kind == "atlas"
    assert only.validation["atlas"]["mre_mm"] == pytest.approx(v["atlas"]["mre_mm"], abs=0.05)


def test_an_old_global_stage_file_without_the_deformable_kind_still_reads(tmp_path):
    from nnlandmark_h3de.inference.global_stage import GlobalStageChoice
    old = {"kind": "atlas", "validation": {
        "atlas": {"mre_mm": 2.0, "median_mm": 1.8, "p90_mm": 3.0, "rms_mm": 2.2, "n": 10, "radius_mm": 6.0},
        "learned": {"mre_mm": 3.0, "median_mm": 2.8, "p90_mm": 4.0, "rms_mm": 3.2, "n": 10, "radius_mm": 8.0}},
        "atlases": ["c0"], "registration_spacing_mm": 4.0, "learned_model": "/m", "learned_folds": [0]}
    (tmp_path / "global_stage.json").write_text(json.dumps(old))
    choice = GlobalStageChoice.read(tmp_path / "global_stage.json")
    assert choice.kind == "atlas" and choice.radius_mm("learned") == 8.0 and "deformable" not in choice.validation
    bad = dict(old, kind="affine")
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="bad.json"):
        GlobalStageChoice.read(tmp_path / "bad.json")


def _raw_dataset(tmp_path, image, points, warps, subjects=None):
    """A raw dataset of the given cases {case: sampling transform} (landmarks.json with `subjects`)."""
    from nnlandmark_h3de.landmarks.dataset_file import landmarks_json_dict
    names = [f"L{k}" for k in range(len(points))]
    raw = tmp_path / "raw"
    (raw / "imagesTr").mkdir(parents=True, exist_ok=True)
    cases, entries = {}, {}
    for case, sampling in warps.items():
        warped, moved = warp_case(image, points, sampling)
        sitk.WriteImage(warped, str(raw / "imagesTr" / f"{case}_0000.nii.gz"))
        cases[case] = LandmarkSet(names, moved)
        entries[case] = {"images": [f"imagesTr/{case}_0000.nii.gz"], "label": f"labelsTr/{case}.nii.gz"}
    (raw / "dataset.json").write_text(json.dumps({"file_ending": ".nii.gz", "dataset": entries}))
    (raw / "landmarks.json").write_text(json.dumps(landmarks_json_dict(cases, names, subjects=subjects)))
    return raw


def test_validation_registers_only_atlases_of_other_subjects(tmp_path):
    """A validation scan of the same subject as the prediction atlas (the same warp) registers to it almost
    exactly; with subjects in landmarks.json it is validated with the other subject's scan instead, whose
    error is what a new subject sees; prediction keeps its atlas."""
    from nnlandmark_h3de.inference import global_stage as gs
    image, points = smooth_volume(seed=8)
    same = known_warp(image, np.random.default_rng(30), 3.0, 32.0)
    warps = {"s0_a": same, "s1_a": known_warp(image, np.random.default_rng(31), 3.0, 32.0), "s0_b": same}
    errors = {}
    for declared in (None, {"s0_a": "s0", "s0_b": "s0", "s1_a": "s1"}):
        raw = _raw_dataset(tmp_path / str(bool(declared)), image, points, warps, declared)
        used = {}
        stage, measured = gs.registration_validation_errors(raw, ["s0_a", "s1_a"], ["s0_b"], n_atlases=1,
                                                            kinds=("atlas",), atlases_used=used)
        assert [a.name for a in stage.atlases] == ["s0_a"]  # what prediction registers
        assert used == {"s0_b": ["s1_a"] if declared else ["s0_a"]}
        errors[bool(declared)] = float(measured["atlas"][0].mean())
    print(f"validation MRE: own subject's atlas {errors[False]:.2f} mm, another subject's {errors[True]:.2f} mm")
    assert errors[False] < 1.0 and errors[True] > 2 * errors[False] + 1.0
    with pytest.warns(UserWarning, match="every training case is of subject 's0'"):
        _, measured = gs.registration_validation_errors(raw, ["s0_a"], ["s0_b"], n_atlases=1, kinds=("atlas",))
    assert float(measured["atlas"][0].mean()) == pytest.approx(errors[False])  # kept its own subject's atlas, with the warning


def test_case_subjects_in_landmarks_json(tmp_path):
    from nnlandmark_h3de.landmarks.dataset_file import DatasetFileError, landmarks_json_dict, load_case_subjects
    ls = {c: LandmarkSet(["A"], np.zeros((1, 3))) for c in ("a", "b")}
    (tmp_path / "landmarks.json").write_text(json.dumps(landmarks_json_dict(ls, ["A"])))
    assert load_case_subjects(tmp_path) is None
    doc = landmarks_json_dict(ls, ["A"], subjects={"a": "p1", "b": "p1", "gone": "p2"})
    assert doc["subjects"] == {"a": "p1", "b": "p1"}  # only the cases written
    (tmp_path / "landmarks.json").write_text(json.dumps({**doc, "subjects": ["a", "b"]}))
    with pytest.raises(DatasetFileError, match="landmarks.json: 'subjects' must map a case id"):
        load_case_subjects(tmp_path)
