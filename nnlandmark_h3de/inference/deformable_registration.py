"""Deformable atlas registration: affine, then symmetric-forces demons on the coarse grid.

Why: subjects differ nonlinearly, and an affine atlas leaves that difference in its landmark error;
the strongest registration a user would try first is affine followed by a nonlinear one. Of the two
SimpleITK choices, FastSymmetricForces demons on histogram-matched coarse images was chosen over a
cubic B-spline with Mattes MI (LBFGSB, two levels): on an AFIDs template (2 mm, 97x115x97) warped by
a known smooth field (4 mm RMS; landmarks moved exactly), at the 4 mm grid, demons brought the affine
error of 2.03 mm down to 0.69 mm in 0.73 CPU seconds, where a B-spline needed 4.7 s (48 mm mesh,
1.47 mm) to 9.8 s (32 mm mesh, 0.95 mm) (one thread each); diffeomorphic demons was as accurate
(0.71 mm) at twice the time.
Demons matches intensities, hence the histogram matching of the affinely resampled atlas to the
case first (different scanners, different templates).

Transforms follow atlas.py: `case -> atlas` (what ImageRegistrationMethod returns with the case as
the fixed image): x -> A(x + u(x)), A the affine and u the demons displacement field on the case's
coarse grid. Atlas points are carried into the case by the exact inverse, solved per point by
fixed-point iteration (the field is smooth, so the iteration contracts), NaN rows kept. 2D images
register in their plane (2D affine, 2D field); points move by (x, y) and keep z.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["DeformableTransform", "register_deformable", "demons_field", "invert_points"]


@dataclass
class DeformableTransform:
    """Case -> atlas: the affine after the displacement field (both SimpleITK transforms)."""
    affine: "SimpleITK.Transform"  # noqa: F821  case -> atlas
    field: "SimpleITK.DisplacementFieldTransform"  # noqa: F821  case -> affinely aligned atlas, in case space

    def GetDimension(self) -> int:  # noqa: N802  (the SimpleITK transform interface atlas.py uses)
        return self.affine.GetDimension()

    def TransformPoint(self, point) -> tuple:  # noqa: N802
        return self.affine.TransformPoint(self.field.TransformPoint(tuple(point)))

    def transform_points(self, case_points_lps: np.ndarray) -> np.ndarray:
        """Case points (L, 3) -> atlas points (NaN rows stay NaN)."""
        from nnlandmark_h3de.inference.atlas import transform_points
        return transform_points(self, case_points_lps)

    def carry_points(self, atlas_points_lps: np.ndarray) -> np.ndarray:
        """Atlas points (L, 3) -> case points: the affine's inverse, then the field's, per point."""
        from nnlandmark_h3de.inference.atlas import transform_points
        aligned = transform_points(self.affine.GetInverse(), atlas_points_lps)
        return invert_points(self.field, aligned)


def register_deformable(fixed, moving, spacing_mm: float = 4.0, seed: int = 0, affine=None,
                        iterations: Sequence[int] = (50, 30), smoothing_voxels: float = 1.5) -> DeformableTransform:
    """Transform mapping points of `fixed` (the case) to points of `moving` (the atlas): atlas.register_affine
    (or `affine`, a case -> atlas transform already found), then demons on the coarse grid."""
    from nnlandmark_h3de.inference.atlas import coarse_image, register_affine
    f, m = coarse_image(fixed, spacing_mm), coarse_image(moving, spacing_mm)
    if affine is None:
        affine = register_affine(f, m, spacing_mm, seed=seed)
    return DeformableTransform(affine, demons_field(f, m, affine, iterations, smoothing_voxels))


def demons_field(fixed_coarse, moving_coarse, affine, iterations: Sequence[int] = (50, 30),
                 smoothing_voxels: float = 1.5):
    """Displacement field (case space) aligning the affinely resampled atlas to the case: symmetric-forces
    demons on two levels (half, then full resolution of the coarse grid), the atlas histogram-matched
    to the case on each; the field is Gaussian-smoothed by `smoothing_voxels` after every iteration."""
    import SimpleITK as sitk
    ndim = fixed_coarse.GetDimension()
    aligned = sitk.Resample(moving_coarse, fixed_coarse, affine, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    field = None
    for shrink, n in zip((2, 1), iterations):
        f = sitk.Shrink(fixed_coarse, [shrink] * ndim) if shrink > 1 else fixed_coarse
        m = sitk.Shrink(aligned, [shrink] * ndim) if shrink > 1 else aligned
        m = sitk.HistogramMatching(m, f, numberOfHistogramLevels=256, numberOfMatchPoints=15,
                                   thresholdAtMeanIntensity=True)
        demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
        demons.SetNumberOfIterations(int(n))
        demons.SetStandardDeviations(float(smoothing_voxels))
        demons.SetSmoothDisplacementField(True)
        if field is None:
            field = demons.Execute(f, m)
        else:  # the coarser level's field, resampled to this level's grid, starts this one
            start = sitk.Resample(field, f, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
            field = demons.Execute(f, m, start)
    if field.GetSize() != fixed_coarse.GetSize():
        field = sitk.Resample(field, fixed_coarse, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
    return sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))


def invert_points(transform, targets_lps: np.ndarray, tolerance_mm: float = 1e-4,
                  max_iterations: int = 200) -> np.ndarray:
    """Points x with transform(x) = target, for a transform near the identity (x + u(x), u smooth):
    fixed-point iteration x <- x - (transform(x) - target) from x = target. NaN rows stay NaN; a 2D
    transform solves for (x, y) and keeps z. Where the iteration does not reach `tolerance_mm` (a
    folded field), the iterate with the smallest residual is kept, with a warning."""
    d = transform.GetDimension()
    targets = np.asarray(targets_lps, dtype=np.float64)
    out = np.full_like(targets, np.nan)
    worst = 0.0
    for k, t in enumerate(targets):
        if not np.all(np.isfinite(t)):
            continue
        x, best, best_residual = t[:d].copy(), t[:d].copy(), np.inf
        for _ in range(max_iterations):
            r = np.asarray(transform.TransformPoint(tuple(float(v) for v in x))) - t[:d]
            residual = float(np.linalg.norm(r))
            if residual < best_residual:
                best, best_residual = x.copy(), residual
            if residual <= tolerance_mm:
                break
            x = x - r
        out[k, :d], out[k, d:] = best, t[d:]
        worst = max(worst, best_residual)
    if worst > 100 * tolerance_mm:
        warnings.warn(f"inverting the deformable registration: a point is off by {worst:.3f} mm (folded field)")
    return out
