"""Pass 2 of the conversion: each case's image (imagesTr or imagesTs) and, for a training case, its
label map of balls around the exact landmarks (labelsTr; a 2D image gets a 2D map of disks).

The balls (nearest landmark wins where they meet, see draw_balls.py) only feed nnU-Net's planning
and foreground-oversampled patch positions; training targets are the exact points in landmarks.json.
Voxel data is read here, one case at a time, so a dataset never has to fit in memory.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

import numpy as np
from tqdm import tqdm

from nnlandmark_h3de.conversion.case_reading import CaseError, CaseProblems, InputCase
from nnlandmark_h3de.conversion.draw_balls import draw_balls, label_dtype
from nnlandmark_h3de.conversion.errors import ConversionError
from nnlandmark_h3de.conversion.lazy_image import LazyImage
from nnlandmark_h3de.landmarks.geometry import ImageGeometry
from nnlandmark_h3de.landmarks.landmark_set import LandmarkError
from nnlandmark_h3de.utilities.orientation import to_orientation

FILE_ENDING = ".nii.gz"


def write_cases(cases: List[InputCase], tmp: Path, names: Sequence[str], radius: float, problems: CaseProblems,
                progress: bool) -> List[InputCase]:
    """Pass 2: images and label balls into the temporary folder; returns the cases written."""
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (tmp / sub).mkdir(parents=True)
    written: List[InputCase] = []
    for c in tqdm(cases, desc="Writing cases", unit="case", disable=not progress):
        try:
            _write_case(c, tmp, names, radius)
        except CaseError as e:
            _remove_case_files(tmp, c.case)
            if problems.on_error == "raise":
                raise ConversionError(str(e)) from None
            problems.fail(c.case, str(e))
            continue
        written.append(c)
    if not any(not c.is_test for c in written):
        raise ConversionError("no training case could be converted:\n" + problems.listing())
    if not any(c.is_test for c in written):
        (tmp / "imagesTs").rmdir()
    return written


def _write_case(c: InputCase, out: Path, names: Sequence[str], radius: float) -> None:
    import SimpleITK as sitk
    image = _read_image(c)
    arr = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        raise CaseError(f"{c.image_label}: image contains NaN or infinite intensities")
    if ImageGeometry.from_sitk(image) != c.geometry:
        raise CaseError(f"{c.image_label}: image geometry changed while converting")
    image = to_orientation(image)  # 3D: one voxel-axis orientation for all cases (utilities/orientation.py)
    if c.is_test:
        sitk.WriteImage(image, str(out / "imagesTs" / f"{c.case}_0000{FILE_ENDING}"), useCompression=True)
        return
    geometry = ImageGeometry.from_sitk(image)
    labels, _ = draw_balls(geometry, c.landmarks.points_lps, radius, label_dtype(len(names)))
    label_img = sitk.GetImageFromArray(labels[0] if geometry.ndim == 2 else labels)  # 2D: disks, a 2D map
    label_img.CopyInformation(image)
    sitk.WriteImage(image, str(out / "imagesTr" / f"{c.case}_0000{FILE_ENDING}"), useCompression=True)
    sitk.WriteImage(label_img, str(out / "labelsTr" / f"{c.case}{FILE_ENDING}"), useCompression=True)


def _read_image(c: InputCase):
    import SimpleITK as sitk
    if isinstance(c.image, sitk.Image):
        return c.image
    if isinstance(c.image, LazyImage):
        try:
            image = c.image.load()
        except (LandmarkError, OSError, ValueError, RuntimeError) as e:
            raise CaseError(f"{c.image_label}: unreadable image ({e})") from None
        if image.GetDimension() != c.image.geometry.ndim or image.GetNumberOfComponentsPerPixel() != 1:
            raise CaseError(f"{c.image_label}: expected a {c.image.geometry.ndim}D single-component image, got "
                            f"{image.GetDimension()}D with {image.GetNumberOfComponentsPerPixel()} component(s)")
        if ImageGeometry.from_sitk(image) != c.image.geometry:
            raise CaseError(f"{c.image_label}: loaded image geometry differs from its header geometry")
        return image
    try:
        return sitk.ReadImage(str(c.image))
    except RuntimeError as e:
        raise CaseError(f"{c.image}: unreadable image ({str(e).strip().splitlines()[-1]})") from None


def _remove_case_files(out: Path, case: str) -> None:
    for p in (out / "imagesTr" / f"{case}_0000{FILE_ENDING}", out / "labelsTr" / f"{case}{FILE_ENDING}",
              out / "imagesTs" / f"{case}_0000{FILE_ENDING}"):
        if p.exists():
            p.unlink()
