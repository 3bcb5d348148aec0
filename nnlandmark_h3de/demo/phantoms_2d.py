"""Procedural 2D X-ray-like phantoms (lateral cephalograms) whose landmarks are exact by construction.

The 2D counterpart of `nnlandmark_h3de.demo.phantoms`: each case is drawn analytically in a canonical
frame (u along the image x axis = anterior, the face looks right; v along the image y axis = inferior,
downwards on screen; units of R, see `frame_unit_mm`) and mapped into the image by a random in-plane
pose (rotation, translation, isotropic scale). The anatomy is a skull-like outline (the bright shell
of an ellipse), a maxilla, a jaw (half an elliptic shell and a ramus) and a cephalostat ear rod; the
landmark structures on top of it are

  distinct      sella (a dot in a cup), nasion (apex of a wedge: a notch-like tip), orbit (centre of a
                ring), porion (centre of the ear-rod ring), menton (apex of the chin wedge);
  look-alike    ANS / PNS (the two ends of one palate bar) and tooth_1..tooth_4 (four identical
                teeth in a row, tooth_1 the most anterior): only the global layout tells them apart.

Like a radiograph, the picture is the SUM of the structures' attenuations (overlaps add up, nothing
hides anything), times a smooth bias field, plus noise. Every structure is evaluated at every pixel
centre mapped back into the frame, with a one-pixel linear partial-volume ramp, so a dot's or ring's
drawn centre of mass is its analytic centre, a bar's ends and a wedge's apex are where the drawn
shapes end, and the landmark written to the file (the same pose applied to the same analytic point)
agrees with the image to sub-pixel accuracy. Because the picture is a sum, a case drawn without a
structure differs from the full case by exactly that structure's own contribution.

Each landmark structure can be absent (probability `absent_fraction` each; a missing tooth takes only
its own landmark). Random draws use independent streams per case and purpose (pose, intensities,
absence, noise), so switching `absent_fraction` changes only which structures are drawn.

Images are 2D NIfTI with the pixel spacing in the header (an `ImageGeometry` with ndim = 2, identity
direction, centred on the world origin); landmarks are world LPS mm with z = 0.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

# random streams (one independent generator per case and purpose) shared with the 3D generator
from nnlandmark_h3de.demo.phantoms import (_NOISE, _POSE, PhantomCase, _bias_field, _case_rng, _check_args,
                                           _ellipsoid_sd, _intensity_draws, _occupancy, _removed_structures,
                                           _write_case)
from nnlandmark_h3de.landmarks import ImageGeometry, LandmarkSet
from nnlandmark_h3de.landmarks.atomic import atomic_write_text
from nnlandmark_h3de.synthesis.rotations import rotation_about_z

# The design fits the box |u| <= 1.0, |v| <= 1.2 (the landmarks a much smaller one, so that any pose
# within the default ranges keeps them well inside); R is chosen so that box fills the field of view.
DESIGN_HALF_EXTENT = (1.0, 1.2)
# Default pose ranges. `check_pose_ranges` (every landmark >= LANDMARK_MARGIN_PX inside for every pose)
# passes for them at the default shape and e.g. 72 x 60 or 64 x 64 and larger; for smaller or much more
# elongated images the generator refuses them with a message that asks for smaller ranges.
MAX_ROTATION_DEG = 12.0
MAX_TRANSLATION_FRACTION = 0.05
SCALE_RANGE = (0.9, 1.08)
DEFAULT_SHAPE = (96, 80)  # (y, x) pixels
DEFAULT_SPACING = (1.0, 1.0)  # (x, y) mm
LANDMARK_MARGIN_PX = 2.0  # every landmark stays at least this far inside the outermost pixel centres


@dataclass(frozen=True)
class Structure2D:
    """One drawable 2D structure (frame units) and the landmarks it defines.

    kind      points                    size                      landmarks
    ellipse   (centre,)                 (a, b) semi-axes          the centre
    ring      (centre,)                 (a, b, thickness)         the centre (an elliptic shell)
    cup       (centre,)                 (a, b, thickness)         -- (the lower half of a ring)
    bar       (end_0, end_1)            (half_width,)             the two end centres
    wedge     (apex, base_centre)       (half_base,)              the apex (an isosceles triangle)
    """
    name: str
    kind: str
    points: Tuple[Tuple[float, float], ...]
    size: Tuple[float, ...]
    tissue: str  # key into TISSUE_ATTENUATION
    landmarks: Tuple[str, ...] = ()

    def landmark_points(self) -> np.ndarray:
        """Landmark positions in the frame (units of R), one row per landmark."""
        pts = np.asarray(self.points, dtype=np.float64)
        if not self.landmarks:
            return np.zeros((0, 2))
        if self.kind in ("ellipse", "ring"):
            return pts[:1]
        if self.kind == "bar":
            return pts[:2]
        if self.kind == "wedge":
            return pts[:1]
        raise ValueError(f"{self.name}: a {self.kind!r} defines no landmark")

    def vertices(self) -> np.ndarray:
        """A wedge's triangle (apex, base corner, base corner), counter-clockwise."""
        apex, base = np.asarray(self.points, dtype=np.float64)
        d = (apex - base) / np.linalg.norm(apex - base)
        n = np.array([-d[1], d[0]])
        tri = np.stack([apex, base + self.size[0] * n, base - self.size[0] * n])
        e1, e2 = tri[1] - tri[0], tri[2] - tri[0]
        return tri if e1[0] * e2[1] - e1[1] * e2[0] > 0 else tri[[0, 2, 1]]


