"""Legacy 3D Slicer fiducial lists (`.fcsv`), still what AFIDs and many datasets ship.

The landmark name is the `label` column (AFIDs: "1".."32"; their anatomical name stays in `desc`).
A row is absent when its Slicer-5 positionStatus field is not "defined" or its coordinates are NaN.
"""
from __future__ import annotations

import csv
import io
import math
import re
from pathlib import Path

import numpy as np

from nnlandmark_h3de.landmarks.atomic import atomic_write_text
from nnlandmark_h3de.landmarks.landmark_set import LandmarkError, LandmarkSet, lps_to_ras
from nnlandmark_h3de.landmarks.text_file import read_landmark_text

FCSV_VERSION = "4.11"
FCSV_COLUMNS = "id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID"
# Slicer's position status codes in the 15th field: 0 undefined, 1 preview, 2 defined, 3 missing.
_DEFINED_STATUS = {"2", "defined"}
_KNOWN_STATUS = {"0", "1", "2", "3", "undefined", "preview", "defined", "missing"}
_CS_HEADER = re.compile(r"^#\s*CoordinateSystem\s*=\s*(\S+)\s*$", re.IGNORECASE)
_CS_VALUES = {"RAS": "RAS", "0": "RAS", "LPS": "LPS", "1": "LPS"}


def _coordinate_system(lines, path) -> str:
    for line in lines:
        if not line.startswith("#"):
            break
        m = _CS_HEADER.match(line.strip())
        if m:
            value = m.group(1).upper()
            if value not in _CS_VALUES:
                raise LandmarkError(f"{path}: unknown CoordinateSystem {m.group(1)!r} (expected LPS, RAS, 0 or 1)")
            return _CS_VALUES[value]
    return "RAS"  # Slicer's assumption for files written before the header existed


def read_fcsv(path) -> LandmarkSet:
    path = Path(path)
    text = read_landmark_text(path, "fcsv")
    lines = text.splitlines()
    cs = _coordinate_system(lines, path)
    names, points, descriptions = [], [], []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = next(csv.reader([line]))
        if not 14 <= len(fields) <= 16:
            raise LandmarkError(f"{path}: line {lineno}: expected 14 to 16 comma-separated fields, got {len(fields)}")
        label = fields[11].strip()
        if not label:
            raise LandmarkError(f"{path}: line {lineno}: empty label")
        try:
            xyz = [float(v) for v in fields[1:4]]
        except ValueError:
            raise LandmarkError(f"{path}: line {lineno}: landmark {label!r}: coordinates {fields[1:4]} are not numbers") from None
        if any(math.isinf(v) for v in xyz):
            raise LandmarkError(f"{path}: line {lineno}: landmark {label!r}: infinite coordinate {xyz}")
        status = fields[14].strip().lower() if len(fields) >= 15 and fields[14].strip() else "2"
        if status not in _KNOWN_STATUS:
            raise LandmarkError(f"{path}: line {lineno}: landmark {label!r}: unknown positionStatus {fields[14]!r}")
        if status not in _DEFINED_STATUS or any(math.isnan(v) for v in xyz):
            xyz = [math.nan] * 3
        names.append(label)
        points.append(xyz)
        descriptions.append(fields[12])
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if cs == "RAS":
        pts = lps_to_ras(pts)
    return LandmarkSet(names, pts, descriptions=descriptions, source=str(path))


def format_fcsv(ls: LandmarkSet, coordinate_system: str = "LPS") -> str:
    """Slicer-5 style rows (14 declared fields + positionStatus, autoCreated); absent rows keep their place."""
    cs = coordinate_system.upper()
    if cs not in ("LPS", "RAS"):
        raise LandmarkError(f"{ls.source}: coordinate system must be LPS or RAS, got {coordinate_system!r}")
    points = ls.points_lps if cs == "LPS" else lps_to_ras(ls.points_lps)
    out = io.StringIO()
    out.write(f"# Markups fiducial file version = {FCSV_VERSION}\n# CoordinateSystem = {cs}\n# columns = {FCSV_COLUMNS}\n")
    writer = csv.writer(out, lineterminator="\n")
    for i, (name, p) in enumerate(zip(ls.names, points)):
        defined = not np.isnan(p).any()
        coords = [repr(float(v)) for v in p] if defined else ["nan"] * 3
        desc = ls.descriptions[i] if ls.descriptions is not None else ""
        writer.writerow([f"vtkMRMLMarkupsFiducialNode_{i + 1}", *coords, 0, 0, 0, 1, 1, 1, 1,
                         name, desc, "", 2 if defined else 0, 0])
    return out.getvalue()


def write_fcsv(ls: LandmarkSet, path, coordinate_system: str = "LPS") -> Path:
    return atomic_write_text(path, format_fcsv(ls, coordinate_system))
