"""Pair image files with landmark files by case name (file name minus its image/landmark extension)."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from nnlandmark_h3de.conversion.errors import ConversionError, ConversionWarning

# 3D or 2D medical image files, then 2D pictures (PNG/BMP/TIFF/JPEG: the conversion needs a pixel spacing)
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".bmp", ".tiff", ".tif", ".jpeg", ".jpg")


def _landmark_suffixes() -> Tuple[str, ...]:
    from nnlandmark_h3de.landmarks.io import LANDMARK_SUFFIXES  # ".mrk.json" before ".json"
    return tuple(LANDMARK_SUFFIXES)


def strip_suffix(name: str, suffixes) -> Optional[str]:
    """File name minus the first matching suffix (case-insensitive), or None if none matches."""
    low = name.lower()
    for s in suffixes:
        if low.endswith(s) and len(name) > len(s):
            return name[: -len(s)]
    return None


def list_cases(folder, suffixes, what: str) -> Dict[str, Path]:
    """Case name -> file for every visible file in `folder` with one of `suffixes`; duplicates are an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConversionError(f"{folder}: {what} folder not found")
    found: Dict[str, List[Path]] = {}
    for f in sorted(folder.iterdir()):
        if f.name.startswith(".") or not f.is_file():
            continue
        case = strip_suffix(f.name, suffixes)
        if case is not None:
            found.setdefault(case, []).append(f)
    dupes = {c: fs for c, fs in found.items() if len(fs) > 1}
    if dupes:
        listing = "; ".join(f"{c}: {', '.join(f.name for f in fs)}" for c, fs in sorted(dupes.items()))
        raise ConversionError(f"{folder}: several {what} files for the same case ({listing})")
    return {c: fs[0] for c, fs in found.items()}


def match_cases(images_dir, landmarks_dir, drop_unmatched: bool = False) -> Dict[str, Tuple[Path, Path]]:
    """Case -> (image file, landmark file), sorted by case.

    Images without a landmark file and landmark files without an image are an error listing them
    by case name; with `drop_unmatched` they are skipped with a warning instead.
    """
    images = list_cases(images_dir, IMAGE_SUFFIXES, "image")
    landmarks = list_cases(landmarks_dir, _landmark_suffixes(), "landmark")
    no_lm = sorted(set(images) - set(landmarks))
    no_img = sorted(set(landmarks) - set(images))
    if no_lm or no_img:
        parts = []
        if no_lm:
            parts.append(f"images without a landmark file in {landmarks_dir}: {no_lm}")
        if no_img:
            parts.append(f"landmark files without an image in {images_dir}: {no_img}")
        msg = "; ".join(parts)
        if not drop_unmatched:
            raise ConversionError(f"mismatched cases ({msg}); file names must match up to their extensions "
                                  f"(image {', '.join(IMAGE_SUFFIXES)}; landmarks {', '.join(_landmark_suffixes())})")
        warnings.warn(f"dropping unmatched cases: {msg}", ConversionWarning, stacklevel=2)
    both = sorted(set(images) & set(landmarks))
    if not both:
        raise ConversionError(f"no case has both an image in {images_dir} and a landmark file in {landmarks_dir}")
    return {c: (images[c], landmarks[c]) for c in both}
