"""The checks between reading and writing: landmark channel names and left/right pairs, each case's
landmarks in channel order and inside its image, and the label-ball radius.

Field of view (`outside_fov`): a present landmark lies outside the image when it is more than half
a voxel beyond the outermost voxel centres (`ImageGeometry.contains_array_index`, the test that
`synthesis.reposing.repose_case` applies to re-posed landmarks, there with its own margin). With
`outside_fov="absent"` (default) such a landmark was cut off by the field of view: it becomes absent
(`null`, no ball), as everywhere else in the package, with a `ConversionWarning` naming the file and
the landmarks. But when MOST of a case's present landmarks are outside (more than half of them, and
at least 2), the case is an error all the same: that is almost surely a RAS/LPS mix-up or the wrong
image, not a cut-off view. `outside_fov="error"` makes any landmark outside the image an error.

2D images: the field of view is the image plane: a landmark is inside when it lies within half a
pixel of the outermost pixel centres in-plane AND on the plane (|z| <= `PLANE_TOLERANCE_MM`; such a
z is then set to exactly 0), so a landmark with z != 0 follows the rule above like any other
landmark outside the image. The ball radius rule looks at the in-plane spacings only (nnU-Net's 2d
configuration never resamples along z; see ball_radius.py).
"""
from __future__ import annotations

import warnings
from typing import List, Optional, Sequence, Tuple

import numpy as np

from nnlandmark_h3de.conversion.ball_radius import ball_radius_mm as radius_rule, nnunet_target_spacing
from nnlandmark_h3de.conversion.case_reading import CaseError, CaseProblems, InputCase
from nnlandmark_h3de.conversion.errors import ConversionError, ConversionWarning
from nnlandmark_h3de.landmarks.landmark_set import LandmarkError, LandmarkSet

RESERVED_NAMES = ("background", "ignore")
OUTSIDE_FOV_CHOICES = ("absent", "error")
FOV_MARGIN_VOXELS = 0.5  # field of view: outermost voxel centres widened by half a voxel
PLANE_TOLERANCE_MM = 1e-3  # a 2D image's landmark lies on the image plane when |z| <= this


# ------------------------------------------------------------------------------ names and pairs
def validate_pairs(pairs, names: Sequence[str]) -> List[Tuple[str, str]]:
    out, seen = [], set()
    for pair in pairs:
        if isinstance(pair, str) or len(pair) != 2:
            raise ConversionError(f"landmark pair {pair!r} must be two names (left, right)")
        a, b = (str(x) for x in pair)
        unknown = [x for x in (a, b) if x not in names]
        if unknown:
            raise ConversionError(f"landmark pair ({a}, {b}): unknown name(s) {unknown}; landmarks are {list(names)}")
        if a == b or a in seen or b in seen:
            raise ConversionError(f"landmark pair ({a}, {b}): a landmark may appear in only one pair, never twice")
        seen.update((a, b))
        out.append((a, b))
    return out


def validate_names(names: Sequence[str], where: str) -> List[str]:
    names = [str(n) for n in names]
    if not names:
        raise ConversionError(f"{where}: no landmark names")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConversionError(f"{where}: duplicate landmark names {dupes}")
    reserved = [n for n in names if n.lower() in RESERVED_NAMES or not n.strip()]
    if reserved:
        raise ConversionError(f"{where}: landmark names {reserved} are reserved by nnU-Net or empty")
    return names


def channel_names(items: List[InputCase], names: Optional[Sequence[str]], exclude: Sequence[str],
                  problems: CaseProblems) -> List[str]:
    """Landmark channel order: the given names, else the first readable case's; checked."""
    if exclude:
        seen = {n for c in items for n in c.file_names} | set(names or ())
        never = [n for n in exclude if n not in seen]
        if items and never:
            raise ConversionError(f"exclude_names {never} do not occur in any case")
    if names is None:
        if not items:
            raise ConversionError("no readable case:\n" + problems.listing())
        return validate_names(list(items[0].landmarks.names), f"names from {items[0].landmarks.source}")
    return validate_names([n for n in names if n not in exclude], "given names")


# -------------------------------------------------------------------------------- field of view
def check_outside_fov_choice(outside_fov: str) -> None:
    if outside_fov not in OUTSIDE_FOV_CHOICES:
        raise ConversionError(f"outside_fov must be one of {OUTSIDE_FOV_CHOICES}, got {outside_fov!r}")


def reorder_and_check(items: List[InputCase], names: Sequence[str], problems: CaseProblems,
                      outside_fov: str = "absent") -> List[InputCase]:
    """Every case in channel order; present landmarks inside the image or absent (see `_check_inside`)."""
    kept: List[InputCase] = []
    for c in items:
        try:
            try:
                c.landmarks = c.landmarks.reordered(names)
            except LandmarkError as e:
                raise CaseError(str(e)) from None
            _check_inside(c, outside_fov)
        except CaseError as e:
            problems.fail(c.case, str(e))
            continue
        kept.append(c)
    return kept


