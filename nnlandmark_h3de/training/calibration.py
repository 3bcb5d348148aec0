"""What the final validation learns from the fold's validation cases, stored next to the checkpoints.

Existence thresholds. Landmarks differ in how high their peaks get (a crisp eye vs a faint rod end):
measured on generated phantoms, present "rod_bottom" peaks at 0.2-0.3 while an absent eye still
peaks at 0.5-0.8, so no single threshold separates present from absent. Each score is therefore
divided by its landmark's median score where it is present (one robust number per landmark, not a
per-landmark threshold fitted to a handful of cases; with in-sample training cases too, their present
scores join the median after one factor puts them on the validation scale), and one threshold on that
relative score is chosen for the best F1 over all (case, landmark) pairs.

Uncertainty. The error a user should expect for a landmark is mostly the landmark's own
difficulty (its validation RMS error, shrunk in log toward the all-landmark RMS when it has few cases),
scaled per case by how much weaker than usual its peak is and, when test-time mirrors are run, by
how much more than usual the mirrors' peaks disagree: u = s_l * (ref_l / peak) ** alpha *
(spread / ref_spread_l) ** beta, alpha, beta >= 0 fitted on the validation errors (log-linear
least squares within landmarks, so they model the case-to-case part only).

Local peak floor (two-stage prediction). The local network's peak replaces the global estimate
only where it is at least t times the landmark's median validation peak; t (one number) is the value
with the lowest validation error of the combined points, from t = 0 (always the local peak) to
t = inf (always the global estimate). A weakly trained local network cannot make a good global stage
worse on the cases it was chosen on.

Local weights (two-stage prediction). The point is global + w_l (local - global), one w_l per landmark:
a young local network is good on some landmarks and worse than registration on others (on AFIDs the
ventral occipital horns, on validation and test alike). With a handful of validation cases a landmark's
own errors are noisy, so w_l minimises its own validation error plus LOCAL_WEIGHT_PRIOR_CASES cases'
worth of the pooled error curve (the single weight of before), shrinking each weight towards it.
"""
from __future__ import annotations

import itertools
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from nnlandmark_h3de.inference.two_stage_tiles import blend_points
from nnlandmark_h3de.inference.uncertainty import UncertaintyModel
from nnlandmark_h3de.training.landmark_validation import calibrate_peak_threshold

__all__ = ["reference_scores", "relative_scores", "calibrate_relative_thresholds", "fit_uncertainty_model", "fit_local_peak_floor",
           "fit_local_weight", "fit_local_weights"]

# Cases of one landmark worth as much as the pooled estimate when shrinking its RMS error.
SHRINKAGE_CASES = 3.0
# Validation cases' worth of the pooled error curve added to each landmark's own when fitting its local weight.
LOCAL_WEIGHT_PRIOR_CASES = 2.0
# Without absent validation landmarks: absent = under this fraction of the landmark's median present score.
DEFAULT_RELATIVE_THRESHOLD = 0.25
MAX_EXPONENT = 3.0


