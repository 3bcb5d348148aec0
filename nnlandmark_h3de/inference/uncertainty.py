"""Per-landmark uncertainty in millimetres, from what inference already has at hand.

Calibrated, when the final validation wrote fold_X/landmark_uncertainty.json: the landmark's
validation RMS error scaled by how much weaker than usual its peak is and how much more than usual
the test-time mirrors disagree (`UncertaintyModel`, fitted in `training/calibration.py` on one fold's
predictions; with several folds each fold's model sees that fold's own peak and mirrors, see
`per_fold_uncertainty`). Otherwise two raw cues, both cheap: with several ensemble members
(folds and/or test-time mirrors), how far the members' own peaks scatter around the ensemble's (a
direct sample of model disagreement); with one member (one fold, --disable_tta), the width of the
heatmap around the peak (the fitted Gaussian's standard deviations, voxels -> mm through the
grid's own step lengths).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from nnlandmark_h3de.landmarks.atomic import atomic_write_text


def axis_step_mm(index_to_world: Callable[[np.ndarray], np.ndarray], at_idx: np.ndarray) -> np.ndarray:
    """Length in mm of one voxel step along each array axis, measured through the index->world map.

    Works for any affine map (resampling, transposition, direction), so spacings never need to be
    reordered by hand. at_idx: (L, 3) points where to measure (the map is affine: any point will do).
    """
    base = np.nan_to_num(np.atleast_2d(at_idx)[:1], nan=0.0)
    pts = np.concatenate([base, base + np.eye(3)])
    w = index_to_world(pts)
    return np.linalg.norm(w[1:] - w[0], axis=1)


def heatmap_spread_mm(spread_vox: np.ndarray, step_mm: np.ndarray) -> np.ndarray:
    """Radial standard deviation of the peak blob in mm: sqrt(sum_a (sigma_a * step_a)^2); NaN if unknown."""
    return np.sqrt(np.sum((np.asarray(spread_vox) * np.asarray(step_mm)[None]) ** 2, axis=1))


def fold_spread_mm(fold_points: np.ndarray, ensemble_points: np.ndarray) -> np.ndarray:
    """RMS distance (mm) of each fold's point from the ensemble's point: (F, L, 3), (L, 3) -> (L,)."""
    d = np.linalg.norm(np.asarray(fold_points) - np.asarray(ensemble_points)[None], axis=2)
    return np.sqrt(np.mean(d ** 2, axis=0))


def member_spread_mm(member_peaks: Sequence[np.ndarray], points: np.ndarray,
                     index_to_world: Callable[[np.ndarray], np.ndarray]) -> Optional[np.ndarray]:
    """Spread (mm) of the ensemble members' network-space peaks around the ensemble's world points;
    None with fewer than two members (nothing to compare)."""
    if len(member_peaks) < 2:
        return None
    return fold_spread_mm(np.stack([index_to_world(p) for p in member_peaks]), points)


class UncertaintyModel:
    """u (mm) = rms_mm[l] * (ref_peak[l] / peak) ** alpha * (spread / ref_spread_mm[l]) ** beta.

    The last factor only when the members' spread is known (test-time mirrors and/or several folds)
    and was calibrated (beta > 0); the spread is floored at SPREAD_FLOOR x ref_spread_mm so a chance
    agreement of the members does not claim certainty. Stored as fold_X/landmark_uncertainty.json.
    """

    SPREAD_FLOOR = 0.1

    def __init__(self, names: Sequence[str], rms_mm: Sequence[float], ref_peak: Sequence[float], alpha: float,
                 ref_spread_mm: Optional[Sequence[float]] = None, beta: float = 0.0, info: Optional[Dict] = None):
        self.names = list(names)
        self.rms_mm = np.asarray(rms_mm, dtype=np.float64)
        self.ref_peak = np.asarray(ref_peak, dtype=np.float64)
        self.alpha = float(alpha)
        self.ref_spread_mm = (np.full(len(self.names), np.nan) if ref_spread_mm is None
                              else np.asarray(ref_spread_mm, dtype=np.float64))
        self.beta = float(beta)
        self.info = info or {}

    def __call__(self, peak: np.ndarray, spread_mm: Optional[np.ndarray] = None) -> np.ndarray:
        peak = np.maximum(np.asarray(peak, dtype=np.float64), 1e-6)
        u = self.rms_mm * (self.ref_peak / peak) ** self.alpha
        if spread_mm is not None and self.beta > 0:
            ratio = np.maximum(np.asarray(spread_mm, dtype=np.float64) / self.ref_spread_mm, self.SPREAD_FLOOR)
            u = u * np.where(np.isfinite(ratio), ratio, 1.0) ** self.beta
        return u

    def to_json(self) -> Dict:
        return {"names": self.names, "rms_error_mm": self.rms_mm.tolist(), "median_present_peak": self.ref_peak.tolist(),
                "alpha": self.alpha, "median_member_spread_mm": [None if not np.isfinite(v) else float(v)
                                                                 for v in self.ref_spread_mm],
                "beta": self.beta,
                "model": "rms_error_mm * (median_present_peak / peak) ** alpha "
                         "* (member_spread_mm / median_member_spread_mm) ** beta", "fit": self.info}

    def write(self, path) -> None:
        atomic_write_text(path, json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def read(cls, path) -> "UncertaintyModel":
        with open(path) as f:
            d = json.load(f)
        spread = d.get("median_member_spread_mm")
        if not (len(d["names"]) == len(d["rms_error_mm"]) == len(d["median_present_peak"])
                and (spread is None or len(spread) == len(d["names"]))):
            raise ValueError(f"{path}: names, rms_error_mm, median_present_peak and median_member_spread_mm "
                             "differ in length")
        spread = None if spread is None else [np.nan if v is None else v for v in spread]
        return cls(d["names"], d["rms_error_mm"], d["median_present_peak"], d["alpha"], spread, d.get("beta", 0.0),
                   d.get("fit"))

    def reordered(self, names: Sequence[str]) -> "UncertaintyModel":
        """The model in `names` order; landmarks it does not know get NaN (no uncertainty)."""
        pos = {n: i for i, n in enumerate(self.names)}
        take = lambda a: np.array([a[pos[n]] if n in pos else np.nan for n in names])  # noqa: E731
        return UncertaintyModel(names, take(self.rms_mm), take(self.ref_peak), self.alpha, take(self.ref_spread_mm),
                                self.beta, self.info)

    @staticmethod
    def mean(models: Sequence["UncertaintyModel"], names: Sequence[str]) -> "UncertaintyModel":
        """Folds ensembled: mean of their parameters in `names` order."""
        ms = [m.reordered(names) for m in models]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a landmark no fold knows stays NaN
            return UncertaintyModel(names, np.nanmean([m.rms_mm for m in ms], 0), np.nanmean([m.ref_peak for m in ms], 0),
                                    float(np.mean([m.alpha for m in ms])),
                                    np.nanmean([m.ref_spread_mm for m in ms], 0), float(np.mean([m.beta for m in ms])),
                                    {"folds_averaged": len(ms)})


def read_uncertainty_per_fold(model_folder, folds: Sequence, names: Sequence[str]
                              ) -> Optional[List[Optional[UncertaintyModel]]]:
    """Each fold's `fold_X/landmark_uncertainty.json` in `names` order (None for a fold without one);
    None if no fold has one."""
    paths = [Path(model_folder) / f"fold_{f}" / "landmark_uncertainty.json" for f in folds]  # "all" -> fold_all
    models = [UncertaintyModel.read(p).reordered(names) if p.is_file() else None for p in paths]
    return models if any(m is not None for m in models) else None


def read_fold_uncertainty(model_folder, folds: Sequence, names: Sequence[str]) -> Optional[UncertaintyModel]:
    """The folds' models averaged, for outputs where the folds were already averaged (nnLandmark_export);
    nnLandmarkPredictor applies each fold's own model (`per_fold_uncertainty`). None if no fold has one."""
    models = [m for m in read_uncertainty_per_fold(model_folder, folds, names) or [] if m is not None]
    return UncertaintyModel.mean(models, names) if models else None


