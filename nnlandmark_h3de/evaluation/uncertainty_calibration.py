"""Does the predicted per-landmark uncertainty rank the real errors? (Spearman over true positives.)

A user checks the landmarks with the highest uncertainty by hand; that only helps if uncertainty
and radial error are rank-correlated, so the summary reports the correlation next to the errors:
pooled over all points (which landmarks and which cases to check), and within landmarks (does the
uncertainty also rank the cases of one landmark, beyond knowing which landmarks are hard).
"""
from __future__ import annotations

from typing import Optional

import numpy as np


def _spearman(u: np.ndarray, e: np.ndarray):
    """(rho, p) or None for fewer than 3 pairs or a constant side."""
    if u.size < 3 or np.ptp(e) == 0 or np.ptp(u) == 0:
        return None
    from scipy.stats import spearmanr

    res = spearmanr(u, e)
    return float(res.statistic), float(res.pvalue)


def uncertainty_error_correlation(errors_mm: np.ndarray, uncertainty_mm: np.ndarray,
                                  landmark: Optional[np.ndarray] = None) -> Optional[dict]:
    """Spearman rank correlation between radial errors and predicted uncertainties (finite pairs only).

    With `landmark` (the landmark index of each pair) also the within-landmark rho: the mean of the
    per-landmark Spearman rhos weighted by their number of points (landmarks with >= 3 points and
    non-constant values). None when there is nothing to correlate.
    """
    e = np.asarray(errors_mm, dtype=np.float64).ravel()
    u = np.asarray(uncertainty_mm, dtype=np.float64).ravel()
    ok = np.isfinite(e) & np.isfinite(u)
    pooled = _spearman(u[ok], e[ok])
    if pooled is None:
        return None
    out = {"spearman_rho": pooled[0], "p_value": pooled[1], "n_points": int(ok.sum()),
           "population": "true positives whose prediction carries an uncertainty"}
    if landmark is not None:
        g = np.asarray(landmark).ravel()[ok]
        rhos = [(r[0], int((g == k).sum())) for k in np.unique(g)
                if (r := _spearman(u[ok][g == k], e[ok][g == k])) is not None]
        if rhos:
            w = np.array([n for _, n in rhos], dtype=np.float64)
            out["within_landmark_spearman_rho"] = float(np.sum(w * [r for r, _ in rhos]) / w.sum())
            out["within_landmark_n_landmarks"] = len(rhos)
    return out
