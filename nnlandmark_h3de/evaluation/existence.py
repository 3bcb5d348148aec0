"""Existence (is the landmark there at all?) as a binary detection problem per landmark.

TP = present in reference and prediction, FN = reference only, FP = prediction only,
TN = absent in both. Scores whose denominator is zero are undefined (None), not 0 or 1.
"""
from __future__ import annotations

from typing import Dict, Optional


def existence_status(reference_present: bool, prediction_present: bool) -> str:
    """'TP' | 'FP' | 'FN' | 'TN' for one landmark of one case."""
    if reference_present:
        return "TP" if prediction_present else "FN"
    return "FP" if prediction_present else "TN"


def _ratio(num: int, den: int) -> Optional[float]:
    return None if den == 0 else float(num / den)


def existence_scores(counts: Dict[str, int]) -> Dict[str, Optional[float]]:
    """accuracy, precision, recall, F1 from counts (None where the denominator is zero)."""
    tp, fp, fn, tn = (int(counts[k]) for k in ("TP", "FP", "FN", "TN"))
    return {
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "F1": _ratio(2 * tp, 2 * tp + fp + fn),
    }
