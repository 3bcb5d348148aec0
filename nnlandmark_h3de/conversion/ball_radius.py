"""How big a landmark ball must be to survive nnU-Net's resampling.

Rule (documented in `ball_radius_mm`): the ball must span at least `min_voxels` (1.5) voxels of
radius along every axis of both grids it lives in, the original image grid of every training case
(where it is drawn) and nnU-Net's target grid (where the trainer finds its centre of mass). With
fewer, nnU-Net's seg resampling (per-label linear interpolation + argmax) can erase a ball or
quantise its centre; at 1.5 voxels the drawn ball's centre of mass stays within ~0.3 voxel of the
exact point for any sub-voxel offset.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

#: nnU-Net's ANISO_THRESHOLD: an axis is "anisotropic" when its spacing exceeds 3x the others.
ANISOTROPY_THRESHOLD = 3.0
MIN_RADIUS_VOXELS = 1.5


def nnunet_target_spacing(spacings: Sequence[Sequence[float]], shapes: Optional[Sequence[Sequence[int]]] = None) -> np.ndarray:
    """The 3d_fullres target spacing nnU-Net's default planner would choose, in the input's axis order.

    Median spacing per axis; if one axis is both much coarser (> 3x) and has far fewer voxels
    (< 1/3) than the others, that axis gets the 10th percentile of its spacings instead, but never
    less than the other axes' spacing. `shapes` (array shapes, same axis order) are only used for
    that voxel-count test; nnU-Net uses shapes after its non-zero crop, the image shape is close.
    """
    spacings = np.asarray(spacings, dtype=np.float64).reshape(-1, 3)
    target = np.percentile(spacings, 50, axis=0)
    if shapes is None:
        return target
    sizes = np.percentile(np.asarray(shapes, dtype=np.float64).reshape(-1, 3), 50, axis=0)
    worst = int(np.argmax(target))
    others = [i for i in range(3) if i != worst]
    aniso_spacing = target[worst] > ANISOTROPY_THRESHOLD * max(target[i] for i in others)
    aniso_voxels = sizes[worst] * ANISOTROPY_THRESHOLD < min(sizes[i] for i in others)
    if aniso_spacing and aniso_voxels:
        low = np.percentile(spacings[:, worst], 10)
        other_max = max(target[i] for i in others)
        target[worst] = max(other_max, low) + 1e-5 if low < other_max else low
    return target


def ball_radius_mm(spacings: Sequence[Sequence[float]], target_spacing: Optional[Sequence[float]] = None,
                   shapes: Optional[Sequence[Sequence[int]]] = None, min_voxels: float = MIN_RADIUS_VOXELS) -> float:
    """Radius (mm) = `min_voxels` x the coarsest spacing among all cases' spacings and the target spacing.

    `spacings`: one (3,) spacing per training case (any axis order, mm). `target_spacing`: the
    spacing nnU-Net will resample to; computed like nnU-Net's planner when omitted. Rounded up to
    0.01 mm so the value in dataset.json reads cleanly.
    """
    spacings = np.asarray(spacings, dtype=np.float64).reshape(-1, 3)
    if spacings.size == 0:
        raise ValueError("ball_radius_mm: no training case spacing given")
    if not np.all(np.isfinite(spacings)) or np.any(spacings <= 0):
        raise ValueError(f"ball_radius_mm: invalid spacings {spacings.tolist()}")
    target = nnunet_target_spacing(spacings, shapes) if target_spacing is None else np.asarray(target_spacing, float)
    coarsest = max(float(spacings.max()), float(np.max(target)))
    return math.ceil(min_voxels * coarsest * 100 - 1e-6) / 100


def min_drawable_radius_mm(spacing: Sequence[float]) -> float:
    """Below half a voxel diagonal, a ball centred between voxel centres may contain no voxel."""
    return 0.5 * float(np.linalg.norm(np.asarray(spacing, dtype=np.float64)))
