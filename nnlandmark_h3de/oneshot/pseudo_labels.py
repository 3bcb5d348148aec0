"""Pseudo-labels of one case and their JSON file (`pseudo_labels.json`).

A one-shot method (registration of the template, self-supervised feature matching, ...) turns the
template's landmarks into a `PseudoLabels` per unlabelled case: world points (LPS mm, NaN = the
method gives no point), one confidence in [0, 1] per landmark (how much the method trusts that
point; an absent landmark has confidence 0), the method's name and a small JSON-able `info` dict
(timings, diagnostics). The dataset writer keeps a point only when its confidence reaches the
threshold; the rest are written absent.

`pseudo_labels.json` (beside the dataset's landmarks.json, see pseudo_dataset.py) holds every
case's UNTHRESHOLDED points and confidences, so a dataset can be re-thresholded or its pseudo-labels
scored against a ground truth without running the method again:

    {"format": "nnlandmark_h3de.pseudo_labels", "version": 1, "coordinate_system": "LPS",
     "units": "mm", "names": [...], <header fields, e.g. method, min_confidence, template>,
     "cases": {case: {"method": str, "landmarks": {name: [x, y, z] | null},
                      "confidence": {name: float}, "info": {...}}}}
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Tuple, Union

import numpy as np

from nnlandmark_h3de.landmarks.dataset_file import PSEUDO_LABELS_FILE
from nnlandmark_h3de.landmarks.atomic import atomic_write_text
from nnlandmark_h3de.landmarks.landmark_set import LandmarkError, LandmarkSet

__all__ = ["PSEUDO_LABELS_FILE", "OneShotError", "OneShotWarning", "PseudoLabels", "pseudo_labels_to_dict",
           "pseudo_labels_from_dict", "save_pseudo_labels", "load_pseudo_labels", "read_pseudo_labels_file",
           "read_scalar_image", "read_template", "image_label"]

FORMAT = "nnlandmark_h3de.pseudo_labels"
VERSION = 1
RESERVED_KEYS = ("format", "version", "coordinate_system", "units", "names", "cases")


class OneShotError(LandmarkError):
    """Bad one-shot input or a failed case; the message names the file or case and the problem."""


class OneShotWarning(UserWarning):
    """Cases skipped (failed registration, no confident landmark) or landmarks dropped; lists them by name."""


@dataclass
class PseudoLabels:
    """One case's pseudo-labels. `confidence` (L,) in [0, 1], in the landmarks' order; an absent
    landmark (NaN row) gets confidence 0. `info` must be JSON-serialisable (numpy scalars/arrays are
    converted when saved)."""
    landmarks: LandmarkSet
    confidence: np.ndarray
    method: str
    info: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        src = self.landmarks.source
        if not isinstance(self.method, str) or not self.method.strip():
            raise OneShotError(f"{src}: pseudo-label method must be a non-empty string, got {self.method!r}")
        conf = np.asarray(self.confidence, dtype=np.float64).reshape(-1)
        if conf.shape[0] != len(self.landmarks):
            raise OneShotError(f"{src}: {conf.shape[0]} confidences for {len(self.landmarks)} landmarks")
        absent = ~self.landmarks.present
        conf = np.where(absent, 0.0, conf)
        if not np.all(np.isfinite(conf)) or conf.min(initial=0.0) < 0 or conf.max(initial=0.0) > 1:
            raise OneShotError(f"{src}: confidences must be finite and in [0, 1], got {np.round(conf, 4).tolist()}")
        self.confidence = conf
        if not isinstance(self.info, dict):
            raise OneShotError(f"{src}: info must be a dict, got {type(self.info).__name__}")

    @property
    def names(self):
        return self.landmarks.names

    def kept_mask(self, min_confidence: float) -> np.ndarray:
        """Landmarks present with confidence >= min_confidence."""
        return self.landmarks.present & (self.confidence >= float(min_confidence))

    def thresholded(self, min_confidence: float) -> LandmarkSet:
        """The landmarks with every point under `min_confidence` made absent (NaN): marked absent, not wrong."""
        keep = self.kept_mask(min_confidence)
        pts = self.landmarks.points_lps.copy()
        pts[~keep] = np.nan
        return LandmarkSet(list(self.names), pts, confidence=np.where(keep, self.confidence, np.nan),
                           descriptions=self.landmarks.descriptions, source=self.landmarks.source)

    def reordered(self, names) -> "PseudoLabels":
        """Same pseudo-labels in `names` order (missing names absent, confidence 0; unknown names an error)."""
        ls = self.landmarks.reordered(list(names))
        index = {n: i for i, n in enumerate(self.names)}
        conf = np.array([self.confidence[index[n]] if n in index else 0.0 for n in names])
        return PseudoLabels(ls, conf, self.method, dict(self.info))


# ------------------------------------------------------------------------------------- JSON
def _jsonable(obj, where: str):
    """numpy scalars/arrays -> Python; NaN/inf -> None; anything else not JSON -> OneShotError."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v, where) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, where) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist(), where)
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(float(obj)) else None
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, os.PathLike):
        return str(obj)
    raise OneShotError(f"{where}: info value {obj!r} ({type(obj).__name__}) is not JSON-serialisable")


