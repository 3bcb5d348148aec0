"""Existence thresholds relative to each landmark's typical score, and the fitted uncertainty model."""
import json

import numpy as np
import pytest

from nnlandmark_h3de.evaluation.uncertainty_calibration import uncertainty_error_correlation
from nnlandmark_h3de.inference.uncertainty import UncertaintyModel, read_fold_uncertainty
from nnlandmark_h3de.training.calibration import (DEFAULT_RELATIVE_THRESHOLD, calibrate_relative_thresholds,
                                                  fit_uncertainty_model, reference_scores)
from nnlandmark_h3de.training.landmark_validation import calibrate_peak_threshold


def f1(scores, present, thresholds):
    pred = scores >= thresholds
    tp, fp, fn = (pred & present).sum(), (pred & ~present).sum(), (~pred & present).sum()
    return 2 * tp / (2 * tp + fp + fn)


def two_scale_scores(rng, n):
    """Landmark 0 peaks high (present 0.9-1.0, absent 0.5-0.7), landmark 1 low (present 0.25-0.3, absent
    0.02-0.08): what a trained network gives a crisp and a faint landmark."""
    present = rng.uniform(size=(n, 2)) < 0.7
    s = np.where(present, rng.uniform(0.9, 1.0, (n, 2)), rng.uniform(0.5, 0.7, (n, 2)))
    s[:, 1] = np.where(present[:, 1], rng.uniform(0.25, 0.3, n), rng.uniform(0.02, 0.08, n))
    return s, present


def test_relative_thresholds_separate_landmarks_of_different_scales():
    rng = np.random.default_rng(0)
    val, val_present = two_scale_scores(rng, 12)
    test, test_present = two_scale_scores(rng, 200)
    thresholds, info = calibrate_relative_thresholds(val, val_present, default=0.1)
    assert info["method"] == "best_f1_relative_to_median_present" and info["f1"] == 1.0
    assert 0.7 < thresholds[0] < 0.9 and 0.08 < thresholds[1] < 0.25
    assert f1(test, test_present, thresholds) > 0.99
    # one global threshold cannot: the faint landmark's present peaks lie under the crisp one's absent peaks
    t, _ = calibrate_peak_threshold(val, val_present)
    assert f1(test, test_present, t) < 0.95


def test_relative_thresholds_default_without_absent_landmarks():
    s = np.array([[0.9, 0.3], [0.8, 0.2]])
    thresholds, info = calibrate_relative_thresholds(s, np.ones_like(s, dtype=bool), default=0.1)
    np.testing.assert_allclose(thresholds, DEFAULT_RELATIVE_THRESHOLD * np.array([0.85, 0.25]))
    assert info["method"] == "default_relative_to_median_present" and "no absent" in info["reason"]
    thresholds, info = calibrate_relative_thresholds(s, np.zeros_like(s, dtype=bool), default=0.1)
    assert thresholds.tolist() == [0.1, 0.1] and info["method"] == "default"


def test_reference_scores_fall_back_to_pooled_median():
    s = np.array([[0.9, 0.3, 0.5], [0.7, 0.1, 0.6]])
    present = np.array([[True, True, False], [True, False, False]])
    np.testing.assert_allclose(reference_scores(s, present), [0.8, 0.3, np.median([0.9, 0.3, 0.7])])


def test_uncertainty_model_recovers_scale_and_exponent():
    rng = np.random.default_rng(1)
    n, rms_true, alpha_true = 400, np.array([1.0, 4.0, 10.0]), 1.5
    peaks = rng.uniform(0.3, 1.0, (n, 3))
    ref = np.median(peaks, axis=0)
    noise = np.exp(rng.normal(0, 0.1, (n, 3)))
    errors = rms_true * (ref / peaks) ** alpha_true * noise
    present = np.ones((n, 3), dtype=bool)
    present[0, 2] = False
    errors[0, 2] = np.nan
    model = fit_uncertainty_model(["a", "b", "c"], errors, peaks, present)
    assert model.alpha == pytest.approx(alpha_true, abs=0.05)
    measured_rms = np.sqrt(np.nanmean(errors ** 2, axis=0))
    np.testing.assert_allclose(model.rms_mm, measured_rms, rtol=0.05)  # shrinkage barely moves 400 cases
    u = model(peaks)
    corr = uncertainty_error_correlation(errors[present], u[present],
                                         landmark=np.broadcast_to(np.arange(3), (n, 3))[present])
    assert corr["spearman_rho"] > 0.8 and corr["within_landmark_spearman_rho"] > 0.8


def test_uncertainty_model_shrinks_rare_landmarks_and_never_inverts():
    # errors grow with the peak (nonsense cue): alpha is clipped at 0, not negative
    peaks = np.array([[0.9, 0.5], [0.5, 0.9], [0.7, 0.7], [0.6, 0.8]])
    errors = np.array([[4.0, 1.0], [1.0, 4.0], [2.0, 2.0], [1.5, np.nan]])
    present = np.isfinite(errors)
    model = fit_uncertainty_model(["a", "b"], errors, peaks, present)
    assert model.alpha == 0.0
    pooled = np.sqrt(np.nanmean(errors ** 2))
    own_b = np.sqrt(np.nanmean(errors[:, 1] ** 2))
    assert min(pooled, own_b) <= model.rms_mm[1] <= max(pooled, own_b)


