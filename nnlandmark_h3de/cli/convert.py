"""nnLandmark_convert: a folder of images + a folder of landmark files -> nnU-Net raw dataset.

3D images (NIfTI, NRRD, MHA) and 2D images (X-rays: 2D NIfTI/NRRD/MHA, or PNG/BMP/TIFF/JPEG with
`--spacing`) convert the same way; a 2D dataset is written as 2D NIfTI images and label maps so that
nnU-Net plans its `2d` configuration (see conversion/images_2d.py and conversion/raw_dataset.py).
"""
from __future__ import annotations

import argparse
import csv
import sys
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple


def _parse_pairs(items: Optional[List[str]]) -> Optional[List[Tuple[str, str]]]:
    if items is None:
        return None
    pairs = []
    for item in items:
        parts = item.split(":")
        if len(parts) != 2 or not all(parts):
            raise SystemExit(f"nnLandmark_convert: error: --pairs expects LEFT:RIGHT, got {item!r}")
        pairs.append((parts[0], parts[1]))
    return pairs


def _read_names_file(path: str) -> List[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except OSError as e:
        raise SystemExit(f"nnLandmark_convert: error: {path}: cannot read names file ({e.strerror})")
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def _read_subjects_file(path: str) -> Dict[str, str]:
    """case,subject per line (a `case,subject` header and # comments allowed): cases that are scans of one
    person, so that calibration never validates a case with an atlas of its own subject."""
    try:
        rows = list(csv.reader(Path(path).read_text(encoding="utf-8-sig").splitlines()))
    except OSError as e:
        raise SystemExit(f"nnLandmark_convert: error: {path}: cannot read subjects file ({e.strerror})")
    rows = [[c.strip() for c in r] for r in rows if r and any(c.strip() for c in r) and not r[0].startswith("#")]
    if rows and [c.lower() for c in rows[0]] == ["case", "subject"]:
        rows = rows[1:]
    bad = [i for i, r in enumerate(rows) if len(r) != 2 or not all(r)]
    if bad:
        raise SystemExit(f"nnLandmark_convert: error: {path}: expected 'case,subject' on every line, got "
                         f"{','.join(rows[bad[0]])!r}")
    return {case: subject for case, subject in rows}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnLandmark_convert",
        description="Convert images + landmark files (matched by file name) into an nnU-Net raw dataset "
                    "DatasetXXX_NAME in $nnUNet_raw: each landmark becomes a small ball of its own label, "
                    "exact world coordinates go to landmarks.json.")
    p.add_argument("-i", "--images", required=True,
                   help="folder of images: 3D or 2D .nii.gz .nii .nrrd .mha .mhd, or 2D pictures .png .bmp .tif "
                        ".tiff .jpg .jpeg (need --spacing; colour pictures become grey)")
    p.add_argument("-l", "--landmarks", required=True,
                   help="folder of landmark files (.mrk.json .fcsv .csv .json), world coordinates in mm (a 2D "
                        "image's landmarks have z = 0; a CSV file may leave out the s column). A CSV file with "
                        "x_px,y_px columns instead gives pixel coordinates: 0-based, column then row, an "
                        "integer at a pixel's centre (3D images: add z_px)")
    p.add_argument("-d", "--dataset_id", required=True, type=int, help="nnU-Net dataset id (1..999)")
    p.add_argument("-n", "--dataset_name", required=True, help="dataset name (letters, digits, _ or -)")
    p.add_argument("-o", "--output_root", default=None, help="parent folder of the dataset (default: $nnUNet_raw)")
    p.add_argument("--test_images", default=None, help="folder of test images (written to imagesTs)")
    p.add_argument("--test_landmarks", default=None, help="landmark files of the test images")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--names", nargs="+", default=None, help="landmark names in channel order (default: first case's order)")
    g.add_argument("--names_file", default=None, help="text file, one landmark name per line")
    p.add_argument("--exclude_names", nargs="+", default=(), help="landmarks to leave out of every case")
    p.add_argument("--pairs", nargs="+", default=None, metavar="LEFT:RIGHT",
                   help="left/right landmark pairs (default: guessed from names such as L*/R*, left/right)")
    p.add_argument("--ball_radius_mm", type=float, default=None,
                   help="label ball radius, for nnU-Net's planning and patch sampling only; training targets are "
                        "the exact points (default: 1.5 voxels of the coarsest original or target spacing)")
    p.add_argument("--channel_name", default="image",
                   help="nnU-Net channel name; 'CT' selects CT intensity normalisation (default: image)")
    p.add_argument("--drop_bad_cases", action="store_true",
                   help="skip cases that cannot be converted (and unmatched files) with a warning instead of failing")
    p.add_argument("--outside_fov", choices=("absent", "error"), default="absent",
                   help="a landmark outside the image (cut off by the field of view): 'absent' makes it absent "
                        "with a warning, though most of a case's landmarks outside stays an error (RAS vs LPS?); "
                        "'error' makes any landmark outside the image an error (default: absent)")
    p.add_argument("--spacing", nargs="+", type=float, default=None, metavar=("SX", "SY"),
                   help="2D images: pixel spacing in mm (x, then y; one value for square pixels). Required for "
                        ".png/.bmp/.tif/.jpg pictures, which carry none; for 2D NIfTI/NRRD/MHA files it overrides "
                        "the file's spacing, with a warning; an error for 3D images")
    p.add_argument("--subjects", default=None, metavar="CSV",
                   help="case,subject per line for cases that are scans of one person (repeated sessions): written "
                        "to landmarks.json, so that the global stage is validated with atlases of other subjects")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    from nnlandmark_h3de.cli.warning_format import run_with_short_warnings
    return run_with_short_warnings("nnLandmark_convert", lambda: _run(build_parser().parse_args(argv)))


def _run(args) -> int:
    from nnlandmark_h3de.conversion import ConversionError, ConversionWarning, convert_dataset, match_cases
    from nnlandmark_h3de.conversion.raw_dataset import dataset_folder_name, raw_dataset_folder
    from nnlandmark_h3de.landmarks.landmark_set import LandmarkError

    warnings.simplefilter("always", ConversionWarning)
    if (args.test_images is None) != (args.test_landmarks is None):
        raise SystemExit("nnLandmark_convert: error: give both --test_images and --test_landmarks, or neither")
    if args.spacing is not None and len(args.spacing) not in (1, 2):
        raise SystemExit(f"nnLandmark_convert: error: --spacing takes 1 or 2 values (SX [SY] mm), got {args.spacing}")
    names = _read_names_file(args.names_file) if args.names_file else args.names
    pairs = _parse_pairs(args.pairs)
    subjects = _read_subjects_file(args.subjects) if args.subjects else None
    try:
        cases = dict(match_cases(args.images, args.landmarks, drop_unmatched=args.drop_bad_cases))
        test_cases = []
        if args.test_images:
            test = match_cases(args.test_images, args.test_landmarks, drop_unmatched=args.drop_bad_cases)
            clash = sorted(set(test) & set(cases))
            if clash:
                raise ConversionError(f"case names used for both training and test images: {clash}")
            cases.update(test)
            test_cases = sorted(test)
        if args.output_root:
            out = Path(args.output_root) / dataset_folder_name(args.dataset_id, args.dataset_name)
        else:
            out = raw_dataset_folder(args.dataset_id, args.dataset_name)
        folder = convert_dataset(cases, out, names=names, pairs=pairs, test_cases=test_cases,
                                 ball_radius_mm=args.ball_radius_mm, on_error="drop" if args.drop_bad_cases else "raise",
                                 channel_name=args.channel_name, overwrite=args.overwrite,
                                 exclude_names=args.exclude_names, outside_fov=args.outside_fov,
                                 spacing=args.spacing, subjects=subjects)
    except (ConversionError, LandmarkError) as e:
        print(f"nnLandmark_convert: error: {e}", file=sys.stderr)
        return 1
    from nnlandmark_h3de.conversion import read_dataset_landmark_info
    info = read_dataset_landmark_info(folder)
    print(f"Wrote {folder}: {len(info['names'])} landmarks, ball radius {info['ball_radius_mm']} mm, "
          f"pairs {info['pairs'] or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
