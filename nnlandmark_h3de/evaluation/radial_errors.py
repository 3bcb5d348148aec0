"""Radial error statistics in world millimetres.

Errors are Euclidean distances between world (LPS mm) points, never voxel offsets scaled by a
spacing, so image orientation and anisotropy cannot leak into a metric. A landmark that is absent
on either side has no error (NaN): it is an existence mistake, not a distance.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence

import numpy as np


def radial_errors(reference_lps: np.ndarray, prediction_lps: np.ndarray) -> np.ndarray:
    """(L,) distances in mm between matching rows; NaN where either point is absent (NaN row)."""
    ref = np.asarray(reference_lps, dtype=np.float64).reshape(-1, 3)
    pred = np.asarray(prediction_lps, dtype=np.float64).reshape(-1, 3)
    if ref.shape != pred.shape:
        raise ValueError(f"reference has {ref.shape[0]} points but prediction has {pred.shape[0]}")
    return np.sqrt(np.sum((ref - pred) ** 2, axis=1))  # NaN rows propagate to NaN


def check_sdr_radii(radii: Iterable[float]) -> tuple:
    """Sorted, unique, positive finite radii in mm (a clear error otherwise)."""
    try:
        values = [float(r) for r in radii]
    except (TypeError, ValueError):
        raise ValueError(f"SDR radii must be numbers in mm, got {radii!r}") from None
    if not values:
        raise ValueError("at least one SDR radius is needed")
    bad = [r for r in values if not np.isfinite(r) or r <= 0]
    if bad:
        raise ValueError(f"SDR radii must be positive finite mm values, got {bad}")
    return tuple(sorted(set(values)))


def sdr_key(radius_mm: float) -> str:
    """Metric name for one radius: 2 -> 'SDR_2mm', 2.5 -> 'SDR_2.5mm'."""
    return f"SDR_{radius_mm:g}mm"


def success_detection_rate(errors_mm: Sequence[float], radius_mm: float) -> Optional[float]:
    """Fraction of the given errors with error <= radius (None when there are no errors)."""
    e = np.asarray(errors_mm, dtype=np.float64)
    if e.size == 0:
        return None
    return float(np.count_nonzero(e <= radius_mm) / e.size)


def error_statistics(errors_mm: Sequence[float], sdr_radii: Sequence[float]) -> Dict[str, Optional[float]]:
    """mean / std (population, ddof=0) / median / max and SDR of finite errors; None when empty."""
    e = np.asarray(errors_mm, dtype=np.float64)
    if np.isnan(e).any():
        raise ValueError("error_statistics got NaN errors: pass only true-positive errors")
    empty = e.size == 0
    stats = {
        "n_errors": int(e.size),
        "mean_radial_error_mm": None if empty else float(np.mean(e)),
        "std_radial_error_mm": None if empty else float(np.std(e)),
        "median_radial_error_mm": None if empty else float(np.median(e)),
        "max_radial_error_mm": None if empty else float(np.max(e)),
    }
    for r in sdr_radii:
        stats[sdr_key(r)] = success_detection_rate(e, r)
    return stats