def test_uncertainty_model_files_round_trip_and_average(tmp_path):
    a = UncertaintyModel(["x", "y"], [1.0, 2.0], [0.5, 0.8], 1.0)
    b = UncertaintyModel(["y", "z"], [4.0, 9.0], [0.4, 0.6], 0.0)
    for f, m in enumerate((a, b)):
        (tmp_path / f"fold_{f}").mkdir()
        m.write(tmp_path / f"fold_{f}" / "landmark_uncertainty.json")
    assert json.loads((tmp_path / "fold_0" / "landmark_uncertainty.json").read_text())["alpha"] == 1.0
    m = read_fold_uncertainty(tmp_path, [0, 1], ["x", "y", "z", "w"])
    np.testing.assert_allclose(m.rms_mm[:3], [1.0, 3.0, 9.0])
    np.testing.assert_allclose(m.ref_peak[:3], [0.5, 0.6, 0.6])
    assert np.isnan(m.rms_mm[3]) and m.alpha == 0.5
    np.testing.assert_allclose(m(np.array([0.5, 0.6, 0.6, 0.5]))[:3], [1.0, 3.0, 9.0])
    assert read_fold_uncertainty(tmp_path, [2], ["x"]) is None
    (tmp_path / "fold_0" / "landmark_uncertainty.json").write_text(json.dumps(
        {"names": ["x"], "rms_error_mm": [1.0, 2.0], "median_present_peak": [0.5], "alpha": 1.0}))
    with pytest.raises(ValueError, match="fold_0.*differ in length"):
        read_fold_uncertainty(tmp_path, [0], ["x"])


def test_within_landmark_rho_separates_landmark_difficulty_from_case_ranking():
    # landmark 0: small errors, ranked right; landmark 1: large errors, ranked backwards (3 points each)
    errors = np.array([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])
    unc = np.array([1.0, 2.0, 3.0, 30.0, 20.0, 10.0])
    corr = uncertainty_error_correlation(errors, unc, landmark=np.array([0, 0, 0, 1, 1, 1]))
    assert corr["spearman_rho"] > 0.5  # pooled: knowing which landmark is hard already ranks well
    assert corr["within_landmark_spearman_rho"] == pytest.approx(0.0)
    assert corr["within_landmark_n_landmarks"] == 2
    assert "within_landmark_spearman_rho" not in uncertainty_error_correlation(errors, unc)


def test_uncertainty_model_learns_the_spread_cue_when_the_peak_says_nothing(tmp_path):
    rng = np.random.default_rng(2)
    n = 300
    peaks = rng.uniform(0.3, 1.0, (n, 2))  # unrelated to the error
    spread = rng.uniform(0.2, 2.0, (n, 2))
    errors = np.array([2.0, 5.0]) * (spread / np.median(spread, 0)) ** 1.0 * np.exp(rng.normal(0, 0.1, (n, 2)))
    model = fit_uncertainty_model(["a", "b"], errors, peaks, np.ones((n, 2), bool), spread_mm=spread)
    assert model.alpha < 0.05 and model.beta == pytest.approx(1.0, abs=0.05)
    np.testing.assert_allclose(model.ref_spread_mm, np.median(spread, 0))
    # without the spread at prediction time (one member) only the landmark scale and peak factor remain
    np.testing.assert_allclose(model(peaks[0]), model.rms_mm * (model.ref_peak / peaks[0]) ** model.alpha)
    # a members' chance agreement is floored, not taken as certainty
    tiny = model(model.ref_peak, spread_mm=np.zeros(2))
    np.testing.assert_allclose(tiny, model.rms_mm * UncertaintyModel.SPREAD_FLOOR ** model.beta)
    model.write(tmp_path / "u.json")
    again = UncertaintyModel.read(tmp_path / "u.json")
    np.testing.assert_allclose(again(peaks, spread), model(peaks, spread))


def test_final_validation_keeps_the_existence_score_that_separates_best():
    from nnlandmark_h3de.training.final_validation import _choose_score
    fit = lambda f1: (None, {"method": "best_f1_relative_to_median_present", "f1": f1})  # noqa: E731
    default = (None, {"method": "default_relative_to_median_present"})
    assert _choose_score({"peak": fit(0.93), "anchor": fit(0.80)}, "anchor") == "peak"
    assert _choose_score({"peak": fit(0.80), "anchor": fit(0.80)}, "anchor") == "anchor"  # tie: preferred
    assert _choose_score({"peak": fit(0.80), "anchor": fit(0.95)}, "anchor") == "anchor"
    assert _choose_score({"peak": default, "anchor": default}, "anchor") == "anchor"  # nothing to compare
    assert _choose_score({"peak": fit(0.9)}, "peak") == "peak"
