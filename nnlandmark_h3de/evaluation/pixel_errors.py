"""Radial errors in pixels (voxels) next to millimetres.

X-ray benchmarks (the ISBI 2015 cephalometric challenge and the work built on it) report the MRE in
pixels as well as in mm, and a user comparing with a voxel-based tool thinks in voxels. A pixel
error is measured in each case's own image grid: both points mapped to continuous array indices by
the image geometry, then the Euclidean distance (for a 2D image its index has z = 0 on both sides).
The images are found beside a converted dataset's landmarks.json (imagesTs/, then imagesTr/,
`<case>_0000.<ending>`) or in a folder given by the user; a case without its image has no pixel error
(the count says how many had one).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence

import numpy as np

from nnlandmark_h3de.landmarks.geometry import ImageGeometry
from nnlandmark_h3de.landmarks.landmark_set import LandmarkSet

__all__ = ["find_case_images", "dataset_image_folders", "add_pixel_errors"]


def dataset_image_folders(reference) -> list:
    """imagesTs/ and imagesTr/ of the raw dataset a landmarks.json (or its folder) belongs to."""
    ref = Path(reference)
    folder = ref if ref.is_dir() else ref.parent
    return [f for f in (folder / "imagesTs", folder / "imagesTr") if f.is_dir()]


def find_case_images(folders: Iterable, cases: Iterable[str]) -> Dict[str, Path]:
    """case -> its first channel's image (`<case>_0000.*`, or `<case>.*`), the first folder that has it."""
    found: Dict[str, Path] = {}
    folders = [Path(f) for f in folders]
    for case in cases:
        for folder in folders:
            hits = sorted(folder.glob(f"{case}_0000.*")) or sorted(folder.glob(f"{case}.*"))
            hits = [h for h in hits if h.is_file()]
            if hits:
                found[case] = hits[0]
                break
    return found


def _pixel_error(geometry: ImageGeometry, reference: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """(L,) distances in the image's index grid; NaN where either point is absent."""
    return np.linalg.norm(geometry.world_to_array_index(prediction) - geometry.world_to_array_index(reference), axis=1)


def add_pixel_errors(summary: dict, reference: Dict[str, LandmarkSet], images: Dict[str, Path]) -> None:
    """Adds `radial_error_px` to every true positive of `summary["metric_per_case"]` whose case has an image,
    and a `pixel_errors` block (micro mean/std/median/max in pixels, per landmark mean, counts)."""
    names: Sequence[str] = summary["landmark_names"]
    per_landmark = {n: [] for n in names}
    spacing = []
    for entry in summary["metric_per_case"]:
        path = images.get(entry["case"])
        if path is None:
            continue
        geometry = ImageGeometry.from_file(path)
        spacing.append(geometry.spacing)
        tp = [n for n in names if entry["metrics"].get(n, {}).get("status") == "TP"]
        if not tp:
            continue
        ref = np.array([entry["metrics"][n]["reference_lps"] for n in tp], dtype=np.float64)
        pred = np.array([entry["metrics"][n]["prediction_lps"] for n in tp], dtype=np.float64)
        for n, e in zip(tp, _pixel_error(geometry, ref, pred)):
            entry["metrics"][n]["radial_error_px"] = float(e)
            per_landmark[n].append(float(e))
    errors = np.array([e for v in per_landmark.values() for e in v])
    summary["pixel_errors"] = {
        "n_cases_with_image": len(spacing), "n_cases": summary["n_cases"],
        "unit": "pixels (voxels for 3D images) of each case's own image grid",
        "image_spacing_mm": _spacing_range(spacing),
        "mean_radial_error_px": _stat(errors, np.mean), "std_radial_error_px": _stat(errors, np.std),
        "median_radial_error_px": _stat(errors, np.median), "max_radial_error_px": _stat(errors, np.max),
        "per_landmark_mean_px": {n: _stat(np.array(v), np.mean) for n, v in per_landmark.items()},
    }


def _stat(values: np.ndarray, fn) -> Optional[float]:
    return None if values.size == 0 else float(fn(values))


def _spacing_range(spacing: list) -> Optional[dict]:
    if not spacing:
        return None
    s = np.asarray(spacing, dtype=np.float64)  # (x, y, z); a 2D image's z is 1
    return {"min_xyz": [float(v) for v in s.min(0)], "max_xyz": [float(v) for v in s.max(0)]}
