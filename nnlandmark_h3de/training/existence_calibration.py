"""Existence calibration on every case that can teach it, and how well it carries to other cases.

A fold's few validation cases often hold no absent landmark at all (the demo's 3 had none), so the
thresholds fell back to a default. Two more sources of (case, landmark) pairs:
- training cases predicted at the end of training (in-sample, so labelled as such; their peaks are
  compared with their own set's median present peaks, see calibration.calibrate_relative_thresholds);
- out-of-fold predictions: each trained fold's validation cases, pooled over folds by
  `nnLandmark_calibrate_existence` (every fold on its own scale, medians pooled; one relative
  threshold for all).
Each fit is also scored on cases it was not fitted on (`held_out_existence_check`,
`leave_one_fold_out`), so the figure a user reads is not the one the threshold was chosen on.

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
    (group 0) with it: how well in-sample calibration carries to unseen cases. Each set is relative to
    its own medians (pooled references would let the validation cases shape the training fit). None when
    either set cannot say (no present or no absent landmark)."""
    val, train = groups == 0, groups == 1
    if not (_fittable(present[val]) and _fittable(present[train])):
        return None
    relative = np.empty_like(np.asarray(scores, dtype=np.float64))
    for rows in (val, train):
        relative[rows] = relative_scores(scores[rows], present[rows], np.zeros(int(rows.sum()), dtype=int))[0]
    t, _ = calibrate_peak_threshold(relative[train], present[train])
    return {"fitted_on": f"{int(train.sum())} training cases (in-sample)",
            "scored_on": f"{int(val.sum())} validation cases", "relative_threshold": float(t),
            **existence_f1(relative[val] >= t, present[val])}


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
    """Existence calls on every fold from the relative threshold fitted on the other folds, pooled."""
    if len(scores) < 2:
        return None
    calls, truth = [], []
    relative = [relative_scores(s, p, np.zeros(len(s), dtype=int))[0] for s, p in zip(scores, present)]
    for f in range(len(scores)):
        rest = [g for g in range(len(scores)) if g != f]
        rest_present = np.concatenate([present[g] for g in rest])
        if not _fittable(rest_present):
            return None
        t, _ = calibrate_peak_threshold(np.concatenate([relative[g] for g in rest]), rest_present)
        calls.append(relative[f] >= t)
        truth.append(present[f])
    return existence_f1(np.concatenate([c.ravel() for c in calls]), np.concatenate([p.ravel() for p in truth]))
