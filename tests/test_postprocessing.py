"""Postprocessing: world-space left/right check, absent thresholds, fold thresholds, written .mrk.json."""
import json

import numpy as np
import pytest

from nnlandmark_h3de.inference.postprocessing import (PostprocessingOptions, apply_absent_thresholds,
                                                      check_lr_pairs, postprocess, read_fold_thresholds,
                                                      read_thresholds_per_fold, resolve_pairs)
from nnlandmark_h3de.inference.uncertainty import axis_step_mm, fold_spread_mm, heatmap_spread_mm
from nnlandmark_h3de.landmarks import ImageGeometry, LandmarkSet

NAMES = ["L0", "R0", "Nose", "La", "Ra"]
PAIRS = [("L0", "R0"), ("La", "Ra")]


def rotated_geometry(angle_deg):
    """An image whose i axis points to patient Right (x decreasing) and is rotated about z."""
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    flip = np.diag([-1.0, -1.0, 1.0])  # RAS-like storage: index i grows toward patient right
    return ImageGeometry((64, 64, 32), (0.8, 0.9, 2.0), (10.0, -5.0, 3.0), tuple((rot @ flip).ravel()))


def test_pair_swap_decided_in_world_with_rotated_direction():
    geo = rotated_geometry(30)
    # In voxel terms L0 has the LARGER i index; in this image that means it is more to the patient's
    # right, i.e. swapped. A voxel-index rule would keep it; the world rule must swap it.
    zyx = np.array([[10, 30, 50], [10, 30, 14], [12, 40, 32], [20, 20, 20], [20, 20, 44]], dtype=float)
    pts = geo.array_index_to_world(zyx)
    ls = LandmarkSet(NAMES, pts, confidence=np.arange(5.0), uncertainty_mm=np.arange(5.0) + 10)
    out, swapped = check_lr_pairs(ls, PAIRS)
    assert swapped == [("L0", "R0")]
    assert out.points_lps[0, 0] > out.points_lps[1, 0]
    np.testing.assert_array_equal(out.points_lps[0], pts[1])
    np.testing.assert_array_equal(out.confidence[:2], [1.0, 0.0])
    np.testing.assert_array_equal(out.uncertainty_mm[:2], [11.0, 10.0])
    # La (i=20) lies to the patient's left of Ra (i=44) in this image: correct, untouched
    np.testing.assert_array_equal(out.points_lps[3:], pts[3:])
    # the input set is not modified
    np.testing.assert_array_equal(ls.points_lps, pts)


def test_pair_with_absent_member_untouched():
    pts = np.array([[-5, 0, 0], [5, 0, 0], [0, 0, 0], [np.nan] * 3, [9, 0, 0]], dtype=float)
    out, swapped = check_lr_pairs(LandmarkSet(NAMES, pts), PAIRS)
    assert swapped == [("L0", "R0")]
    assert np.isnan(out.points_lps[3]).all() and out.points_lps[4, 0] == 9


def test_absent_threshold_keeps_score_in_confidence():
    pts = np.arange(15, dtype=float).reshape(5, 3)
    scores = np.array([0.9, 0.2, 0.5, 0.29, np.nan])
    out, absent = apply_absent_thresholds(LandmarkSet(NAMES, pts), scores, 0.3)
    assert absent == ["R0", "La", "Ra"]  # NaN score counts as absent
    assert out.present.tolist() == [True, False, True, False, False]
    np.testing.assert_array_equal(out.confidence, scores)
    # per-landmark thresholds, NaN = never absent
    out, absent = apply_absent_thresholds(LandmarkSet(NAMES, pts), scores, [0.95, np.nan, 0.1, 0.1, 0.1])
    assert absent == ["L0", "Ra"]


def test_postprocess_switches():
    pts = np.array([[-5, 0, 0], [5, 0, 0], [0, 0, 0], [1, 1, 1], [-1, 1, 1]], dtype=float)
    scores = np.array([0.9, 0.9, 0.1, 0.9, 0.9])
    ls = LandmarkSet(NAMES, pts)
    out, rep = postprocess(ls, scores, PostprocessingOptions(), PAIRS, thresholds=np.full(5, 0.5))
    assert rep == {"absent": ["Nose"], "swapped": [("L0", "R0")]}
    out, rep = postprocess(ls, scores, PostprocessingOptions(lr_check=False, absent=False), PAIRS, np.full(5, 0.5))
    assert rep == {"absent": [], "swapped": []} and out.present.all()
    np.testing.assert_array_equal(out.confidence, scores)
    # the flag overrides the calibrated thresholds
    out, rep = postprocess(ls, scores, PostprocessingOptions(threshold=0.05), PAIRS, np.full(5, 0.5))
    assert rep["absent"] == []
    # no thresholds known and no flag: nothing becomes absent
    out, rep = postprocess(ls, scores, PostprocessingOptions(), PAIRS, None)
    assert rep["absent"] == []


