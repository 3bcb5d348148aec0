#!/usr/bin/env python
"""MML (Mandibular Molar Landmarking) -> nnU-Net raw dataset with the official split.

Layout: ROOT/{train,val,test}/<id>_volume.nrrd, <id>_label.npy (14 voxel indices, pynrrd axis
order, negative/NaN = missing), <id>_spacing.npy. train/ + val/ go to imagesTr/labelsTr and
`splits_final.json` holds one fold (train = train/, val = val/), also copied to
$nnUNet_preprocessed/DatasetXXX_NAME/ when that is set; test/ goes to imagesTs. `--complete_only`
keeps cases with all 14 landmarks (nnLandmark's "complete" subset). The channel is named "CBCT",
so nnU-Net uses z-score normalisation (the volumes are 0..255, not Hounsfield units).

    python dataset_conversion/convert_mml.py -i /data/MML -d 501 [-n MML] [--complete_only]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional

SPLITS = ("train", "val", "test")


def mml_cases(root, complete_only: bool = False, on_error: str = "raise") -> Dict[str, Dict[str, tuple]]:
    """split -> case id -> (LazyImage, LandmarkSet); volumes are decoded only when written.

    A case whose header, spacing or label file is bad raises, or with on_error="drop" is skipped
    with a warning.
    """
    import warnings

    import nrrd
    from nnlandmark_h3de.conversion import ConversionWarning
    from nnlandmark_h3de.landmarks import LandmarkError
    from nnlandmark_h3de.conversion import ConversionError
    from nnlandmark_h3de.conversion.lazy_image import LazyImage
    from nnlandmark_h3de.landmarks import ImageGeometry
    from nnlandmark_h3de.landmarks.io_mml import read_mml_case, read_mml_landmarks, read_mml_spacing

    root = Path(root)
    out: Dict[str, Dict[str, tuple]] = {}
    seen: Dict[str, str] = {}
    for split in SPLITS:
        folder = root / split
        if not folder.is_dir():
            if split == "test":
                continue
            raise ConversionError(f"{folder}: MML {split}/ folder not found")
        out[split] = {}
        for vol in sorted(folder.glob("*_volume.nrrd")):
            case = vol.name[: -len("_volume.nrrd")]
            if case in seen:
                raise ConversionError(f"{vol}: case id {case} also in {seen[case]}/")
            seen[case] = split
            label, spacing = folder / f"{case}_label.npy", folder / f"{case}_spacing.npy"
            try:
                try:
                    header = nrrd.read_header(str(vol))
                except Exception as e:  # pynrrd raises several types for a bad header
                    raise ConversionError(f"{vol}: unreadable nrrd header ({e})") from None
                if int(header.get("dimension", 0)) != 3:
                    raise ConversionError(f"{vol}: expected a 3D volume, header says {header.get('dimension')}D")
                geo = ImageGeometry(tuple(int(s) for s in header["sizes"]), read_mml_spacing(spacing),
                                    (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
                ls = read_mml_landmarks(label, geo)
            except LandmarkError as e:  # ConversionError is a LandmarkError
                if on_error != "drop":
                    raise
                warnings.warn(f"dropping case {case}: {e}", ConversionWarning, stacklevel=2)
                continue
            if complete_only and not ls.present.all():
                continue
            load = (lambda v=vol, lab=label, sp=spacing: read_mml_case(v, lab, sp)[0])
            out[split][case] = (LazyImage(geo, load, str(vol)), ls)
        if not out[split] and split != "test":
            raise ConversionError(f"{folder}: no usable *_volume.nrrd case")
    return out


def convert_mml(root, dataset_id: int, dataset_name: str = "MML", complete_only: bool = False,
                output_root=None, **kwargs) -> Path:
    from nnlandmark_h3de.conversion import convert_dataset
    from nnlandmark_h3de.conversion.raw_dataset import dataset_folder_name
    from nnlandmark_h3de.landmarks.io_mml import MML_NAMES

    by_split = mml_cases(root, complete_only, kwargs.get("on_error", "raise"))
    cases = {c: v for split in SPLITS for c, v in by_split.get(split, {}).items()}
    target = (Path(output_root) / dataset_folder_name(dataset_id, dataset_name)) if output_root else (dataset_id, dataset_name)
    return convert_dataset(cases, target, names=MML_NAMES, test_cases=sorted(by_split.get("test", {})),
                           splits=[{"train": sorted(by_split["train"]), "val": sorted(by_split["val"])}],
                           channel_name="CBCT", **kwargs)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-i", "--input", required=True, help="MML root with train/, val/, test/")
    p.add_argument("-d", "--dataset_id", required=True, type=int)
    p.add_argument("-n", "--dataset_name", default="MML")
    p.add_argument("-o", "--output_root", default=None, help="parent folder (default $nnUNet_raw)")
    p.add_argument("--complete_only", action="store_true", help="only cases with all 14 landmarks")
    p.add_argument("--ball_radius_mm", type=float, default=None)
    p.add_argument("--drop_bad_cases", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    from nnlandmark_h3de.landmarks import LandmarkError
    try:
        folder = convert_mml(a.input, a.dataset_id, a.dataset_name, a.complete_only, a.output_root,
                             ball_radius_mm=a.ball_radius_mm, overwrite=a.overwrite,
                             on_error="drop" if a.drop_bad_cases else "raise")
    except LandmarkError as e:  # includes ConversionError
        print(f"convert_mml: error: {e}", file=sys.stderr)
        return 1
    print(f"Wrote {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
