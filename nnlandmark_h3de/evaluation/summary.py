"""The metric core: paired landmark sets in, an nnU-Net-shaped summary dict out (no IO).

Shape (like nnU-Net's summary.json): `foreground_mean` holds the overall numbers, labelled
`micro` (pooled over every case and landmark) and `macro` (per-landmark value averaged over
landmarks); `mean` holds one block per landmark; `metric_per_case` one entry per case with
`reference_file`, `prediction_file` and per-landmark status / error. `conventions` states the rules.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from nnlandmark_h3de.evaluation.existence import existence_scores, existence_status
from nnlandmark_h3de.evaluation.radial_errors import check_sdr_radii, error_statistics, radial_errors, sdr_key
from nnlandmark_h3de.evaluation.uncertainty_calibration import uncertainty_error_correlation
from nnlandmark_h3de.landmarks.landmark_set import LandmarkError, LandmarkSet

DEFAULT_SDR_RADII = (2.0, 2.5, 3.0, 4.0)
EXISTENCE_SCORES = ("accuracy", "precision", "recall", "F1")
ERROR_SUMMARIES = ("mean_radial_error_mm", "std_radial_error_mm", "median_radial_error_mm")


def conventions(sdr_radii: Sequence[float]) -> Dict[str, str]:
    """The rules a reader needs to compare our numbers with a paper's."""
    return {
        "units": "millimetres; points are world coordinates (LPS)",
        "radial_error": "Euclidean distance between the reference and predicted world points "
                        "(never voxel offsets scaled by a spacing)",
        "sdr_rule": f"SDR_r = fraction of true-positive landmarks with radial error <= r mm, "
                    f"r in {[float(r) for r in sdr_radii]}",
        "radial_error_population": "true positives only (present in reference and prediction); an "
                                   "absent point never contributes a distance",
        "existence": "per landmark and case: TP present in both, FN reference only, FP prediction "
                     "only, TN absent in both; a landmark name missing from a prediction (or from one "
                     "case's reference) counts as absent there",
        "fractions": "SDR, accuracy, precision, recall and F1 are fractions in [0, 1]",
        "std": "population standard deviation (ddof=0)",
        "micro": "foreground_mean.micro pools every (case, landmark) pair: errors of all true "
                 "positives together, existence counts summed before the scores",
        "macro": "foreground_mean.macro averages the per-landmark values in `mean` over the "
                 "landmarks where that value is defined (each landmark weighs the same)",
        "undefined": "null when a value has no data (no true positive, zero denominator)",
    }


def _restrict_to(pred: LandmarkSet, names: List[str]) -> LandmarkSet:
    """Keep only `names` (used with chill to drop unknown prediction names)."""
    keep = [i for i, n in enumerate(pred.names) if n in set(names)]
    return LandmarkSet([pred.names[i] for i in keep], pred.points_lps[keep], source=pred.source)


def _point(p: np.ndarray) -> Optional[List[float]]:
    return None if np.isnan(p).any() else [float(x) for x in p]


def _landmark_block(status_col: np.ndarray, error_col: np.ndarray, radii) -> dict:
    counts = {k: int(np.count_nonzero(status_col == k)) for k in ("TP", "FP", "FN", "TN")}
    block = {"n_cases": int(status_col.size), **counts, **existence_scores(counts)}
    block.update(error_statistics(error_col[status_col == "TP"], radii))
    return block


def _macro_block(per_landmark: Dict[str, dict], radii) -> dict:
    keys = list(ERROR_SUMMARIES) + [sdr_key(r) for r in radii] + list(EXISTENCE_SCORES)
    macro = {"n_landmarks": len(per_landmark),
             "n_landmarks_with_errors": sum(1 for b in per_landmark.values() if b["n_errors"] > 0)}
    for k in keys:
        vals = [b[k] for b in per_landmark.values() if b[k] is not None]
        macro[k] = float(np.mean(vals)) if vals else None
    return macro


