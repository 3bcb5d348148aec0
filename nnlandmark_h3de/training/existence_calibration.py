"""Existence calibration on every case that can teach it, and how well it carries to other cases.

A fold's few validation cases often hold no absent landmark at all (the demo's 3 had none), so the
thresholds fell back to a default. Two more sources of (case, landmark) pairs:
- training cases predicted at the end of training (in-sample, so labelled as such; their peaks are
  compared with their own set's median present peaks, see calibration.calibrate_relative_thresholds);
- out-of-fold predictions: each trained fold's validation cases, pooled over folds by
  `nnLandmark_calibrate_existence` (every fold on its own scale, medians pooled; one relative
  threshold for all).
Each fit is also scored on cases it was not fitted on (`held_out_existence_check`,
`leave_one_fold_out`), so the figure a user reads is not the one the threshold was chosen on; the
scored cases' labels only count the calls (references and scale come from the fitted cases and from
label-free peak medians).

The final validation stores the scores it saw in fold_X/validation/existence_scores.json.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnlandmark_h3de.landmarks.atomic import atomic_write_text
from nnlandmark_h3de.training.calibration import calibrate_relative_thresholds, relative_scores
from nnlandmark_h3de.training.landmark_validation import calibrate_peak_threshold

__all__ = ["EXISTENCE_SCORES_FILE", "existence_f1", "held_out_existence_check", "write_existence_scores",
           "read_existence_scores", "calibrate_out_of_fold"]

EXISTENCE_SCORES_FILE = "existence_scores.json"


def existence_f1(called_present: np.ndarray, present: np.ndarray) -> Dict:
    """Precision, recall, F1 of "present" calls, with the counts."""
    called_present, present = np.asarray(called_present, bool).ravel(), np.asarray(present, bool).ravel()
    tp, fp = int((called_present & present).sum()), int((called_present & ~present).sum())
    fn, tn = int((~called_present & present).sum()), int((~called_present & ~present).sum())
    return {"precision": tp / max(1, tp + fp), "recall": tp / max(1, tp + fn), "f1": 2 * tp / max(1, 2 * tp + fp + fn),
            "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def _fittable(present: np.ndarray) -> bool:
    return bool(present.any() and (~present).any())


def held_out_existence_check(scores: np.ndarray, present: np.ndarray, groups: np.ndarray) -> Optional[Dict]:
    """Fit the relative threshold on the training cases (group 1) alone and score the validation cases
    (group 0) with it: how well in-sample calibration carries to unseen cases. None when either set
    cannot say (no present or no absent landmark).

    The validation labels only count the calls, never shape them (`_calls_without_labels`): the
    per-landmark references are the training cases' median present peaks, and the validation peaks
    are put on the training scale by a factor estimated from all their peaks, present or not. Dividing
    the validation cases by their own median present peaks would hand the check each landmark's true
    level on exactly the cases it scores (an optimistic F1)."""
    val, train = groups == 0, groups == 1
    if not (_fittable(present[val]) and _fittable(present[train])):
        return None
    t, called, factor = _calls_without_labels(scores[train], present[train], np.zeros(int(train.sum()), dtype=int),
                                              scores[val])
    return {"fitted_on": f"{int(train.sum())} training cases (in-sample)",
            "scored_on": f"{int(val.sum())} validation cases (their labels unused until scoring)",
            "relative_threshold": float(t), "validation_scale_factor": factor,
            **existence_f1(called, present[val])}


def _label_free_factor(held: np.ndarray, fitted: np.ndarray) -> float:
    """How much higher the held-out peaks run than the fitted cases' (on the fit's scale), without any
    label: per landmark the median of all held-out peaks over the median of all fitted peaks, present
    or not, then the median over landmarks (1.0 where no landmark has peaks in both). In-sample peaks
    run higher than unseen cases' by about one factor (calibration.relative_scores); the product
    estimates it from the validation labels, which a check on those cases must not see. Present
    landmarks are the majority, so the medians sit among present peaks; when the held-out set has a
    different absent fraction the factor errs, and that error counts against the check."""
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.array([np.nanmedian(held[:, l]) / np.nanmedian(fitted[:, l])
                          if np.isfinite(held[:, l]).any() and np.isfinite(fitted[:, l]).any() else np.nan
                          for l in range(held.shape[1])])
    ratio = ratio[np.isfinite(ratio) & (ratio > 0)]
    return float(np.median(ratio)) if ratio.size else 1.0


def _calls_without_labels(fit_scores: np.ndarray, fit_present: np.ndarray, fit_groups: np.ndarray,
                          held_scores: np.ndarray) -> Tuple[float, np.ndarray, float]:
    """The product's relative fit on the fitting cases alone (calibration.relative_scores: each group on
    its own scale, references pooled on group 0's) -> (relative threshold, present calls (N_h, L) on
    the held-out cases, their scale factor). The held-out labels are not an argument."""
    relative, ref = relative_scores(fit_scores, fit_present, fit_groups)
    t, _ = calibrate_peak_threshold(relative, fit_present)
    factor = _label_free_factor(np.asarray(held_scores, dtype=np.float64), relative * ref[None])
    with np.errstate(invalid="ignore"):
        called = np.asarray(held_scores, dtype=np.float64) / factor / ref[None] >= t
    return float(t), called, factor


def write_existence_scores(path, names: Sequence[str], validation: Dict[str, tuple], training: Dict[str, tuple]) -> None:
    """{case: ({score kind: (L,)}, present (L,))} of both sets -> one JSON file beside the validation."""
    cases = {}
    for what, table in (("validation", validation), ("training_in_sample", training)):
        for c, (scores, present) in sorted(table.items()):
            cases[c] = {"set": what, "present": [bool(p) for p in present],
                        **{k: [float(v) for v in np.asarray(s, dtype=np.float64)] for k, s in scores.items()}}
    atomic_write_text(path, json.dumps({"names": list(names), "cases": cases}, indent=1) + "\n")


def read_existence_scores(path, score: str, sets: Sequence[str] = ("validation",)) -> Tuple[List[str], np.ndarray, np.ndarray]:
    """-> names, (N, L) scores of kind `score` and truth of the cases in `sets`."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        rows = [c for c in d["cases"].values() if c["set"] in sets]
        scores = np.array([c[score] for c in rows], dtype=np.float64).reshape(-1, len(d["names"]))
        present = np.array([c["present"] for c in rows], dtype=bool).reshape(-1, len(d["names"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a readable existence score file with '{score}' scores ({e})") from None
    return list(d["names"]), scores, present


def calibrate_out_of_fold(scores: Sequence[np.ndarray], present: Sequence[np.ndarray], default: float
                          ) -> Tuple[List[np.ndarray], Dict]:
    """Each fold's (N_f, L) validation scores and truth -> each fold's thresholds (one relative threshold
    fitted on all folds, times the references on the fold's own scale, see calibration.relative_scores) and
    the leave-one-fold-out check:
    every fold scored with the threshold fitted on the others."""
    thresholds = []
    for f in range(len(scores)):
        # the fold whose medians set the thresholds is group 0; the others are their own groups
        order = [f] + [g for g in range(len(scores)) if g != f]
        groups = np.concatenate([np.full(len(scores[g]), i) for i, g in enumerate(order)])
        t, info = calibrate_relative_thresholds(np.concatenate([scores[g] for g in order]),
                                                np.concatenate([present[g] for g in order]), default, groups)
        thresholds.append(t)
    info = {**info, "n_cases": int(sum(len(s) for s in scores)), "n_folds": len(scores),
            "fitted_on": "out-of-fold validation predictions of every fold"}
    info.pop("median_present_score", None)  # per fold: in each fold's own file
    check = _leave_one_fold_out(scores, present)
    if check is not None:
        info["leave_one_fold_out"] = check
    return thresholds, info


def _leave_one_fold_out(scores: Sequence[np.ndarray], present: Sequence[np.ndarray]) -> Optional[Dict]:
    """Existence calls on every fold from the fit on the other folds (as `calibrate_out_of_fold` fits:
    each fold on its own scale, references pooled), pooled. The held-out fold's labels only count the
    calls (`_calls_without_labels`)."""
    if len(scores) < 2:
        return None
    calls, truth = [], []
    for f in range(len(scores)):
        rest = [g for g in range(len(scores)) if g != f]
        rest_present = np.concatenate([present[g] for g in rest])
        if not (_fittable(rest_present) and present[rest[0]].any()):
            return None
        groups = np.concatenate([np.full(len(scores[g]), i) for i, g in enumerate(rest)])
        _, called, _ = _calls_without_labels(np.concatenate([scores[g] for g in rest]), rest_present, groups, scores[f])
        calls.append(called)
        truth.append(present[f])
    return existence_f1(np.concatenate([c.ravel() for c in calls]), np.concatenate([p.ravel() for p in truth]))
