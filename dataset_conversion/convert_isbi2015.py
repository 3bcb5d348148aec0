#!/usr/bin/env python
"""ISBI 2015 cephalometric X-ray challenge -> 2D nnU-Net raw dataset with the official split.

Layout (as downloaded):
    ROOT/RawImage/TrainingData/001.bmp .. 150.bmp    training (imagesTr/labelsTr)
    ROOT/RawImage/Test1Data/151.bmp .. 300.bmp       test set 1 (imagesTs)
    ROOT/RawImage/Test2Data/301.bmp .. 400.bmp       test set 2 (imagesTs)
    ROOT/AnnotationsByMD/400_senior/001.txt ..       one file per image and doctor: 19 lines `x,y`
    ROOT/AnnotationsByMD/400_junior/001.txt ..       in pixels, then lines that are not landmarks
Images are 1935 x 2400 grey BMPs at 0.1 mm per pixel (SimpleITK reads 8-bit palette BMPs as RGB;
they become one grey channel again, exactly). The reference landmark is the mean of the two
doctors (`--reference senior|junior` takes one of them), and the annotation pixel coordinates are
read as 0-based continuous pixel indices (x = column, y = row, an integer at a pixel's centre).
Landmarks go to world LPS mm through the ORIGINAL image grid (origin 0, 0.1 mm, z = 0), so
`--downscale F` (block-average F x F pixels: spacing F x 0.1 mm, origin at the first block's
centre, remainder rows/columns dropped) changes the images only, never the landmarks.

Case ids are the file names ("001" ..). Both test sets go to imagesTs; their reference landmarks
are in landmarks.json like every case's, and its `test_sets` block, {"test1": [...], "test2": [...]}
(read with `nnlandmark_h3de.conversion.load_dataset_test_sets`), says which case is in which, so
each set can be evaluated on its own (predict both, evaluate the files of one set). There is no
official validation split: nnU-Net's 5-fold cross-validation runs on the 150 training cases.

    python dataset_conversion/convert_isbi2015.py -i /data/ISBI2015 -d 505 [-n ISBI2015] [--downscale 2]
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

ISBI_NAMES = ["sella", "nasion", "orbitale", "porion", "subspinale", "supramentale", "pogonion", "menton",
              "gnathion", "gonion", "lower_incisal_incision", "upper_incisal_incision", "upper_lip", "lower_lip",
              "subnasale", "soft_tissue_pogonion", "posterior_nasal_spine", "anterior_nasal_spine", "articulare"]
SPACING_MM = 0.1
SPLIT_FOLDERS = {"train": "TrainingData", "test1": "Test1Data", "test2": "Test2Data"}
DOCTORS = {"senior": "400_senior", "junior": "400_junior"}
REFERENCES = ("mean", "senior", "junior")
_PAIR = re.compile(r"^\s*([-+0-9.eE]+)\s*[,;\s]\s*([-+0-9.eE]+)\s*$")


def read_isbi_annotation(path) -> np.ndarray:
    """The first 19 lines `x,y` of one doctor's file as a (19, 2) float array of pixel coordinates."""
    from nnlandmark_h3de.conversion import ConversionError

    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig", errors="replace").splitlines()
    except FileNotFoundError:
        raise ConversionError(f"{path}: ISBI annotation file not found") from None
    except OSError as e:
        raise ConversionError(f"{path}: unreadable ISBI annotation file ({e.strerror})") from None
    n = len(ISBI_NAMES)
    if len(lines) < n:
        raise ConversionError(f"{path}: {len(lines)} lines, expected {n} landmark lines 'x,y' first")
    xy = []
    for lineno, line in enumerate(lines[:n], start=1):
        m = _PAIR.match(line)
        try:
            x, y = float(m.group(1)), float(m.group(2))
        except (AttributeError, ValueError):
            raise ConversionError(f"{path}: line {lineno} ({ISBI_NAMES[lineno - 1]}): expected 'x,y' pixel "
                                  f"coordinates, got {line!r}") from None
        if not (np.isfinite(x) and np.isfinite(y)):
            raise ConversionError(f"{path}: line {lineno}: non-finite coordinates {line!r}")
        xy.append((x, y))
    return np.asarray(xy, dtype=np.float64)


