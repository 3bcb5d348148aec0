"""Registration pseudo-labels: the template registered to each unlabelled image (the one-shot baseline).

Stages, all on SimpleITK:
1. Affine: `inference/atlas.py`'s `register_affine(image, template)` (moments initialisation,
   similarity then affine stage, Mattes mutual information on coarse isotropic copies at
   `spacing_mm`) gives the map of IMAGE points to TEMPLATE points; `carry_points` moves the
   template's landmarks through its inverse.
2. Affine refinement (`refine=True`): the same affine polished with ANTs' local neighbourhood
   correlation (`refine_affine`). Measured on the procedural phantoms, register_affine alone stops
   a few degrees short on near-symmetric anatomy (2-4 mm mean error for a re-pose of the template
   itself, 3 mm voxels); refined, 0.2 mm.
3. Deformable (`deformable="demons"`, optional): fast symmetric-forces demons on a coarse grid
   (`deformable_spacing_mm`, default the template's finest spacing but at least 2 mm). The image is
   resampled through the affine onto the template's coarse grid and histogram-matched to it; the
   displacement field u lives on the TEMPLATE grid, so the composite
   `CompositeTransform([affine_t2i, DisplacementFieldTransform(u)])` maps a template point x straight
   to affine(x + u(x)) in the image: no field is ever inverted. Why demons, not a B-spline: on a
   CPU, demons on a 2 mm grid takes well under a second for a ~100^3 image, where SimpleITK's
   B-spline with mutual information took 4-30 s per case on a 40^3 phantom and moved points of a
   pure re-pose AWAY from the truth (0.2 -> 2.6 mm); with Gaussian smoothing of the field
   (`smoothing_voxels`) demons needs no regulariser to tune. Demons compares intensities, hence
   the histogram matching (same modality assumed: the one-shot setting). `"none"` keeps the
   refined affine. Where the template and the image differ by a pure affine (the phantoms) the
   deformable stage has nothing to fix and adds a few tenths of a mm; on real anatomy it is what
   follows inter-subject shape differences.

Confidence of a carried landmark: the local normalised cross-correlation between the template's
neighbourhood of the landmark (a cube of +-`patch_radius_mm`, sampled on the original template) and
the image's neighbourhood of the carried point, mapped through the registration's local linear part
(its Jacobian at the landmark, so rotation and scale are undone). Where the registration is locally
right the two neighbourhoods show the same anatomy and the NCC is near 1; a point off its structure
sees something else and scores lower. Confidence = max(0, NCC) x the fraction of the neighbourhood
inside both images (edges give less evidence); a flat template neighbourhood (nothing to match)
gives 0. `info["affine_to_final_mm"]` also records how far the deformable stage moved each point
from the affine estimate (a diagnostic, not part of the confidence).

Failures: a case whose image cannot be read, whose registration raises, whose affine is implausible
(a singular value outside [1/MAX_SCALE, MAX_SCALE]) or that carries most present landmarks (> half,
and at least 2) outside its image has failed. `on_error="warn"` (default) skips it and, at the end,
emits ONE `OneShotWarning` listing every failed case by name with its reason; `on_error="raise"`
stops at the first with a `OneShotError` naming the case and its file. If every case fails, that is
an error either way. A carried point outside the image's field of view (beyond half a voxel of the
outermost voxel centres) is absent, confidence 0, listed in `info["outside_fov"]`.

2D images (X-rays): the template and the images are all 2D, registered in their plane with
SimpleITK's 2D transforms (demons and the confidence's neighbourhood are 2D too); points keep
z = 0 (landmarks/geometry.py). A 2D template with 3D images, or the reverse, is an error.

Reproducibility: SimpleITK reads a sampling seed of 0 as "wall clock"; `register_affine` and the
refinement here pass seed + 1 on, so reruns give the same points.
"""
from __future__ import annotations

import time
import warnings
from typing import Dict, Mapping, Optional

import numpy as np
from tqdm import tqdm

from nnlandmark_h3de.inference.atlas import (carry_points, coarse_image, execute_two_levels, register_affine,
                                             transform_points)
