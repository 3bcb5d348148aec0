#!/usr/bin/env python
"""AFIDs (anatomical fiducials) -> nnU-Net raw dataset.

Two layouts:
- BIDS-like: ROOT/**/sub-XX[_ses-YY]_*T1w.nii[.gz] and, anywhere under ROOT (e.g. derivatives/),
  one `sub-XX[_ses-YY]_*.fcsv` per image; case id = `sub-XX[_ses-YY]`.
- flat (e.g. ../shared/data/afids-templates): ROOT/images/<case>.nii.gz + ROOT/landmarks/<case>.fcsv;
  other .fcsv files there (e.g. `<case>.second-raters.fcsv`) are ignored.
The .fcsv files are RAS (converted to LPS by the reader). Landmark names are the anatomical
descriptions (`desc`: "AC", "R MB", ...; left/right pairs are then found from the R/L tokens), or
with `--number_names` the AFID numbers "1".."32" (`label`).

All 32 landmarks convert: the mammillary bodies and the intermammillary sulcus lie 2-5 mm apart,
which the trainers handle because their targets are the exact points of landmarks.json (the label
balls only steer nnU-Net's patch sampling). `--exclude_names` still leaves landmarks out if wanted.

    python dataset_conversion/convert_afids.py -i ROOT -d 502 [-n AFIDs] [--exclude_names ...]
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

_CASE = re.compile(r"^(sub-[A-Za-z0-9]+(?:_ses-[A-Za-z0-9]+)?)_")


def _named_by_description(ls):
    """The same landmarks named by their fcsv `desc` column."""
    from nnlandmark_h3de.conversion import ConversionError
    from nnlandmark_h3de.landmarks import LandmarkSet

    desc = [d.strip() for d in (ls.descriptions or [])]
    if len(desc) != len(ls) or not all(desc) or len(set(desc)) != len(desc):
        raise ConversionError(f"{ls.source}: descriptions (desc column) are missing or not unique; use --number_names")
    return LandmarkSet(desc, ls.points_lps, descriptions=list(ls.names), source=ls.source)


def _bids_pairs(root: Path) -> Dict[str, Tuple[Path, Path]]:
    from nnlandmark_h3de.conversion import ConversionError

    def by_case(files, what):
        found: Dict[str, List[Path]] = {}
        for f in files:
            m = _CASE.match(f.name)
            if m:
                found.setdefault(m.group(1), []).append(f)
        dupes = {c: fs for c, fs in found.items() if len(fs) > 1}
        if dupes:
            raise ConversionError(f"{root}: several {what} files for " +
                                  "; ".join(f"{c}: {[str(f) for f in fs]}" for c, fs in sorted(dupes.items())))
        return {c: fs[0] for c, fs in found.items()}

    images = by_case(sorted(p for p in root.rglob("*T1w.nii*") if p.name.endswith((".nii", ".nii.gz"))), "T1w image")
    fcsv = by_case(sorted(root.rglob("*.fcsv")), ".fcsv")
    missing = sorted(set(images) ^ set(fcsv))
    if missing:
        raise ConversionError(f"{root}: cases with only an image or only an .fcsv: {missing}")
    return {c: (images[c], fcsv[c]) for c in sorted(images)}


def _flat_pairs(root: Path) -> Dict[str, Tuple[Path, Path]]:
    from nnlandmark_h3de.conversion import ConversionError
    from nnlandmark_h3de.conversion.case_matching import IMAGE_SUFFIXES, list_cases

    images = list_cases(root / "images", IMAGE_SUFFIXES, "image")
    missing = [c for c in images if not (root / "landmarks" / f"{c}.fcsv").is_file()]
    if missing:
        raise ConversionError(f"{root / 'landmarks'}: no <case>.fcsv for images {missing}")
    return {c: (images[c], root / "landmarks" / f"{c}.fcsv") for c in sorted(images)}


def afids_cases(root, number_names: bool = False) -> Dict[str, tuple]:
    """case id -> (image path, LandmarkSet) for either layout."""
    from nnlandmark_h3de.conversion import ConversionError
    from nnlandmark_h3de.landmarks import read_landmarks

    root = Path(root)
    if not root.is_dir():
        raise ConversionError(f"{root}: AFIDs folder not found")
    pairs = _flat_pairs(root) if (root / "images").is_dir() and (root / "landmarks").is_dir() else _bids_pairs(root)
    if not pairs:
        raise ConversionError(f"{root}: no AFIDs case found (neither images/ + landmarks/ nor sub-*_T1w images)")
    out = {}
    for case, (img, fcsv) in pairs.items():
        ls = read_landmarks(fcsv)
        out[case] = (img, ls if number_names else _named_by_description(ls))
    return out


def convert_afids(root, dataset_id: int, dataset_name: str = "AFIDs", number_names: bool = False,
                  output_root=None, **kwargs) -> Path:
    from nnlandmark_h3de.conversion import convert_dataset
    from nnlandmark_h3de.conversion.raw_dataset import dataset_folder_name

    target = (Path(output_root) / dataset_folder_name(dataset_id, dataset_name)) if output_root else (dataset_id, dataset_name)
    return convert_dataset(afids_cases(root, number_names), target, channel_name="T1w", **kwargs)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-i", "--input", required=True, help="AFIDs root (BIDS-like, or images/ + landmarks/)")
    p.add_argument("-d", "--dataset_id", required=True, type=int)
    p.add_argument("-n", "--dataset_name", default="AFIDs")
    p.add_argument("-o", "--output_root", default=None, help="parent folder (default $nnUNet_raw)")
    p.add_argument("--number_names", action="store_true", help="name landmarks 1..32 instead of their description")
    p.add_argument("--exclude_names", nargs="+", default=(), help="landmarks to leave out")
    p.add_argument("--test_cases", nargs="+", default=(), help="case ids to put in imagesTs")
    p.add_argument("--ball_radius_mm", type=float, default=None)
    p.add_argument("--drop_bad_cases", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    from nnlandmark_h3de.landmarks import LandmarkError
    try:
        folder = convert_afids(a.input, a.dataset_id, a.dataset_name, a.number_names, a.output_root,
                               exclude_names=a.exclude_names, test_cases=a.test_cases, ball_radius_mm=a.ball_radius_mm,
                               on_error="drop" if a.drop_bad_cases else "raise", overwrite=a.overwrite)
    except LandmarkError as e:  # includes ConversionError
        print(f"convert_afids: error: {e}", file=sys.stderr)
        return 1
    print(f"Wrote {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
