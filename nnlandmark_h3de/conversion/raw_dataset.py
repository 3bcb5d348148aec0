"""Images + landmarks -> an nnU-Net raw dataset: exact points in landmarks.json, label balls for nnU-Net.

Layout and JSON contracts: docs/architecture.md ("Raw dataset written by the converter"). The
dataset is built in a hidden temporary folder beside the target and renamed into place only when
complete, so a failed conversion never leaves a half-written dataset (output_folder.py).

`convert_dataset` runs the steps, each in its own module:
1. case_reading.py: image headers and landmark files (no voxel data read);
2. case_checking.py: channel names, left/right pairs, landmarks inside the field of view, ball radius;
3. case_writing.py: images and label balls, one case at a time;
4. json_files.py: dataset.json, landmarks.json, splits_final.json.

Per-case problems (unreadable image or landmark file, 4D or multi-component image, NaN/inf
intensities, unknown or duplicate landmark names, partly NaN coordinates, most landmarks outside the
image) are collected over all cases and raised together (`on_error="raise"`), or the offending cases
are dropped with a `ConversionWarning` (`on_error="drop"`). Landmarks that are absent (NaN) are fine:
they get no ball and `null` in landmarks.json. The training targets are the exact points; the balls
(nearest landmark wins where they meet, see draw_balls.py) only feed nnU-Net's planning and
foreground-oversampled patch positions, so landmarks may lie at any distance apart. Landmarks cut off
by the field of view become absent; most of a case's landmarks outside its image is an error
(`outside_fov`, see case_checking.py).

2D images (X-rays; images_2d.py): the image is the plane z = 0 of a 2D `ImageGeometry`, written as a
2D NIfTI with a 2D label map (each present landmark a disk of its own label value) so that nnU-Net
plans a `2d` configuration. PNG/BMP/TIFF/JPEG files need `spacing=` (mm per pixel; colour pictures
become grey); `spacing=` overrides a 2D NIfTI/NRRD/MHA file's own spacing with a warning and is an
error for a 3D image. A dataset is all 2D or all 3D.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

from nnlandmark_h3de.conversion.ball_radius import MIN_RADIUS_VOXELS
from nnlandmark_h3de.conversion.case_checking import (channel_names, check_ball_radius, check_outside_fov_choice,
                                                      dataset_ball_radius, reorder_and_check, validate_pairs)
from nnlandmark_h3de.conversion.case_reading import (CaseProblems, ImageLike, LandmarksLike, check_case_ids,
                                                     read_cases)
from nnlandmark_h3de.conversion.case_writing import write_cases
from nnlandmark_h3de.conversion.errors import ConversionError
from nnlandmark_h3de.conversion.images_2d import parse_spacing
from nnlandmark_h3de.conversion.json_files import check_subjects, check_test_sets, write_json_files
from nnlandmark_h3de.conversion.output_folder import (dataset_folder_name, install_splits, raw_dataset_folder,
                                                      replace_folder, resolve_output_folder, staging_folder)
from nnlandmark_h3de.landmarks.pairs import find_lr_pairs

__all__ = ["convert_dataset", "dataset_folder_name", "raw_dataset_folder", "resolve_output_folder",
           "replace_folder", "install_splits", "ImageLike", "LandmarksLike"]


def convert_dataset(cases: Mapping[str, Tuple[ImageLike, LandmarksLike]],
                    output_folder: Union[str, os.PathLike, Tuple[int, str], None] = None, *,
                    dataset_id: Optional[int] = None, dataset_name: Optional[str] = None,
                    names: Optional[Sequence[str]] = None, pairs: Optional[Sequence[Tuple[str, str]]] = None,
                    test_cases: Sequence[str] = (), ball_radius_mm: Optional[float] = None,
                    target_spacing: Optional[Sequence[float]] = None, on_error: str = "raise",
                    channel_name: str = "image", overwrite: bool = False, exclude_names: Sequence[str] = (),
                    splits: Optional[List[dict]] = None, min_radius_voxels: float = MIN_RADIUS_VOXELS,
                    outside_fov: str = "absent", progress: bool = True,
                    spacing: Optional[Sequence[float]] = None,
                    test_sets: Optional[Mapping[str, Sequence[str]]] = None,
                    subjects: Optional[Mapping[str, str]] = None) -> Path:
    """Write `DatasetXXX_Name/` (imagesTr, labelsTr, imagesTs, dataset.json, landmarks.json) and return it.

    cases: case id -> (image path, SimpleITK image or LazyImage, landmark file path or LandmarkSet).
        Image files: 3D or 2D NIfTI/NRRD/MHA, or 2D PNG/BMP/TIFF/JPEG pictures (these need `spacing`);
        a CSV landmark file may give pixel coordinates (`x_px,y_px` columns, see io_csv.py).
    output_folder: the dataset folder itself, or (dataset_id, dataset_name) under $nnUNet_raw
        (the keyword arguments `dataset_id`/`dataset_name` do the same).
    names: landmark (channel) order; default: the first case's order. Every case is reordered to it;
        a case naming a landmark outside `names` is an error. `exclude_names` are removed from every
        case first. pairs: left/right pairs; default `find_lr_pairs(names)`.
    test_cases: case ids written to imagesTs (no label; their points still go to landmarks.json).
    ball_radius_mm: default `ball_radius.ball_radius_mm` over the training cases' spacings and
        `target_spacing` (default: what nnU-Net's planner will pick).
    on_error: "raise" (all per-case problems reported together, nothing written) or "drop"
        (offending cases skipped with a ConversionWarning).
    outside_fov: "absent" (a landmark cut off by the field of view becomes absent, with a warning;
        most of a case's landmarks outside is still an error) or "error" (any landmark outside).
    splits: optional nnU-Net splits (list of {"train": [...], "val": [...]}) written to
        splits_final.json (dropped cases removed) and copied to $nnUNet_preprocessed/<dataset>/ if set.
    spacing: (sx, sy) or one value, mm per pixel, for 2D image files: required for pictures;
        overrides a 2D NIfTI/NRRD/MHA file's spacing with a warning; an error for 3D images.
    test_sets: optional named groups of test cases (e.g. {"test1": [...], "test2": [...]}), each a
        subset of `test_cases` (default `test_cases`: their union), written to landmarks.json.
    subjects: optional case id -> subject id, for cases that are scans of one person, written to
        landmarks.json (the global stage's calibration then never validates a case with an atlas of its
        own subject).
    """
    problems = CaseProblems(on_error)
    check_outside_fov_choice(outside_fov)
    target = resolve_output_folder(output_folder, dataset_id, dataset_name, overwrite)
    test_sets, test_set = _test_cases(cases, test_cases, test_sets)
    spacing, exclude = parse_spacing(spacing), [str(n) for n in exclude_names]
    check_ball_radius(ball_radius_mm)
    subjects = check_subjects(subjects, cases)

    items = read_cases(cases, test_set, exclude, problems, progress, spacing)
    names = channel_names(items, names, exclude, problems)
    pairs = validate_pairs(find_lr_pairs(names) if pairs is None else pairs, names)
    kept = reorder_and_check(items, names, problems, outside_fov)
    train = [c for c in kept if not c.is_test]
    if not train and on_error == "drop":
        raise ConversionError("no training case left after dropping bad cases:\n" + problems.listing())
    radius = dataset_ball_radius(train, kept, target_spacing, ball_radius_mm, min_radius_voxels)
    problems.raise_if_any()

    tmp = staging_folder(target)
    try:
        written = write_cases(train + [c for c in kept if c.is_test], tmp, names, radius, problems, progress)
        write_json_files(tmp, target, written, names, pairs, radius, channel_name, test_sets, splits,
                         {str(k) for k in cases}, subjects)
        replace_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if splits is not None:
        install_splits(target)
    return target


def _test_cases(cases: Mapping, test_cases: Sequence[str], test_sets) -> Tuple[Dict[str, List[str]], set]:
    """(the checked named test sets, the test case ids: `test_cases`, else the union of the sets)."""
    test_sets = check_test_sets(test_sets, test_cases)
    if test_sets and not test_cases:
        test_cases = sorted({c for group in test_sets.values() for c in group})
    return test_sets, check_case_ids(cases, test_cases)
