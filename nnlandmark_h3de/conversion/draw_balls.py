"""Landmarks -> label balls in the original image grid, drawn in world millimetres.

A voxel belongs to landmark k's ball when its centre lies within `radius_mm` of the exact world
point, so anisotropic spacing and rotated directions need no special case. Where balls meet, a
voxel goes to the nearest landmark. The balls only steer nnU-Net's planning and foreground-
oversampled patch positions: training targets come from the exact points (landmarks.json), so
landmarks may lie at any distance from each other and from the image border. On a 2D image (the
plane z = 0 of a 2D `ImageGeometry`, landmarks with z = 0) a ball is the disk it cuts from the plane.
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
    distance_mm: np.ndarray  # of each kept voxel centre from the point

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
    d2 = np.einsum("ij,ij->i", offset_mm, offset_mm)
    within = d2 <= radius_mm ** 2 * (1 + 1e-12)
    ijk, d2 = ijk[within], d2[within]
    shape_ijk = np.asarray(geometry.shape_ijk)
    inside = np.all((ijk >= 0) & (ijk < shape_ijk), axis=1)
    kept = ijk[inside]
    return Ball((kept[:, 2], kept[:, 1], kept[:, 0]), int((~inside).sum()), np.sqrt(d2[inside]))


def draw_balls(geometry: ImageGeometry, points_lps: np.ndarray, radius_mm: float,
               dtype: Optional[np.dtype] = None) -> Tuple[np.ndarray, List[Optional[Ball]]]:
    """Label array (z, y, x): landmark k (0-based row) drawn with value k + 1; absent (NaN) rows skipped.

    A voxel within `radius_mm` of several landmarks takes the nearest one's label (ties: the lower
    row). Returns the array and one `Ball` per row (None for absent rows), before that sharing.
    """
    pts = np.asarray(points_lps, dtype=np.float64).reshape(-1, 3)
    dtype = label_dtype(len(pts)) if dtype is None else np.dtype(dtype)
    labels = np.zeros(geometry.shape_zyx, dtype=dtype)
    balls: List[Optional[Ball]] = [None if np.isnan(p).any() else ball_voxels(geometry, p, radius_mm) for p in pts]
    drawn = [(k, b) for k, b in enumerate(balls) if b is not None and b.n_inside]
    if not drawn:
        return labels, balls
    flat = np.concatenate([np.ravel_multi_index(b.index_zyx, labels.shape) for _, b in drawn])
    value = np.concatenate([np.full(b.n_inside, k + 1, dtype=np.int64) for k, b in drawn])
    dist = np.concatenate([b.distance_mm for _, b in drawn])
    order = np.lexsort((value, dist))  # nearest first, then lower label
    first = np.unique(flat[order], return_index=True)[1]
    labels.flat[flat[order][first]] = value[order][first]
    return labels, balls
