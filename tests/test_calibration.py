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


# ------------------------------------------------ checks on cases the existence fit did not see
def _levels(rng, n, present_level, absent_level, scale=(0.4, 0.7, 1.0)):
    """(n, 3) peaks, present around `present_level` x each landmark's scale, absent around `absent_level` x it."""
    present = rng.uniform(size=(n, 3)) >= 0.2
    present[0], present[1] = True, [False, True, True]  # both kinds in every set
    lv = lambda level: np.broadcast_to(np.asarray(level, dtype=np.float64) * np.asarray(scale), (n, 3))
    s = np.where(present, rng.uniform(0.9, 1.1, (n, 3)) * lv(present_level),
                 rng.uniform(0.6, 1.4, (n, 3)) * lv(absent_level))
    return s, present


def _shifted_landmark_sets(rng):
    """In-sample training cases, and held-out cases whose peaks run 0.6 times lower, except landmark 2's
    present peaks, 0.2 times lower: on that landmark a reference taken from the held-out cases' own
    present peaks knows a level that nothing unlabelled reveals."""
    train, train_present = _levels(rng, 30, 1.0, 0.1)
    val, val_present = _levels(rng, 12, [0.6, 0.6, 0.2], [0.06, 0.06, 0.02])
    return train, train_present, val, val_present


def _label_free_calls(fit, fit_present, held):
    """What the check must compute: training references and threshold; held-out scale from all peaks."""
    ref = np.array([np.median(fit[fit_present[:, l], l]) for l in range(fit.shape[1])])
    t, _ = calibrate_peak_threshold(fit / ref, fit_present)
    factor = np.median(np.median(held, axis=0) / np.median(fit, axis=0))
    return held / factor / ref >= t, t


def _own_label_calls(held, held_present, t):
    """The leaky check: each held-out landmark divided by its own median present peak."""
    return held / np.array([np.median(held[held_present[:, l], l]) for l in range(held.shape[1])]) >= t


def test_held_out_existence_check_never_uses_the_held_out_labels():
    from nnlandmark_h3de.training.existence_calibration import existence_f1, held_out_existence_check
    train, train_present, val, val_present = _shifted_landmark_sets(np.random.default_rng(5))
    groups = np.r_[np.zeros(len(val), int), np.ones(len(train), int)]
    check = held_out_existence_check(np.r_[val, train], np.r_[val_present, train_present], groups)

    calls, t = _label_free_calls(train, train_present, val)
    honest = existence_f1(calls, val_present)
    leaky = existence_f1(_own_label_calls(val, val_present, t), val_present)
    assert check["relative_threshold"] == pytest.approx(t)
    assert {k: check[k] for k in ("tp", "fp", "fn", "tn")} == {k: honest[k] for k in ("tp", "fp", "fn", "tn")}
    assert check["f1"] == pytest.approx(honest["f1"])
    assert check["validation_scale_factor"] == pytest.approx(0.6, rel=0.1)
    # the label-informed normalisation finds landmark 2's present peaks; the honest one cannot
    assert leaky["f1"] > honest["f1"] + 0.15 and leaky["f1"] > 0.95
    # other labels on the same validation peaks: the same calls, only counted differently
    relabelled = held_out_existence_check(np.r_[val, train], np.r_[val_present[::-1], train_present], groups)
    assert relabelled["tp"] + relabelled["fp"] == check["tp"] + check["fp"]
    assert relabelled["relative_threshold"] == check["relative_threshold"]


