"""Our plain JSON landmark file, for scripts that do not want Slicer's schema.

`{"coordinate_system": "LPS"|"RAS", "units": "mm", "landmarks": [{"name", "position": [x,y,z] | null,
"confidence", "uncertainty_mm", "description"}, ...]}`; the score keys are optional (null = unknown).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from nnlandmark_h3de.landmarks.atomic import atomic_write_text
from nnlandmark_h3de.landmarks.landmark_set import LandmarkError, LandmarkSet, lps_to_ras
from nnlandmark_h3de.landmarks.text_file import read_landmark_json

SCORE_KEYS = ("confidence", "uncertainty_mm")


def _finite_or_none(v: float):
    return float(v) if math.isfinite(v) else None


def landmarks_to_json_dict(ls: LandmarkSet, coordinate_system: str = "LPS") -> dict:
    cs = coordinate_system.upper()
    if cs not in ("LPS", "RAS"):
        raise LandmarkError(f"{ls.source}: coordinate system must be LPS or RAS, got {coordinate_system!r}")
    points = ls.points_lps if cs == "LPS" else lps_to_ras(ls.points_lps)
    entries = []
    for i, (name, p) in enumerate(zip(ls.names, points)):
        e = {"name": name, "position": None if np.isnan(p).any() else [float(x) for x in p]}
        for key, values in zip(SCORE_KEYS, (ls.confidence, ls.uncertainty_mm)):
            if values is not None:
                e[key] = _finite_or_none(values[i])
        if ls.descriptions is not None and ls.descriptions[i]:
            e["description"] = ls.descriptions[i]
        entries.append(e)
    return {"coordinate_system": cs, "units": "mm", "landmarks": entries}


def write_json(ls: LandmarkSet, path, coordinate_system: str = "LPS") -> Path:
    doc = landmarks_to_json_dict(ls, coordinate_system)
    return atomic_write_text(path, json.dumps(doc, indent=2, allow_nan=False) + "\n")


def _score(entry: dict, key: str, path, name: str) -> float:
    v = entry.get(key)
    if v is None:
        return math.nan
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise LandmarkError(f"{path}: landmark {name!r}: {key} must be a number or null, got {v!r}")
    return float(v)


def read_json(path) -> LandmarkSet:
    path = Path(path)
    doc = read_landmark_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("landmarks"), list):
        raise LandmarkError(f"{path}: expected an object with a 'landmarks' list")
    cs = str(doc.get("coordinate_system", "LPS")).upper()
    if cs not in ("LPS", "RAS"):
        raise LandmarkError(f"{path}: coordinate_system must be LPS or RAS, got {doc.get('coordinate_system')!r}")
    if doc.get("units", "mm") != "mm":
        raise LandmarkError(f"{path}: units {doc.get('units')!r} not supported (only mm)")
    names, points, descriptions = [], [], []
    scores = {k: [] for k in SCORE_KEYS}
    for i, e in enumerate(doc["landmarks"]):
        if not isinstance(e, dict) or not isinstance(e.get("name"), str) or not e["name"]:
            raise LandmarkError(f"{path}: landmark entry {i + 1} has no 'name'")
        name, pos = e["name"], e.get("position")
        if pos is None:
            xyz = [math.nan] * 3
        else:
            if not (isinstance(pos, list) and len(pos) == 3
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pos)):
                raise LandmarkError(f"{path}: landmark {name!r}: position must be [x, y, z] or null, got {pos!r}")
            xyz = [float(v) for v in pos]
            if not all(math.isfinite(v) for v in xyz):
                raise LandmarkError(f"{path}: landmark {name!r}: non-finite position {pos} (use null for absent)")
        names.append(name)
        points.append(xyz)
        descriptions.append(str(e.get("description", "")))
        for k in SCORE_KEYS:
            scores[k].append(_score(e, k, path, name))
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if cs == "RAS":
        pts = lps_to_ras(pts)
    has = {k: any(k in e for e in doc["landmarks"]) for k in SCORE_KEYS}
    return LandmarkSet(names, pts, confidence=scores["confidence"] if has["confidence"] else None,
                       uncertainty_mm=scores["uncertainty_mm"] if has["uncertainty_mm"] else None,
                       descriptions=descriptions, source=str(path))