def test_read_fold_thresholds_average_and_order(tmp_path):
    for f, thr in ((0, [0.2, 0.4, None]), (1, [0.4, 0.6, 0.3])):
        (tmp_path / f"fold_{f}").mkdir()
        (tmp_path / f"fold_{f}" / "landmark_thresholds.json").write_text(
            json.dumps({"names": ["L0", "R0", "Nose"], "threshold": thr, "score": "peak"}))
    thr, kind = read_fold_thresholds(tmp_path, [0, 1], ["Nose", "R0", "L0", "Other"])
    assert kind == "peak"
    np.testing.assert_allclose(thr[:3], [0.3, 0.5, 0.3])
    assert np.isnan(thr[3])
    with pytest.warns(UserWarning, match="fold"):
        thr, _ = read_fold_thresholds(tmp_path, [0, 3], ["L0"])
    np.testing.assert_allclose(thr, [0.2])
    assert read_fold_thresholds(tmp_path, [5], ["L0"]) == (None, None)


def test_thresholds_per_fold_keep_the_folds_apart(tmp_path):
    (tmp_path / "fold_1").mkdir()
    (tmp_path / "fold_1" / "landmark_thresholds.json").write_text(
        json.dumps({"names": ["R0", "L0"], "threshold": [0.6, None], "score": "anchor"}))
    with pytest.warns(UserWarning, match="fold"):
        rows, kind = read_thresholds_per_fold(tmp_path, [0, 1], ["L0", "R0"])
    assert kind == "anchor" and rows.shape == (2, 2)
    assert np.isnan(rows[0]).all()  # fold 0 has no file: it does not vote
    np.testing.assert_array_equal(rows[1], [np.nan, 0.6])


def test_postprocess_with_per_fold_scores():
    ls = LandmarkSet(NAMES, np.zeros((5, 3)))
    scores = np.array([[0.6, 0.6, 0.6, 0.2, 0.9], [0.2, 0.9, 0.5, 0.2, 0.9]])
    thr = np.array([[0.5] * 5, [0.9] * 5])
    out, rep = postprocess(ls, scores, PostprocessingOptions(lr_check=False), PAIRS, thr)
    # ratios (1.2 + 0.22) / 2, (1.2 + 1) / 2, (1.2 + 0.56) / 2, ... ; confidence = the folds' mean score
    assert rep["absent"] == ["L0", "Nose", "La"]
    np.testing.assert_allclose(out.confidence, scores.mean(0))


def test_resolve_pairs_guessed_from_names():
    assert resolve_pairs({}, ["Left_eye", "Right_eye", "Nose"]) == [("Left_eye", "Right_eye")]


def test_resolve_pairs_from_dataset_json():
    dj = {"landmarks": {"names": NAMES, "pairs": [["L0", "R0"]]}}
    assert resolve_pairs(dj, NAMES) == [("L0", "R0")]
    with pytest.raises(ValueError, match="unknown"):
        resolve_pairs({"landmarks": {"pairs": [["L0", "Rx"]]}}, NAMES)


def test_uncertainty_helpers():
    geo = rotated_geometry(45)
    step = axis_step_mm(geo.array_index_to_world, np.zeros((2, 3)))
    np.testing.assert_allclose(step, [2.0, 0.9, 0.8])  # (z, y, x) spacing, whatever the direction
    np.testing.assert_allclose(heatmap_spread_mm(np.array([[1.0, 1.0, 1.0]]), step), [np.sqrt(4 + 0.81 + 0.64)])
    folds = np.array([[[1.0, 0, 0]], [[-1.0, 0, 0]]])
    np.testing.assert_allclose(fold_spread_mm(folds, np.zeros((1, 3))), [1.0])


def test_written_mrk_json(tmp_path):
    from nnlandmark_h3de.landmarks import write_landmarks
    pts = np.array([[1, 2, 3], [np.nan] * 3, [4, 5, 6], [7, 8, 9], [0, 1, 0]], dtype=float)
    ls = LandmarkSet(NAMES, pts, confidence=[0.9, 0.1, 0.8, 0.7, 0.6], uncertainty_mm=[1, np.nan, 2, 3, 4])
    path = write_landmarks(ls, tmp_path / "case.mrk.json", "mrk.json")
    d = json.loads(path.read_text())
    assert d["@schema"].endswith("markups-schema-v1.0.3.json#")
    (m,) = d["markups"]
    assert m["coordinateSystem"] == "LPS" and m["coordinateUnits"] == "mm"
    assert [c["label"] for c in m["controlPoints"]] == NAMES
    assert m["controlPoints"][1]["positionStatus"] == "undefined"
    assert m["controlPoints"][0]["position"] == [1, 2, 3]
