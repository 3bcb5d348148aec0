"""What the landmark trainer measures: radial errors on validation patches every epoch, and the
existence threshold calibrated in the final validation.

Patch errors compare the sub-voxel peak of each predicted heatmap with the landmark's point in the
patch (the batch's target, where the heatmap target is centred), in mm of the target spacing, for
the landmarks present in the patch only.
"""
from __future__ import annotations

import json
from typing import Dict, Sequence, Tuple

import numpy as np
import torch

from nnlandmark_h3de.inference.peaks import decode_peaks
from nnlandmark_h3de.landmarks.atomic import atomic_write_text

__all__ = ["patch_radial_errors", "calibrate_peak_threshold", "write_thresholds", "DEFAULT_PEAK_THRESHOLD",
           "unlearned_landmarks", "UNLEARNED_PEAK"]

# Used when the validation cases give nothing to calibrate on (every landmark present everywhere,
# or absent everywhere): a trained peak is ~1 where the landmark is, so 0.1 only drops flat maps.
DEFAULT_PEAK_THRESHOLD = 0.1

# A heatmap channel starts at sigmoid(logit_offset) = 0.018 everywhere (landmark_network.py) and a learned
# one peaks near 1 at its landmark; one whose peak stays under this on every validation case never left
# its start (with the sigmoid's MSE, whose gradient vanishes there, that can last a whole short training).
UNLEARNED_PEAK = 0.05


def unlearned_landmarks(peaks: np.ndarray, names: Sequence[str], floor: float = UNLEARNED_PEAK) -> list:
    """Names of the landmarks whose heatmap peak (sigmoid height) stays under `floor` on every case.

    peaks: (cases, L); NaN = not searched (no global estimate). A landmark never searched is not listed.
    """
    peaks = np.asarray(peaks, dtype=np.float64).reshape(-1, len(names))
    highest = np.where(np.isfinite(peaks), peaks, -np.inf).max(0, initial=-np.inf)
    return [n for n, h in zip(names, highest) if -np.inf < h < floor]


@torch.no_grad()
def patch_radial_errors(output: torch.Tensor, points: torch.Tensor, spacing: Sequence[float]) -> Tuple[np.ndarray, np.ndarray]:
    """output (B, 1 + L, *patch) logits, points (B, L, ndim) patch indices (NaN rows = absent).

    Returns per landmark the sum of radial errors (mm) and the number of patches it was present in.
    """
    B, L = points.shape[:2]
    if output.shape[1] != L + 1:
        raise ValueError(f"network output has {output.shape[1]} channels, expected 1 + {L}")
    if points.shape[2] != output.ndim - 2:
        raise ValueError(f"points of shape {tuple(points.shape)} for a {output.ndim - 2}D output")
    spacing = np.asarray(spacing, dtype=np.float64)
    sums, counts = np.zeros(L), np.zeros(L, dtype=np.int64)
    ref_all = points.detach().double().cpu().numpy()
    present = np.isfinite(ref_all).all(2)
    for b in range(B):
        idx = np.flatnonzero(present[b])
        if idx.size == 0:
            continue
        sel = torch.as_tensor(idx, device=output.device)
        pred, _, _ = decode_peaks(output[b, 1:].index_select(0, sel), logits=True)
        err = np.linalg.norm((pred - ref_all[b, idx]) * spacing, axis=1)
        sums[idx] += err
        counts[idx] += 1
    return sums, counts


def calibrate_peak_threshold(peaks: np.ndarray, present: np.ndarray) -> Tuple[float, Dict]:
    """One peak-height threshold maximising the existence F1 over all (case, landmark) pairs.

    peaks, present: (N, L). "Predicted present" means peak >= threshold. Among thresholds with the
    best F1 the middle one is taken (the widest safety margin on both sides for few cases). Returns
    the threshold and a description of how it was obtained.
    """
    peaks = np.asarray(peaks, dtype=np.float64).ravel()
    present = np.asarray(present, dtype=bool).ravel()
    n_pos, n_neg = int(present.sum()), int((~present).sum())
    if n_pos == 0 or n_neg == 0:
        return DEFAULT_PEAK_THRESHOLD, {
            "method": "default", "n_present": n_pos, "n_absent": n_neg,
            "reason": "validation cases have no " + ("absent" if n_neg == 0 else "present") + " landmarks to calibrate on"}
    values = np.unique(peaks[np.isfinite(peaks)])
    candidates = np.concatenate(([values[0] - 1e-6], (values[:-1] + values[1:]) / 2, [values[-1] + 1e-6]))
    f1 = np.empty(len(candidates))
    for i, t in enumerate(candidates):
        pred = peaks >= t
        tp = int((pred & present).sum())
        fp = int((pred & ~present).sum())
        fn = int((~pred & present).sum())
        f1[i] = 2 * tp / max(1, 2 * tp + fp + fn)
    best = np.flatnonzero(f1 == f1.max())
    threshold = float(candidates[best[len(best) // 2]])
    return threshold, {"method": "best_f1", "f1": float(f1.max()), "n_present": n_pos, "n_absent": n_neg}


def write_thresholds(path, names: Sequence[str], thresholds: Sequence[float], calibration: Dict,
                     score: str = "peak") -> None:
    """fold_X/landmark_thresholds.json in the format of docs/architecture.md (+ how it was calibrated)."""
    d = {"names": list(names), "threshold": [float(t) for t in thresholds], "score": score, "calibration": calibration}
    atomic_write_text(path, json.dumps(d, indent=2) + "\n")
