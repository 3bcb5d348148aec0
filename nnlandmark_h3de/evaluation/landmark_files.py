"""Find and read the landmark files an evaluation compares.

A case is a landmark file's name minus its landmark extension (`.mrk.json`, `.fcsv`, `.csv`,
`.json`). The reference is either a folder of such files or a converted dataset's
`landmarks.json` (all cases of a dataset in one file; a raw dataset folder holding it works too).
Every problem raises `LandmarkError` naming the file; with `chill` it is appended to `skipped`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, List, Optional

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
        from nnlandmark_h3de.landmarks.dataset_file import load_dataset_landmarks
        return load_dataset_landmarks(path)
    files = find_landmark_files(path)
    if not files:
        raise LandmarkError(f"{path}: no landmark files ({', '.join(LANDMARK_EXTENSIONS)}) in the reference folder")
    return read_landmark_files(files, chill=chill, skipped=skipped)
