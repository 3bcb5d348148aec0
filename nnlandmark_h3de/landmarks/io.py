"""`read_landmarks` / `write_landmarks`: pick the landmark file format from the file name."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from nnlandmark_h3de.landmarks.io_csv import read_csv, write_csv
from nnlandmark_h3de.landmarks.io_fcsv import read_fcsv, write_fcsv
from nnlandmark_h3de.landmarks.io_json import read_json, write_json
from nnlandmark_h3de.landmarks.io_mrk_json import read_mrk_json, write_mrk_json
from nnlandmark_h3de.landmarks.landmark_set import LandmarkError, LandmarkSet

# Order matters: ".mrk.json" must be recognised before ".json".
LANDMARK_FORMATS = {".mrk.json": (read_mrk_json, write_mrk_json), ".fcsv": (read_fcsv, write_fcsv),
                    ".csv": (read_csv, write_csv), ".json": (read_json, write_json)}
LANDMARK_SUFFIXES = tuple(LANDMARK_FORMATS)
OUTPUT_FORMATS = tuple(s.lstrip(".") for s in LANDMARK_SUFFIXES)  # as CLI choices / format=


def landmark_format(path) -> Optional[str]:
    """The format key ('.mrk.json', '.fcsv', '.csv', '.json') of a file name, or None."""
    name = Path(path).name.lower()
    return next((s for s in LANDMARK_FORMATS if name.endswith(s)), None)


def is_landmark_file(path) -> bool:
    return landmark_format(path) is not None


def read_landmarks(path, names: Optional[Sequence[str]] = None, geometry=None) -> LandmarkSet:
    """Read any supported landmark file as LPS mm; with `names`, reorder to that order.

    Names in the file but not in `names` are an error; names missing from the file become absent.
    `geometry` (the image's `ImageGeometry`) maps a CSV file's pixel columns (`x_px,y_px`) to world;
    other files ignore it.
    """
    fmt = landmark_format(path)
    if fmt is None:
        raise LandmarkError(f"{path}: unknown landmark file type (expected one of {', '.join(LANDMARK_SUFFIXES)})")
    ls = read_csv(path, geometry=geometry) if fmt == ".csv" else LANDMARK_FORMATS[fmt][0](path)
    return ls if names is None else ls.reordered(list(names))


def read_landmark_source(source, geometry=None, error: type = LandmarkError) -> LandmarkSet:
    """`source` as given when it is a LandmarkSet, else its file read (a CSV in pixel columns mapped
    through `geometry`); a missing or unreadable file raises `error` with a message naming the file."""
    if isinstance(source, LandmarkSet):
        return source
    path = Path(source)
    if not path.is_file():
        raise error(f"{path}: landmark file not found")
    try:
        return read_landmarks(path, geometry=geometry)
    except (LandmarkError, OSError, ValueError, KeyError) as e:
        msg = str(e)
        raise error(msg if str(path) in msg else f"{path}: {msg}") from None


def write_landmarks(landmark_set: LandmarkSet, path, format: Optional[str] = None,
                    coordinate_system: str = "LPS") -> Path:
    """Write atomically; `format` ('mrk.json', 'fcsv', 'csv', 'json') defaults to the file name's."""
    if format is None:
        fmt = landmark_format(path)
        if fmt is None:
            raise LandmarkError(f"{path}: cannot tell the landmark format from the file name "
                                f"(expected one of {', '.join(LANDMARK_SUFFIXES)}, or pass format=)")
    else:
        fmt = "." + format.lower().lstrip(".")
        if fmt not in LANDMARK_FORMATS:
            raise LandmarkError(f"{path}: unknown landmark format {format!r} (expected one of "
                                f"{', '.join(s.lstrip('.') for s in LANDMARK_SUFFIXES)})")
    if coordinate_system.upper() not in ("LPS", "RAS"):
        raise LandmarkError(f"{path}: coordinate system must be LPS or RAS, got {coordinate_system!r}")
    return LANDMARK_FORMATS[fmt][1](landmark_set, path, coordinate_system)
