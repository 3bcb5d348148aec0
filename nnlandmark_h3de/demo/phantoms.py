"""Procedural head-like phantoms whose landmarks are exact by construction.

The demo and the tests need a landmark dataset that ships with the package (nothing is
downloaded) and whose ground truth is known exactly. Each phantom is drawn analytically in a
canonical head frame (LPS axes, millimetres): scalp, skull shell and brain ellipsoids, plus
small structures whose centres or tips ARE the landmarks (eyes, ears and ventricles as L/R pairs,
a midline rod with two tips, a pituitary-like dot). A random pose (rotation, translation, isotropic
scale) maps the frame into the world; every voxel centre is mapped back into the frame and the
shapes are evaluated there with a one-voxel linear partial-volume ramp, so a structure's drawn
centre of mass is its analytic centre and the landmark written to the file (the same pose applied
to the same analytic point) agrees with the image to sub-voxel accuracy.

Random draws use independent streams per case (pose, intensities, absence, noise), so switching
`absent_fraction` changes only which structures are drawn; the rest of the image is bit-identical.

`deform_mm` > 0 gives each phantom a random smooth nonlinear deformation (`synthesis.deformation`,
its own random stream; RMS displacement over the head): every voxel centre x is drawn with the
anatomy at the deformation's sampling point x + u(x), and the landmarks are moved by the exact
inverse, so subjects differ nonlinearly (an atlas's affine registration is no longer near the truth)
while the landmarks stay exact. With the default 0 the phantoms are those drawn without it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from nnlandmark_h3de.landmarks import ImageGeometry, LandmarkSet
from nnlandmark_h3de.landmarks.atomic import atomic_path, atomic_write_text
from nnlandmark_h3de.synthesis.deformation import random_deformation
from nnlandmark_h3de.synthesis.rotations import random_rotation

# ---------------------------------------------------------------- the phantom in its own frame
# Lengths are fractions of R = half the smallest field-of-view extent, so any shape/spacing fits.
HEAD_AXES = np.array([0.72, 0.82, 0.72])  # scalp outer surface
SKULL_OUTER = 0.94  # skull shell, as a fraction of HEAD_AXES
SKULL_INNER = 0.84  # brain = inside of the skull

# Random stream ids (one independent generator per case and purpose).
_POSE, _INTENSITY, _ABSENCE, _NOISE, _GEOMETRY, _DEFORMATION = range(6)


@dataclass(frozen=True)
class Structure:
    """One drawable structure and the landmarks it defines.

    kind 'ellipsoid': centre + semi-axes; kind 'rod': a cylinder along the frame's z axis with
    flat end caps at z0 < z1 (radius = axes[0]); its landmarks are the two end-cap centres.
    """
    name: str
    kind: str
    centre: Tuple[float, float, float]
    axes: Tuple[float, float, float]
    tissue: str  # key into the intensity table
    landmarks: Tuple[str, ...]
    z_range: Tuple[float, float] = (0.0, 0.0)

    def landmark_points(self) -> np.ndarray:
        """Landmark positions in the canonical frame (units of R), one row per landmark."""
        c = np.asarray(self.centre, dtype=np.float64)
        if self.kind == "ellipsoid":
            return c[None]
        top = c.copy(); top[2] = self.z_range[1]
        bottom = c.copy(); bottom[2] = self.z_range[0]
        return np.stack([top, bottom])


def _mirror(s: Structure, name: str, landmark: str) -> Structure:
    cx, cy, cz = s.centre
    return Structure(name, s.kind, (-cx, cy, cz), s.axes, s.tissue, (landmark,), s.z_range)


_L_EYE = Structure("L_eye", "ellipsoid", (0.22, -0.42, -0.12), (0.09, 0.09, 0.09), "eye", ("L_eye",))
_L_EAR = Structure("L_ear", "ellipsoid", (0.45, 0.05, -0.05), (0.05, 0.07, 0.11), "ear", ("L_ear",))
_L_VENT = Structure("L_ventricle", "ellipsoid", (0.15, 0.05, 0.15), (0.05, 0.18, 0.08), "csf", ("L_ventricle",))
STRUCTURES: Tuple[Structure, ...] = (
    _L_EYE, _mirror(_L_EYE, "R_eye", "R_eye"),
    _L_EAR, _mirror(_L_EAR, "R_ear", "R_ear"),
    _L_VENT, _mirror(_L_VENT, "R_ventricle", "R_ventricle"),
    Structure("rod", "rod", (0.0, 0.35, 0.0), (0.04, 0.04, 0.0), "rod", ("rod_top", "rod_bottom"), (-0.35, 0.10)),
    Structure("pituitary", "ellipsoid", (0.0, -0.05, -0.25), (0.05, 0.05, 0.05), "dot", ("pituitary",)),
)
LANDMARK_NAMES: List[str] = [n for s in STRUCTURES for n in s.landmarks]

# Mean intensity per tissue (before the per-case jitter, global scale and bias field).
TISSUE_INTENSITY = {"background": 0.0, "scalp": 0.35, "skull": 0.9, "brain": 0.5,
                    "eye": 0.95, "ear": 0.75, "csf": 0.12, "rod": 1.0, "dot": 0.8}


# ---------------------------------------------------------------------------- drawing helpers
def _occupancy(signed_distance: np.ndarray, ramp: float) -> np.ndarray:
    """Partial-volume fraction: 1 inside, 0 outside, linear over `ramp` around the surface."""
    return np.clip(0.5 - signed_distance / ramp, 0.0, 1.0)


def _ellipsoid_sd(p: np.ndarray, centre, axes) -> np.ndarray:
    """First-order signed distance to an ellipsoid surface (exact on the surface, symmetric)."""
    axes = np.asarray(axes, dtype=np.float64)
    q = (p - np.asarray(centre)) / axes
    f = np.sqrt(np.einsum("...i,...i->...", q, q))
    grad = np.sqrt(np.einsum("...i,...i->...", q / axes, q / axes)) / np.maximum(f, 1e-9)
    return (f - 1.0) / np.maximum(grad, 1e-9)


def _rod_sd(p: np.ndarray, s: Structure) -> np.ndarray:
    radial = np.hypot(p[..., 0] - s.centre[0], p[..., 1] - s.centre[1]) - s.axes[0]
    mid, half = 0.5 * (s.z_range[0] + s.z_range[1]), 0.5 * (s.z_range[1] - s.z_range[0])
    axial = np.abs(p[..., 2] - mid) - half
    return np.maximum(radial, axial)


def _structure_sd(p: np.ndarray, s: Structure) -> np.ndarray:
    if s.kind == "ellipsoid":
        return _ellipsoid_sd(p, s.centre, s.axes)
    if s.kind == "rod":
        return _rod_sd(p, s)
    raise ValueError(f"unknown structure kind {s.kind!r}")


def _structure_box(s: Structure, ramp: float) -> Tuple[np.ndarray, np.ndarray]:
    """(centre, half extents) of a box outside which the structure's signed distance is >= `ramp`, so its
    occupancy there is exactly 0. Ellipsoid: along axis i the first-order distance is at least
    (|q| - 1) * min(axes) with |q| > 1 + m_i / a_i, hence m_i = ramp * a_i / min(axes). Rod: exact
    distances along each box axis, hence m = ramp."""
    if s.kind == "ellipsoid":
        a = np.asarray(s.axes, dtype=np.float64)
        return np.asarray(s.centre, dtype=np.float64), a + ramp * a / a.min()
    mid, half = 0.5 * (s.z_range[0] + s.z_range[1]), 0.5 * (s.z_range[1] - s.z_range[0])
    r = float(s.axes[0])
    return np.array([s.centre[0], s.centre[1], mid]), np.array([r + ramp, r + ramp, half + ramp])


def _structure_occupancy(p: np.ndarray, s: Structure, ramp: float) -> Tuple[np.ndarray, np.ndarray]:
    """(mask of the voxels near the structure, their occupancy): the same values as
    `_occupancy(_structure_sd(p, s), ramp)` there, and 0 everywhere else, at a fraction of the cost (the
    small structures cover a few percent of a CT-sized volume)."""
    centre, half = _structure_box(s, ramp)
    near = np.ones(p.shape[:-1], dtype=bool)
    for axis in range(3):
        near &= np.abs(p[..., axis] - centre[axis]) <= half[axis]
    return near, _occupancy(_structure_sd(p[near], s), ramp)


def _bias_field(p: np.ndarray, direction: np.ndarray, curvature: float, strength: float) -> np.ndarray:
    """Smooth multiplicative bias at frame points p (..., d): a linear ramp along `direction` plus a
    radial quadratic term (any dimension)."""
    return 1.0 + strength * (p @ direction) + 0.5 * strength * curvature * np.einsum("...i,...i->...", p, p)


# ------------------------------------------------------------------------------- one phantom
@dataclass
class PhantomCase:
    """One rendered phantom: float32 array (z, y, x), its geometry and its landmarks (LPS)."""
    case_id: str
    array_zyx: np.ndarray
    geometry: ImageGeometry
    landmarks: LandmarkSet
    frame_to_world: np.ndarray  # 4x4 affine: canonical frame (mm) -> world LPS mm


def _case_rng(seed: int, case_index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(case_index), int(stream)])


def make_geometry(shape_zyx: Sequence[int], spacing_xyz: Sequence[float], oblique_deg: float,
                  rng: np.random.Generator) -> ImageGeometry:
    """Image centred on the world origin; direction rotated up to `oblique_deg` (0 = identity)."""
    direction = random_rotation(rng, oblique_deg) if oblique_deg > 0 else np.eye(3)
    shape_ijk = np.asarray(shape_zyx[::-1], dtype=np.float64)
    centre_offset = direction @ (np.asarray(spacing_xyz, dtype=np.float64) * (shape_ijk - 1) / 2)
    return ImageGeometry(tuple(int(s) for s in shape_ijk), tuple(float(s) for s in spacing_xyz),
                         tuple(float(o) for o in -centre_offset), tuple(float(d) for d in direction.ravel()))


def _intensity_draws(seed: int, case_index: int, table: Dict[str, float], ndim: int):
    """One case's intensity stream: each tissue's value +-10 %, a gain, and a bias field's unit
    direction (ndim) and curvature. Shared by the 3D and 2D phantoms (same draws, same order)."""
    rng = _case_rng(seed, case_index, _INTENSITY)
    tissue = {k: v * rng.uniform(0.9, 1.1) for k, v in table.items()}
    gain = rng.uniform(200.0, 1000.0)
    bias_dir = rng.normal(size=ndim)
    bias_dir /= np.linalg.norm(bias_dir)
    return tissue, gain, bias_dir, rng.uniform(-1, 1)


def _removed_structures(seed: int, case_index: int, structures, absent_fraction: float) -> set:
    """Names of the structures left out of one case, each with probability `absent_fraction`."""
    rng = _case_rng(seed, case_index, _ABSENCE)
    return {s.name for s in structures if rng.uniform() < absent_fraction}


def render_phantom(case_id: str, geometry: ImageGeometry, seed: int, case_index: int,
                   absent_fraction: float = 0.0, max_rotation_deg: float = 15.0,
                   max_translation_fraction: float = 0.05, scale_range=(0.92, 1.05),
                   noise_std: float = 0.03, bias_strength: float = 0.15, deform_mm: float = 0.0,
                   control_spacing_mm: float = 24.0) -> PhantomCase:
    """Draw one phantom on `geometry`; removed structures' landmarks are NaN (absent). `deform_mm` > 0:
    a random nonlinear deformation of that RMS over the head (see the module doc)."""
    R = 0.5 * float(np.min(np.asarray(geometry.spacing) * np.asarray(geometry.shape_ijk)))
    pose_rng = _case_rng(seed, case_index, _POSE)
    rot = random_rotation(pose_rng, max_rotation_deg)
    scale = pose_rng.uniform(*scale_range)
    translation = pose_rng.uniform(-1, 1, size=3) * max_translation_fraction * R
    frame_to_world = np.eye(4)
    frame_to_world[:3, :3] = scale * R * rot  # frame units are R; world is mm
    frame_to_world[:3, 3] = translation

    tissue, gain, bias_dir, bias_curv = _intensity_draws(seed, case_index, TISSUE_INTENSITY, 3)
    removed = _removed_structures(seed, case_index, STRUCTURES, absent_fraction)

    # Canonical-frame coordinates of every voxel centre, in units of R.
    zz, yy, xx = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in geometry.shape_zyx), indexing="ij")
    world = geometry.array_index_to_world(np.stack([zz, yy, xx], axis=-1))
    world_to_frame = np.linalg.inv(frame_to_world)
    p = world @ world_to_frame[:3, :3].T + world_to_frame[:3, 3]
    deformation = None
    if deform_mm > 0:  # each voxel shows the anatomy at its sampling point
        head_mask = _ellipsoid_sd(p, (0, 0, 0), HEAD_AXES) < 0
        deformation = random_deformation(geometry, _case_rng(seed, case_index, _DEFORMATION), deform_mm,
                                         control_spacing_mm, head_mask)
        world = world + deformation.sample_displacement(world.reshape(-1, 3)).reshape(world.shape)
        p = world @ world_to_frame[:3, :3].T + world_to_frame[:3, 3]
    ramp = float(np.mean(geometry.spacing)) / (scale * R)  # one voxel, in frame units

    head = HEAD_AXES
    img = tissue["scalp"] * _occupancy(_ellipsoid_sd(p, (0, 0, 0), head), ramp)
    for key, axes in (("skull", head * SKULL_OUTER), ("brain", head * SKULL_INNER)):
        occ = _occupancy(_ellipsoid_sd(p, (0, 0, 0), axes), ramp)
        img = img * (1 - occ) + tissue[key] * occ
    for s in STRUCTURES:
        if s.name in removed:
            continue
        near, occ = _structure_occupancy(p, s, ramp)
        img[near] = img[near] * (1 - occ) + tissue[s.tissue] * occ

    bias = _bias_field(p, bias_dir, bias_curv, bias_strength)
    noise = _case_rng(seed, case_index, _NOISE).normal(0.0, noise_std, size=img.shape)
    array = (gain * (img * bias + noise)).astype(np.float32)

    pts_frame = np.concatenate([s.landmark_points() for s in STRUCTURES])
    pts_world = pts_frame @ frame_to_world[:3, :3].T + frame_to_world[:3, 3]
    if deformation is not None:
        pts_world = deformation.move_points(pts_world)
    absent_names = {n for s in STRUCTURES if s.name in removed for n in s.landmarks}
    for i, n in enumerate(LANDMARK_NAMES):
        if n in absent_names:
            pts_world[i] = np.nan
    landmarks = LandmarkSet(list(LANDMARK_NAMES), pts_world, source=case_id)
    return PhantomCase(case_id, array, geometry, landmarks, frame_to_world)


# --------------------------------------------------------------------------- many, on disk
def _check_args(n_cases, shape, spacing, absent_fraction, ndim: int = 3):
    """The generators' common argument checks; `ndim` 3 (shape (z, y, x)) or 2 (shape (y, x))."""
    array_axes, itk_axes, unit = ("(z, y, x)", "(x, y, z)", "voxels") if ndim == 3 else ("(y, x)", "(x, y)", "pixels")
    if int(n_cases) < 1:
        raise ValueError(f"n_cases must be >= 1, got {n_cases}")
    if len(shape) != ndim or min(shape) < 16:
        raise ValueError(f"shape must be {ndim} sizes {array_axes} of at least 16 {unit}, got {shape}")
    if len(spacing) != ndim or min(spacing) <= 0:
        raise ValueError(f"spacing must be {ndim} positive values {itk_axes} in mm, got {spacing}")
    if not 0.0 <= absent_fraction <= 1.0:
        raise ValueError(f"absent_fraction must be in [0, 1], got {absent_fraction}")