from nnlandmark_h3de.landmarks.geometry import ImageGeometry
from nnlandmark_h3de.landmarks.landmark_set import LandmarkSet
from nnlandmark_h3de.oneshot.pseudo_labels import (OneShotError, OneShotWarning, PseudoLabels, image_label,
                                                   read_scalar_image, read_template)

__all__ = ["METHOD", "DEFORMABLE_CHOICES", "register_template", "affine_spacing", "refine_affine", "register_demons",
           "transform_points", "local_jacobian", "neighbourhood_confidence", "registration_pseudo_labels"]

METHOD = "registration"
DEFORMABLE_CHOICES = ("demons", "none")
ON_ERROR_CHOICES = ("warn", "raise")
MAX_SCALE = 2.0  # an affine stretching any axis more than this (or shrinking under 1/this) failed
FOV_MARGIN_VOXELS = 0.5  # as the converter: a point inside when within half a voxel of the outer voxel centres


# ----------------------------------------------------------------------------- registration
def _seed(seed: int) -> int:
    """SimpleITK reads a sampling seed of 0 as 'wall clock' (a different result on every run): shift by one."""
    if int(seed) < 0:
        raise OneShotError(f"seed must be >= 0, got {seed!r}")
    return int(seed) + 1


def refine_affine(image, template, affine_i2t, spacing_mm: float = 4.0, iterations: int = 100):
    """`affine_i2t` (image point -> template point) refined by local normalised cross-correlation.

    register_affine's global mutual information often stops a few degrees short on near-symmetric
    anatomy (the skull's shells hardly change with a rotation about its long axis; the small inner
    structures that do are a sliver of the histogram). ANTs' neighbourhood correlation (radius 2
    coarse voxels) weighs every local structure and is blind to gain and bias fields; started
    from the global result it converges to the near basin. Returns a new AffineTransform.
    """
    import SimpleITK as sitk
    f, m = coarse_image(image, spacing_mm), coarse_image(template, spacing_mm)
    refined = sitk.AffineTransform(affine_i2t)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsANTSNeighborhoodCorrelation(2)
    reg.SetMetricSamplingStrategy(reg.NONE)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3, numberOfIterations=int(iterations),
                                                 gradientMagnitudeTolerance=1e-8, relaxationFactor=0.5)
    execute_two_levels(reg, refined, f, m)
    return refined


