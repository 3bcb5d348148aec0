"""Reading a landmark file's text (or JSON document) with errors that name the file."""
from __future__ import annotations

import json
from pathlib import Path

from nnlandmark_h3de.landmarks.landmark_set import LandmarkError


def read_landmark_text(path, kind: str) -> str:
    """UTF-8 text (a BOM is tolerated); a missing or unreadable file is a LandmarkError naming it."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise LandmarkError(f"{path}: landmark file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LandmarkError(f"{path}: unreadable {kind} file ({e})") from None


def read_landmark_json(path):
    """The parsed JSON document of a landmark file."""
    text = read_landmark_text(path, "JSON")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise LandmarkError(f"{path}: not a readable JSON file ({e})") from None
