"""Landmarks -> label balls in the original image grid, drawn in world millimetres.

A voxel belongs to landmark k's ball when its centre lies within `radius_mm` of the exact world
point, so anisotropic spacing and rotated directions need no special case, and the ball's centre
of mass (what the trainer turns into a heatmap peak) stays at the point to a fraction of a voxel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from nnlandmark_h3de.landmarks.geometry import ImageGeometry
from nnlandmark_h3de.landmarks.landmark_set import LandmarkError


def label_dtype(num_landmarks: int) -> np.dtype:
    """Smallest unsigned integer type holding labels 0..num_landmarks."""
    if num_landmarks <= np.iinfo(np.uint8).max:
        return np.dtype(np.uint8)
    if num_landmarks <= np.iinfo(np.uint16).max:
        return np.dtype(np.uint16)
    raise LandmarkError(f"{num_landmarks} landmarks do not fit a uint16 label map")


@dataclass
class Ball:
    """Voxels of one ball: array indices (z, y, x) that lie inside the image, and how many fell outside."""

    index_zyx: Tuple[np.ndarray, np.ndarray, np.ndarray]
    n_outside: int

    @property
    def n_inside(self) -> int:
        return int(self.index_zyx[0].size)


def ball_voxels(geometry: ImageGeometry, point_lps: Sequence[float], radius_mm: float) -> Ball:
    """Array indices of the voxels whose centre lies within `radius_mm` of `point_lps`."""
    m = geometry.index_to_world_matrix
    minv = np.linalg.inv(m)
    centre = geometry.world_to_itk_index(np.asarray(point_lps, dtype=np.float64))
    half = radius_mm * np.linalg.norm(minv, axis=1)  # index-space half extent of the world ball per axis
    lo = np.ceil(centre - half - 1e-9).astype(int)
    hi = np.floor(centre + half + 1e-9).astype(int)
    axes = [np.arange(a, b + 1) for a, b in zip(lo, hi)]
    ii, jj, kk = np.meshgrid(*axes, indexing="ij")
    ijk = np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=1)
    offset_mm = (ijk - centre) @ m.T
    ijk = ijk[np.einsum("ij,ij->i", offset_mm, offset_mm) <= radius_mm ** 2 * (1 + 1e-12)]
    shape_ijk = np.asarray(geometry.shape_ijk)
    inside = np.all((ijk >= 0) & (ijk < shape_ijk), axis=1)
    kept = ijk[inside]
    return Ball((kept[:, 2], kept[:, 1], kept[:, 0]), int((~inside).sum()))


def find_overlaps(names: Sequence[str], points_lps: np.ndarray, min_distance_mm: float) -> List[Tuple[str, str, float]]:
    """Pairs of present landmarks closer than `min_distance_mm`, closest first."""
    pts = np.asarray(points_lps, dtype=np.float64)
    present = np.flatnonzero(~np.isnan(pts).any(axis=1))
    out = []
    for a_pos, a in enumerate(present):
        d = np.linalg.norm(pts[present[a_pos + 1:]] - pts[a], axis=1)
        for b, dist in zip(present[a_pos + 1:], d):
            if dist < min_distance_mm:
                out.append((names[a], names[b], float(dist)))
    return sorted(out, key=lambda t: t[2])


def draw_balls(geometry: ImageGeometry, points_lps: np.ndarray, radius_mm: float,
               dtype: Optional[np.dtype] = None) -> Tuple[np.ndarray, List[Ball]]:
    """Label array (z, y, x): landmark k (0-based row) drawn with value k + 1; absent (NaN) rows skipped.

    Returns the array and one `Ball` per row (None for absent rows) so callers can check for
    empty or clipped balls. Later balls never overwrite earlier ones silently: a shared voxel
    raises (callers check distances first, this is the last line of defence).
    """
    pts = np.asarray(points_lps, dtype=np.float64).reshape(-1, 3)
    dtype = label_dtype(len(pts)) if dtype is None else np.dtype(dtype)
    labels = np.zeros(geometry.shape_zyx, dtype=dtype)
    balls: List[Optional[Ball]] = []
    for k, p in enumerate(pts):
        if np.isnan(p).any():
            balls.append(None)
            continue
        ball = ball_voxels(geometry, p, radius_mm)
        if np.any(labels[ball.index_zyx] != 0):
            raise LandmarkError(f"ball {k + 1} overlaps an earlier ball (radius {radius_mm} mm too large)")
        labels[ball.index_zyx] = k + 1
        balls.append(ball)
    return labels, balls


def nonzero_bbox_zyx(array_zyx: np.ndarray) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """(lo, hi) inclusive bounds of the non-zero voxels: the box nnU-Net crops every case to."""
    mask = array_zyx != 0
    if not mask.any():
        return None
    lo, hi = [], []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        lo.append(idx[0])
        hi.append(idx[-1])
    return np.asarray(lo), np.asarray(hi)


def voxels_outside_box(ball: Ball, box: Tuple[np.ndarray, np.ndarray]) -> int:
    """How many of the ball's voxels nnU-Net's non-zero crop would cut off."""
    idx = np.stack(ball.index_zyx, axis=1)
    lo, hi = box
    return int((~np.all((idx >= lo) & (idx <= hi), axis=1)).sum())
