"""Landmark postprocessing after decoding, each step switchable: left/right pair check, absent landmarks.

Both steps work on world LPS points (never voxel indices), so they hold for any image orientation:
in LPS, +x points to the patient's Left, hence a left landmark must have the larger x.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from nnlandmark_h3de.landmarks.landmark_set import LandmarkSet


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
        try:
            from nnlandmark_h3de.landmarks import find_lr_pairs
        except ImportError:
            return []
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


def apply_absent_thresholds(ls: LandmarkSet, scores: np.ndarray, thresholds) -> Tuple[LandmarkSet, List[str]]:
    """Landmarks whose score is below their threshold become absent (NaN); `confidence` = the score.

    `thresholds`: scalar or (L,) array; NaN entries mean "never absent". Returns the set and the
    names made absent.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    thr = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), scores.shape)
    out = _copy(ls)
    out.confidence = scores.copy()
    absent = np.nan_to_num(scores, nan=-np.inf) < np.where(np.isnan(thr), -np.inf, thr)
    out.points_lps[absent] = np.nan
    return out, [n for n, a in zip(ls.names, absent) if a]


def read_fold_thresholds(model_folder, folds: Sequence, names: Sequence[str]) -> Tuple[Optional[np.ndarray], Optional[str]]:
    """Mean over the given folds of `fold_X/landmark_thresholds.json`, in `names` order.

    Returns (thresholds (L,) or None when no fold has the file, score kind 'peak'|'anchor').
    Folds without the file are skipped with a warning; a landmark missing from a file counts as NaN
    there (the mean ignores it).
    """
    rows, kinds, missing = [], set(), []
    for f in folds:
        fold_dir = Path(model_folder) / f"fold_{f}"  # "all" -> fold_all
        path = fold_dir / "landmark_thresholds.json"
        if not path.is_file():
            missing.append(str(f))
            continue
        d = json.loads(path.read_text())
        if len(d["names"]) != len(d["threshold"]):
            raise ValueError(f"{path}: {len(d['names'])} names but {len(d['threshold'])} thresholds")
        by_name = {n: (np.nan if t is None else float(t)) for n, t in zip(d["names"], d["threshold"])}
        rows.append([by_name.get(n, np.nan) for n in names])
        kinds.add(d.get("score", "peak"))
    if missing and rows:
        warnings.warn(f"landmark_thresholds.json missing for fold(s) {', '.join(missing)}; averaging the others")
    if not rows:
        return None, None
    if len(kinds) > 1:
        raise ValueError(f"{model_folder}: folds calibrated different scores {sorted(kinds)}; cannot average")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN column -> NaN = never absent
        return np.nanmean(np.asarray(rows, dtype=np.float64), axis=0), kinds.pop()


def postprocess(ls: LandmarkSet, scores: np.ndarray, options: PostprocessingOptions,
                pairs: Sequence[Tuple[str, str]] = (), thresholds: Optional[np.ndarray] = None
                ) -> Tuple[LandmarkSet, dict]:
    """Absent check (on the decoded scores), then the left/right check; returns the set and a report."""
    report = {"absent": [], "swapped": []}
    out = _copy(ls)
    out.confidence = np.asarray(scores, dtype=np.float64).copy()
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