def reference_scores(scores: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Per landmark the median score over the cases where it is present, (N, L) -> (L,).

    NaN scores (no peak searched: the global stage put the landmark outside the image) do not count;
    a landmark without any such score gets the median over all of them (NaN if there are none).
    """
    scores, present = np.asarray(scores, dtype=np.float64), np.asarray(present, dtype=bool)
    usable = present & np.isfinite(scores)
    pooled = np.median(scores[usable]) if usable.any() else np.nan
    ref = np.array([np.median(scores[usable[:, l], l]) if usable[:, l].any() else pooled
                    for l in range(scores.shape[1])])
    return np.maximum(ref, 1e-6)


def calibrate_relative_thresholds(scores: np.ndarray, present: np.ndarray, default: float,
                                  groups: Optional[np.ndarray] = None) -> Tuple[np.ndarray, Dict]:
    """(N, L) scores and truth -> per-landmark thresholds (L,) = t * median present score, and how.

    `groups` (N,) ints: cases whose peaks run at different heights (0 = validation cases, on whose
    scale the thresholds are; 1 = training cases predicted in-sample, where the network's present
    peaks are higher and its absent ones lower): each group on its own scale, the per-landmark
    references pooled over all groups (`relative_scores`), then one t is fitted on all of them.
    Validation cases without any absent landmark give no threshold to fit: then a landmark is called
    absent only when its score is under DEFAULT_RELATIVE_THRESHOLD of its usual present score (so a
    model with low peaks everywhere does not lose landmarks to an absolute cut). With no present
    landmark at all, every landmark gets the absolute `default`.
    """
    scores, present = np.asarray(scores, dtype=np.float64), np.asarray(present, dtype=bool)
    groups = np.zeros(len(scores), dtype=int) if groups is None else np.asarray(groups, dtype=int)
    if not present[groups == 0].any():
        t, info = calibrate_peak_threshold(scores, present)  # describes why there is nothing to fit
        return np.full(scores.shape[1], float(default)), {**info, "threshold": float(default)}
    relative, ref = relative_scores(scores, present, groups)
    t, info = calibrate_peak_threshold(relative, present)
    described = {"relative_threshold": float(t), "median_present_score": ref.tolist()}
    if info["method"] == "default":
        t = DEFAULT_RELATIVE_THRESHOLD
        return t * ref, {**info, **described, "method": "default_relative_to_median_present", "relative_threshold": t}
    return t * ref, {**info, **described, "method": "best_f1_relative_to_median_present"}


def relative_scores(scores: np.ndarray, present: np.ndarray, groups: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Scores divided by their landmark's reference score on their group's scale; returns them and the
    references on group 0's scale (what the thresholds are multiplied by).

    A group's scale is one factor against group 0 (the median over landmarks of its per-landmark median
    present score over group 0's): in-sample peaks run higher by about the same factor everywhere. The
    per-landmark reference is the median of every group's present scores divided by its factor: a
    landmark's median over 4-5 validation peaks alone is noisy, and a reference set too high by chance
    calls that landmark absent on new cases."""
    groups = np.asarray(groups, dtype=int)
    base = reference_scores(scores[groups == 0], present[groups == 0])
    factor = np.ones(len(scores))
    for g in np.unique(groups[groups != 0]):
        rows = groups == g
        ratio = reference_scores(scores[rows], present[rows]) / base
        ratio = ratio[np.isfinite(ratio)]
        factor[rows] = float(np.median(ratio)) if ratio.size else 1.0
    ref = reference_scores(scores / factor[:, None], present)
    return scores / factor[:, None] / ref[None], ref


def _within_landmark(values: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Concatenate each landmark's valid values minus their mean (landmarks with >= 2 values)."""
    parts = [values[ok[:, l], l] - values[ok[:, l], l].mean() for l in range(values.shape[1]) if ok[:, l].sum() >= 2]
    return np.concatenate(parts) if parts else np.zeros(0)


def _nonnegative_slopes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares y ~ x @ b through 0 with 0 <= b <= MAX_EXPONENT (exhaustive over active sets:
    a cue may only raise the uncertainty when it says the prediction is worse)."""
    best, best_rss = np.zeros(x.shape[1]), float(np.sum(y ** 2))
    for k in range(1, x.shape[1] + 1):
        for cols in itertools.combinations(range(x.shape[1]), k):
            sub = x[:, cols]
            if np.linalg.matrix_rank(sub) < k:
                continue
            b = np.linalg.lstsq(sub, y, rcond=None)[0]
            if (b < 0).any():
                continue
            b = np.minimum(b, MAX_EXPONENT)
            rss = float(np.sum((y - sub @ b) ** 2))
            if rss < best_rss:
                best, best_rss = np.zeros(x.shape[1]), rss
                best[list(cols)] = b
    return best


def fit_uncertainty_model(names: Sequence[str], errors_mm: np.ndarray, peaks: np.ndarray, present: np.ndarray,
                          spread_mm: Optional[np.ndarray] = None) -> UncertaintyModel:
    """Fit on the validation cases, all (N, L): radial errors (NaN where not evaluable), peak heights,
    reference presence, and optionally the mirrors' peak spread (mm).

    rms_mm[l]: RMS error of landmark l, shrunk (in log) toward the pooled RMS with weight SHRINKAGE_CASES;
    alpha, beta: slopes of log error on log(ref / peak) and log(spread / median spread) within
    landmarks, non-negative least squares.
    """
    e = np.asarray(errors_mm, dtype=np.float64)
    p = np.asarray(peaks, dtype=np.float64)
    ok = np.isfinite(e) & np.isfinite(p) & np.asarray(present, dtype=bool)
    ref = reference_scores(np.where(ok, p, np.nan), ok)
    use_spread = spread_mm is not None and np.isfinite(np.asarray(spread_mm, dtype=np.float64)[ok]).all() and ok.any()
    ref_spread = None
    if use_spread:
        spread = np.asarray(spread_mm, dtype=np.float64)
        ref_spread = reference_scores(np.where(ok, spread, np.nan), ok)
    if not ok.any():
        return UncertaintyModel(names, np.full(len(names), np.nan), ref, 0.0, info={"n_points": 0})
    pooled_ms = float(np.mean(e[ok] ** 2))
    n_l = ok.sum(0)
    ms_l = np.array([np.mean(e[ok[:, l], l] ** 2) if n_l[l] else pooled_ms for l in range(e.shape[1])])
    # geometric shrinkage: a scale, so a faint landmark is not dragged toward the hardest one's errors
    rms = np.exp((n_l * 0.5 * np.log(np.maximum(ms_l, 1e-12)) + SHRINKAGE_CASES * 0.5 * np.log(max(pooled_ms, 1e-12)))
                 / (n_l + SHRINKAGE_CASES))
    y = _within_landmark(np.log(np.maximum(e, 1e-3)), ok)
    cues = [_within_landmark(np.log(ref[None] / np.maximum(p, 1e-6)), ok)]
    if use_spread:
        floor = UncertaintyModel.SPREAD_FLOOR
        cues.append(_within_landmark(np.log(np.maximum(spread / ref_spread[None], floor)), ok))
    slopes = _nonnegative_slopes(np.stack(cues, axis=1), y) if y.size else np.zeros(len(cues))
    alpha, beta = float(slopes[0]), float(slopes[1]) if use_spread else 0.0
    return UncertaintyModel(names, rms, ref, alpha, ref_spread, beta,
                            {"n_points": int(ok.sum()), "pooled_rms_mm": float(np.sqrt(pooled_ms)),
                             "shrinkage_cases": SHRINKAGE_CASES, "spread_cue": bool(use_spread)})


def fit_local_peak_floor(local_err: np.ndarray, global_err: np.ndarray, peaks: np.ndarray) -> Tuple[np.ndarray, Dict]:
    """(V, L) validation errors of the local peaks and of the global estimates, and the local peak
    heights -> per-landmark peak floors (L,) (inf = never the local peak) and how they were chosen."""
    local_err, global_err, peaks = (np.asarray(a, dtype=np.float64) for a in (local_err, global_err, peaks))
    ok = np.isfinite(local_err) & np.isfinite(global_err) & np.isfinite(peaks)
    if not ok.any():
        return np.zeros(peaks.shape[1]), {"method": "nothing to fit: always the local peak", "relative_floor": 0.0}
    ref = reference_scores(np.where(ok, peaks, np.nan), ok)
    relative = peaks / ref[None]
    candidates = np.concatenate([[0.0], np.unique(relative[ok]), [np.inf]])

    def combined(t):
        return float(np.mean(np.where(relative >= t, local_err, global_err)[ok]))

    errors = [combined(t) for t in candidates]
    best = int(np.argmin(errors))  # ties: the lowest floor (more local peaks)
    t = float(candidates[best])
    info = {"method": "lowest validation MRE of the combined points", "relative_floor": t,
            "mre_mm": errors[best], "mre_local_mm": errors[0], "mre_global_mm": errors[-1],
            "local_used_fraction": float(np.mean((relative >= t)[ok])), "n": int(ok.sum())}
    return t * ref, info


def _blend_error_curves(local_pts, global_pts, truth, grid: int):
    """Weights w = 1, ..., 1/grid, 0 (W,), the error of global + w (local - global) at every point where all
    three are finite (W, N, in the order of `ok`), and that mask `ok` (the points' leading shape)."""
    g, l, t = (np.asarray(a, dtype=np.float64) for a in (global_pts, local_pts, truth))
    ok = np.isfinite(g).all(-1) & np.isfinite(l).all(-1) & np.isfinite(t).all(-1)
    weights = np.round(np.linspace(1.0, 0.0, grid + 1), 6)
    errors = np.array([np.linalg.norm(blend_points(g[ok], l[ok], w) - t[ok], axis=-1) for w in weights])
    return weights, errors.reshape(len(weights), -1), ok


def _pooled_weight(weights: np.ndarray, mre: Sequence[float], n: int) -> Tuple[float, Dict]:
    """The weight with the lowest mean error over all points (`mre`: one per weight); ties keep the larger."""
    best = int(np.argmin(mre))  # first minimum from w = 1 down: ties keep the larger weight
    return float(weights[best]), {"method": "lowest validation MRE of global + w (local - global)",
                                  "weight": float(weights[best]), "mre_mm": mre[best],
                                  "mre_local_mm": mre[0], "mre_global_mm": mre[-1], "n": int(n)}


def fit_local_weight(local_pts: np.ndarray, global_pts: np.ndarray, truth: np.ndarray,
                     grid: int = 20) -> Tuple[float, Dict]:
    """How far to move from the global estimate towards the local peak, fitted on validation points (..., 3).

    Why: the global stage and the local network err independently (registration misses nonlinear
    shape, a young network confuses nearby structures), so a weighted mean of both can beat each alone,
    as a measurement fused with its prior does. The weight w in {0, 1/grid, ..., 1} with the lowest
    validation MRE of global + w (local - global) is kept; ties keep the larger w (1 = the local peak,
    the behaviour before this fit existed)."""
    weights, errors, ok = _blend_error_curves(local_pts, global_pts, truth, grid)
    if not ok.any():
        return 1.0, {"method": "nothing to fit: the local peak", "weight": 1.0}
    return _pooled_weight(weights, [float(np.mean(e)) for e in errors], errors.shape[1])


def fit_local_weights(local_pts: np.ndarray, global_pts: np.ndarray, truth: np.ndarray, grid: int = 20,
                      prior_cases: float = LOCAL_WEIGHT_PRIOR_CASES) -> Tuple[np.ndarray, Dict]:
    """One local weight per landmark from validation points (C, L, 3), shrunk towards the pooled weight.

    For each w in {0, 1/grid, ..., 1}: the landmark's summed validation error of global + w (local - global)
    plus `prior_cases` times the pooled mean error (all landmarks) at that w; the lowest wins, ties keep the
    larger w. A landmark without validation points gets the pooled weight (`fit_local_weight`)."""
    weights, errors, ok = _blend_error_curves(local_pts, global_pts, truth, grid)  # ok: (C, L)
    if not ok.any():
        return np.ones(ok.shape[1]), {"method": "nothing to fit: the local peak", "weight": 1.0,
                                      "per_landmark": False}
    mre = [float(np.mean(e)) for e in errors]
    pooled_w, info = _pooled_weight(weights, mre, errors.shape[1])
    per_point = np.zeros((len(weights),) + ok.shape)  # (W, C, L), 0 where a point is missing
    per_point[:, ok] = errors
    objective = per_point.sum(1) + prior_cases * np.array(mre)[:, None]  # (W, L)
    per_landmark = weights[np.argmin(objective, axis=0)]  # first minimum from w = 1 down
    per_landmark = np.where(ok.any(0), per_landmark, pooled_w)
    g, l, t = (np.asarray(a, dtype=np.float64) for a in (global_pts, local_pts, truth))
    blended = np.where(ok, np.linalg.norm(blend_points(g, l, per_landmark) - t, axis=-1), np.nan)
    return per_landmark, {**info, "method": "per landmark: lowest validation error of global + w_l (local - global) "
                                            f"plus {prior_cases:g} cases' worth of the pooled error",
                          "per_landmark": True, "pooled_weight": pooled_w, "prior_cases": prior_cases,
                          "mre_mm": float(np.nanmean(blended)), "mre_pooled_mm": info["mre_mm"]}
