"""Pseudo-labelled cases + the template and re-posed copies of it -> an nnU-Net raw dataset.

Written through `conversion.convert_dataset` (same layout, label balls, dataset.json,
landmarks.json; nothing of the conversion is re-implemented here), plus `pseudo_labels.json`
beside landmarks.json (see pseudo_labels.py for its layout).

Cases:
- every pseudo-labelled case, its landmarks thresholded: a point whose confidence is under
  `min_confidence` is written ABSENT (null in landmarks.json, no label ball): marked absent rather
  than wrong. Note what absent means to training: a landmark absent from a case gets an all-zero
  heatmap there, i.e. "not in this image"; a high threshold therefore trades wrong targets for
  wrongly empty ones. A case left with no landmark at all teaches nothing but that, so it is left
  out, with a `OneShotWarning` listing it and its name under `dropped_cases` in pseudo_labels.json.
- the template itself, its landmarks exact (method "template", confidence 1);
- `template_copies` augmented template data (ATD): re-posed copies of the template made with
  `synthesis.reposing.repose_case` (rotation up to 15 degrees, translation up to 10 mm, scale 0.9-1.1,
  field of view cropped to 80-100 %, intensity changes; as benchmarks/afids_benchmark.py's
  build_cases), their landmarks moved exactly with the anatomy (those within 3 voxels of the
  cropped edge become absent). Named `<template>_atdNN`, method "template_copy", confidence 1;
  copy k is drawn from `np.random.default_rng([seed, k])`, so a seed gives the same copies.

Atomicity: the dataset is converted into a hidden staging folder beside the target, pseudo_labels.json
is added, and only the finished folder is renamed onto the target (an existing one, with
`overwrite=True`, is replaced only then); a failure leaves no half-written dataset. The re-posed
copies are written to that staging folder one at a time (one volume in memory, not K).
"""
from __future__ import annotations

import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Union

import numpy as np
from tqdm import tqdm

from nnlandmark_h3de.conversion.case_matching import IMAGE_SUFFIXES, strip_suffix
from nnlandmark_h3de.conversion.output_folder import replace_folder, resolve_output_folder
from nnlandmark_h3de.conversion.raw_dataset import convert_dataset
from nnlandmark_h3de.landmarks.atomic import atomic_path
from nnlandmark_h3de.landmarks.dataset_file import LANDMARKS_FILE, load_dataset_landmarks
from nnlandmark_h3de.landmarks.landmark_set import LandmarkError, LandmarkSet
from nnlandmark_h3de.oneshot.pseudo_labels import (PSEUDO_LABELS_FILE, OneShotError, OneShotWarning, PseudoLabels,
                                                   image_label, read_template, save_pseudo_labels)

__all__ = ["write_pseudo_label_dataset", "template_copy_name", "REPOSE_OPTIONS", "TEMPLATE_METHOD",
           "TEMPLATE_COPY_METHOD", "DEFAULT_MIN_CONFIDENCE"]

TEMPLATE_METHOD = "template"
TEMPLATE_COPY_METHOD = "template_copy"
DEFAULT_MIN_CONFIDENCE = 0.5
REPOSE_OPTIONS = dict(max_rotation_deg=15.0, max_translation_mm=10.0, scale_range=(0.9, 1.1),
                      crop_fraction=(0.8, 1.0), margin_vox=-3)

Target = Union[str, os.PathLike, Tuple[int, str]]


def template_copy_name(template_name: str, k: int) -> str:
    return f"{template_name}_atd{k:02d}"


def _template_name(template_image, template_name: Optional[str]) -> str:
    if template_name is not None:
        return str(template_name)
    if isinstance(template_image, (str, os.PathLike)):
        name = strip_suffix(Path(template_image).name, IMAGE_SUFFIXES)
        if name:
            return name
    return "template"


def _provenance(source) -> str:
    """An input file as an absolute path (the dataset may move; the record should still say which file)."""
    return str(Path(source).resolve()) if isinstance(source, (str, os.PathLike)) else image_label(source)


def _exact(ls: LandmarkSet) -> np.ndarray:
    """Confidence of exact landmarks: 1 where present."""
    return np.where(ls.present, 1.0, 0.0)