def test_leave_one_fold_out_never_uses_the_held_out_folds_labels():
    """Three folds, the third with landmark 2's present peaks at a fifth of the others' level: its calls
    come from the other folds' fit and a label-free scale, and miss what its own labels would have told."""
    from nnlandmark_h3de.training.calibration import relative_scores
    from nnlandmark_h3de.training.existence_calibration import calibrate_out_of_fold, existence_f1
    rng = np.random.default_rng(6)
    folds = [_levels(rng, 10, 1.0, 0.1), _levels(rng, 10, 0.8, 0.08), _levels(rng, 10, [0.9, 0.9, 0.18], [0.09, 0.09, 0.018])]
    check = calibrate_out_of_fold([f[0] for f in folds], [f[1] for f in folds], default=0.1)[1]["leave_one_fold_out"]

    honest, leaky = [], []
    for f in range(3):
        rest = [g for g in range(3) if g != f]
        scores, present = np.r_[folds[rest[0]][0], folds[rest[1]][0]], np.r_[folds[rest[0]][1], folds[rest[1]][1]]
        relative, ref = relative_scores(scores, present, np.r_[np.zeros(10, int), np.ones(10, int)])
        t, _ = calibrate_peak_threshold(relative, present)
        held, held_present = folds[f]
        factor = np.median(np.median(held, axis=0) / np.median(relative * ref, axis=0))
        honest.append(held / factor / ref >= t)
        leaky.append(_own_label_calls(held, held_present, t))
    truth = np.concatenate([f[1] for f in folds])
    honest_f1, leaky_f1 = existence_f1(np.concatenate(honest), truth), existence_f1(np.concatenate(leaky), truth)
    assert {k: check[k] for k in ("tp", "fp", "fn", "tn")} == {k: honest_f1[k] for k in ("tp", "fp", "fn", "tn")}
    # every present landmark 2 of the third fold is missed honestly, and found with its own labels
    shifted = folds[2][1][:, 2]
    assert not honest[2][shifted, 2].any() and leaky[2][shifted, 2].all()
    assert honest_f1["fn"] >= shifted.sum() and leaky_f1["f1"] > honest_f1["f1"] + 0.05 and leaky_f1["f1"] > 0.95


def test_local_weight_blends_independent_errors_and_keeps_the_better_alone():
    """Fitted on validation points: two estimates with independent errors of the same size are best
    averaged (w near 0.5, blended MRE below both); a perfect global stage gets w = 0, a perfect local
    peak w = 1; a tie keeps w = 1 (the behaviour before the weight existed)."""
    from nnlandmark_h3de.inference.two_stage_tiles import blend_points
    from nnlandmark_h3de.training.calibration import fit_local_weight
    rng = np.random.default_rng(0)
    truth = rng.uniform(0, 100, size=(40, 8, 3))
    local = truth + rng.normal(0, 2.0, size=truth.shape)
    glob = truth + rng.normal(0, 2.0, size=truth.shape)
    w, info = fit_local_weight(local, glob, truth)
    assert 0.35 <= w <= 0.65
    assert info["mre_mm"] < 0.8 * min(info["mre_local_mm"], info["mre_global_mm"])
    assert fit_local_weight(local, truth, truth)[0] == 0.0
    assert fit_local_weight(truth, glob, truth)[0] == 1.0
    assert fit_local_weight(truth, truth, truth)[0] == 1.0
    # a missing global estimate leaves the local point, a missing local point the estimate
    g = glob[0].copy(); g[0] = np.nan
    l = local[0].copy(); l[1] = np.nan
    b = blend_points(g, l, 0.5)
    assert np.allclose(b[0], l[0]) and np.allclose(b[1], g[1]) and np.allclose(b[2], (g[2] + l[2]) / 2)


