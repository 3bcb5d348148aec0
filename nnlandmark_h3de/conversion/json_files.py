"""The JSON files of a converted dataset: dataset.json (nnU-Net's, with our `landmarks` block),
landmarks.json (every case's exact world coordinates; its format is read and written in
landmarks/dataset_file.py) and the optional splits_final.json, with the checks of the named test
sets and splits that go into them."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from nnlandmark_h3de.conversion.case_reading import InputCase
from nnlandmark_h3de.conversion.case_writing import FILE_ENDING
from nnlandmark_h3de.conversion.errors import ConversionError, ConversionWarning
from nnlandmark_h3de.landmarks.dataset_file import LANDMARKS_FILE, landmark_info_dict, landmarks_json_dict
from nnlandmark_h3de.utilities.orientation import CANONICAL_ORIENTATION


def write_json_files(tmp: Path, target: Path, written: List[InputCase], names: Sequence[str], pairs, radius: float,
                     channel_name: str, test_sets: Dict[str, List[str]], splits: Optional[List[dict]],
                     all_cases: set, subjects: Optional[Dict[str, str]] = None) -> None:
    """dataset.json, landmarks.json (cases written, test sets without dropped cases, their subjects) and,
    when `splits` are given, splits_final.json (training cases written) into the staging folder `tmp`."""
    n_train = sum(not c.is_test for c in written)
    ndim = written[0].geometry.ndim
    dump_json(dataset_json(target, names, pairs, radius, channel_name, n_train, ndim), tmp / "dataset.json")
    done = {c.case for c in written}
    dump_json(landmarks_json_dict({c.case: c.landmarks for c in written}, names,
                                  [c.case for c in written if c.is_test],
                                  None if not test_sets else
                                  {k: [x for x in v if x in done] for k, v in test_sets.items()}, subjects),
              tmp / LANDMARKS_FILE)
    if splits is not None:
        dump_json(filter_splits(splits, {c.case for c in written if not c.is_test}, all_cases),
                  tmp / "splits_final.json")


def dump_json(obj, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def dataset_json(target: Path, names: Sequence[str], pairs, radius: float, channel_name: str, n_train: int,
                 ndim: int = 3) -> dict:
    balls = "label disks" if ndim == 2 else "label balls"
    return {
        "name": target.name.split("_", 1)[-1] if target.name.startswith("Dataset") else target.name,
        "description": f"{ndim}D anatomical landmarks: exact points in landmarks.json, {balls} for sampling "
                       "(nnlandmark_h3de)",
        "channel_names": {"0": channel_name},
        "labels": {"background": 0, **{n: i + 1 for i, n in enumerate(names)}},
        "numTraining": n_train,
        "file_ending": FILE_ENDING,
        "overwrite_image_reader_writer": "SimpleITKIO",
        "landmarks": {**landmark_info_dict(names, pairs, radius),
                      **({"image_orientation": CANONICAL_ORIENTATION} if ndim == 3 else {})},
    }


def check_subjects(subjects, cases: Mapping) -> Optional[Dict[str, str]]:
    """Case id -> subject id as strings, every case among `cases` (a case not listed is its own subject)."""
    if subjects is None:
        return None
    if not isinstance(subjects, Mapping):
        raise ConversionError(f"subjects must map a case id to a subject id, got {type(subjects).__name__}")
    known = {str(k) for k in cases}
    unknown = sorted(str(c) for c in subjects if str(c) not in known)
    if unknown:
        raise ConversionError(f"subjects: case(s) {unknown[:10]} are not among the cases converted")
    return {str(c): str(s) for c, s in subjects.items()}


def check_test_sets(test_sets, test_cases: Sequence[str]) -> Dict[str, List[str]]:
    """Named test groups as {name: [case ids]}: disjoint, and within `test_cases` when that is given."""
    if test_sets is None:
        return {}
    if not isinstance(test_sets, Mapping):
        raise ConversionError(f"test_sets must map a name to case ids, got {type(test_sets).__name__}")
    out: Dict[str, List[str]] = {}
    owner: Dict[str, str] = {}
    given = {str(t) for t in test_cases}
    for name, ids in test_sets.items():
        if isinstance(ids, str):
            raise ConversionError(f"test set {name!r}: expected a list of case ids, got the string {ids!r}")
        ids = [str(x) for x in ids]
        twice = sorted({x for x in ids if x in owner})
        if twice:
            raise ConversionError(f"test set {name!r}: case(s) {twice[:10]} also in test set {owner[twice[0]]!r}")
        if given and not set(ids) <= given:
            raise ConversionError(f"test set {name!r}: case(s) {sorted(set(ids) - given)[:10]} are not test cases")
        owner.update({x: str(name) for x in ids})
        out[str(name)] = ids
    return out


def filter_splits(splits: List[dict], train_cases: set, all_cases: set) -> List[dict]:
    """Keep only converted training cases; unknown case ids are an error, dropped ones a warning."""
    out = []
    for i, fold in enumerate(splits):
        if not isinstance(fold, dict) or set(fold) != {"train", "val"}:
            raise ConversionError(f"split {i}: expected {{'train': [...], 'val': [...]}}")
        new = {}
        for key in ("train", "val"):
            ids = [str(x) for x in fold[key]]
            unknown = [x for x in ids if x not in all_cases]
            if unknown:
                raise ConversionError(f"split {i} {key}: unknown case ids {unknown[:10]}")
            missing = [x for x in ids if x not in train_cases]
            if missing:
                warnings.warn(f"split {i} {key}: {len(missing)} case(s) not in the converted training set "
                              f"(dropped or test): {missing[:10]}", ConversionWarning, stacklevel=4)
            new[key] = [x for x in ids if x in train_cases]
        out.append(new)
    return out
