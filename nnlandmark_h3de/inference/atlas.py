"""Atlas global stage: register a few labelled training images to a case, carry their landmarks.

Why: a heatmap network that sees one tile cannot tell look-alike landmarks apart; registration of
whole images can, needs no training and runs in seconds on a CPU (where anatomy is consistent, such
as brains, it is hard to beat). Each atlas is registered to the case with SimpleITK (moments
initialisation, then a similarity and an affine stage, Mattes mutual information, on images
resampled to a coarse isotropic grid); its exact landmarks move through the inverse transform; the
estimates of all atlases are combined per landmark by the coordinate-wise median, and their spread
(RMS distance from that median) is the estimate's uncertainty. An atlas without a landmark says
nothing about the case (registration cannot see a missing structure): the median is over the
atlases that have it, and only a landmark no atlas has is absent. Atlases are chosen complete first.

With `nonlinear=True` each affine registration is followed by demons on the same coarse grid
(deformable_registration.py): the `deformable` global-stage kind. `atlas_estimates` gives both from
one affine registration per atlas, with the seconds each took (what calibration compares).

2D images register in their plane (SimpleITK 2D transforms, and a 2D demons field); their world
points are the z = 0 plane of the lifted 3D geometry (landmarks/geometry.py), so points move by
their (x, y) and keep z.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnlandmark_h3de.landmarks.landmark_set import LandmarkSet

__all__ = ["Atlas", "AtlasEstimate", "coarse_image", "register_affine", "execute_two_levels", "atlas_estimate",
           "atlas_estimates", "choose_atlases", "transform_points", "carry_points"]


@dataclass
class Atlas:
    """One labelled image: a SimpleITK image and its exact landmarks (world LPS, NaN = absent)."""
    name: str
    image: "SimpleITK.Image"  # noqa: F821
    landmarks: LandmarkSet


@dataclass
class AtlasEstimate:
    points_lps: np.ndarray  # (L, 3) combined estimate, NaN where absent
    spread_mm: np.ndarray  # (L,) RMS distance of the atlases' points from it
    per_atlas: np.ndarray  # (A, L, 3) each atlas's carried points
    seconds: float = float("nan")  # registering all atlases to this case (the case's resampling included)


def coarse_image(image, spacing_mm: float):
    """The image resampled to an isotropic grid (same origin and direction), float32, smoothed first."""
    import SimpleITK as sitk
    img = sitk.Cast(image, sitk.sitkFloat32)
    old = np.asarray(img.GetSpacing())
    if spacing_mm <= old.min():
        return img
    sigma = [max(0.0, (spacing_mm ** 2 - s ** 2)) ** 0.5 / 2.355 for s in old]
    img = sitk.SmoothingRecursiveGaussian(img, sigma)
    size = [max(8, int(round(n * s / spacing_mm))) for n, s in zip(img.GetSize(), old)]
    return sitk.Resample(img, size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), [spacing_mm] * len(size),
                         img.GetDirection(), 0.0, sitk.sitkFloat32)


def register_affine(fixed, moving, spacing_mm: float = 4.0, iterations: int = 200, seed: int = 0):
    """Affine transform mapping points of `fixed` (the case) to points of `moving` (the atlas), both
    2D or both 3D. `seed` >= 0; SimpleITK reads a sampling seed of 0 as "wall clock", so seed + 1 is
    passed on (the same inputs give the same transform on every run)."""
    import SimpleITK as sitk
    ndim = fixed.GetDimension()
    if moving.GetDimension() != ndim:
        raise ValueError(f"cannot register a {moving.GetDimension()}D image to a {ndim}D one")
    similarity = sitk.Similarity2DTransform if ndim == 2 else sitk.Similarity3DTransform
    f, m = coarse_image(fixed, spacing_mm), coarse_image(moving, spacing_mm)
    transform = sitk.CenteredTransformInitializer(f, m, similarity(), sitk.CenteredTransformInitializerFilter.MOMENTS)
    for stage in (similarity, sitk.AffineTransform):
        if stage is sitk.AffineTransform:
            affine = sitk.AffineTransform(ndim)
            affine.SetMatrix(transform.GetMatrix())
            affine.SetTranslation(transform.GetTranslation())
            affine.SetCenter(transform.GetCenter())
            transform = affine
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(32)
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(0.25, int(seed) + 1)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=iterations,
                                                     gradientMagnitudeTolerance=1e-8)
        execute_two_levels(reg, transform, f, m)
    return transform


def execute_two_levels(reg, transform, fixed, moving) -> None:
    """Run a configured SimpleITK registration (metric, optimiser) on two resolution levels (half,
    then full resolution of the coarse images), optimising `transform` in place with step scales
    from physical shifts: the schedule every registration stage here shares."""
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([2, 1])
    reg.SetSmoothingSigmasPerLevel([1.0, 0.0])
    reg.SetInitialTransform(transform, inPlace=True)
    reg.Execute(fixed, moving)


def transform_points(transform, points_lps: np.ndarray) -> np.ndarray:
    """World points (L, 3) through a SimpleITK transform (NaN rows stay NaN); a 2D transform moves
    (x, y) and keeps z."""
    d = transform.GetDimension()
    out = np.full_like(np.asarray(points_lps, dtype=np.float64), np.nan)
    for k, p in enumerate(np.asarray(points_lps, dtype=np.float64)):
        if np.all(np.isfinite(p)):
            out[k, :d] = transform.TransformPoint(tuple(float(v) for v in p[:d]))
            out[k, d:] = p[d:]
    return out


def carry_points(transform, points_lps: np.ndarray) -> np.ndarray:
    """Atlas points into the case: the inverse of the case -> atlas transform (NaN rows stay NaN); a
    deformable transform inverts itself (its own `carry_points`)."""
    if hasattr(transform, "carry_points"):
        return transform.carry_points(points_lps)
    return transform_points(transform.GetInverse(), points_lps)


def combine(per_atlas: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Coordinate-wise median over the atlases that carry each landmark and the RMS distance from it;
    NaN where no atlas carries it."""
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: no atlas has the landmark
        median = np.nanmedian(per_atlas, axis=0)
        spread = np.sqrt(np.nanmean(np.sum((per_atlas - median) ** 2, axis=2), axis=0))
    return median, spread


