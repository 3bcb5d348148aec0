"""Random smooth nonlinear (diffeomorphic) deformations that carry landmarks exactly.

A rigid or affine re-pose is undone by affine registration almost perfectly; real subjects differ
nonlinearly. This module draws a random deformation the way subject-to-subject variability looks:
smooth on the scale of `control_spacing_mm`, with a chosen RMS displacement over the foreground.

Construction (in the image's own axes, so the grid hugs the field of view):
- a stationary velocity field v: cubic B-spline with random normal coefficients on control points
  `control_spacing_mm` apart, covering the image plus one control spacing; the coefficients of two
  further rings are zero, so v and every field below vanish smoothly at the field grid's border;
- the anatomy moves by exp(v) and the image is sampled through exp(-v), both by scaling and
  squaring on a grid of a quarter control spacing: the exponential of a smooth velocity field is a
  diffeomorphism (invertible, Jacobian determinant > 0);
- the velocity is scaled so that the anatomy's RMS displacement over the foreground equals `rms_mm`.

The image is resampled through the linearly interpolated sampling field u (output point x reads
the input at x + u(x), what `sitk.DisplacementFieldTransform` does). A landmark p goes to the p'
with p' + u(p') = p, found by Newton iterations started from p + w(p) (w = the anatomy field), so
the landmark is exact for the image actually written, to far below 0.01 mm. 2D images (ndim 2)
are deformed in their plane.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np

from nnlandmark_h3de.landmarks import ImageGeometry, LandmarkSet

FIELD_NODES_PER_CONTROL = 4  # field grid spacing = control spacing / 4
_ACTIVE_MARGIN = 1  # random control points this many control spacings beyond the image
_ZERO_RINGS = 2  # then this many rings of zero coefficients (the cubic B-spline's support)
_MAX_RMS_POINTS = 50_000  # foreground points used to measure the RMS displacement
_INVERSE_TOL_MM = 1e-6


def _bspline3(t: np.ndarray) -> np.ndarray:
    """The cubic B-spline basis (support |t| < 2)."""
    a = np.abs(t)
    return np.where(a < 1, 2 / 3 - a ** 2 + a ** 3 / 2, np.where(a < 2, (2 - a) ** 3 / 6, 0.0))


def _interpolate(field: np.ndarray, geometry: ImageGeometry, points_lps: np.ndarray) -> np.ndarray:
    """Linear interpolation of a (*spatial, 3) world-vector field at world points (N, 3); zero
    outside the grid (as ITK's displacement field transform)."""
    from scipy.ndimage import map_coordinates
    d = geometry.ndim
    idx = geometry.world_to_array_index(points_lps)[..., -d:].T
    return np.stack([map_coordinates(field[..., c], idx, order=1, mode="constant", cval=0.0)
                     for c in range(3)], axis=-1)


def _field_geometry(geometry: ImageGeometry, control_spacing_mm: float):
    """The field grid (image direction, spacing control/4, the image plus 3 control spacings and one
    node each side) and, per spatial axis in array order, the B-spline matrix (field nodes x control
    points) and the mask of random control points."""
    d, c = geometry.ndim, float(control_spacing_mm)
    h = c / FIELD_NODES_PER_CONTROL
    lo = -(_ACTIVE_MARGIN + _ZERO_RINGS) * c - h
    sizes, offsets, bases, active = [], [], [], []
    for axis in range(3):
        if axis >= d:
            sizes.append(1); offsets.append(0.0)
            continue
        extent = (geometry.shape_ijk[axis] - 1) * geometry.spacing[axis]
        k_max = int(np.ceil(extent / c)) + _ACTIVE_MARGIN + _ZERO_RINGS
        ks = np.arange(-(_ACTIVE_MARGIN + _ZERO_RINGS), k_max + 1)
        nodes = lo + h * np.arange(int(round((k_max * c + h - lo) / h)) + 1)
        sizes.append(len(nodes)); offsets.append(lo)
        bases.append(_bspline3(nodes[:, None] / c - ks[None, :]))
        active.append((ks >= -_ACTIVE_MARGIN) & (ks <= k_max - _ZERO_RINGS))
    spacing = tuple(h if a < d else geometry.spacing[a] for a in range(3))
    origin = geometry.itk_index_to_world(np.asarray(offsets) / np.asarray(geometry.spacing))
    field = ImageGeometry(tuple(sizes), spacing, tuple(float(o) for o in origin), geometry.direction, d)
    return field, bases[::-1], active[::-1]


def _node_points(geometry: ImageGeometry) -> np.ndarray:
    """World points of a grid's nodes, (*spatial, 3) in array order (2D: (y, x, 3))."""
    shape = geometry.shape_zyx[-geometry.ndim:]
    idx = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij"), -1)
    if geometry.ndim == 2:
        idx = np.concatenate([np.zeros(idx.shape[:-1] + (1,)), idx], axis=-1)
    return geometry.array_index_to_world(idx)


def _exponential(velocity: np.ndarray, geometry: ImageGeometry, nodes: np.ndarray) -> np.ndarray:
    """Displacement field of exp(velocity) by scaling and squaring (steps under a quarter node)."""
    peak = float(np.linalg.norm(velocity, axis=-1).max())
    h = min(geometry.spacing[:geometry.ndim])
    n = max(0, int(np.ceil(np.log2(max(peak, 1e-12) / (0.25 * h))))) + 2
    u = velocity / 2.0 ** n
    for _ in range(n):
        u = u + _interpolate(u, geometry, (nodes + u).reshape(-1, 3)).reshape(u.shape)
    return u


@dataclass
class Deformation:
    """A smooth invertible deformation on `field_geometry` (world LPS mm). The anatomy at p moves to
    `move_points(p)`; the deformed image at x shows the input at x + `sample_displacement(x)`."""
    field_geometry: ImageGeometry
    sampling_field: np.ndarray  # (*spatial, 3): output point x -> input point x + u(x)
    anatomy_field: np.ndarray  # (*spatial, 3): p -> p + w(p), the inverse up to grid error
    rms_mm: float  # achieved RMS anatomy displacement over the foreground

    def sample_displacement(self, points_lps: np.ndarray) -> np.ndarray:
        """u at world points (N, 3): the deformed image at x shows the input at x + u(x)."""
        p = np.atleast_2d(np.asarray(points_lps, dtype=np.float64))
        out = np.full(p.shape, np.nan)
        ok = np.isfinite(p).all(axis=1)
        out[ok] = _interpolate(self.sampling_field, self.field_geometry, p[ok])
        return out

    def sampling_transform(self):
        """`sitk.DisplacementFieldTransform` for `sitk.Resample`: output (deformed) point -> input point."""
        import SimpleITK as sitk
        g, d = self.field_geometry, self.field_geometry.ndim
        img = sitk.GetImageFromArray(np.ascontiguousarray(self.sampling_field[..., :d], dtype=np.float64),
                                     isVector=True)
        img.SetSpacing(g.spacing[:d])
        img.SetOrigin(g.origin[:d])
        img.SetDirection(tuple(float(v) for v in g.direction_matrix[:d, :d].ravel()))
        return sitk.DisplacementFieldTransform(img)

    def move_points(self, points_lps: np.ndarray) -> np.ndarray:
        """Anatomy points into the deformed image: the p' with p' + u(p') = p (Newton; NaN rows stay NaN)."""
        p = np.atleast_2d(np.asarray(points_lps, dtype=np.float64))
        out = np.full(p.shape, np.nan)
        ok = np.isfinite(p).all(axis=1)
        if ok.any():
            out[ok] = self._invert_sampling(p[ok])
        return out

    def _invert_sampling(self, p: np.ndarray) -> np.ndarray:
        d = self.field_geometry.ndim
        eps = 1e-3 * min(self.field_geometry.spacing[:d])
        x = p + _interpolate(self.anatomy_field, self.field_geometry, p)
        for _ in range(100):
            residual = x + _interpolate(self.sampling_field, self.field_geometry, x) - p
            if np.abs(residual).max() < _INVERSE_TOL_MM:
                return x
            jac = np.repeat(np.eye(3)[None], len(x), axis=0)
            for a in range(d):
                step = np.zeros(3); step[a] = eps
                diff = (_interpolate(self.sampling_field, self.field_geometry, x + step)
                        - _interpolate(self.sampling_field, self.field_geometry, x - step))
                jac[:, :, a] += diff / (2 * eps)
            x = x - np.linalg.solve(jac, residual[..., None])[..., 0]
        raise RuntimeError(f"deformation inverse did not converge (residual {np.abs(residual).max():.2g} mm): "
                           "the deformation is too strong for its control spacing")


def _foreground_points(geometry: ImageGeometry, mask: Optional[np.ndarray]) -> np.ndarray:
    """World points of (a regular subsample of) the mask's voxels; no mask: the whole image."""
    shape = geometry.shape_zyx
    if mask is None:
        flat = np.arange(int(np.prod(shape)))
    else:
        mask = np.asarray(mask, dtype=bool)
        if mask.size != int(np.prod(shape)):
            raise ValueError(f"deformation mask has shape {mask.shape}, the image {shape} (z, y, x)")
        flat = np.flatnonzero(mask.ravel())
        if flat.size == 0:
            raise ValueError("deformation mask has no foreground voxel: cannot scale the displacement")
    flat = flat[::max(1, int(np.ceil(flat.size / _MAX_RMS_POINTS)))]
    return geometry.array_index_to_world(np.stack(np.unravel_index(flat, shape), -1).astype(np.float64))


def foreground_mask(array_zyx: np.ndarray) -> Optional[np.ndarray]:
    """Voxels above 10 % of the robust [1, 99] % intensity range; None when that selects nothing
    or everything (a flat image: use the whole field of view)."""
    a = np.asarray(array_zyx, dtype=np.float64)
    lo, hi = np.percentile(a, [1, 99])
    mask = a > lo + 0.1 * (hi - lo)
    return mask if 0 < mask.sum() < mask.size else None


def random_deformation(geometry: ImageGeometry, rng: np.random.Generator, rms_mm: float,
                       control_spacing_mm: float = 24.0, mask: Optional[np.ndarray] = None) -> Deformation:
    """A random diffeomorphism on `geometry` whose anatomy displacement has RMS `rms_mm` over `mask`
    (array (z, y, x) of the geometry; None: the whole image). rms_mm = 0: the identity, no draws."""
    if not np.isfinite(rms_mm) or rms_mm < 0:
        raise ValueError(f"rms_mm must be >= 0, got {rms_mm}")
    if not control_spacing_mm > 0:
        raise ValueError(f"control_spacing_mm must be > 0, got {control_spacing_mm}")
    field, bases, active = _field_geometry(geometry, control_spacing_mm)
    nodes = _node_points(field)
    if rms_mm == 0:
        zero = np.zeros(nodes.shape)
        return Deformation(field, zero, zero.copy(), 0.0)
    d = geometry.ndim
    coef = np.zeros(tuple(b.shape[1] for b in bases) + (d,))
    sel = np.ix_(*(np.flatnonzero(m) for m in active))
    coef[sel] = rng.standard_normal(coef[sel].shape)
    spec = "zc,yb,xa,cbae->zyxe" if d == 3 else "yb,xa,bae->yxe"
    velocity = np.zeros(nodes.shape)
    velocity[..., :d] = np.einsum(spec, *bases, coef, optimize=True) @ geometry.direction_matrix[:d, :d].T
    points = _foreground_points(geometry, mask)

    def rms_of(scale):
        w = _exponential(scale * velocity, field, nodes)
        return w, float(np.sqrt(np.mean(np.sum(_interpolate(w, field, points) ** 2, axis=-1))))

    scale = rms_mm / max(float(np.sqrt(np.mean(np.sum(_interpolate(velocity, field, points) ** 2, -1)))), 1e-12)
    for _ in range(8):
        anatomy, achieved = rms_of(scale)
        if abs(achieved / rms_mm - 1) < 1e-3:
            break
        scale *= rms_mm / achieved
    return Deformation(field, _exponential(-scale * velocity, field, nodes), anatomy, achieved)


def deform_case(image, landmark_set: LandmarkSet, rng: np.random.Generator, rms_mm: float,
                control_spacing_mm: float = 24.0, interpolator=None):
    """Deform one case (2D or 3D) on its own grid; returns (sitk image float32, LandmarkSet,
    displacement_mm (L,)): each landmark's displacement, NaN where absent. RMS over the foreground
    (`foreground_mask`); landmarks pushed out of the field of view become absent."""
    import SimpleITK as sitk
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() not in (2, 3):
        raise ValueError(f"{landmark_set.source}: deform_case needs a scalar 2D or 3D image")
    geometry = ImageGeometry.from_sitk(image)
    array = sitk.GetArrayViewFromImage(image)
    deformation = random_deformation(geometry, rng, rms_mm, control_spacing_mm, foreground_mask(array))
    new_image = sitk.Resample(image, image, deformation.sampling_transform(),
                              sitk.sitkLinear if interpolator is None else interpolator,
                              float(np.min(array)), sitk.sitkFloat32)
    points = deformation.move_points(landmark_set.points_lps)
    present = np.isfinite(points).all(axis=1)
    present[present] = geometry.contains_array_index(geometry.world_to_array_index(points[present]), margin=0.0)
    points[~present] = np.nan
    new_ls = LandmarkSet(list(landmark_set.names), points, descriptions=landmark_set.descriptions,
                         source=landmark_set.source)
    return new_image, new_ls, np.linalg.norm(points - landmark_set.points_lps, axis=1)


def displacement_summary(displacement_mm: np.ndarray) -> Dict[str, float]:
    """{mean_mm, max_mm, n} over the finite entries (NaN figures when there are none)."""
    v = np.asarray(displacement_mm, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean_mm": float("nan"), "max_mm": float("nan"), "n": 0}
    return {"mean_mm": float(v.mean()), "max_mm": float(v.max()), "n": int(v.size)}


def landmark_displacement_summary(before_lps: np.ndarray, after_lps: np.ndarray) -> Dict[str, float]:
    """Mean and max distance between matching rows of two (L, 3) point sets (rows present in both)."""
    before, after = np.asarray(before_lps, np.float64), np.asarray(after_lps, np.float64)
    if before.shape != after.shape:
        raise ValueError(f"point sets differ in shape: {before.shape} vs {after.shape}")
    return displacement_summary(np.linalg.norm(after - before, axis=-1))
