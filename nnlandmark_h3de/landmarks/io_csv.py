"""3D Slicer's control-point table (`.csv`): `label,l,p,s,defined,selected,visible,locked,description`.

Slicer reads and writes this table with either `l,p,s` (LPS) or `r,a,s` (RAS) columns. Optional
`confidence` and `uncertainty_mm` columns carry our per-landmark scores (empty = unknown).
A row with `defined` false is absent; a defined row must have numeric coordinates.

2D images (X-rays) lie in the world plane z = 0, so two more layouts are read (never written):
- `label,l,p` or `label,r,a` without the third column: world mm in that plane, z = 0.
- `label,x_px,y_px` (optionally `z_px`): pixel coordinates, what X-ray annotation tools export:
  0-based continuous ITK indices, x_px the column (i), y_px the row (j), an integer at a pixel's
  centre. They need the image geometry (`read_csv(path, geometry=ImageGeometry...)`, which
  nnLandmark_convert passes with each case's image) and are mapped to world LPS mm through it;
  a 3D image needs `z_px` too.
A header with both world and pixel columns is an error (which one is meant?).
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import List, Optional

import numpy as np

from nnlandmark_h3de.landmarks.atomic import atomic_write_text
from nnlandmark_h3de.landmarks.geometry import ImageGeometry
from nnlandmark_h3de.landmarks.landmark_set import LandmarkError, LandmarkSet, lps_to_ras
from nnlandmark_h3de.landmarks.text_file import read_landmark_text

COORDINATE_COLUMNS = {"LPS": ("l", "p", "s"), "RAS": ("r", "a", "s")}
PLANE_COLUMNS = {"LPS": ("l", "p"), "RAS": ("r", "a")}  # 2D: world mm in the plane z = 0
PIXEL_COLUMNS = ("x_px", "y_px", "z_px")  # 0-based continuous ITK index (column, row, slice)
FLAG_COLUMNS = ("defined", "selected", "visible", "locked")
SCORE_COLUMNS = ("confidence", "uncertainty_mm")
_TRUE = {"1", "true", "yes"}
_FALSE = {"0", "false", "no"}


def _flag(value: str, path, lineno: int, column: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise LandmarkError(f"{path}: line {lineno}: column {column!r} must be true/false or 1/0, got {value!r}")


def _number(value: str, path, lineno: int, what: str) -> float:
    if value.strip() == "":
        return math.nan
    try:
        return float(value)
    except ValueError:
        raise LandmarkError(f"{path}: line {lineno}: {what} {value!r} is not a number") from None


def _coordinate_columns(header: List[str], path, geometry: Optional[ImageGeometry]):
    """(kind 'LPS' | 'RAS' | 'pixel', the coordinate columns present) of a header."""
    world = next((c for c, cols in COORDINATE_COLUMNS.items() if all(col in header for col in cols)), None)
    cols = COORDINATE_COLUMNS.get(world)
    if world is None:
        world = next((c for c, cols in PLANE_COLUMNS.items() if all(col in header for col in cols)), None)
        cols = PLANE_COLUMNS.get(world)
    pixel = all(col in header for col in PIXEL_COLUMNS[:2])
    if "label" not in header or (world is None and not pixel):
        raise LandmarkError(f"{path}: header must contain 'label' and l,p,s or r,a,s columns (2D: l,p or r,a; "
                            f"pixels: x_px,y_px), got {header}")
    if world is not None and pixel:
        raise LandmarkError(f"{path}: header has both world ({','.join(cols)}) and pixel (x_px,y_px) columns; "
                            "keep one kind")
    if world is not None:
        return world, cols
    if geometry is None:
        raise LandmarkError(f"{path}: pixel coordinates (x_px,y_px) need the image they refer to (give the image "
                            "geometry, as nnLandmark_convert does), or convert them to world l,p,s mm")
    cols = PIXEL_COLUMNS if "z_px" in header else PIXEL_COLUMNS[:2]
    if geometry.ndim == 3 and len(cols) == 2:
        raise LandmarkError(f"{path}: pixel coordinates of a 3D image need a z_px column too")
    return "pixel", cols


def read_csv(path, geometry: Optional[ImageGeometry] = None) -> LandmarkSet:
    """A landmark CSV file as LPS mm; `geometry` (the image's) is needed for pixel columns only."""
    path = Path(path)
    text = read_landmark_text(path, "CSV")
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        raise LandmarkError(f"{path}: empty CSV file (a header label,l,p,s,... is required)")
    header = [h.strip().lower() for h in rows[0]]
    cs, coord_cols = _coordinate_columns(header, path, geometry)
    col = {h: i for i, h in enumerate(header)}
    names: List[str] = []
    points, descriptions = [], []
    scores = {c: [] for c in SCORE_COLUMNS if c in col}
    for lineno, row in enumerate(rows[1:], start=2):
        if not any(f.strip() for f in row):
            continue
        if len(row) != len(header):
            raise LandmarkError(f"{path}: line {lineno}: expected {len(header)} fields like the header, got {len(row)}")
        label = row[col["label"]].strip()
        if not label:
            raise LandmarkError(f"{path}: line {lineno}: empty label")
        xyz = [_number(row[col[c]], path, lineno, f"landmark {label!r} coordinate {c}") for c in coord_cols]
        xyz += [0.0] * (3 - len(xyz))  # 2D: the plane z = 0 (world), slice 0 (pixels)
        if any(math.isinf(v) for v in xyz):
            raise LandmarkError(f"{path}: line {lineno}: landmark {label!r}: infinite coordinate {xyz}")
        defined = _flag(row[col["defined"]], path, lineno, "defined") if "defined" in col else \
            not any(math.isnan(v) for v in xyz)
        if defined and any(math.isnan(v) for v in xyz):
            raise LandmarkError(f"{path}: line {lineno}: landmark {label!r} is defined but its coordinates are {xyz}")
        names.append(label)
        points.append(xyz if defined else [math.nan] * 3)
        descriptions.append(row[col["description"]] if "description" in col else "")
        for c in scores:
            scores[c].append(_number(row[col[c]], path, lineno, f"landmark {label!r} {c}"))
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if cs == "RAS":
        pts = lps_to_ras(pts)
    elif cs == "pixel":
        pts = geometry.itk_index_to_world(pts)  # NaN rows stay NaN
    return LandmarkSet(names, pts, confidence=scores.get("confidence"), uncertainty_mm=scores.get("uncertainty_mm"),
                       descriptions=descriptions, source=str(path))


def _score_text(values: Optional[np.ndarray], i: int) -> List[str]:
    if values is None:
        return []
    return ["" if not math.isfinite(values[i]) else repr(float(values[i]))]


def format_csv(ls: LandmarkSet, coordinate_system: str = "LPS") -> str:
    cs = coordinate_system.upper()
    if cs not in COORDINATE_COLUMNS:
        raise LandmarkError(f"{ls.source}: coordinate system must be LPS or RAS, got {coordinate_system!r}")
    points = ls.points_lps if cs == "LPS" else lps_to_ras(ls.points_lps)
    header = ["label", *COORDINATE_COLUMNS[cs], *FLAG_COLUMNS, "description"]
    header += [c for c, v in zip(SCORE_COLUMNS, (ls.confidence, ls.uncertainty_mm)) if v is not None]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for i, (name, p) in enumerate(zip(ls.names, points)):
        defined = not np.isnan(p).any()
        coords = [repr(float(v)) for v in p] if defined else ["", "", ""]
        desc = ls.descriptions[i] if ls.descriptions is not None else ""
        writer.writerow([name, *coords, str(defined).lower(), "true", "true", "true", desc,
                         *_score_text(ls.confidence, i), *_score_text(ls.uncertainty_mm, i)])
    return out.getvalue()


def write_csv(ls: LandmarkSet, path, coordinate_system: str = "LPS") -> Path:
    return atomic_write_text(path, format_csv(ls, coordinate_system))
