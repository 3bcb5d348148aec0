"""Random re-posing of an image and its landmarks (rigid + isotropic scale, field-of-view crop,
intensity changes).

Templates that all live in one standard space teach a model nothing about pose: the same landmark
sits at the same world point in every image. Re-posing moves the anatomy by a random similarity
transform about the image centre, resamples it onto a (possibly cropped) copy of the original
grid, and moves the landmarks with it, so train and test cases differ the way scans do.

The transform convention is the one that is easy to get backwards: the anatomy moves by
    x' = A (x - c) + c + t,   A = s * Rot,
so a landmark p goes to p' = A (p - c) + c + t, while `sitk.Resample` needs the map from OUTPUT
points to INPUT points, i.e. the inverse x = A^-1 (x' - c) + c - A^-1 t.

2D images (the z = 0 plane of a 3D geometry, see landmarks/geometry.py) are re-posed in their
plane: a rotation about z, a translation with z = 0, the crop in x and y; the pose is still a
3D one (points keep z = 0), resampled with its 2x2 block.

`deform_mm` > 0 adds a random smooth nonlinear deformation (`synthesis.deformation`) of the input
anatomy before the pose: p -> pose(deformation(p)), resampled once through the composite transform.
Its random draws come after the pose and the crop, so a seed gives the same pose and crop with and
without deformation; with `deform_mm` = 0 nothing else is drawn and the result is the pose-only one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from nnlandmark_h3de.landmarks import ImageGeometry, LandmarkSet
from nnlandmark_h3de.synthesis.deformation import Deformation, foreground_mask, random_deformation
from nnlandmark_h3de.synthesis.rotations import random_rotation, rotation_about_z


@dataclass(frozen=True)
class IntensityChange:
    """Random intensity change: gamma on the robust [1, 99] % range, a global gain, Gaussian noise
    (std as a fraction of that range)."""
    gamma_range: Tuple[float, float] = (0.7, 1.4)
    gain_range: Tuple[float, float] = (0.8, 1.25)
    noise_fraction: float = 0.02


@dataclass(frozen=True)
class Pose:
    """x' = matrix @ (x - centre) + centre + translation, in world LPS mm."""
    matrix: np.ndarray
    centre: np.ndarray
    translation: np.ndarray

    def apply(self, points_lps: np.ndarray) -> np.ndarray:
        """Move world points with the anatomy (NaN rows stay NaN)."""
        p = np.asarray(points_lps, dtype=np.float64)
        return (p - self.centre) @ self.matrix.T + self.centre + self.translation

    def resampling_transform(self, ndim: int = 3):
        """The sitk transform for `sitk.Resample`: output point -> input point (the inverse pose);
        `ndim` = 2 for a 2D image (an in-plane pose: its leading 2x2 block)."""
        import SimpleITK as sitk
        inv = np.linalg.inv(self.matrix)
        t = sitk.AffineTransform(ndim)
        t.SetMatrix(tuple(float(v) for v in inv[:ndim, :ndim].ravel()))
        t.SetCenter(tuple(float(v) for v in self.centre[:ndim]))
        t.SetTranslation(tuple(float(v) for v in (-inv @ self.translation)[:ndim]))
        return t


def image_centre(geometry: ImageGeometry) -> np.ndarray:
    """World point of the image's middle (continuous index (n-1)/2 per axis)."""
    return geometry.itk_index_to_world((np.asarray(geometry.shape_ijk, dtype=np.float64) - 1) / 2)


def random_pose(rng: np.random.Generator, centre, max_rotation_deg: float = 15.0,
                max_translation_mm: float = 10.0, scale_range=(0.9, 1.1), ndim: int = 3) -> Pose:
    """Rotation about a random axis (|angle| <= max), translation uniform in a cube, isotropic scale;
    `ndim` = 2: rotation about z and a translation in the z = 0 plane (a 2D image's pose)."""
    if ndim == 2:
        rot = rotation_about_z(rng.uniform(-max_rotation_deg, max_rotation_deg))
    else:
        rot = random_rotation(rng, max_rotation_deg)
    scale = rng.uniform(*scale_range)
    translation = rng.uniform(-max_translation_mm, max_translation_mm, size=3)
    if ndim == 2:
        translation[2] = 0.0
    return Pose(scale * rot, np.asarray(centre, dtype=np.float64), translation)