def isbi2015_cases(root, downscale: int = 1, reference: str = "mean",
                   on_error: str = "raise") -> Dict[str, Dict[str, tuple]]:
    """split ("train", "test1", "test2") -> case id -> (LazyImage, LandmarkSet in LPS mm).

    Images are decoded only when written. A case whose image or annotation is bad raises, or with
    on_error="drop" is skipped with a warning. A missing test folder is skipped.
    """
    import warnings

    from nnlandmark_h3de.conversion import ConversionError, ConversionWarning, downscale_2d, downscaled_geometry
    from nnlandmark_h3de.conversion.images_2d import open_picture, read_picture
    from nnlandmark_h3de.conversion.lazy_image import LazyImage
    from nnlandmark_h3de.landmarks import LandmarkSet

    if reference not in REFERENCES:
        raise ConversionError(f"reference must be one of {REFERENCES}, got {reference!r}")
    root = Path(root)
    doctors = [d for d in DOCTORS if reference in ("mean", d)]
    for d in doctors:
        if not (root / "AnnotationsByMD" / DOCTORS[d]).is_dir():
            raise ConversionError(f"{root / 'AnnotationsByMD' / DOCTORS[d]}: ISBI annotation folder not found")
    out: Dict[str, Dict[str, tuple]] = {}
    for split, name in SPLIT_FOLDERS.items():
        folder = root / "RawImage" / name
        if not folder.is_dir():
            if split != "train":
                continue
            raise ConversionError(f"{folder}: ISBI training image folder not found")
        out[split] = {}
        for bmp in sorted(p for p in folder.iterdir() if p.suffix.lower() == ".bmp" and not p.name.startswith(".")):
            case = bmp.stem
            try:
                image, _ = open_picture(bmp, (SPACING_MM, SPACING_MM))
                geo = image.geometry
                xy = np.mean([read_isbi_annotation(root / "AnnotationsByMD" / DOCTORS[d] / f"{case}.txt")
                              for d in doctors], axis=0)
                points = geo.itk_index_to_world(np.column_stack([xy, np.zeros(len(xy))]))
                ls = LandmarkSet(list(ISBI_NAMES), points, source=f"{case}: AnnotationsByMD ({reference} of {doctors})")
                if downscale != 1:
                    small = downscaled_geometry(geo, downscale)
                    image = LazyImage(small, lambda p=bmp, f=downscale: downscale_2d(
                        read_picture(p, (SPACING_MM, SPACING_MM)), f), str(bmp))
            except ValueError as e:  # LandmarkError, ConversionError; messages name the file
                msg = str(e) if str(root) in str(e) else f"{bmp}: {e}"
                if on_error != "drop":
                    raise ConversionError(msg) from None
                warnings.warn(f"dropping case {case}: {msg}", ConversionWarning, stacklevel=2)
                continue
            out[split][case] = (image, ls)
        if split == "train" and not out[split]:
            raise ConversionError(f"{folder}: no .bmp image")
    seen: Dict[str, str] = {}
    for split, cases in out.items():
        for case in cases:
            if case in seen:
                raise ConversionError(f"case id {case} is in both {SPLIT_FOLDERS[seen[case]]} and {SPLIT_FOLDERS[split]}")
            seen[case] = split
    return out


def convert_isbi2015(root, dataset_id: int, dataset_name: str = "ISBI2015", downscale: int = 1,
                     reference: str = "mean", output_root=None, **kwargs) -> Path:
    """Write the raw dataset (see the module docstring); `kwargs` go to `convert_dataset`."""
    from nnlandmark_h3de.conversion import convert_dataset
    from nnlandmark_h3de.conversion.raw_dataset import dataset_folder_name

    by_split = isbi2015_cases(root, downscale, reference, kwargs.get("on_error", "raise"))
    cases = {c: v for split in SPLIT_FOLDERS for c, v in by_split.get(split, {}).items()}
    test_sets = {s: sorted(by_split[s]) for s in ("test1", "test2") if by_split.get(s)}
    target = (Path(output_root) / dataset_folder_name(dataset_id, dataset_name)) if output_root else (dataset_id, dataset_name)
    return convert_dataset(cases, target, names=ISBI_NAMES, pairs=[], test_sets=test_sets, channel_name="Xray",
                           **kwargs)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-i", "--input", required=True, help="ISBI 2015 root with RawImage/ and AnnotationsByMD/")
    p.add_argument("-d", "--dataset_id", required=True, type=int)
    p.add_argument("-n", "--dataset_name", default="ISBI2015")
    p.add_argument("-o", "--output_root", default=None, help="parent folder (default $nnUNet_raw)")
    p.add_argument("--downscale", type=int, default=1, metavar="F",
                   help="average F x F pixel blocks (spacing F x 0.1 mm; landmarks unchanged in mm). 1935 x 2400 "
                        "pixels at 0.1 mm are heavy on a CPU: 2 gives 0.2 mm, 4 gives 0.4 mm (default: 1)")
    p.add_argument("--reference", choices=REFERENCES, default="mean",
                   help="reference landmarks: the mean of the two doctors (default), or one of them")
    p.add_argument("--ball_radius_mm", type=float, default=None)
    p.add_argument("--drop_bad_cases", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    from nnlandmark_h3de.landmarks import LandmarkError
    if a.downscale < 1:
        p.error(f"--downscale must be a positive integer, got {a.downscale}")
    try:
        folder = convert_isbi2015(a.input, a.dataset_id, a.dataset_name, a.downscale, a.reference, a.output_root,
                                  ball_radius_mm=a.ball_radius_mm, overwrite=a.overwrite,
                                  on_error="drop" if a.drop_bad_cases else "raise")
    except LandmarkError as e:  # includes ConversionError
        print(f"convert_isbi2015: error: {e}", file=sys.stderr)
        return 1
    print(f"Wrote {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