# Always drawn: the head that gives the landmarks their context (never absent, no landmarks).
ANATOMY: Tuple[Structure2D, ...] = (
    Structure2D("scalp", "ellipse", ((-0.10, -0.32),), (0.88, 0.80), "soft"),
    Structure2D("face", "ellipse", ((0.32, 0.41),), (0.50, 0.60), "soft"),
    Structure2D("skull", "ring", ((-0.12, -0.36),), (0.80, 0.72, 0.07), "bone"),
    Structure2D("maxilla", "ellipse", ((0.36, 0.18),), (0.30, 0.16), "maxilla"),
    Structure2D("mandible", "cup", ((0.20, 0.42),), (0.52, 0.48, 0.08), "bone"),
    Structure2D("ramus", "bar", ((-0.28, 0.46), (-0.36, 0.08)), (0.045,), "bone"),
    Structure2D("sella_turcica", "cup", ((-0.18, -0.24),), (0.12, 0.12, 0.03), "bone"),
    Structure2D("ear_rod_holder", "bar", ((-0.50, -0.11), (-0.50, -1.30)), (0.02,), "metal"),
)
# The landmark structures, in channel order; each may be absent.
_TEETH_U = (0.64, 0.46, 0.28, 0.10)  # tooth_1 (anterior) .. tooth_4
STRUCTURES_2D: Tuple[Structure2D, ...] = (
    Structure2D("sella", "ellipse", ((-0.18, -0.24),), (0.06, 0.06), "dot", ("sella",)),
    Structure2D("nasion", "wedge", ((0.56, -0.28), (0.76, -0.28)), (0.09,), "wedge", ("nasion",)),
    Structure2D("orbit", "ring", ((0.38, -0.10),), (0.12, 0.12, 0.04), "orbit", ("orbit",)),
    Structure2D("porion", "ring", ((-0.50, -0.02),), (0.09, 0.09, 0.045), "metal", ("porion",)),
    Structure2D("palate", "bar", ((0.64, 0.16), (0.04, 0.16)), (0.04,), "palate", ("ANS", "PNS")),
    *(Structure2D(f"tooth_{i + 1}", "ellipse", ((u, 0.38),), (0.055, 0.09), "tooth", (f"tooth_{i + 1}",))
      for i, u in enumerate(_TEETH_U)),
    Structure2D("menton", "wedge", ((0.62, 0.86), (0.50, 0.70)), (0.08,), "wedge", ("menton",)),
)
LANDMARK_NAMES_2D: List[str] = [n for s in STRUCTURES_2D for n in s.landmarks]

