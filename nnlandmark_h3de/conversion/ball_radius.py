"""How big a landmark ball must be to survive nnU-Net's resampling.

The balls steer nnU-Net's foreground-oversampled patch positions (training targets are the exact
points); a ball that vanishes in resampling just loses that. Rule (documented in `ball_radius_mm`):
the ball spans at least `min_voxels` (1.5) voxels of radius along every axis of both grids it lives
in, the original image grid of every training case and nnU-Net's target grid. With fewer, nnU-Net's
seg resampling (per-label linear interpolation + argmax) can erase it. Datasets without exact
points (hand-made labels) train from the ball centres: at 1.5 voxels a drawn ball's centre of mass
stays within ~0.3 voxel of the exact point.

2D images (spacings given as (x, y) pairs): the same rule in-plane, the ball being a disk. The third
axis does not count: our 2D geometry's spacing 1 along k is a placeholder, nnU-Net reports 999 x the
largest in-plane spacing there, and its `2d` configuration resamples in-plane only, to the in-plane
part of its full-resolution target spacing (the median: the planner's anisotropy branch only ever
changes that 999 axis).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

MIN_RADIUS_VOXELS = 1.5


def nnunet_target_spacing(spacings: Sequence[Sequence[float]], shapes: Optional[Sequence[Sequence[int]]] = None) -> np.ndarray:
    """The 3d_fullres target spacing nnU-Net's default planner would choose, in the input's axis order
    (for (x, y) spacings of 2D images: the in-plane spacing of its 2d configuration).

    Calls the planner's own rule (`ExperimentPlanner.determine_fullres_target_spacing`: median
    spacing, except for a much coarser axis with far fewer voxels) on these spacings and shapes,
    before any fingerprint exists. nnU-Net uses shapes after its non-zero crop; the image shape is
    close. Without shapes, the median spacing (the rule's anisotropy branch needs voxel counts).
    """
    from types import SimpleNamespace
    from nnunetv2.configuration import ANISO_THRESHOLD
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    spacings = _rows(spacings)
    if spacings.shape[1] == 2:  # 2D: what nnU-Net sees, (sx, sy, 999 * max) and one slice; in-plane part
        big = 999 * spacings.max(axis=1, keepdims=True)
        shapes3 = None if shapes is None else [(int(s[0]), int(s[1]), 1) for s in shapes]
        return nnunet_target_spacing(np.hstack([spacings, big]), shapes3)[:2]
    if shapes is None:
        return np.percentile(spacings, 50, axis=0)
    planner_state = SimpleNamespace(overwrite_target_spacing=None, anisotropy_threshold=ANISO_THRESHOLD,
                                    dataset_fingerprint={"spacings": list(spacings),
                                                         "shapes_after_crop": [tuple(s) for s in shapes]})
    return np.asarray(ExperimentPlanner.determine_fullres_target_spacing(planner_state), dtype=np.float64)


def ball_radius_mm(spacings: Sequence[Sequence[float]], target_spacing: Optional[Sequence[float]] = None,
                   shapes: Optional[Sequence[Sequence[int]]] = None, min_voxels: float = MIN_RADIUS_VOXELS) -> float:
    """Radius (mm) = `min_voxels` x the coarsest spacing among all cases' spacings and the target spacing.

    `spacings`: one (3,) spacing per training case (any axis order, mm), or one (x, y) pair per 2D
    image (then `target_spacing` is 2 numbers too). `target_spacing`: the
    spacing nnU-Net will resample to; computed like nnU-Net's planner when omitted. Rounded up to
    0.01 mm so the value in dataset.json reads cleanly.
    """
    spacings = _rows(spacings)
    if spacings.size == 0:
        raise ValueError("ball_radius_mm: no training case spacing given")
    if not np.all(np.isfinite(spacings)) or np.any(spacings <= 0):
        raise ValueError(f"ball_radius_mm: invalid spacings {spacings.tolist()}")
    target = nnunet_target_spacing(spacings, shapes) if target_spacing is None else np.asarray(target_spacing, float)
    coarsest = max(float(spacings.max()), float(np.max(target)))
    return math.ceil(min_voxels * coarsest * 100 - 1e-6) / 100


def _rows(spacings) -> np.ndarray:
    """One spacing per row: (N, 3), or (N, 2) for 2D images; a flat sequence is read as 3D rows."""
    a = np.asarray(spacings, dtype=np.float64)
    if a.ndim == 2 and a.shape[1] == 2:
        return a
    return a.reshape(-1, 3)