def _check_pseudo(pseudo: Mapping, names) -> Dict[str, Tuple[object, PseudoLabels]]:
    out = {}
    for case, item in pseudo.items():
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], PseudoLabels)):
            raise OneShotError(f"case {case}: expected (image, PseudoLabels), got {type(item).__name__}")
        image, p = item
        try:
            out[str(case)] = (image, p.reordered(names))
        except LandmarkError as e:
            raise OneShotError(f"case {case} ({image_label(image)}): landmark names differ from the template's "
                               f"({e})") from None
    return out


def _write_template_copies(image, landmarks: LandmarkSet, name: str, n: int, seed: int, folder: Path,
                           progress: bool) -> Dict[str, Tuple[Path, LandmarkSet]]:
    import SimpleITK as sitk
    from nnlandmark_h3de.synthesis.reposing import IntensityChange, repose_case
    out = {}
    for k in tqdm(range(n), desc="template copies", unit="case", disable=not progress or n == 0):
        new_image, new_ls = repose_case(image, landmarks, np.random.default_rng([int(seed), k]),
                                        intensity=IntensityChange(), **REPOSE_OPTIONS)
        case = template_copy_name(name, k)
        path = folder / f"{case}.nii.gz"
        with atomic_path(path) as tmp:
            sitk.WriteImage(new_image, str(tmp), True)
        out[case] = (path, LandmarkSet(list(new_ls.names), new_ls.points_lps, source=f"{case} (template copy)"))
    return out


