"""Landmark postprocessing after decoding, each step switchable: left/right pair check, absent landmarks.

Both steps work on world LPS points (never voxel indices), so they hold for any image orientation:
in LPS, +x points to the patient's Left, hence a left landmark must have the larger x.

Existence with several folds: each fold's threshold was calibrated on that fold's own scores, so
each fold's score is compared with its own threshold (`existence_ratio`: score / threshold, 1 =
on the threshold) and the folds' ratios are averaged, a soft majority vote: one fold gives exactly
its calibrated decision, and folds that agree are never overruled.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from nnlandmark_h3de.landmarks.landmark_set import LandmarkSet
from nnlandmark_h3de.landmarks.pairs import find_lr_pairs


@dataclass
class PostprocessingOptions:
    """What the predictor / exporter applies; `threshold` overrides the calibrated thresholds."""

    lr_check: bool = True
    absent: bool = True
    threshold: Optional[float] = None


def resolve_pairs(dataset_json: Optional[dict], names: Sequence[str]) -> List[Tuple[str, str]]:
    """(left, right) name pairs: dataset.json `landmarks.pairs` first, else guessed from the names."""
    block = (dataset_json or {}).get("landmarks") or {}
    if "pairs" in block:
        pairs = [tuple(p) for p in block["pairs"]]
    else:
        pairs = [tuple(p) for p in find_lr_pairs(list(names))]
    unknown = sorted({n for p in pairs for n in p if n not in names})
    if unknown:
        raise ValueError(f"left/right pairs name unknown landmarks {unknown}")
    return pairs


def check_lr_pairs(ls: LandmarkSet, pairs: Sequence[Tuple[str, str]]) -> Tuple[LandmarkSet, List[Tuple[str, str]]]:
    """Swap each (left, right) pair whose left point lies at smaller LPS x than its right partner.

    Returns the corrected set (a copy) and the pairs that were swapped; confidence and uncertainty
    travel with the point. Pairs with an absent member are left alone.
    """
    out = _copy(ls)
    index = {n: i for i, n in enumerate(ls.names)}
    swapped = []
    for left, right in pairs:
        i, j = index[left], index[right]
        if not (out.present[i] and out.present[j]):
            continue
        if out.points_lps[i, 0] < out.points_lps[j, 0]:
            for arr in (out.points_lps, out.confidence, out.uncertainty_mm):
                if arr is not None:
                    arr[[i, j]] = arr[[j, i]]
            swapped.append((left, right))
    return out, swapped


def existence_ratio(scores: np.ndarray, thresholds) -> np.ndarray:
    """Mean over folds of score / threshold, (L,); a landmark is present where it is >= 1.

    scores: (L,) or per fold (F, L); thresholds: scalar, (L,) or (F, L). A NaN threshold means the
    fold has no calibration for that landmark and does not vote (no fold votes: +inf, never absent);
    a NaN score votes absent; a threshold <= 0 votes present for any score at or above it.
    """
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    thr = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), scores.shape)
    s = np.nan_to_num(scores, nan=-np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(thr > 0, s / thr, np.where(s >= thr, np.inf, 0.0))
    ratio = np.where(np.isnan(thr), np.nan, np.maximum(ratio, 0.0))
    voted = ~np.isnan(ratio)
    n = voted.sum(axis=0)
    return np.where(n > 0, np.where(voted, ratio, 0.0).sum(axis=0) / np.maximum(n, 1), np.inf)


def apply_absent_thresholds(ls: LandmarkSet, scores: np.ndarray, thresholds) -> Tuple[LandmarkSet, List[str]]:
    """Landmarks whose `existence_ratio` is below 1 become absent (NaN); `confidence` = the score
    (the folds' mean with per-fold scores).

    scores: (L,) or (F, L); `thresholds`: scalar, (L,) or (F, L); NaN entries mean "never absent".
    Returns the set and the names made absent.
    """
    out = _copy(ls)
    out.confidence = fold_mean(scores)
    absent = existence_ratio(scores, thresholds) < 1.0
    out.points_lps[absent] = np.nan
    return out, [n for n, a in zip(ls.names, absent) if a]


def fold_mean(scores: np.ndarray) -> np.ndarray:
    """(L,) scores as they are, (F, L) per-fold scores averaged over the folds."""
    scores = np.asarray(scores, dtype=np.float64)
    return scores.copy() if scores.ndim == 1 else scores.mean(axis=0)


def read_thresholds_per_fold(model_folder, folds: Sequence, names: Sequence[str]
                             ) -> Tuple[Optional[np.ndarray], Optional[str]]:
    """Each fold's `fold_X/landmark_thresholds.json` in `names` order: (F, L) or None when no fold has
    the file, and the score kind 'peak'|'anchor'.

    A fold without the file gets a NaN row (it does not vote), with a warning; a landmark missing
    from a file is NaN there.
    """
    rows, kinds, missing = [], set(), []
    for f in folds:
        path = Path(model_folder) / f"fold_{f}" / "landmark_thresholds.json"  # "all" -> fold_all
        if not path.is_file():
            missing.append(str(f))
            rows.append([np.nan] * len(names))
            continue
        d = json.loads(path.read_text())
        if len(d["names"]) != len(d["threshold"]):
            raise ValueError(f"{path}: {len(d['names'])} names but {len(d['threshold'])} thresholds")
        by_name = {n: (np.nan if t is None else float(t)) for n, t in zip(d["names"], d["threshold"])}
        rows.append([by_name.get(n, np.nan) for n in names])
        kinds.add(d.get("score", "peak"))
    if not kinds:
        return None, None
    if missing:
        warnings.warn(f"landmark_thresholds.json missing for fold(s) {', '.join(missing)}; "
                      f"absent landmarks are decided by the other folds")
    if len(kinds) > 1:
        raise ValueError(f"{model_folder}: folds calibrated different scores {sorted(kinds)}; cannot combine")
    return np.asarray(rows, dtype=np.float64), kinds.pop()


def read_fold_thresholds(model_folder, folds: Sequence, names: Sequence[str]) -> Tuple[Optional[np.ndarray], Optional[str]]:
    """Mean over the folds of their thresholds, (L,), for outputs where the folds were already averaged
    (nnLandmark_export of nnUNetv2_predict's output); nnLandmarkPredictor uses `read_thresholds_per_fold`."""
    rows, kind = read_thresholds_per_fold(model_folder, folds, names)
    if rows is None:
        return None, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN column -> NaN = never absent
        return np.nanmean(rows, axis=0), kind


def postprocess(ls: LandmarkSet, scores: np.ndarray, options: PostprocessingOptions,
                pairs: Sequence[Tuple[str, str]] = (), thresholds: Optional[np.ndarray] = None
                ) -> Tuple[LandmarkSet, dict]:
    """Absent check (on the decoded scores, (L,) or per fold (F, L) against (F, L) thresholds), then the
    left/right check; returns the set and a report."""
    report = {"absent": [], "swapped": []}
    out = _copy(ls)
    out.confidence = fold_mean(scores)
    if options.absent:
        thr = options.threshold if options.threshold is not None else thresholds
        if thr is not None:
            out, report["absent"] = apply_absent_thresholds(out, scores, thr)
    if options.lr_check and pairs:
        out, report["swapped"] = check_lr_pairs(out, pairs)
    return out, report


def _copy(ls: LandmarkSet) -> LandmarkSet:
    return LandmarkSet(list(ls.names), ls.points_lps.copy(),
                       None if ls.confidence is None else ls.confidence.copy(),
                       None if ls.uncertainty_mm is None else ls.uncertainty_mm.copy(),
                       None if ls.descriptions is None else list(ls.descriptions), ls.source)
