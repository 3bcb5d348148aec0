"""Per-landmark uncertainty in millimetres, from what inference already has at hand.

Two cues, both cheap: with several ensemble members (folds and/or test-time mirrors), how far the
members' own peaks scatter around the ensemble's (a direct sample of model disagreement); with one
member (one fold, --disable_tta), the width of the heatmap around the peak (the fitted Gaussian's
standard deviations, voxels -> mm through the grid's own step lengths).
"""
from __future__ import annotations

from typing import Callable

import numpy as np


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