def random_crop(geometry: ImageGeometry, rng: np.random.Generator,
                crop_fraction=(1.0, 1.0)) -> ImageGeometry:
    """A random box of the grid, each axis keeping a fraction in `crop_fraction` of its voxels."""
    lo, hi = crop_fraction
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"crop_fraction must satisfy 0 < min <= max <= 1, got {crop_fraction}")
    size = np.asarray(geometry.shape_ijk)
    new_size = np.maximum(1, np.round(size * rng.uniform(lo, hi, size=3)).astype(int))
    start = np.array([rng.integers(0, n - m + 1) for n, m in zip(size, new_size)])
    origin = geometry.itk_index_to_world(start.astype(np.float64))
    return ImageGeometry(tuple(int(s) for s in new_size), geometry.spacing,
                         tuple(float(o) for o in origin), geometry.direction, geometry.ndim)


def change_intensity(array: np.ndarray, rng: np.random.Generator, change: IntensityChange) -> np.ndarray:
    lo, hi = np.percentile(array, [1, 99])
    span = max(float(hi - lo), 1e-6)
    x = np.clip((array - lo) / span, 0, None)
    x = x ** rng.uniform(*change.gamma_range)
    x = x * rng.uniform(*change.gain_range)
    x = x + rng.normal(0.0, change.noise_fraction, size=x.shape)
    return (x * span + lo).astype(np.float32)


def resample_posed(image, pose: Pose, output: ImageGeometry, interpolator=None, default_value=None,
                   deformation: Optional[Deformation] = None):
    """The image with its anatomy moved by `pose` (after `deformation`, when given), sampled on the
    `output` grid in one resampling."""
    import SimpleITK as sitk
    ref = output.to_sitk_image(np.zeros(output.shape_zyx, np.uint8))
    if default_value is None:
        default_value = float(sitk.GetArrayViewFromImage(image).min())
    transform = pose.resampling_transform(image.GetDimension())
    if deformation is not None:  # ITK applies the last transform first: output -> un-posed -> input
        transform = sitk.CompositeTransform([deformation.sampling_transform(), transform])
    return sitk.Resample(image, ref, transform, sitk.sitkLinear if interpolator is None else interpolator,
                         float(default_value), sitk.sitkFloat32)


def repose_case(image, landmark_set: LandmarkSet, rng: np.random.Generator, max_rotation_deg: float = 15.0,
                max_translation_mm: float = 10.0, scale_range=(0.9, 1.1), crop_fraction=(1.0, 1.0),
                intensity: Optional[IntensityChange] = IntensityChange(), interpolator=None,
                margin_vox: float = 0.0, deform_mm: float = 0.0, control_spacing_mm: float = 24.0,
                return_displacement: bool = False):
    """Randomly re-pose one case (2D or 3D); returns (new sitk image (float32), new LandmarkSet), and
    with `return_displacement` also each landmark's displacement (mm) by the nonlinear deformation
    alone (NaN where the new landmark is absent; zeros without deformation).

    Landmarks follow the anatomy exactly; those that end up outside the new field of view (beyond
    the outermost voxel centres widened by `margin_vox`; negative = a safety margin inside) become
    absent, as do landmarks that were absent. `intensity=None` keeps the resampled intensities.
    `deform_mm` > 0: a random nonlinear deformation of that RMS displacement over the foreground,
    smooth on the scale of `control_spacing_mm`, before the pose (see the module doc).
    """
    import SimpleITK as sitk
    geometry = ImageGeometry.from_sitk(image)
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() not in (2, 3):
        raise ValueError(f"{landmark_set.source}: repose_case needs a scalar 2D or 3D image")
    pose = random_pose(rng, image_centre(geometry), max_rotation_deg, max_translation_mm, scale_range, geometry.ndim)
    output = random_crop(geometry, rng, crop_fraction)
    deformation = None
    if deform_mm > 0:
        deformation = random_deformation(geometry, rng, deform_mm, control_spacing_mm,
                                         foreground_mask(sitk.GetArrayViewFromImage(image)))
    new_image = resample_posed(image, pose, output, interpolator, deformation=deformation)
    if intensity is not None:
        new_image = output.to_sitk_image(change_intensity(sitk.GetArrayFromImage(new_image), rng, intensity))
    deformed = landmark_set.points_lps if deformation is None else deformation.move_points(landmark_set.points_lps)
    points = pose.apply(deformed)
    present = ~np.isnan(points).any(axis=1)
    inside = np.zeros(len(points), bool)
    if present.any():
        inside[present] = output.contains_array_index(output.world_to_array_index(points[present]), margin=margin_vox)
    points[~inside] = np.nan
    new_ls = LandmarkSet(list(landmark_set.names), points, descriptions=landmark_set.descriptions,
                         source=landmark_set.source)
    if not return_displacement:
        return new_image, new_ls
    displacement = np.linalg.norm(deformed - landmark_set.points_lps, axis=1)
    displacement[~inside] = np.nan
    return new_image, new_ls, displacement