# Attenuation per tissue (before the per-case jitter, gain and bias); the image is their sum.
TISSUE_ATTENUATION = {"soft": 0.15, "bone": 0.6, "maxilla": 0.2, "metal": 0.9, "dot": 0.55, "wedge": 0.5,
                      "orbit": 0.4, "palate": 0.45, "tooth": 0.7}


# ---------------------------------------------------------------------------- drawing helpers
def _bar_sd(p: np.ndarray, end_0, end_1, half_width: float) -> np.ndarray:
    """Signed distance (max form) to a rectangle with flat ends at end_0 and end_1."""
    a, b = np.asarray(end_0, dtype=np.float64), np.asarray(end_1, dtype=np.float64)
    length = np.linalg.norm(b - a)
    e = (b - a) / length
    q = p - 0.5 * (a + b)
    along = q @ e
    across = q @ np.array([-e[1], e[0]])
    return np.maximum(np.abs(along) - 0.5 * length, np.abs(across) - half_width)


def _convex_polygon_sd(p: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Max over the edges of the distance to each edge's line (vertices counter-clockwise)."""
    sd = None
    for v0, v1 in zip(vertices, np.roll(vertices, -1, axis=0)):
        edge = (v1 - v0) / np.linalg.norm(v1 - v0)
        outward = np.array([edge[1], -edge[0]])
        d = (p - v0) @ outward
        sd = d if sd is None else np.maximum(sd, d)
    return sd


def _structure_sd(p: np.ndarray, s: Structure2D) -> np.ndarray:
    if s.kind == "ellipse":
        return _ellipsoid_sd(p, s.points[0], s.size)
    if s.kind in ("ring", "cup"):
        a, b, t = s.size
        sd = np.maximum(_ellipsoid_sd(p, s.points[0], (a, b)), -_ellipsoid_sd(p, s.points[0], (a - t, b - t)))
        return sd if s.kind == "ring" else np.maximum(sd, s.points[0][1] - p[..., 1])
    if s.kind == "bar":
        return _bar_sd(p, s.points[0], s.points[1], s.size[0])
    if s.kind == "wedge":
        return _convex_polygon_sd(p, s.vertices())
    raise ValueError(f"unknown structure kind {s.kind!r}")


def _landmark_frame_points() -> np.ndarray:
    return np.concatenate([s.landmark_points() for s in STRUCTURES_2D])


# ----------------------------------------------------------------------------------- geometry
def make_geometry_2d(shape_yx: Sequence[int] = DEFAULT_SHAPE, spacing_xy: Sequence[float] = DEFAULT_SPACING
                     ) -> ImageGeometry:
    """A 2D image geometry (ndim 2, identity direction) whose centre is the world origin."""
    size_ij = np.asarray(shape_yx[::-1], dtype=np.float64)
    origin = -np.asarray(spacing_xy, dtype=np.float64) * (size_ij - 1) / 2
    return ImageGeometry.create(tuple(int(s) for s in size_ij), tuple(float(s) for s in spacing_xy),
                                tuple(float(o) for o in origin), (1.0, 0.0, 0.0, 1.0))


def frame_unit_mm(geometry: ImageGeometry) -> float:
    """R: the frame unit in mm, so that the design box (DESIGN_HALF_EXTENT) fills the field of view."""
    fov = np.asarray(geometry.spacing[:2]) * np.asarray(geometry.shape_ijk[:2])
    return float(np.min(0.5 * fov / np.asarray(DESIGN_HALF_EXTENT)))


def pose_matrix(rotation_deg: float, scale: float, translation_mm: Sequence[float], R: float) -> np.ndarray:
    """4x4 affine: frame (u, v, z) in units of R -> world LPS mm (in-plane similarity, z kept)."""
    m = np.eye(4)
    m[:2, :2] = scale * R * rotation_about_z(rotation_deg)[:2, :2]
    m[:2, 3] = translation_mm
    return m


def check_pose_ranges(geometry: ImageGeometry, max_rotation_deg: float, max_translation_fraction: float,
                      scale_range: Sequence[float], margin_px: float = LANDMARK_MARGIN_PX) -> None:
    """ValueError unless every landmark stays `margin_px` inside the image for EVERY pose in the ranges.

    The extremes of a landmark's x and y over the pose box lie at its corners in scale and translation
    (the position is linear in each); the rotation is sampled every <= 0.05 degrees.
    """
    if max_rotation_deg < 0 or max_translation_fraction < 0:
        raise ValueError(f"max_rotation_deg and max_translation_fraction must be >= 0, got "
                         f"{max_rotation_deg}, {max_translation_fraction}")
    if len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]:
        raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range}")
    R = frame_unit_mm(geometry)
    angles = np.deg2rad(np.linspace(-max_rotation_deg, max_rotation_deg, int(np.ceil(40 * max_rotation_deg)) + 2))
    c, s = np.cos(angles), np.sin(angles)
    q = _landmark_frame_points()  # (L, 2)
    rotated = np.stack([c[:, None] * q[:, 0] - s[:, None] * q[:, 1],
                        s[:, None] * q[:, 0] + c[:, None] * q[:, 1]], axis=-1)  # (A, L, 2)
    t = max_translation_fraction * R
    corners = [(sc, tx, ty) for sc in scale_range for tx in (-t, t) for ty in (-t, t)]
    world = np.stack([sc * R * rotated + np.array([tx, ty]) for sc, tx, ty in corners])  # (C, A, L, 2)
    world = np.concatenate([world, np.zeros(world.shape[:-1] + (1,))], axis=-1)
    yx = geometry.world_to_array_index(world)[..., 1:]
    size_yx = np.asarray(geometry.shape_zyx[1:])
    inside = ((yx >= margin_px) & (yx <= size_yx - 1 - margin_px)).all(axis=(0, 1, 3))
    if not inside.all():
        lost = [n for n, ok in zip(LANDMARK_NAMES_2D, inside) if not ok]
        raise ValueError(f"the pose ranges (rotation {max_rotation_deg} deg, translation {max_translation_fraction}, "
                         f"scale {tuple(scale_range)}) can move {lost} closer than {margin_px} pixels to the "
                         f"image border of shape {geometry.shape_zyx[1:]}: shrink them")