def atlas_estimate(image, atlases: Sequence[Atlas], spacing_mm: float = 4.0, nonlinear: bool = False) -> AtlasEstimate:
    """Register every atlas to `image` (affine; then demons where `nonlinear`) and combine their carried
    landmarks."""
    return atlas_estimates(image, atlases, spacing_mm, (nonlinear,))[nonlinear]


def atlas_estimates(image, atlases: Sequence[Atlas], spacing_mm: float = 4.0,
                    nonlinear: Sequence[bool] = (False, True)) -> Dict[bool, AtlasEstimate]:
    """{nonlinear: estimate} for each asked kind from one affine registration per atlas (the deformable
    kind refines the affine one), each estimate timed as if it ran alone. The case is smoothed and
    resampled to the registration grid once (on a CT-sized case that is most of the cost;
    register_affine leaves an image already on the grid as it is)."""
    from nnlandmark_h3de.inference.deformable_registration import register_deformable
    start = time.perf_counter()
    fixed = coarse_image(image, spacing_mm)
    affine_seconds, nonlinear_seconds = time.perf_counter() - start, 0.0
    per: Dict[bool, list] = {False: [], True: []}
    for a in atlases:
        t = time.perf_counter()
        affine = register_affine(fixed, a.image, spacing_mm)
        affine_seconds += time.perf_counter() - t
        if False in nonlinear:
            per[False].append(carry_points(affine, a.landmarks.points_lps))
        if True in nonlinear:
            t = time.perf_counter()
            per[True].append(carry_points(register_deformable(fixed, a.image, spacing_mm, affine=affine),
                                          a.landmarks.points_lps))
            nonlinear_seconds += time.perf_counter() - t
    seconds = {False: affine_seconds, True: affine_seconds + nonlinear_seconds}
    out = {}
    for kind in dict.fromkeys(nonlinear):
        stacked = np.stack(per[kind])
        median, spread = combine(stacked)
        out[kind] = AtlasEstimate(median, spread, stacked, seconds[kind])
    return out


def choose_atlases(landmark_sets: Sequence[LandmarkSet], n: int, names: Optional[Sequence[str]] = None,
                   exact: Optional[Sequence[bool]] = None) -> List[int]:
    """Indices of up to `n` cases chosen for coverage: cases with exact labels first where `exact` says
    which (a one-shot dataset: the template and its copies before pseudo-labelled cases, whose
    errors an atlas would carry into every case), then the cases with the most landmarks present
    (an atlas lacking a landmark cannot vote for it), among them spread out (farthest-point order on
    the cases' centred landmark configurations)."""
    if not landmark_sets:
        raise ValueError("no labelled cases to choose atlases from")
    n = min(n, len(landmark_sets))
    pts = np.stack([ls.points_lps for ls in landmark_sets])  # (C, L, 3)
    counts = np.isfinite(pts).all(2).sum(1)
    if exact is not None:
        counts = counts + (pts.shape[1] + 1) * np.asarray(exact, dtype=bool)  # exact outranks any count
    shapes = np.nan_to_num(pts - np.nanmean(pts, axis=1, keepdims=True)).reshape(len(pts), -1)
    chosen = [int(np.argmax(counts))]
    while len(chosen) < n:
        d = np.min([np.linalg.norm(shapes - shapes[c], axis=1) for c in chosen], axis=0)
        d[chosen] = -1
        counts_left = np.where(d >= 0, counts, -1)
        d[counts_left < counts_left.max()] = -1  # only the most complete of the cases left
        chosen.append(int(np.argmax(d)))
    return chosen
