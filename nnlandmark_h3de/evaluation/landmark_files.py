"""Find and read the landmark files an evaluation compares.

A case is a landmark file's name minus its landmark extension (`.mrk.json`, `.fcsv`, `.csv`,
`.json`). The reference is either a folder of such files or a converted dataset's
`landmarks.json` (all cases of a dataset in one file; a raw dataset folder holding it works too).
Every problem raises `LandmarkError` naming the file; with `chill` it is appended to `skipped`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import numpy as np

from nnlandmark_h3de.landmarks.landmark_set import LandmarkError, LandmarkSet

# Longest first: "a.mrk.json" is case "a", not "a.mrk".
LANDMARK_EXTENSIONS = (".mrk.json", ".fcsv", ".csv", ".json")
# JSON/CSV files nnU-Net, our predictor or this evaluation put into a prediction folder.
NOT_LANDMARK_FILES = frozenset({
    "summary.json", "summary.csv", "dataset.json", "plans.json", "dataset_fingerprint.json",
    "predict_from_raw_data_args.json", "landmark_thresholds.json", "splits_final.json",
    "landmarks.json", "debug.json"})


def case_name(path) -> Optional[str]:
    """'x/case_01.mrk.json' -> 'case_01'; None when the file is not a landmark file."""
    name = Path(path).name
    for ext in LANDMARK_EXTENSIONS:
        if name.lower().endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    return None


def find_landmark_files(folder, exclude: Iterable = ()) -> Dict[str, Path]:
    """Case -> landmark file in `folder` (not recursive); two files for one case is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LandmarkError(f"{folder}: landmark folder not found")
    excluded = {Path(p).resolve() for p in exclude if p is not None}
    found: Dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        case = case_name(path)
        if case is None or not path.is_file() or path.name.startswith(".") or path.name in NOT_LANDMARK_FILES \
                or path.resolve() in excluded:
            continue
        if case in found:
            raise LandmarkError(f"{folder}: case {case!r} has two landmark files: {found[case].name} and {path.name}")
        found[case] = path
    return found


def _skip_or_raise(error: Exception, chill: bool, skipped: Optional[list], **info) -> None:
    if not chill:
        raise error
    if skipped is not None:
        skipped.append({**info, "reason": str(error)})


def read_landmark_file(path) -> LandmarkSet:
    """Any supported landmark file as LPS mm; any failure becomes a LandmarkError naming it."""
    from nnlandmark_h3de.landmarks import read_landmarks  # the landmarks stage owns the formats
    try:
        return read_landmarks(path)
    except LandmarkError:
        raise
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise LandmarkError(f"{path}: unreadable landmark file ({type(e).__name__}: {e})") from None


def read_landmark_files(files: Dict[str, Path], chill: bool = False,
                        skipped: Optional[list] = None) -> Dict[str, LandmarkSet]:
    """Read every case's file; unreadable ones raise (or are skipped with chill)."""
    sets = {}
    for case, path in files.items():
        try:
            sets[case] = read_landmark_file(path)
        except LandmarkError as e:
            _skip_or_raise(e, chill, skipped, case=case, file=str(path))
    return sets


def read_dataset_landmarks_json(path) -> Dict[str, LandmarkSet]:
    """A converter's landmarks.json: `{"coordinate_system": "LPS", "units": "mm", "names": [...],
    "cases": {case: {name: [x, y, z] | null}}}` -> case -> LandmarkSet in `names` order."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LandmarkError(f"{path}: reference landmarks file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LandmarkError(f"{path}: not readable as JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("cases"), dict):
        raise LandmarkError(f"{path}: not a dataset landmarks.json (needs a 'cases' object of case -> "
                            f"{{name: [x, y, z] or null}})")
    if str(doc.get("coordinate_system", "LPS")).upper() != "LPS":
        raise LandmarkError(f"{path}: coordinate_system must be 'LPS', got {doc.get('coordinate_system')!r}")
    if str(doc.get("units", "mm")).lower() != "mm":
        raise LandmarkError(f"{path}: units must be 'mm', got {doc.get('units')!r}")
    names = doc.get("names")
    if names is None:
        names = []
        for points in doc["cases"].values():
            names.extend(n for n in (points or {}) if n not in names)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise LandmarkError(f"{path}: 'names' must be a list of strings")
    sets = {}
    for case, points in doc["cases"].items():
        if not isinstance(points, dict):
            raise LandmarkError(f"{path}: case {case!r}: expected {{name: [x, y, z] or null}}, got {type(points).__name__}")
        unknown = [n for n in points if n not in names]
        if unknown:
            raise LandmarkError(f"{path}: case {case!r}: landmark names {unknown} are not in 'names'")
        pts = np.full((len(names), 3), np.nan)
        for i, n in enumerate(names):
            p = points.get(n)
            if p is None:
                continue
            if (not isinstance(p, list) or len(p) != 3 or
                    not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in p)):
                raise LandmarkError(f"{path}: case {case!r}, landmark {n!r}: expected [x, y, z] or null, got {p!r}")
            pts[i] = p
        sets[str(case)] = LandmarkSet(list(names), pts, source=str(path))
    return sets


def reference_kind(path) -> str:
    """'dataset_json' for a landmarks.json (or a raw dataset folder holding one), else 'folder'."""
    path = Path(path)
    if path.is_file():
        return "dataset_json"
    if path.is_dir():
        return "dataset_json" if (path / "landmarks.json").is_file() and (path / "dataset.json").is_file() else "folder"
    raise LandmarkError(f"{path}: reference not found (expected a folder of landmark files or a landmarks.json)")


def load_reference(path, chill: bool = False, skipped: Optional[List[dict]] = None) -> Dict[str, LandmarkSet]:
    """Reference landmarks per case from a landmarks.json or a folder of landmark files."""
    path = Path(path)
    if reference_kind(path) == "dataset_json":
        json_path = path if path.is_file() else path / "landmarks.json"
        return read_dataset_landmarks_json(json_path)
    files = find_landmark_files(path)
    if not files:
        raise LandmarkError(f"{path}: no landmark files ({', '.join(LANDMARK_EXTENSIONS)}) in the reference folder")
    return read_landmark_files(files, chill=chill, skipped=skipped)