def per_fold_uncertainty(models: Sequence[Optional[UncertaintyModel]], peaks: Sequence[np.ndarray],
                         spreads_mm: Sequence[Optional[np.ndarray]]) -> Optional[np.ndarray]:
    """Each fold's model applied to that fold's own peak heights and mirror spread (what it was fitted
    on), combined as the root mean square over the folds that have a model: u is an RMS-error scale.
    None when no fold has a model."""
    rows = [m(p, s) for m, p, s in zip(models, peaks, spreads_mm) if m is not None]
    return np.sqrt(np.mean(np.square(rows), axis=0)) if rows else None


def case_uncertainty(fold_models, folds, points: np.ndarray, idx: np.ndarray, width: np.ndarray,
                     to_world) -> np.ndarray:
    """One case's uncertainty (L,) mm: calibrated per fold when every fold has its model (`fold_models`);
    else the spread of all members (folds x mirrors) around the ensemble's points; with a single member
    the heatmap width. folds: the predictor's FoldOutputs (idx, peak, member_idx)."""
    if fold_models is not None:
        spreads = [member_spread_mm(f.member_idx, to_world(f.idx), to_world) for f in folds]
        u = per_fold_uncertainty(fold_models, [f.peak for f in folds], spreads)
        if u is not None:
            return u
    spread = member_spread_mm([m for f in folds for m in f.member_idx], points, to_world)
    return spread if spread is not None else heatmap_spread_mm(width, axis_step_mm(to_world, idx))