def write_pseudo_label_dataset(template_image, template_landmarks,
                               pseudo: Mapping[str, Tuple[object, PseudoLabels]], target: Target = None, *,
                               dataset_id: Optional[int] = None, dataset_name: Optional[str] = None,
                               min_confidence: float = DEFAULT_MIN_CONFIDENCE, template_copies: int = 0,
                               seed: int = 0, template_name: Optional[str] = None, overwrite: bool = False,
                               on_error: str = "raise", progress: bool = True,
                               convert_options: Optional[dict] = None, header: Optional[dict] = None) -> Path:
    """Write the pseudo-label dataset and return its folder (see the module docstring).

    template_image / template_landmarks: the one labelled image (path or SimpleITK image; landmark
        file or LandmarkSet); its landmark names and order are the dataset's channels.
    pseudo: case -> (image path or SimpleITK image, PseudoLabels), e.g. from a one-shot method.
    target: the dataset folder, or (dataset_id, dataset_name) under $nnUNet_raw (the keywords
        `dataset_id`/`dataset_name` do the same), as in `convert_dataset`.
    min_confidence: points under it are written absent. template_copies: how many re-posed copies.
    template_name: the template's case id (default: its file name without extension, else "template").
    on_error, convert_options (pairs, ball_radius_mm, channel_name, target_spacing, ...): passed
        on to `convert_dataset`. header: extra top-level fields for pseudo_labels.json.
    """
    convert_options = _checked_options(min_confidence, template_copies, seed, convert_options)
    target = resolve_output_folder(target, dataset_id, dataset_name, overwrite)  # checks ids, nnUNet_raw, overwrite
    image, template_ls = read_template(template_image, template_landmarks, convert_options.get("spacing"))
    names = list(template_ls.names)
    name = _template_name(template_image, template_name)
    pseudo = _check_pseudo(pseudo, names)
    _check_no_clash(pseudo, name, int(template_copies), template_image)
    kept, dropped = _split_by_confidence(pseudo, min_confidence)

    stage = target.parent / f".{target.name}.oneshot-{uuid.uuid4().hex[:8]}"
    try:
        stage.mkdir(parents=True)
        copies = _write_template_copies(image, template_ls, name, int(template_copies), seed,
                                        stage / "template_copies", progress)
        cases = {name: (template_image if isinstance(template_image, (str, os.PathLike)) else image, template_ls)}
        cases.update({c: v for c, v in copies.items()})
        cases.update({c: (img, p.thresholded(min_confidence)) for c, (img, p) in kept.items()})
        folder = convert_dataset(cases, stage / target.name, names=names, on_error=on_error, progress=progress,
                                 **convert_options)
        written = set(load_dataset_landmarks(folder / LANDMARKS_FILE))
        records = _written_records(written, name, template_image, template_ls, copies, kept, seed)
        fields = dict(method=_method_field(kept), min_confidence=float(min_confidence),
                      template=name, template_image=_provenance(template_image),
                      template_landmarks=(template_landmarks.source if isinstance(template_landmarks, LandmarkSet)
                                          else _provenance(template_landmarks)),
                      template_copies=[c for c in copies if c in written], seed=int(seed),
                      dropped_cases=sorted(dropped))
        save_pseudo_labels(records, folder / PSEUDO_LABELS_FILE, **{**(header or {}), **fields})
        replace_folder(folder, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return target


def _checked_options(min_confidence, template_copies, seed, convert_options: Optional[dict]) -> dict:
    """The arguments checked before any work; returns a copy of `convert_options`."""
    if not (isinstance(min_confidence, (int, float)) and 0.0 <= float(min_confidence) <= 1.0):
        raise OneShotError(f"min_confidence must be in [0, 1], got {min_confidence!r}")
    if isinstance(template_copies, bool) or not isinstance(template_copies, (int, np.integer)) or template_copies < 0:
        raise OneShotError(f"template_copies must be an integer >= 0, got {template_copies!r}")
    if int(seed) < 0:
        raise OneShotError(f"seed must be >= 0, got {seed!r}")
    convert_options = dict(convert_options or {})
    clash = sorted(set(convert_options) & {"names", "test_cases", "overwrite", "on_error", "progress",
                                           "output_folder", "dataset_id", "dataset_name"})
    if clash:
        raise OneShotError(f"convert_options may not set {clash} (write_pseudo_label_dataset sets them)")
    return convert_options


def _check_no_clash(pseudo: Mapping, name: str, template_copies: int, template_image) -> None:
    """The pseudo-labelled case ids must differ from the template's and its copies'."""
    copy_names = [template_copy_name(name, k) for k in range(template_copies)]
    taken = sorted(set(pseudo) & ({name} | set(copy_names)))
    if taken:
        raise OneShotError(f"case id(s) {taken} of the pseudo-labelled images clash with the template "
                           f"{image_label(template_image)} or its copies; rename them or pass template_name=")


def _split_by_confidence(pseudo: Dict[str, Tuple[object, PseudoLabels]], min_confidence: float):
    """(cases with at least one landmark at `min_confidence`, ids of the others: left out, warned)."""
    kept, dropped = {}, []
    for case, (img, p) in pseudo.items():
        if p.kept_mask(min_confidence).any():
            kept[case] = (img, p)
        else:
            dropped.append(case)
    if dropped:
        warnings.warn(f"{len(dropped)} pseudo-labelled case(s) have no landmark with confidence >= {min_confidence} "
                      f"and are left out: {sorted(dropped)}", OneShotWarning, stacklevel=3)
    return kept, dropped


def _written_records(written: set, name: str, template_image, template_ls: LandmarkSet,
                     copies: Dict[str, Tuple[Path, LandmarkSet]], kept: Dict[str, Tuple[object, PseudoLabels]],
                     seed: int) -> Dict[str, PseudoLabels]:
    """pseudo_labels.json's records of the cases the conversion wrote: template, copies, pseudo-labels."""
    records: Dict[str, PseudoLabels] = {}
    if name in written:
        records[name] = PseudoLabels(template_ls, _exact(template_ls), TEMPLATE_METHOD,
                                     {"image": image_label(template_image)})
    for k, (c, (_, ls)) in enumerate(copies.items()):
        if c in written:
            records[c] = PseudoLabels(ls, _exact(ls), TEMPLATE_COPY_METHOD, {"seed": int(seed), "copy": k})
    records.update({c: p for c, (_, p) in kept.items() if c in written})
    return records


def _method_field(kept: Dict[str, Tuple[object, PseudoLabels]]):
    """The one-shot method of the pseudo-labels: a name, or a sorted list when they differ."""
    methods = sorted({p.method for _, p in kept.values()})
    return methods[0] if len(methods) == 1 else methods