# ------------------------------------------------------------------------------- one phantom
def render_phantom_2d(case_id: str, geometry: Optional[ImageGeometry] = None, seed: int = 0, case_index: int = 0,
                      absent_fraction: float = 0.0, max_rotation_deg: float = MAX_ROTATION_DEG,
                      max_translation_fraction: float = MAX_TRANSLATION_FRACTION, scale_range=SCALE_RANGE,
                      noise_std: float = 0.03, bias_strength: float = 0.15) -> PhantomCase:
    """Draw one case on a 2D `geometry` (default: `make_geometry_2d()`).

    Returns a `PhantomCase`: float32 array (1, y, x), the geometry, the landmarks (LPS mm, z = 0; NaN
    for those of removed structures) and the 4x4 frame-to-world pose.
    """
    geometry = make_geometry_2d() if geometry is None else geometry
    if geometry.ndim != 2:
        raise ValueError(f"render_phantom_2d needs a 2D geometry, got ndim={geometry.ndim}")
    check_pose_ranges(geometry, max_rotation_deg, max_translation_fraction, scale_range)
    R = frame_unit_mm(geometry)
    pose_rng = _case_rng(seed, case_index, _POSE)
    angle = pose_rng.uniform(-max_rotation_deg, max_rotation_deg)
    scale = pose_rng.uniform(*scale_range)
    translation = pose_rng.uniform(-1, 1, size=2) * max_translation_fraction * R
    frame_to_world = pose_matrix(angle, scale, translation, R)

    mu, gain, bias_dir, bias_curv = _intensity_draws(seed, case_index, TISSUE_ATTENUATION, 2)
    removed = _removed_structures(seed, case_index, STRUCTURES_2D, absent_fraction)

    # Frame coordinates (units of R) of every pixel centre.
    yy, xx = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in geometry.shape_zyx[1:]), indexing="ij")
    world = geometry.array_index_to_world(np.stack([np.zeros_like(yy), yy, xx], axis=-1))[..., :2]
    world_to_frame = np.linalg.inv(frame_to_world[:2, :2])
    p = (world - frame_to_world[:2, 3]) @ world_to_frame.T
    ramp = float(np.mean(geometry.spacing[:2])) / (scale * R)  # one pixel, in frame units

    img = np.zeros(p.shape[:-1])
    for s in ANATOMY + STRUCTURES_2D:
        if s.name not in removed:
            img += mu[s.tissue] * _occupancy(_structure_sd(p, s), ramp)

    bias = _bias_field(p, bias_dir, bias_curv, bias_strength)
    noise = _case_rng(seed, case_index, _NOISE).normal(0.0, noise_std, size=img.shape)
    array = (gain * (img * bias + noise)).astype(np.float32)[None]

    pts = _landmark_frame_points() @ frame_to_world[:2, :2].T + frame_to_world[:2, 3]
    pts_world = np.concatenate([pts, np.zeros((len(pts), 1))], axis=1)
    absent_names = {n for s in STRUCTURES_2D if s.name in removed for n in s.landmarks}
    for i, n in enumerate(LANDMARK_NAMES_2D):
        if n in absent_names:
            pts_world[i] = np.nan
    landmarks = LandmarkSet(list(LANDMARK_NAMES_2D), pts_world, source=case_id)
    return PhantomCase(case_id, array, geometry, landmarks, frame_to_world)