def _case_dict(case: str, p: PseudoLabels) -> dict:
    return {"method": p.method,
            "landmarks": p.landmarks.as_dict(),
            "confidence": {n: float(c) for n, c in zip(p.names, p.confidence)},
            "info": _jsonable(p.info, f"case {case}")}


def pseudo_labels_to_dict(pseudo: Mapping[str, PseudoLabels], **header) -> dict:
    """The JSON object of `pseudo_labels.json`; every case is written in the first case's landmark order."""
    if not pseudo:
        raise OneShotError("no pseudo-labelled cases to write")
    bad = [k for k in header if k in RESERVED_KEYS]
    if bad:
        raise OneShotError(f"header keys {bad} are reserved in {PSEUDO_LABELS_FILE}")
    names = list(next(iter(pseudo.values())).names)
    cases = {}
    for case, p in pseudo.items():
        if not isinstance(p, PseudoLabels):
            raise OneShotError(f"case {case}: expected PseudoLabels, got {type(p).__name__}")
        try:
            cases[str(case)] = _case_dict(str(case), p.reordered(names))
        except LandmarkError as e:
            raise OneShotError(f"case {case}: {e}") from None
    return {"format": FORMAT, "version": VERSION, "coordinate_system": "LPS", "units": "mm", "names": names,
            **_jsonable(header, "header"), "cases": cases}


def pseudo_labels_from_dict(d: Mapping, source: str = "<memory>") -> Dict[str, PseudoLabels]:
    """Inverse of `pseudo_labels_to_dict`; errors name `source` and the case."""
    if not isinstance(d, Mapping) or d.get("format") != FORMAT:
        raise OneShotError(f"{source}: not a pseudo-label file (expected \"format\": \"{FORMAT}\")")
    if d.get("version") != VERSION:
        raise OneShotError(f"{source}: unsupported pseudo-label file version {d.get('version')!r} (expected {VERSION})")
    if d.get("coordinate_system", "LPS") != "LPS":
        raise OneShotError(f"{source}: coordinate_system must be LPS, got {d.get('coordinate_system')!r}")
    names, cases = d.get("names"), d.get("cases")
    if not isinstance(names, list) or not isinstance(cases, Mapping):
        raise OneShotError(f"{source}: needs a \"names\" list and a \"cases\" object")
    out: Dict[str, PseudoLabels] = {}
    for case, c in cases.items():
        where = f"{source}: case {case}"
        try:
            lm, conf = c["landmarks"], c["confidence"]
            unknown = sorted(set(lm) - set(names)) + sorted(set(conf) - set(names))
            if unknown:
                raise OneShotError(f"{where}: unknown landmark names {unknown}")
            pts = np.array([[np.nan] * 3 if lm.get(n) is None else [float(v) for v in lm[n]] for n in names],
                           dtype=np.float64)
            confidence = np.array([0.0 if conf.get(n) is None else float(conf[n]) for n in names])
            ls = LandmarkSet(list(names), pts, source=f"{source}: case {case}")
            out[str(case)] = PseudoLabels(ls, confidence, str(c["method"]), dict(c.get("info") or {}))
        except OneShotError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise OneShotError(f"{where}: malformed entry ({type(e).__name__}: {e})") from None
    return out


def save_pseudo_labels(pseudo: Mapping[str, PseudoLabels], path: Union[str, os.PathLike], **header) -> Path:
    """Write `pseudo_labels.json` atomically; `header` adds top-level fields (method, min_confidence, ...)."""
    text = json.dumps(pseudo_labels_to_dict(pseudo, **header), indent=2, allow_nan=False) + "\n"
    return atomic_write_text(path, text)


