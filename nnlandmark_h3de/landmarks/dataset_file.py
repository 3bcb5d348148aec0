"""The landmark sidecars of a raw dataset: `landmarks.json` (exact world coordinates) and the
`landmarks` block of `dataset.json`. The converter writes them (conversion/), and training,
inference, evaluation and one-shot read them here, never the voxelised balls: the format lives
beside the other landmark formats, so readers do not depend on the converter. A one-shot dataset
also has `pseudo_labels.json` (written by oneshot/pseudo_dataset.py); from it this module reads only
which cases carry exact labels (`exact_label_cases`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from nnlandmark_h3de.landmarks.landmark_set import LandmarkError, LandmarkSet

LANDMARKS_FILE = "landmarks.json"
PSEUDO_LABELS_FILE = "pseudo_labels.json"


class DatasetFileError(LandmarkError):
    """A raw dataset's landmarks.json, dataset.json `landmarks` block or pseudo_labels.json is missing
    or malformed; the message names the file and the problem."""


def landmarks_json_dict(landmarks: Dict[str, LandmarkSet], names: Sequence[str], test_cases: Iterable[str] = (),
                        test_sets: Optional[Dict[str, Sequence[str]]] = None,
                        subjects: Optional[Dict[str, str]] = None) -> dict:
    """The landmarks.json content: LPS mm per case and name, null when absent; `test_sets` (named groups
    of test cases, e.g. a challenge's two test sets) and `subjects` (case -> subject id, for cases that
    are scans of one person) only when given, `subjects` for the cases written only."""
    d = {"coordinate_system": "LPS", "units": "mm", "names": list(names),
         "cases": {case: ls.reordered(list(names)).as_dict() for case, ls in landmarks.items()},
         "test_cases": [c for c in test_cases]}
    if test_sets:
        d["test_sets"] = {str(k): [str(c) for c in v] for k, v in test_sets.items()}
    if subjects:
        d["subjects"] = {str(c): str(s) for c, s in subjects.items() if c in landmarks}
    return d


def landmark_info_dict(names: Sequence[str], pairs: Sequence[Tuple[str, str]], ball_radius_mm: float) -> dict:
    """The `landmarks` block of dataset.json."""
    return {"names": list(names), "pairs": [[a, b] for a, b in pairs], "ball_radius_mm": float(ball_radius_mm),
            "coordinate_system": "LPS"}


def _load_json(path: Path, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DatasetFileError(f"{path}: {what} not found") from None
    except (OSError, ValueError) as e:
        raise DatasetFileError(f"{path}: unreadable {what} ({e})") from None


def load_dataset_landmarks(path) -> Dict[str, LandmarkSet]:
    """Case id -> LandmarkSet (channel order, NaN = absent) from landmarks.json or its dataset folder.

    Test cases are included; `load_dataset_test_cases` tells which they are.
    """
    path = Path(path)
    file = path / LANDMARKS_FILE if path.is_dir() else path
    d = _load_json(file, "landmarks file")
    if not isinstance(d, dict) or not isinstance(d.get("names"), list) or not isinstance(d.get("cases"), dict):
        raise DatasetFileError(f"{file}: not a landmarks.json (needs 'names' list and 'cases' mapping)")
    if d.get("coordinate_system", "LPS") != "LPS":
        raise DatasetFileError(f"{file}: coordinate_system {d.get('coordinate_system')!r} is not LPS")
    names: List[str] = [str(n) for n in d["names"]]
    out = {}
    for case, entry in d["cases"].items():
        src = f"{file} (case {case})"
        if not isinstance(entry, dict):
            raise DatasetFileError(f"{src}: expected a mapping of landmark name -> [x, y, z] or null")
        unknown = [n for n in entry if n not in names]
        if unknown:
            raise DatasetFileError(f"{src}: unknown landmark names {unknown}")
        pts = np.full((len(names), 3), np.nan)
        for i, n in enumerate(names):
            v = entry.get(n)
            if v is None:
                continue
            try:
                p = np.asarray(v, dtype=np.float64)
            except (TypeError, ValueError):
                p = np.empty(0)
            if p.shape != (3,) or not np.all(np.isfinite(p)):
                raise DatasetFileError(f"{src}: landmark {n!r} must be [x, y, z] of finite numbers or null, got {v!r}")
            pts[i] = p
        out[str(case)] = LandmarkSet(list(names), pts, source=src)
    return out


def load_dataset_test_cases(path) -> List[str]:
    """The `test_cases` list of landmarks.json (cases in imagesTs)."""
    path = Path(path)
    file = path / LANDMARKS_FILE if path.is_dir() else path
    return [str(c) for c in _load_json(file, "landmarks file").get("test_cases", [])]


def load_dataset_test_sets(path) -> Dict[str, List[str]]:
    """The `test_sets` of landmarks.json (name -> case ids, each a group of `test_cases`); {} when absent."""
    path = Path(path)
    file = path / LANDMARKS_FILE if path.is_dir() else path
    sets = _load_json(file, "landmarks file").get("test_sets") or {}
    if not isinstance(sets, dict) or not all(isinstance(v, list) for v in sets.values()):
        raise DatasetFileError(f"{file}: 'test_sets' must map a name to a list of case ids")
    return {str(k): [str(c) for c in v] for k, v in sets.items()}


def load_case_subjects(path) -> Optional[Dict[str, str]]:
    """The `subjects` of landmarks.json (case -> subject id; a case not listed is a subject of its own), or
    None when the file has none.

    Why: scans of one person (repeated sessions, or the benchmarks' deformed copies of one template)
    register to each other far better than to another person, so a global stage validated with an
    atlas of the validation case's own subject looks better than it will on a new one."""
    path = Path(path)
    file = path / LANDMARKS_FILE if path.is_dir() else path
    subjects = _load_json(file, "landmarks file").get("subjects")
    if subjects is None:
        return None
    if not isinstance(subjects, dict) or not all(isinstance(v, (str, int)) for v in subjects.values()):
        raise DatasetFileError(f"{file}: 'subjects' must map a case id to a subject id (a string)")
    return {str(c): str(s) for c, s in subjects.items()}


def read_dataset_landmark_info(dataset_json) -> dict:
    """The `landmarks` block of a dataset.json (path, dataset folder or loaded dict), checked.

    Returns {"names", "pairs" (list of (left, right) tuples), "ball_radius_mm", "coordinate_system"}.
    """
    if isinstance(dataset_json, dict):
        d, src = dataset_json, "dataset.json"
    else:
        p = Path(dataset_json)
        p = p / "dataset.json" if p.is_dir() else p
        d, src = _load_json(p, "dataset.json"), str(p)
    block = d.get("landmarks")
    if not isinstance(block, dict) or not isinstance(block.get("names"), list):
        raise DatasetFileError(f"{src}: no 'landmarks' block with 'names' (was it written by nnLandmark_convert?)")
    names = [str(n) for n in block["names"]]
    labels = d.get("labels")
    if isinstance(labels, dict):
        expected = {"background": 0, **{n: i + 1 for i, n in enumerate(names)}}
        if {k: v for k, v in labels.items()} != expected:
            raise DatasetFileError(f"{src}: 'labels' do not match landmarks.names in channel order")
    pairs = []
    for pair in block.get("pairs", []):
        if len(pair) != 2 or pair[0] not in names or pair[1] not in names:
            raise DatasetFileError(f"{src}: landmark pair {pair} does not name two landmarks of {names}")
        pairs.append((str(pair[0]), str(pair[1])))
    radius = block.get("ball_radius_mm")
    if not isinstance(radius, (int, float)) or not radius > 0:
        raise DatasetFileError(f"{src}: landmarks.ball_radius_mm must be a positive number, got {radius!r}")
    cs = block.get("coordinate_system", "LPS")
    if cs != "LPS":
        raise DatasetFileError(f"{src}: landmarks.coordinate_system {cs!r} is not LPS")
    return {"names": names, "pairs": pairs, "ball_radius_mm": float(radius), "coordinate_system": cs}


def exact_label_cases(raw_dataset) -> Optional[List[str]]:
    """The cases of a one-shot dataset whose landmarks are exact (the template and its re-posed
    copies; the others are pseudo-labels), from pseudo_labels.json's `template` and
    `template_copies`; None when the dataset has no pseudo_labels.json (every case is labelled)."""
    path = Path(raw_dataset) / PSEUDO_LABELS_FILE
    if not path.is_file():
        return None
    header = _load_json(path, "pseudo-label file")
    template = header.get("template")
    return ([str(template)] if template else []) + [str(c) for c in header.get("template_copies", [])]