# --------------------------------------------------------------------------- many, on disk
def generate_phantom_cases_2d(output_dir, n_cases: int, shape=DEFAULT_SHAPE, spacing=DEFAULT_SPACING,
                              seed: int = 0, absent_fraction: float = 0.0,
                              max_rotation_deg: float = MAX_ROTATION_DEG,
                              max_translation_fraction: float = MAX_TRANSLATION_FRACTION,
                              scale_range=SCALE_RANGE, noise_std: float = 0.03, bias_strength: float = 0.15,
                              case_prefix: str = "xray", progress: bool = True) -> Dict[str, Tuple[Path, Path]]:
    """Write `n_cases` 2D phantoms as `images/<case>.nii.gz` + `landmarks/<case>.mrk.json` (LPS, z = 0).

    shape is (y, x) pixels, spacing (x, y) mm like SimpleITK. `absent_fraction` is the probability
    that each landmark structure is left out of a case (its landmarks are then `positionStatus:
    undefined`). Pose ranges that could move a landmark out of the image are refused (ValueError).
    Also writes `phantoms.json` (the parameters, for reproducibility). Returns {case_id:
    (image_path, landmark_path)}; the same seed gives the same files.
    """
    from tqdm import tqdm

    _check_args(n_cases, shape, spacing, absent_fraction, ndim=2)
    geometry = make_geometry_2d(shape, spacing)
    check_pose_ranges(geometry, max_rotation_deg, max_translation_fraction, scale_range)
    out = Path(output_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "landmarks").mkdir(parents=True, exist_ok=True)
    cases: Dict[str, Tuple[Path, Path]] = {}
    for i in tqdm(range(int(n_cases)), desc="2D phantoms", unit="case", disable=not progress):
        case = render_phantom_2d(f"{case_prefix}_{i:03d}", geometry, seed, i, absent_fraction, max_rotation_deg,
                                 max_translation_fraction, scale_range, noise_std, bias_strength)
        cases[case.case_id] = _write_case(out, case)
    params = {"generator": "nnlandmark_h3de.demo.phantoms_2d", "n_cases": int(n_cases),
              "shape_yx": [int(s) for s in shape], "spacing_xy": [float(s) for s in spacing],
              "seed": int(seed), "absent_fraction": float(absent_fraction),
              "max_rotation_deg": float(max_rotation_deg), "max_translation_fraction": float(max_translation_fraction),
              "scale_range": [float(s) for s in scale_range], "noise_std": float(noise_std),
              "bias_strength": float(bias_strength), "landmarks": LANDMARK_NAMES_2D, "cases": sorted(cases)}
    atomic_write_text(out / "phantoms.json", json.dumps(params, indent=2) + "\n")
    return cases