def _write_case(out: Path, case: PhantomCase) -> Tuple[Path, Path]:
    """`out/images/<case>.nii.gz` (the geometry's 2D or 3D image) + `out/landmarks/<case>.mrk.json`, atomically."""
    import SimpleITK as sitk

    from nnlandmark_h3de.landmarks import write_landmarks

    image_path = out / "images" / f"{case.case_id}.nii.gz"
    landmark_path = out / "landmarks" / f"{case.case_id}.mrk.json"
    with atomic_path(image_path) as tmp:
        sitk.WriteImage(case.geometry.to_sitk_image(case.array_zyx), str(tmp), True)
    write_landmarks(case.landmarks, landmark_path)
    return image_path, landmark_path


def generate_phantom_cases(output_dir, n_cases: int, shape=(64, 64, 64), spacing=(2.0, 2.0, 2.0),
                           seed: int = 0, absent_fraction: float = 0.0, oblique_deg: float = 0.0,
                           max_rotation_deg: float = 15.0, max_translation_fraction: float = 0.05,
                           scale_range=(0.92, 1.05), noise_std: float = 0.03, bias_strength: float = 0.15,
                           case_prefix: str = "phantom", progress: bool = True, deform_mm: float = 0.0,
                           control_spacing_mm: float = 24.0) -> Dict[str, Tuple[Path, Path]]:
    """Write `n_cases` phantoms as `images/<case>.nii.gz` + `landmarks/<case>.mrk.json` (LPS).

    shape is (z, y, x) voxels, spacing (x, y, z) mm like SimpleITK. `absent_fraction` is the
    probability that each structure is left out of a case (its landmarks are then
    `positionStatus: undefined`). `oblique_deg` > 0 gives each image a random non-identity
    direction matrix. `deform_mm` > 0 deforms each phantom nonlinearly (RMS displacement over the
    head, smooth on the scale of `control_spacing_mm`), its landmarks moved exactly. Also writes
    `phantoms.json` (the parameters, for reproducibility).
    Returns {case_id: (image_path, landmark_path)}; the same seed gives the same files.
    """
    from tqdm import tqdm

    _check_args(n_cases, shape, spacing, absent_fraction)
    if not deform_mm >= 0 or not control_spacing_mm > 0:
        raise ValueError(f"deform_mm must be >= 0 and control_spacing_mm > 0, got {deform_mm}, {control_spacing_mm}")
    out = Path(output_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "landmarks").mkdir(parents=True, exist_ok=True)
    cases: Dict[str, Tuple[Path, Path]] = {}
    for i in tqdm(range(int(n_cases)), desc="phantoms", unit="case", disable=not progress):
        case_id = f"{case_prefix}_{i:03d}"
        geometry = make_geometry(shape, spacing, oblique_deg, _case_rng(seed, i, _GEOMETRY))
        case = render_phantom(case_id, geometry, seed, i, absent_fraction, max_rotation_deg,
                              max_translation_fraction, scale_range, noise_std, bias_strength,
                              deform_mm, control_spacing_mm)
        cases[case_id] = _write_case(out, case)
    params = {"generator": "nnlandmark_h3de.demo.phantoms", "n_cases": int(n_cases),
              "shape_zyx": [int(s) for s in shape], "spacing_xyz": [float(s) for s in spacing],
              "seed": int(seed), "absent_fraction": float(absent_fraction), "oblique_deg": float(oblique_deg),
              "max_rotation_deg": float(max_rotation_deg), "max_translation_fraction": float(max_translation_fraction),
              "scale_range": [float(s) for s in scale_range], "noise_std": float(noise_std),
              "bias_strength": float(bias_strength), "deform_mm": float(deform_mm),
              "control_spacing_mm": float(control_spacing_mm), "landmarks": LANDMARK_NAMES, "cases": sorted(cases)}
    atomic_write_text(out / "phantoms.json", json.dumps(params, indent=2) + "\n")
    return cases