def register_demons(template, image, affine_t2i, spacing_mm: float = 2.0, iterations: int = 50,
                    smoothing_voxels: float = 2.0):
    """Demons stage on top of `affine_t2i` (template point -> image point); returns the composite
    template -> image transform.

    The image is resampled through the affine onto the template's grid coarsened to `spacing_mm`,
    its histogram matched to the template's (demons compares intensities), and fast symmetric-forces
    demons finds a displacement field u on that grid (smoothed by a Gaussian of `smoothing_voxels`
    grid voxels after every iteration). A template point x then lies at affine(x + u(x)) in the image.
    """
    import SimpleITK as sitk
    f = coarse_image(template, spacing_mm)
    m = sitk.Resample(coarse_image(image, spacing_mm), f, affine_t2i, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    m = sitk.HistogramMatching(m, f, 128, 7, True)
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetNumberOfIterations(int(iterations))
    demons.SetSmoothDisplacementField(True)
    demons.SetStandardDeviations(float(smoothing_voxels))
    field = sitk.DisplacementFieldTransform(sitk.Cast(demons.Execute(f, m), sitk.sitkVectorFloat64))
    return sitk.CompositeTransform([affine_t2i, field])  # back applied first: affine(x + u(x))


def _check_affine(affine_i2t) -> None:
    d = affine_i2t.GetDimension()
    sv = np.linalg.svd(np.asarray(affine_i2t.GetMatrix(), dtype=np.float64).reshape(d, d), compute_uv=False)
    if not np.all(np.isfinite(sv)) or sv.min() < 1.0 / MAX_SCALE or sv.max() > MAX_SCALE:
        raise RuntimeError(f"implausible affine registration (axis scales {np.round(sv, 3).tolist()}, "
                           f"expected within [{1 / MAX_SCALE:g}, {MAX_SCALE:g}])")


def affine_spacing(template, spacing_mm: Optional[float] = None) -> float:
    """The affine stages' grid: `spacing_mm`, else 4 mm for a volume (measured on AFIDs brains) and, for
    a 2D image, its longest extent / 128 but at least its finest spacing: a 2D image is cheap, and
    on the 2D phantoms (96 mm wide) a 4 mm grid left 0.8 px of a pure re-pose, a 1 mm one 0.001 px."""
    if spacing_mm is not None:
        return float(spacing_mm)
    if template.GetDimension() == 3:
        return 4.0
    extent = max(n * s for n, s in zip(template.GetSize(), template.GetSpacing()))
    return max(float(min(template.GetSpacing())), extent / 128.0)


def deformable_spacing(template, spacing_mm: Optional[float] = None) -> float:
    """The demons grid: `spacing_mm`, else for a volume the template's finest spacing but at least
    2 mm, for a 2D image the affine grid (`affine_spacing`)."""
    if spacing_mm is not None:
        return float(spacing_mm)
    if template.GetDimension() == 2:
        return affine_spacing(template)
    return max(2.0, float(min(template.GetSpacing())))


def register_template(template, image, deformable: str = "demons", spacing_mm: Optional[float] = None,
                      deformable_spacing_mm: Optional[float] = None, iterations: int = 200,
                      demons_iterations: int = 50, smoothing_voxels: float = 2.0, refine: bool = True, seed: int = 0):
    """(image -> template affine, template -> image final transform) for two float32 images (both 2D
    or both 3D).

    Carry template points into the image with `carry_points(affine, pts)` (the affine estimate) or
    `final.TransformPoint` (the final estimate; the affine's inverse when deformable="none").
    """
    if deformable not in DEFORMABLE_CHOICES:
        raise OneShotError(f"deformable must be one of {DEFORMABLE_CHOICES}, got {deformable!r}")
    spacing_mm = affine_spacing(template, spacing_mm)
    affine_i2t = register_affine(image, template, spacing_mm, iterations, seed)
    _check_affine(affine_i2t)
    if refine:
        affine_i2t = refine_affine(image, template, affine_i2t, spacing_mm)
        _check_affine(affine_i2t)
    affine_t2i = affine_i2t.GetInverse()
    if deformable == "none":
        return affine_i2t, affine_t2i
    return affine_i2t, register_demons(template, image, affine_t2i, deformable_spacing(template, deformable_spacing_mm),
                                       demons_iterations, smoothing_voxels)


def local_jacobian(transform, point, step_mm: float = 1.0) -> np.ndarray:
    """d x d derivative of a d-dimensional SimpleITK transform at `point` (its first d coordinates;
    central differences, world mm)."""
    d = transform.GetDimension()
    p = np.asarray(point, dtype=np.float64)[:d]
    jac = np.empty((d, d))
    for k in range(d):
        e = np.zeros(d)
        e[k] = step_mm
        jac[:, k] = (np.asarray(transform.TransformPoint(tuple(p + e)))
                     - np.asarray(transform.TransformPoint(tuple(p - e)))) / (2 * step_mm)
    return jac


# ------------------------------------------------------------------------------- confidence
def _patch(image, centre, matrix, source_centre, radius_mm: float, step_mm: float) -> np.ndarray:
    """Samples of `image` at centre + matrix (q - source_centre) for q on a cube (2D: square) grid
    around source_centre; points are the image's dimension (a 2D image's (x, y))."""
    import SimpleITK as sitk
    d = image.GetDimension()
    centre, source_centre = np.asarray(centre, dtype=np.float64)[:d], np.asarray(source_centre, dtype=np.float64)[:d]
    n = 2 * int(np.ceil(radius_mm / step_mm)) + 1
    half = (n - 1) / 2 * step_mm
    t = sitk.AffineTransform(d)
    t.SetMatrix(tuple(float(v) for v in np.asarray(matrix, dtype=np.float64).ravel()))
    t.SetCenter(tuple(float(v) for v in source_centre))
    t.SetTranslation(tuple(float(v) for v in centre - source_centre))
    out = sitk.Resample(image, [n] * d, t, sitk.sitkLinear, tuple(float(v) for v in source_centre - half),
                        [float(step_mm)] * d, tuple(np.eye(d).ravel()), float("nan"), sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out).ravel()


def neighbourhood_confidence(template, template_point, image, image_point, matrix=None, radius_mm: float = 10.0,
                             step_mm: Optional[float] = None) -> float:
    """Local NCC match in [0, 1] of `template` around `template_point` and `image` around `image_point`.

    The template's cube of +-radius_mm (sampled every `step_mm`, default its finest spacing, at most
    21 samples per axis) is compared with the image at image_point + matrix (q - template_point)
    (`matrix`: the template -> image local linear map, e.g. `local_jacobian` of the registration;
    default identity). Returns max(0, NCC) x the fraction of samples inside both images; 0 for a
    flat template neighbourhood or a non-finite point.
    """
    if not (np.all(np.isfinite(template_point)) and np.all(np.isfinite(image_point))):
        return 0.0
    if step_mm is None:
        step_mm = max(min(template.GetSpacing()), radius_mm / 10.0)
    d = template.GetDimension()
    matrix = np.eye(d) if matrix is None else np.asarray(matrix, dtype=np.float64)
    a = _patch(template, template_point, np.eye(d), template_point, radius_mm, step_mm)
    b = _patch(image, image_point, matrix, template_point, radius_mm, step_mm)
    valid = np.isfinite(a) & np.isfinite(b)
    if valid.sum() < 8:
        return 0.0
    a, b = a[valid].astype(np.float64), b[valid].astype(np.float64)
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    if denom <= 1e-12 * max(1.0, float(np.abs(a).max()) ** 2 * a.size):
        return 0.0
    ncc = float((a * b).sum() / denom)
    return float(np.clip(ncc, 0.0, 1.0) * valid.mean())


# --------------------------------------------------------------------------------- one case
def _pseudo_labels_of_case(template, template_ls: LandmarkSet, image_source, options: dict,
                           patch_radius_mm: float, pixel_spacing=None) -> PseudoLabels:
    start = time.perf_counter()
    image = read_scalar_image(image_source, "image", pixel_spacing)
    if image.GetDimension() != template.GetDimension():
        raise OneShotError(f"{image_label(image_source)}: a {image.GetDimension()}D image, the template is "
                           f"{template.GetDimension()}D")
    affine_i2t, final_t2i = register_template(template, image, **options)
    affine_pts = carry_points(affine_i2t, template_ls.points_lps)
    deformable = options["deformable"]
    pts = affine_pts.copy() if deformable == "none" else transform_points(final_t2i, template_ls.points_lps)
    geometry = ImageGeometry.from_sitk(image)
    present = template_ls.present
    inside = np.zeros(len(pts), bool)
    if present.any():
        inside[present] = geometry.contains_array_index(geometry.world_to_array_index(pts[present]),
                                                        FOV_MARGIN_VOXELS)
    outside = present & ~inside
    n_out, n_present = int(outside.sum()), int(present.sum())
    if n_out >= 2 and 2 * n_out > n_present:
        raise RuntimeError(f"{n_out} of {n_present} carried landmarks fall outside the image "
                           f"(registration failed, or the image does not show the template's anatomy)")
    pts[outside] = np.nan
    confidence = np.zeros(len(pts))
    for k in np.flatnonzero(inside):
        jac = local_jacobian(final_t2i, template_ls.points_lps[k])
        confidence[k] = neighbourhood_confidence(template, template_ls.points_lps[k], image, pts[k], jac,
                                                 patch_radius_mm)
    shift = np.linalg.norm(pts - affine_pts, axis=1)
    info = {"deformable": deformable, "spacing_mm": float(options["spacing_mm"]),
            "affine_to_final_mm": {n: (None if not np.isfinite(d) else round(float(d), 3))
                                   for n, d in zip(template_ls.names, shift)},
            "outside_fov": [n for n, o in zip(template_ls.names, outside) if o],
            "seconds": round(time.perf_counter() - start, 3)}
    if deformable == "demons":
        info["deformable_spacing_mm"] = deformable_spacing(template, options["deformable_spacing_mm"])
    ls = LandmarkSet(list(template_ls.names), pts, descriptions=template_ls.descriptions,
                     source=image_label(image_source))
    return PseudoLabels(ls, confidence, METHOD, info)


# ------------------------------------------------------------------------------------ main
def registration_pseudo_labels(template_image, template_landmarks, images: Mapping[str, object],
                               deformable: str = "demons", spacing_mm: Optional[float] = None,
                               deformable_spacing_mm: Optional[float] = None, iterations: int = 200,
                               demons_iterations: int = 50, smoothing_voxels: float = 2.0, refine: bool = True,
                               patch_radius_mm: float = 10.0, seed: int = 0, on_error: str = "warn",
                               progress: bool = True, pixel_spacing=None) -> Dict[str, PseudoLabels]:
    """{case: PseudoLabels} from registering the template to every image (see the module docstring).

    template_image: path or SimpleITK image (2D or 3D); template_landmarks: landmark file (any format
        `read_landmarks` takes) or LandmarkSet, world LPS mm; every present point inside the template.
    images: case -> image path or SimpleITK image (the template's dimension).
    deformable: "demons" (refined affine, then demons on a `deformable_spacing_mm` grid) or "none".
    spacing_mm: isotropic grid of the affine stages (default `affine_spacing`); iterations: register_affine's per stage.
    patch_radius_mm: half-size of the neighbourhood compared for the confidence.
    on_error: "warn" (skip failed cases, one OneShotWarning lists them) or "raise".
    pixel_spacing: mm per pixel of 2D pictures (PNG, BMP, TIFF, JPEG: required) or a 2D file's
        replacement spacing, for the template and the images (`read_scalar_image`).
    Failed cases are absent from the result.
    """
    if deformable not in DEFORMABLE_CHOICES:
        raise OneShotError(f"deformable must be one of {DEFORMABLE_CHOICES}, got {deformable!r}")
    if on_error not in ON_ERROR_CHOICES:
        raise OneShotError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
    for name, v in (("spacing_mm", spacing_mm), ("deformable_spacing_mm", deformable_spacing_mm),
                    ("smoothing_voxels", smoothing_voxels), ("patch_radius_mm", patch_radius_mm)):
        if v is not None and not (np.isfinite(v) and v > 0):
            raise OneShotError(f"{name} must be a positive number, got {v!r}")
    _seed(seed)
    if not images:
        raise OneShotError("no unlabelled images to pseudo-label")
    template, template_ls = read_template(template_image, template_landmarks, pixel_spacing)
    options = dict(deformable=deformable, spacing_mm=affine_spacing(template, spacing_mm),
                   deformable_spacing_mm=deformable_spacing_mm, iterations=int(iterations), demons_iterations=int(demons_iterations),
                   smoothing_voxels=float(smoothing_voxels), refine=bool(refine), seed=int(seed))
    out: Dict[str, PseudoLabels] = {}
    failed: Dict[str, str] = {}
    for case, image in tqdm(list(images.items()), desc="registering the template", unit="case",
                            disable=not progress):
        try:
            out[str(case)] = _pseudo_labels_of_case(template, template_ls, image, options, patch_radius_mm,
                                                    pixel_spacing)
        except (OneShotError, RuntimeError) as e:
            msg = str(e).strip().splitlines()[-1] if isinstance(e, RuntimeError) and str(e).strip() else str(e)
            reason = f"case {case} ({image_label(image)}): {msg}"
            if on_error == "raise":
                raise OneShotError(reason) from None
            failed[str(case)] = reason
    if failed:
        listing = "\n".join(f"  {r}" for r in failed.values())
        if not out:
            raise OneShotError(f"registration failed for every case ({len(failed)}):\n{listing}")
        warnings.warn(f"registration failed for {len(failed)} case(s), skipped: {sorted(failed)}\n{listing}",
                      OneShotWarning, stacklevel=2)
    return out
