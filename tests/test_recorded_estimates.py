"""The calibration's registration estimates, recorded once and reused by the two-stage revalidation."""
import json

import numpy as np
import pytest

from nnlandmark_h3de.inference.recorded_estimates import (RecordedGlobalStage, read_recorded_estimates,
                                                          write_recorded_estimates)
from nnlandmark_h3de.landmarks.landmark_set import LandmarkSet

NAMES = ["A", "B", "C"]


class CountingStage:
    names = NAMES

    def __init__(self):
        self.calls = []

    def estimate(self, files):
        self.calls.append(list(files))
        return LandmarkSet(NAMES, np.zeros((3, 3)))


def test_estimates_round_trip_with_absent_landmarks_and_spread(tmp_path):
    points = np.array([[1.0, 2.0, 3.0], [np.nan] * 3, [-4.5, 0.25, 7.0]])
    ls = LandmarkSet(NAMES, points, uncertainty_mm=np.array([0.5, np.nan, 1.5]))
    write_recorded_estimates(tmp_path / "e.json", NAMES, {"deformable": {"case_1": ls}})
    back = read_recorded_estimates(tmp_path / "e.json", "deformable")
    assert list(back) == ["case_1"]
    np.testing.assert_array_equal(back["case_1"].points_lps, points)
    np.testing.assert_array_equal(back["case_1"].uncertainty_mm, [0.5, np.nan, 1.5])
    assert read_recorded_estimates(tmp_path / "e.json", "atlas") == {}  # another kind: nothing recorded
    assert read_recorded_estimates(tmp_path / "missing.json", "atlas") == {}


def test_an_unreadable_file_is_named(tmp_path):
    (tmp_path / "e.json").write_text(json.dumps({"names": NAMES, "kinds": {"atlas": {"c": {"points_lps": [[1, 2]]}}}}))
    with pytest.raises(ValueError, match="e.json: not a readable file of recorded global-stage estimates"):
        read_recorded_estimates(tmp_path / "e.json", "atlas")


def test_recorded_images_are_not_registered_again(tmp_path):
    seen, other = tmp_path / "seen_0000.nii.gz", tmp_path / "other_0000.nii.gz"
    recorded = LandmarkSet(["C", "B", "A"], np.arange(9.0).reshape(3, 3))
    stage = CountingStage()
    wrapped = RecordedGlobalStage(stage, {str(seen): recorded})
    got = wrapped.estimate([str(tmp_path / "." / "seen_0000.nii.gz")])  # the same file, another spelling
    assert got.names == NAMES and np.array_equal(got.points_lps[0], [6.0, 7.0, 8.0])  # in the stage's order
    assert stage.calls == [] and wrapped.reused == 1
    wrapped.estimate([str(other)])
    assert stage.calls == [[str(other)]] and wrapped.reused == 1
