"""3D Slicer markups JSON (`.mrk.json`), the preferred landmark output.

One Fiducial markup, one control point per landmark in a fixed order (absent ones are
`positionStatus: undefined` without `position`), so files of many cases line up. Per-landmark
confidence and uncertainty travel as markup `measurements` with `controlPointValues`, which Slicer
reads as static measurements without complaint. JSON has no NaN, so an unknown value is written as
-1 (both quantities are never negative) and read back as NaN.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List, Optional

import numpy as np

from nnlandmark_h3de.landmarks.atomic import atomic_write_text
from nnlandmark_h3de.landmarks.landmark_set import LandmarkError, LandmarkSet, lps_to_ras
from nnlandmark_h3de.landmarks.text_file import read_landmark_json

MARKUPS_SCHEMA = ("https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
                  "Resources/Schema/markups-schema-v1.0.3.json#")
IDENTITY_ORIENTATION = {"LPS": [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0],
                        "RAS": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]}
CONFIDENCE_MEASUREMENT = "confidence"
UNCERTAINTY_MEASUREMENT = "uncertainty"
UNKNOWN_VALUE = -1.0


def _measurement(name: str, values: np.ndarray, units: str, description: str) -> dict:
    return {"name": name, "enabled": False, "units": units, "description": description,
            "printFormat": "%5.3f %s",
            "controlPointValues": [UNKNOWN_VALUE if not math.isfinite(v) else float(v) for v in values]}


def landmarks_to_markups(ls: LandmarkSet, coordinate_system: str = "LPS") -> dict:
    """The markups document (a dict ready for json.dump)."""
    cs = coordinate_system.upper()
    if cs not in IDENTITY_ORIENTATION:
        raise LandmarkError(f"{ls.source}: coordinate system must be LPS or RAS, got {coordinate_system!r}")
    points = ls.points_lps if cs == "LPS" else lps_to_ras(ls.points_lps)
    control_points = []
    for i, (name, p) in enumerate(zip(ls.names, points)):
        cp = {"id": str(i + 1), "label": name,
              "description": ls.descriptions[i] if ls.descriptions is not None else ""}
        defined = not np.isnan(p).any()
        if defined:
            cp["position"] = [float(x) for x in p]
        cp.update({"orientation": list(IDENTITY_ORIENTATION[cs]), "selected": True, "locked": True,
                   "visibility": True, "positionStatus": "defined" if defined else "undefined"})
        control_points.append(cp)
    markup = {"type": "Fiducial", "coordinateSystem": cs, "coordinateUnits": "mm", "locked": True,
              "fixedNumberOfControlPoints": True, "labelFormat": "%N-%d", "controlPoints": control_points}
    measurements = []
    if ls.confidence is not None:
        measurements.append(_measurement(CONFIDENCE_MEASUREMENT, ls.confidence, "",
                                         "landmark existence confidence (0..1); -1 = unknown"))
    if ls.uncertainty_mm is not None:
        measurements.append(_measurement(UNCERTAINTY_MEASUREMENT, ls.uncertainty_mm, "mm",
                                         "expected localisation error in mm; -1 = unknown"))
    if measurements:
        markup["measurements"] = measurements
    return {"@schema": MARKUPS_SCHEMA, "markups": [markup]}


def write_mrk_json(ls: LandmarkSet, path, coordinate_system: str = "LPS") -> Path:
    doc = landmarks_to_markups(ls, coordinate_system)
    return atomic_write_text(path, json.dumps(doc, indent=2, allow_nan=False) + "\n")


def _number_list(values, n: int, path, what: str) -> Optional[List[float]]:
    if not isinstance(values, list) or len(values) != n or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise LandmarkError(f"{path}: {what} must be a list of {n} numbers, got {values!r}")
    return [float(v) for v in values]


def _measurement_values(markup: dict, name: str, n: int, path) -> Optional[np.ndarray]:
    for m in markup.get("measurements") or []:
        if isinstance(m, dict) and m.get("name") == name and "controlPointValues" in m:
            vals = np.asarray(_number_list(m["controlPointValues"], n, path,
                                           f"measurement {name!r} controlPointValues"), dtype=np.float64)
            vals[vals < 0] = np.nan
            return vals
    return None


def read_mrk_json(path) -> LandmarkSet:
    """First Fiducial markup of a Slicer markups JSON file, as LPS."""
    path = Path(path)
    doc = read_landmark_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("markups"), list):
        raise LandmarkError(f"{path}: not a Slicer markups file (no 'markups' list)")
    schema = doc.get("@schema")
    if not isinstance(schema, str) or "markups-schema-v1." not in schema.lower():
        raise LandmarkError(f"{path}: missing or unknown '@schema' {schema!r} (expected markups-schema-v1.x.y.json#)")
    markup = next((m for m in doc["markups"] if isinstance(m, dict) and m.get("type") == "Fiducial"), None)
    if markup is None:
        raise LandmarkError(f"{path}: no markup of type 'Fiducial'")
    cs = str(markup.get("coordinateSystem", "LPS")).upper()
    if cs not in IDENTITY_ORIENTATION:
        raise LandmarkError(f"{path}: coordinateSystem must be LPS or RAS, got {markup.get('coordinateSystem')!r}")
    units = markup.get("coordinateUnits", "mm")
    if isinstance(units, list) and units:
        units = units[0]
    if units != "mm":
        raise LandmarkError(f"{path}: coordinateUnits {markup.get('coordinateUnits')!r} not supported (only mm)")
    cps = markup.get("controlPoints", [])
    if not isinstance(cps, list):
        raise LandmarkError(f"{path}: 'controlPoints' is not a list")
    names, points, descriptions = [], [], []
    for i, cp in enumerate(cps):
        if not isinstance(cp, dict):
            raise LandmarkError(f"{path}: control point {i + 1} is not an object")
        label = cp.get("label")
        if not isinstance(label, str) or not label:
            raise LandmarkError(f"{path}: control point {i + 1} has no label")
        status = cp.get("positionStatus", "defined")
        if status not in ("undefined", "preview", "defined"):
            raise LandmarkError(f"{path}: landmark {label!r}: invalid positionStatus {status!r}")
        position = cp.get("position")
        if status == "defined" and position is not None and position != "":
            xyz = _number_list(position, 3, path, f"landmark {label!r} position")
            if not all(math.isfinite(v) for v in xyz):
                raise LandmarkError(f"{path}: landmark {label!r}: non-finite position {position}")
        else:
            xyz = [math.nan] * 3  # undefined/preview, or defined without a position (Slicer: undefined)
        names.append(label)
        points.append(xyz)
        descriptions.append(str(cp.get("description", "")))
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if cs == "RAS":
        pts = lps_to_ras(pts)
    n = len(names)
    return LandmarkSet(names, pts, confidence=_measurement_values(markup, CONFIDENCE_MEASUREMENT, n, path),
                       uncertainty_mm=_measurement_values(markup, UNCERTAINTY_MEASUREMENT, n, path),
                       descriptions=descriptions, source=str(path))
