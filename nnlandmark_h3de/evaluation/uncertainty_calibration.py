"""Does the predicted per-landmark uncertainty rank the real errors? (Spearman over true positives.)

A user checks the landmarks with the highest uncertainty by hand; that only helps if uncertainty
and radial error are rank-correlated, so the summary reports the correlation next to the errors.
"""
from __future__ import annotations

from typing import Optional

import numpy as np


def uncertainty_error_correlation(errors_mm: np.ndarray, uncertainty_mm: np.ndarray) -> Optional[dict]:
    """Spearman rank correlation between radial errors and predicted uncertainties (finite pairs only).

    None when there is nothing to correlate (no uncertainty given, or fewer than 3 pairs, or a constant).
    """
    e = np.asarray(errors_mm, dtype=np.float64).ravel()
    u = np.asarray(uncertainty_mm, dtype=np.float64).ravel()
    ok = np.isfinite(e) & np.isfinite(u)
    if ok.sum() < 3 or np.ptp(e[ok]) == 0 or np.ptp(u[ok]) == 0:
        return None
    from scipy.stats import spearmanr

    res = spearmanr(u[ok], e[ok])
    return {"spearman_rho": float(res.statistic), "p_value": float(res.pvalue), "n_points": int(ok.sum()),
            "population": "true positives whose prediction carries an uncertainty"}