def evaluate_landmarks(reference: Dict[str, LandmarkSet], prediction: Dict[str, LandmarkSet],
                       sdr_radii: Sequence[float] = DEFAULT_SDR_RADII, *, chill: bool = False) -> dict:
    """Compare predicted with reference landmark sets, matched by case key and landmark name.

    The evaluated cases are the prediction's keys (a dataset's reference usually holds more cases
    than one fold predicts). A predicted case without reference, or a predicted landmark name the
    reference does not know, is an error; with `chill` it is skipped and listed under `skipped`.
    """
    radii = check_sdr_radii(sdr_radii)
    skipped: List[dict] = []
    cases = []
    for case in sorted(prediction):
        if case in reference:
            cases.append(case)
            continue
        msg = f"{prediction[case].source}: case {case!r} has no reference landmarks"
        if not chill:
            raise LandmarkError(msg)
        skipped.append({"case": case, "file": prediction[case].source, "reason": "no reference landmarks"})
    if not cases:
        raise LandmarkError("no case has both reference and predicted landmarks: nothing to evaluate")

    # landmark order: the fullest reference case's order, then names only other cases have
    names: List[str] = []
    for case in sorted(cases, key=lambda c: -len(reference[c].names)):
        names.extend(n for n in reference[case].names if n not in names)

    statuses = np.empty((len(cases), len(names)), dtype=object)
    errors = np.full((len(cases), len(names)), np.nan)
    uncertainty = np.full((len(cases), len(names)), np.nan)
    per_case = []
    for c, case in enumerate(cases):
        ref_set = reference[case].reordered(names)  # a name this case's reference lacks = absent
        pred_set = prediction[case]
        unknown = [n for n in pred_set.names if n not in names]
        if unknown:
            msg = f"{pred_set.source}: landmark names {unknown} are not in the reference (known: {names})"
            if not chill:
                raise LandmarkError(msg)
            skipped.append({"case": case, "file": pred_set.source, "landmarks": unknown,
                            "reason": "landmark names not in the reference"})
            pred_set = _restrict_to(pred_set, names)
        pred_set = pred_set.reordered(names)  # a name the prediction lacks = predicted absent
        errors[c] = radial_errors(ref_set.points_lps, pred_set.points_lps)
        if pred_set.uncertainty_mm is not None:
            uncertainty[c] = pred_set.uncertainty_mm
        metrics = {}
        for l, name in enumerate(names):
            status = existence_status(bool(ref_set.present[l]), bool(pred_set.present[l]))
            statuses[c, l] = status
            metrics[name] = {"status": status,
                             "radial_error_mm": float(errors[c, l]) if status == "TP" else None,
                             "reference_lps": _point(ref_set.points_lps[l]),
                             "prediction_lps": _point(pred_set.points_lps[l])}
            if np.isfinite(uncertainty[c, l]):
                metrics[name]["uncertainty_mm"] = float(uncertainty[c, l])
        per_case.append({"case": case, "reference_file": reference[case].source,
                         "prediction_file": prediction[case].source, "metrics": metrics})

    per_landmark = {name: _landmark_block(statuses[:, l], errors[:, l], radii) for l, name in enumerate(names)}
    micro = _landmark_block(statuses.ravel(), errors.ravel(), radii)
    micro["n_points"] = micro.pop("n_cases")
    micro["n_cases"] = len(cases)
    return {
        "conventions": conventions(radii),
        "sdr_radii_mm": [float(r) for r in radii],
        "landmark_names": names,
        "n_cases": len(cases),
        "foreground_mean": {"micro": micro, "macro": _macro_block(per_landmark, radii)},
        "mean": per_landmark,
        "metric_per_case": per_case,
        "uncertainty_vs_error": uncertainty_error_correlation(
            errors[statuses == "TP"], uncertainty[statuses == "TP"],
            landmark=np.broadcast_to(np.arange(len(names)), statuses.shape)[statuses == "TP"]),
        "skipped": skipped,
    }