def read_pseudo_labels_file(path: Union[str, os.PathLike]) -> Tuple[dict, Dict[str, PseudoLabels]]:
    """(header fields, {case: PseudoLabels}) of a `pseudo_labels.json`; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise OneShotError(f"{path}: pseudo-label file not found")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OneShotError(f"{path}: unreadable pseudo-label file ({e})") from None
    pseudo = pseudo_labels_from_dict(d, str(path))
    return {k: v for k, v in d.items() if k not in RESERVED_KEYS}, pseudo


def load_pseudo_labels(path: Union[str, os.PathLike]) -> Dict[str, PseudoLabels]:
    """{case: PseudoLabels} of a `pseudo_labels.json` (e.g. a pseudo-label dataset's)."""
    return read_pseudo_labels_file(path)[1]


# ------------------------------------------------------------------------ template and images
def image_label(image) -> str:
    """How messages name an image: its path, or '<in-memory image>'."""
    return str(image) if isinstance(image, (str, os.PathLike)) else "<in-memory image>"


def read_scalar_image(image, what: str = "image", spacing=None):
    """A path or SimpleITK image -> a scalar 2D or 3D float32 SimpleITK image; errors name the file.

    A multi-component or 4D image is an error naming the file. 2D pictures (PNG, BMP, TIFF, JPEG)
    need `spacing` (mm per pixel, one value or (x, y)) and are read as the converter reads them
    (conversion/images_2d.py: grey, origin 0, identity direction); a 2D NIfTI/NRRD/MHA file given
    a different `spacing` takes it (a OneShotWarning says so); a volume given one is an error.
    """
    import warnings

    import SimpleITK as sitk
    from nnlandmark_h3de.conversion.errors import ConversionError
    from nnlandmark_h3de.conversion.images_2d import open_with_pixel_spacing
    from nnlandmark_h3de.landmarks.geometry import read_image
    label = image_label(image)
    if isinstance(image, sitk.Image):
        img = image
    elif isinstance(image, (str, os.PathLike)):
        try:
            opened = open_with_pixel_spacing(image, spacing)
            img = read_image(image) if opened is None else opened.image.load()
            if opened is not None and opened.spacing_replaced:
                warnings.warn(f"{what} {label}: pixel spacing {opened.file_spacing} of the file replaced by "
                              f"{img.GetSpacing()}", OneShotWarning, stacklevel=2)
        except (FileNotFoundError, ValueError, ConversionError) as e:
            raise OneShotError(f"{what} {e}") from None
    else:
        raise OneShotError(f"{what}: expected an image path or SimpleITK image, got {type(image).__name__}")
    if img.GetDimension() not in (2, 3) or img.GetNumberOfComponentsPerPixel() != 1:
        raise OneShotError(f"{what} {label}: expected a scalar 2D or 3D image, got {img.GetDimension()}D with "
                           f"{img.GetNumberOfComponentsPerPixel()} component(s) per voxel")
    img = sitk.Cast(img, sitk.sitkFloat32)
    if not np.all(np.isfinite(sitk.GetArrayViewFromImage(img))):
        raise OneShotError(f"{what} {label}: image contains NaN or infinite intensities")
    return img


def read_template(template_image, template_landmarks, spacing=None):
    """(float32 2D or 3D SimpleITK image, LandmarkSet) of the one labelled image, checked.

    The landmarks (a file read with `read_landmarks`, a CSV's pixel columns mapped through the
    image, or a LandmarkSet) need at least one present point, and every present point inside the
    template image: the template is the ground truth of the whole dataset, so a point outside it is
    a mistake (RAS vs LPS, wrong image), never a cut-off view. `spacing`: see `read_scalar_image`.
    """
    from nnlandmark_h3de.landmarks.geometry import ImageGeometry
    from nnlandmark_h3de.landmarks.io import read_landmark_source
    image = read_scalar_image(template_image, "template image", spacing)
    geometry = ImageGeometry.from_sitk(image)
    ls = read_landmark_source(template_landmarks, geometry, OneShotError)
    if not ls.present.any():
        raise OneShotError(f"{ls.source}: the template has no landmark with a position")
    present = ls.present
    inside = np.ones(len(ls), bool)
    inside[present] = geometry.contains_array_index(geometry.world_to_array_index(ls.points_lps[present]), 0.5)
    if not inside.all():
        bad = "; ".join(f"{n} at LPS {np.round(p, 2).tolist()}"
                        for n, p, ok in zip(ls.names, ls.points_lps, inside) if not ok)
        raise OneShotError(f"{ls.source}: template landmark(s) outside the template image "
                           f"{image_label(template_image)} (shape zyx {geometry.shape_zyx}): {bad}. "
                           "Wrong coordinate system (RAS vs LPS) or wrong image?")
    return image, ls
