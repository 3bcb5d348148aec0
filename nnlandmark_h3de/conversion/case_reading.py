"""Pass 1 of the conversion: every case's image header and landmark file, no voxel data read.

Per-case problems are collected in `CaseProblems` (raised together, or each case dropped with a
`ConversionWarning`), so one run reports every bad case at once.
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from tqdm import tqdm

from nnlandmark_h3de.conversion.errors import ConversionError, ConversionWarning
from nnlandmark_h3de.conversion.images_2d import ImageInputError, open_with_pixel_spacing
from nnlandmark_h3de.conversion.lazy_image import LazyImage
from nnlandmark_h3de.landmarks.geometry import ImageGeometry, read_image_header
from nnlandmark_h3de.landmarks.landmark_set import LandmarkSet

ImageLike = Union[str, os.PathLike, "SimpleITK.Image", LazyImage]  # noqa: F821
LandmarksLike = Union[str, os.PathLike, LandmarkSet]


class CaseError(Exception):
    """One case cannot be converted (collected, then raised together or dropped)."""


@dataclass
class InputCase:
    """One case on its way through the conversion: its image, landmarks (channel order once checked)
    and geometry."""
    case: str
    image: ImageLike
    image_label: str  # file name or "<case> (in-memory image)" for messages
    landmarks: Optional[LandmarkSet] = None
    geometry: Optional[ImageGeometry] = None
    is_test: bool = False
    file_names: Tuple[str, ...] = ()  # landmark names as read, before exclude_names


class CaseProblems:
    """Per-case problems: collected and raised together ("raise"), or each case dropped with a warning."""

    def __init__(self, on_error: str):
        if on_error not in ("raise", "drop"):
            raise ConversionError(f"on_error must be 'raise' or 'drop', got {on_error!r}")
        self.on_error = on_error
        self.by_case: Dict[str, str] = {}

    def fail(self, case: str, msg: str) -> None:
        self.by_case[case] = msg
        if self.on_error == "drop":
            warnings.warn(f"dropping case {case}: {msg}", ConversionWarning, stacklevel=4)

    def listing(self) -> str:
        return "\n".join(f"  {v}" for v in self.by_case.values())

    def raise_if_any(self) -> None:
        if self.by_case and self.on_error == "raise":
            raise ConversionError(f"{len(self.by_case)} case(s) cannot be converted (fix them, or drop them with "
                                  f"on_error='drop' / --drop_bad_cases):\n" + self.listing())


def check_case_ids(cases: Mapping, test_cases: Sequence[str]) -> set:
    """The test case ids, after checking every id can be a file name."""
    if not cases:
        raise ConversionError("no cases to convert")
    test_set = {str(t) for t in test_cases}
    unknown_test = sorted(test_set - {str(k) for k in cases})
    if unknown_test:
        raise ConversionError(f"test cases {unknown_test} are not among the given cases")
    bad_ids = [k for k in cases if not str(k) or str(k).startswith(".") or re.search(r"[/\\\s]", str(k))]
    if bad_ids:
        raise ConversionError(f"case ids {bad_ids} cannot be file names (no spaces, slashes or leading dot)")
    return test_set


def some(items: List[str], n: int = 5) -> str:
    """The first `n` items for a message, and how many more there are."""
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def read_cases(cases: Mapping, test_set: set, exclude: Sequence[str], problems: CaseProblems,
               progress: bool, spacing: Optional[Tuple[float, float]] = None) -> List[InputCase]:
    """Pass 1: image headers and landmark files (no voxel data read)."""
    import SimpleITK as sitk
    items: List[InputCase] = []
    notes: Dict[str, List[str]] = {"grey": [], "spacing": []}
    for case, (image, lm) in tqdm(list(cases.items()), desc="Reading cases", unit="case", disable=not progress):
        case = str(case)
        label = f"{case} (in-memory image)" if isinstance(image, sitk.Image) else str(image)
        c = InputCase(case, image, label, is_test=case in test_set)
        try:
            _open_2d(c, spacing, notes)
            c.geometry = _image_header(c)
            c.landmarks, c.file_names = _read_case_landmarks(lm, exclude, c.geometry)
        except CaseError as e:
            problems.fail(case, str(e))
            continue
        items.append(c)
    if notes["grey"]:
        warnings.warn(f"{len(notes['grey'])} colour picture(s) converted to one grey channel (0.299 R + 0.587 G + "
                      "0.114 B, alpha ignored; exact for grey pictures stored as colour, such as palette BMPs): "
                      f"{some(notes['grey'])}", ConversionWarning, stacklevel=3)
    if notes["spacing"]:
        warnings.warn(f"spacing {list(spacing)} mm per pixel (x, y) overrides the spacing of {len(notes['spacing'])} "
                      f"2D image file(s): {some(notes['spacing'])}", ConversionWarning, stacklevel=3)
    dims = {c.geometry.ndim for c in items}
    if len(dims) > 1:
        by_dim = {d: [c.image_label for c in items if c.geometry.ndim == d] for d in sorted(dims)}
        raise ConversionError("a dataset holds 2D or 3D images, not both (nnU-Net plans one kind): "
                              + "; ".join(f"{d}D: {some(v, 3)}" for d, v in by_dim.items()))
    return items


def _open_2d(c: InputCase, spacing: Optional[Tuple[float, float]], notes: Dict[str, List[str]]) -> None:
    """Picture files, and image files whose spacing is overridden, become LazyImages (images_2d.py).

    In-memory images and LazyImages keep their own geometry.
    """
    import SimpleITK as sitk
    if isinstance(c.image, (sitk.Image, LazyImage)):
        return
    path = Path(c.image)
    try:
        opened = open_with_pixel_spacing(path, spacing, c.image_label)
    except ImageInputError as e:
        raise CaseError(str(e)) from None
    if opened is None:
        return
    c.image = opened.image
    if opened.components > 1:
        notes["grey"].append(str(path))
    if opened.spacing_replaced:
        notes["spacing"].append(f"{path} (file: {list(opened.file_spacing)})")


def _image_header(c: InputCase) -> ImageGeometry:
    import SimpleITK as sitk
    if isinstance(c.image, LazyImage):
        return c.image.geometry
    if isinstance(c.image, sitk.Image):
        dim, comps = c.image.GetDimension(), c.image.GetNumberOfComponentsPerPixel()
        size = c.image.GetSize()
    else:
        path = Path(c.image)
        if not path.is_file():
            raise CaseError(f"{path}: image file not found")
        try:
            reader = read_image_header(path)
        except ValueError as e:
            raise CaseError(str(e)) from None
        dim, comps, size = reader.GetDimension(), reader.GetNumberOfComponents(), reader.GetSize()
    if dim not in (2, 3) or comps != 1:
        raise CaseError(f"{c.image_label}: expected a 3D single-component image, got {dim}D with {comps} "
                        f"component(s) per voxel (size {tuple(size)}); split 4D/multi-channel images first "
                        "(2D single-component images convert too)")
    geo = ImageGeometry.from_sitk(c.image) if isinstance(c.image, sitk.Image) else ImageGeometry.from_file(c.image)
    if min(geo.shape_ijk) < 1 or not np.all(np.asarray(geo.spacing) > 0):
        raise CaseError(f"{c.image_label}: degenerate geometry (size {geo.shape_ijk}, spacing {geo.spacing})")
    return geo


def _read_case_landmarks(lm: LandmarksLike, exclude: Sequence[str],
                         geometry: Optional[ImageGeometry] = None) -> Tuple[LandmarkSet, Tuple[str, ...]]:
    """The case's landmarks (a CSV file in pixel coordinates is mapped to world through `geometry`)."""
    from nnlandmark_h3de.landmarks.io import read_landmark_source
    ls = read_landmark_source(lm, geometry, CaseError)
    file_names = tuple(ls.names)
    if exclude:
        keep = [i for i, n in enumerate(ls.names) if n not in exclude]
        ls = LandmarkSet([ls.names[i] for i in keep], ls.points_lps[keep], source=ls.source)
    return ls, file_names