def test_local_weights_per_landmark_keep_registration_where_the_network_is_worse():
    """Per landmark: where the local peak is consistently worse than the global estimate the weight drops
    low, where it is better it stays high; the prior moves every weight towards the pooled one (never past
    it), an enormous prior gives every landmark the pooled weight; the fitted weights beat the pooled one on
    the cases they were fitted on."""
    from nnlandmark_h3de.training.calibration import fit_local_weight, fit_local_weights
    rng = np.random.default_rng(1)
    truth = rng.uniform(0, 100, size=(4, 6, 3))
    glob = truth + rng.normal(0, 2.0, size=truth.shape)
    local = truth + rng.normal(0, 0.5, size=truth.shape)
    local[:, 0] = truth[:, 0] + rng.normal(0, 6.0, size=(4, 3))  # the network misses landmark 0 on every case
    local[0, 1] = truth[0, 1] + np.array([8.0, 0.0, 0.0])  # and landmark 1 on one case
    weights, info = fit_local_weights(local, glob, truth)
    pooled, _ = fit_local_weight(local, glob, truth)
    assert weights.shape == (6,) and weights[0] <= 0.4 and np.all(weights[2:] >= 0.8)
    own_only = fit_local_weights(local, glob, truth, prior_cases=0.0)[0]
    assert np.all(np.abs(weights - pooled) <= np.abs(own_only - pooled) + 1e-9)
    assert np.all(np.minimum(own_only, pooled) - 1e-9 <= weights) and np.all(weights <= np.maximum(own_only, pooled) + 1e-9)
    assert info["per_landmark"] and info["pooled_weight"] == pooled and info["mre_mm"] < info["mre_pooled_mm"]
    assert np.all(fit_local_weights(local, glob, truth, prior_cases=1e9)[0] == pooled)
    nan_local = local.copy(); nan_local[:, 3] = np.nan  # no local point for landmark 3 on any case
    assert fit_local_weights(nan_local, glob, truth)[0][3] == fit_local_weight(nan_local, glob, truth)[0]


def test_per_landmark_weights_blend_each_row_and_travel_through_global_stage_json(tmp_path):
    """blend_points / blend_with_estimates take one weight per landmark row; global_stage.json's
    `local_weights` reaches the predictor as that array, older files keep their one number."""
    from nnlandmark_h3de.inference.global_stage import GlobalStageChoice
    from nnlandmark_h3de.inference.two_stage_tiles import TilePlan, blend_points, blend_with_estimates
    g = np.zeros((3, 3)); l = np.ones((3, 3))
    w = np.array([0.0, 0.5, 1.0])
    assert np.allclose(blend_points(g, l, w), [[0, 0, 0], [0.5] * 3, [1, 1, 1]])
    assert np.allclose(blend_points(np.stack([g, g]), np.stack([l, l]), w)[1], blend_points(g, l, w))
    centres = np.array([[10.0, 10.0, 10.0], [np.nan] * 3, [20.0, 20.0, 20.0]])
    plan = TilePlan([], centres, np.full(3, 5.0), np.zeros(3))
    idx = np.array([[12.0, 10.0, 10.0], [5.0, 5.0, 5.0], [20.0, 24.0, 20.0]])
    out = blend_with_estimates(idx, plan, np.array([0.5, 0.3, 0.25]))
    assert np.allclose(out, [[11.0, 10.0, 10.0], [5.0, 5.0, 5.0], [20.0, 21.0, 20.0]])
    assert blend_with_estimates(idx, plan, np.ones(3)) is idx
    choice = GlobalStageChoice(kind="deformable", validation={"deformable": {"mre_mm": 3.0, "radius_mm": 10.0, "local_weight": 0.8}})
    assert choice.local_weight("deformable") == 0.8
    choice.validation["deformable"]["local_weights"] = [0.1, 0.9, 1.0]
    choice = GlobalStageChoice.read(choice.write(tmp_path / "global_stage.json"))
    assert np.allclose(choice.local_weight("deformable"), [0.1, 0.9, 1.0])


def test_prediction_blends_in_case_indices_like_the_calibration_in_world():
    """blend_with_estimates moves each local peak towards its tile plan's estimate by the weight, in the
    case's indices; a landmark without an estimate keeps its peak; w = 1 changes nothing."""
    from nnlandmark_h3de.inference.two_stage_tiles import TilePlan, blend_points, blend_with_estimates
    centres = np.array([[10.0, 12.0, 14.0], [20.0, 20.0, 20.0], [np.nan] * 3])  # padded indices
    offset = np.array([2.0, 2.0, 2.0])
    plan = TilePlan([], centres, np.full(3, 5.0), offset)
    idx = np.array([[9.0, 13.0, 15.0], [24.0, 16.0, 20.0], [5.0, 5.0, 5.0]])
    out = blend_with_estimates(idx, plan, 0.25)
    assert np.allclose(out[:2], blend_points(centres[:2] - offset, idx[:2], 0.25))
    assert np.allclose(out[2], idx[2])
    assert blend_with_estimates(idx, plan, 1.0) is idx
