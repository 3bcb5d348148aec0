"""Existence calibrated on every case that can teach it: validation + in-sample training cases (each
relative to its own set's peaks), out-of-fold predictions of all folds, and the checks on cases the
threshold was not fitted on."""
import json

import numpy as np
import pytest

from nnlandmark_h3de.training.calibration import calibrate_relative_thresholds
from nnlandmark_h3de.training.existence_calibration import (calibrate_out_of_fold, existence_f1,
                                                            held_out_existence_check, write_existence_scores)


def scores_at_scale(rng, n, present_level, absent_level, p_absent=0.3, L=3):
    """(n, L) peaks: present around `present_level`, absent around `absent_level` (x a per-landmark scale)."""
    present = rng.uniform(size=(n, L)) >= p_absent
    scale = np.linspace(0.4, 1.0, L)[None]
    s = np.where(present, rng.uniform(0.9, 1.1, (n, L)) * present_level, rng.uniform(0.6, 1.4, (n, L)) * absent_level)
    return s * scale, present


def test_training_cases_teach_existence_when_validation_has_no_absent_landmark():
    rng = np.random.default_rng(0)
    val, val_present = scores_at_scale(rng, 3, 0.6, 0.25, p_absent=0.0)  # unseen cases: lower peaks
    train, train_present = scores_at_scale(rng, 20, 0.95, 0.1)  # in-sample: higher present, lower absent
    test, test_present = scores_at_scale(rng, 300, 0.6, 0.25)
    alone, info_alone = calibrate_relative_thresholds(val, val_present, default=0.1)
    assert info_alone["method"] == "default_relative_to_median_present"
    groups = np.r_[np.zeros(3, int), np.ones(20, int)]
    both, info = calibrate_relative_thresholds(np.r_[val, train], np.r_[val_present, train_present], 0.1, groups)
    assert info["method"] == "best_f1_relative_to_median_present"
    test_f1 = existence_f1(test >= both[None], test_present)["f1"]
    assert test_f1 > 0.95 and test_f1 > existence_f1(test >= alone[None], test_present)["f1"] + 0.05
    # the thresholds are on the validation cases' scale, not the in-sample one (which runs 0.95 / 0.6 higher)
    assert np.median(both / np.median(val, axis=0)) == pytest.approx(info["relative_threshold"], rel=0.1)


def test_reference_scores_pool_the_sets_on_one_scale_per_set():
    """Few validation cases make a landmark's median present peak noisy; the in-sample training cases run
    higher by one factor. Pooled on one scale per set, the references are on the validation scale and
    nearer each landmark's true peak height than the validation medians alone (200 draws)."""
    from nnlandmark_h3de.training.calibration import relative_scores
    rng = np.random.default_rng(3)
    truth = np.linspace(0.3, 0.9, 9)
    err_pooled, err_val = [], []
    for _ in range(200):
        val = truth * rng.uniform(0.6, 1.4, (5, 9))
        train = 1.5 * truth * rng.uniform(0.6, 1.4, (30, 9))
        scores, present = np.r_[val, train], np.ones((35, 9), bool)
        relative, ref = relative_scores(scores, present, np.r_[np.zeros(5, int), np.ones(30, int)])
        err_pooled.append(np.abs(np.log(ref / truth)).mean())
        err_val.append(np.abs(np.log(np.median(val, axis=0) / truth)).mean())
        np.testing.assert_allclose(relative[:5], val / ref)  # validation cases on their own scale
    assert np.mean(err_pooled) < 0.7 * np.mean(err_val)
    # one set only: the references are its medians, as before
    _, ref = relative_scores(val, np.ones((5, 9), bool), np.zeros(5, int))
    np.testing.assert_allclose(ref, np.median(val, axis=0))


def test_held_out_check_scores_validation_with_the_training_fit():
    rng = np.random.default_rng(1)
    val, val_present = scores_at_scale(rng, 10, 0.6, 0.25)
    train, train_present = scores_at_scale(rng, 20, 0.95, 0.1)
    groups = np.r_[np.zeros(10, int), np.ones(20, int)]
    check = held_out_existence_check(np.r_[val, train], np.r_[val_present, train_present], groups)
    assert check["tp"] + check["fn"] == val_present.sum() and check["tn"] + check["fp"] == (~val_present).sum()
    assert check["f1"] > 0.9 and "training" in check["fitted_on"]
    # the fit is the training cases' alone: other validation peaks do not move it
    other = held_out_existence_check(np.r_[val * np.array([0.5, 1.0, 2.0]), train],
                                     np.r_[val_present, train_present], groups)
    assert other["relative_threshold"] == check["relative_threshold"]
    # nothing absent among the validation cases: the check cannot say anything
    assert held_out_existence_check(np.r_[val, train], np.r_[np.ones_like(val_present), train_present], groups) is None


def test_out_of_fold_thresholds_follow_each_folds_own_peak_scale():
    rng = np.random.default_rng(2)
    folds = [scores_at_scale(rng, 6, level, level * 0.35) for level in (0.9, 0.5, 0.7)]
    thresholds, info = calibrate_out_of_fold([f[0] for f in folds], [f[1] for f in folds], default=0.1)
    assert info["n_folds"] == 3 and info["n_cases"] == 18
    medians = [[np.median(s[p[:, k], k]) for k in range(3)] for s, p in folds]
    assert thresholds[0] / thresholds[1] == pytest.approx(np.full(3, np.median(np.divide(*medians[:2]))), rel=0.05)
    check = info["leave_one_fold_out"]
    assert check["tp"] + check["fp"] + check["fn"] + check["tn"] == 18 * 3 and check["f1"] > 0.9
    test, test_present = scores_at_scale(rng, 300, 0.5, 0.5 * 0.35)
    assert existence_f1(test >= thresholds[1][None], test_present)["f1"] > 0.95


def test_calibrate_existence_cli_refits_every_fold(tmp_path, capsys):
    from nnlandmark_h3de.cli.calibrate_existence import refit_folds
    from nnlandmark_h3de.training.landmark_validation import write_thresholds
    rng = np.random.default_rng(3)
    names = ["a", "b", "c"]
    for f, level in enumerate((0.9, 0.5)):
        fold = tmp_path / f"fold_{f}"
        (fold / "validation").mkdir(parents=True)
        write_thresholds(fold / "landmark_thresholds.json", names, [0.1] * 3, {"method": "default"})
        s, p = scores_at_scale(rng, 5, level, level * 0.3)
        write_existence_scores(fold / "validation" / "existence_scores.json", names,
                               {f"case{f}{i}": ({"peak": s[i]}, p[i]) for i in range(5)},
                               {"train": ({"peak": np.ones(3)}, np.ones(3, bool))})  # in-sample: not used
    info = refit_folds(tmp_path, ["0", "1"])
    assert info["n_cases"] == 10 and info["method"] == "best_f1_relative_to_median_present"
    written = [json.loads((tmp_path / f"fold_{f}" / "landmark_thresholds.json").read_text()) for f in (0, 1)]
    assert all(w["calibration"]["folds"] == ["0", "1"] and w["score"] == "peak" for w in written)
    assert written[0]["threshold"][0] > written[1]["threshold"][0]  # each fold on its own scale
    (tmp_path / "fold_1" / "validation" / "existence_scores.json").unlink()
    with pytest.raises(ValueError, match="fold_1"):
        refit_folds(tmp_path, ["0", "1"])