def _outside_fov(c: InputCase) -> np.ndarray:
    """Mask of present landmarks beyond the image's field of view (voxel centres +- half a voxel; for a
    2D image also off the image plane, |z| > PLANE_TOLERANCE_MM)."""
    ls, geo = c.landmarks, c.geometry
    outside = np.zeros(len(ls.names), bool)
    present = ls.present
    if present.any():
        idx = geo.world_to_array_index(ls.points_lps[present])
        outside[present] = ~geo.contains_array_index(idx, margin=FOV_MARGIN_VOXELS)
        if geo.ndim == 2:  # the plane's normal is the k axis, of spacing 1: idx z is the distance in mm
            outside[present] |= np.abs(idx[:, 0]) > PLANE_TOLERANCE_MM
    return outside


def _onto_plane(ls: LandmarkSet) -> LandmarkSet:
    """A 2D image's landmarks (all on the plane, within PLANE_TOLERANCE_MM) with z exactly 0."""
    present = ls.present
    if not present.any() or np.all(ls.points_lps[present, 2] == 0):
        return ls
    pts = ls.points_lps.copy()
    pts[present, 2] = 0.0
    return LandmarkSet(list(ls.names), pts, ls.confidence, ls.uncertainty_mm, ls.descriptions, ls.source)


def _looks_like_wrong_frame(n_outside: int, n_present: int) -> bool:
    """Most present landmarks outside (> half, at least 2): a RAS/LPS mix-up or wrong image, not a cut-off view."""
    return n_outside >= 2 and 2 * n_outside > n_present


def _describe(c: InputCase, mask: np.ndarray) -> str:
    return "; ".join(f"{n} at LPS {np.round(p, 2).tolist()}"
                     for n, p in zip(np.asarray(c.landmarks.names)[mask], c.landmarks.points_lps[mask]))


def _without(ls: LandmarkSet, mask: np.ndarray) -> LandmarkSet:
    """A copy of `ls` with the masked landmarks absent (the caller's LandmarkSet is left untouched)."""
    pts = ls.points_lps.copy()
    pts[mask] = np.nan
    return LandmarkSet(list(ls.names), pts, ls.confidence, ls.uncertainty_mm, ls.descriptions, ls.source)


def _check_inside(c: InputCase, outside_fov: str = "absent") -> None:
    """Landmarks cut off by the field of view become absent (warned); most of them outside is an error."""
    outside = _outside_fov(c)
    n_out, n_present = int(outside.sum()), int(c.landmarks.present.sum())
    plane = (f"; a 2D image's landmarks lie in its plane z = 0 (within {PLANE_TOLERANCE_MM} mm)"
             if c.geometry.ndim == 2 else "")
    if n_out:
        if outside_fov == "error" or _looks_like_wrong_frame(n_out, n_present):
            raise CaseError(f"{c.landmarks.source}: {n_out} of {n_present} landmark(s) outside the image "
                            f"{c.image_label} (shape zyx {c.geometry.shape_zyx}{plane}): {_describe(c, outside)}. "
                            "Wrong coordinate system (RAS vs LPS) or wrong image?")
        warnings.warn(f"case {c.case}: {c.landmarks.source}: landmark(s) {_describe(c, outside)} lie outside the image "
                      f"{c.image_label} (shape zyx {c.geometry.shape_zyx}{plane}), cut off by the field of view -> "
                      "absent (null in landmarks.json, no label ball)", ConversionWarning, stacklevel=4)
        c.landmarks = _without(c.landmarks, outside)
    if c.geometry.ndim == 2:
        c.landmarks = _onto_plane(c.landmarks)


# ---------------------------------------------------------------------------------- ball radius
def check_ball_radius(ball_radius_mm: Optional[float]) -> None:
    if ball_radius_mm is not None and not (np.isfinite(ball_radius_mm) and ball_radius_mm > 0):
        raise ConversionError(f"ball radius must be a positive number of mm, got {ball_radius_mm!r}")


def dataset_ball_radius(train: List[InputCase], kept: List[InputCase], target_spacing,
                        ball_radius_mm: Optional[float], min_radius_voxels: float) -> float:
    """The given radius (a warning under the rule), else the rule over the training cases' spacings.

    2D images: in-plane spacings (x, y) only, and `target_spacing` is 2 numbers (x, y).
    """
    ref = train or kept
    ndim = ref[0].geometry.ndim if ref else 3
    spacings = [c.geometry.spacing[:ndim] for c in ref]
    shapes = [c.geometry.shape_ijk[:ndim] for c in ref]
    try:
        target_sp = (np.asarray(target_spacing, dtype=np.float64) if target_spacing is not None
                     else nnunet_target_spacing(spacings, shapes) if spacings else np.ones(ndim))
    except (TypeError, ValueError):
        target_sp = np.zeros(0)
    if target_sp.shape != (ndim,) or not np.all(target_sp > 0):
        raise ConversionError(f"target spacing must be {ndim} positive numbers"
                              f"{' (x, y) for 2D images' if ndim == 2 else ''}, got {target_spacing!r}")
    advised = radius_rule(spacings, target_sp, min_voxels=min_radius_voxels) if spacings else 1.0
    if ball_radius_mm is None:
        return advised
    if ball_radius_mm < advised:
        warnings.warn(f"ball radius {ball_radius_mm} mm is under {min_radius_voxels} voxels of the coarsest spacing "
                      f"({advised} mm advised): balls may vanish in nnU-Net's resampling, and patches are then "
                      "sampled less often around those landmarks (targets use the exact points)",
                      ConversionWarning, stacklevel=3)
    return float(ball_radius_mm)
