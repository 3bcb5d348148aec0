"""Global-stage estimates already computed, kept for the pass that needs them again.

`nnLandmark_calibrate_global` registers every validation case to the atlases to measure the global
stages; the two-stage final validation that follows needs exactly those estimates again (registration
is most of a small case's two-stage time). They are written beside global_stage.json
(fold_X/global_stage_estimates.json: per kind, per case, the points and the atlases' spread), and
`RecordedGlobalStage` returns them for those cases instead of registering the same image twice.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Sequence

import numpy as np

from nnlandmark_h3de.landmarks.atomic import atomic_write_text
from nnlandmark_h3de.landmarks.landmark_set import LandmarkSet

__all__ = ["ESTIMATES_FILE", "write_recorded_estimates", "read_recorded_estimates", "RecordedGlobalStage"]

ESTIMATES_FILE = "global_stage_estimates.json"


def _numbers(a) -> list:
    return [[None if not np.isfinite(v) else float(v) for v in row] for row in np.atleast_2d(a)]


def write_recorded_estimates(path, names: Sequence[str], estimates: Dict[str, Dict[str, LandmarkSet]]) -> Path:
    """{kind: {case: LandmarkSet}} -> one JSON file (written whole or not at all)."""
    doc = {"names": list(names), "kinds": {
        kind: {case: {"points_lps": _numbers(ls.points_lps),
                      "uncertainty_mm": None if ls.uncertainty_mm is None else
                      _numbers(np.asarray(ls.uncertainty_mm, dtype=np.float64)[None])[0]}
               for case, ls in sorted(cases.items())} for kind, cases in estimates.items()}}
    atomic_write_text(path, json.dumps(doc) + "\n")
    return Path(path)


def read_recorded_estimates(path, kind: str) -> Dict[str, LandmarkSet]:
    """{case: LandmarkSet} recorded for `kind`; empty when the file or the kind is not there (then every
    case is registered as usual). An unreadable file is an error naming it."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        names = list(doc["names"])
        out = {}
        for case, e in doc["kinds"].get(kind, {}).items():
            points = np.array([[np.nan if v is None else v for v in row] for row in e["points_lps"]], dtype=np.float64)
            spread = e.get("uncertainty_mm")
            spread = None if spread is None else np.array([np.nan if v is None else v for v in spread], dtype=np.float64)
            out[case] = LandmarkSet(names, points.reshape(len(names), 3), uncertainty_mm=spread,
                                    source=f"{kind} global stage (recorded by nnLandmark_calibrate_global)")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a readable file of recorded global-stage estimates ({e}); delete it or rerun "
                         f"nnLandmark_calibrate_global") from None
    return out


class RecordedGlobalStage:
    """A global stage that returns the recorded estimate of an image it has seen ({first image file:
    LandmarkSet}) and asks the stage itself for any other image."""

    def __init__(self, stage, recorded: Dict[str, LandmarkSet]):
        self.stage = stage
        self.names = list(stage.names)
        self.recorded = {str(Path(f).resolve()): ls.reordered(self.names) for f, ls in recorded.items()}
        self.reused = 0

    def estimate(self, files: Sequence[str]) -> LandmarkSet:
        hit = self.recorded.get(str(Path(files[0]).resolve()))
        if hit is None:
            return self.stage.estimate(files)
        self.reused += 1
        return hit
