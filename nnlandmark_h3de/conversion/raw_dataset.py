"""Images + landmarks -> an nnU-Net raw dataset: exact points in landmarks.json, label balls for nnU-Net.

Layout and JSON contracts: docs/architecture.md ("Raw dataset written by the converter"). The
dataset is built in a hidden temporary folder beside the target and renamed into place only when
complete, so a failed conversion never leaves a half-written dataset.

Per-case problems (unreadable image or landmark file, 4D or multi-component image, NaN/inf
intensities, unknown or duplicate landmark names, partly NaN coordinates, most landmarks outside the
image) are collected over all cases and raised together (`on_error="raise"`), or the offending cases
are dropped with a `ConversionWarning` (`on_error="drop"`). Landmarks that are absent (NaN) are fine:
they get no ball and `null` in landmarks.json. The training targets are the exact points; the balls
(nearest landmark wins where they meet, see draw_balls.py) only feed nnU-Net's planning and
foreground-oversampled patch positions, so landmarks may lie at any distance apart.

Field of view (`outside_fov`): a present landmark lies outside the image when it is more than half
a voxel beyond the outermost voxel centres (`ImageGeometry.contains_array_index`, the test that
`demo.reposing.repose_case` applies to re-posed landmarks, there with its own margin). With
`outside_fov="absent"` (default) such a landmark was cut off by the field of view: it becomes absent
(`null`, no ball), as everywhere else in the package, with a `ConversionWarning` naming the file and
the landmarks. But when MOST of a case's present landmarks are outside (more than half of them, and
at least 2), the case is an error all the same: that is almost surely a RAS/LPS mix-up or the wrong
image, not a cut-off view. `outside_fov="error"` makes any landmark outside the image an error.

2D images (X-rays; images_2d.py): the image is the plane z = 0 of a 2D `ImageGeometry`, written as a
2D NIfTI with a 2D label map (each present landmark a disk of its own label value) so that nnU-Net
plans a `2d` configuration. PNG/BMP/TIFF/JPEG files need `spacing=` (mm per pixel; colour pictures
become grey); `spacing=` overrides a 2D NIfTI/NRRD/MHA file's own spacing with a warning and is an
error for a 3D image. A dataset is all 2D or all 3D. The 2D field of view is the image plane: a
landmark is inside when it lies within half a pixel of the outermost pixel centres in-plane AND on
the plane (|z| <= `PLANE_TOLERANCE_MM`; such a z is then set to exactly 0), so a landmark with z != 0
follows the rule above like any other landmark outside the image. The ball radius rule looks at the
in-plane spacings only (nnU-Net's 2d configuration never resamples along z; see ball_radius.py).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from tqdm import tqdm

from nnlandmark_h3de.conversion.ball_radius import (MIN_RADIUS_VOXELS, ball_radius_mm as radius_rule,
                                                    nnunet_target_spacing)
from nnlandmark_h3de.conversion.dataset_landmarks import LANDMARKS_FILE, landmark_info_dict, landmarks_json_dict
from nnlandmark_h3de.conversion.draw_balls import draw_balls, label_dtype
from nnlandmark_h3de.conversion.errors import ConversionError, ConversionWarning
from nnlandmark_h3de.conversion.images_2d import ImageInputError, open_with_pixel_spacing, parse_spacing
from nnlandmark_h3de.conversion.lazy_image import LazyImage
from nnlandmark_h3de.landmarks.geometry import ImageGeometry, read_image_header
from nnlandmark_h3de.landmarks.landmark_set import LandmarkError, LandmarkSet

FILE_ENDING = ".nii.gz"
RESERVED_NAMES = ("background", "ignore")
OUTSIDE_FOV_CHOICES = ("absent", "error")
FOV_MARGIN_VOXELS = 0.5  # field of view: outermost voxel centres widened by half a voxel
PLANE_TOLERANCE_MM = 1e-3  # a 2D image's landmark lies on the image plane when |z| <= this
ImageLike = Union[str, os.PathLike, "SimpleITK.Image", LazyImage]  # noqa: F821
LandmarksLike = Union[str, os.PathLike, LandmarkSet]


class CaseError(Exception):
    """One case cannot be converted (collected, then raised together or dropped)."""


@dataclass
class _Case:
    case: str
    image: ImageLike
    image_label: str  # file name or "<case> (in-memory image)" for messages
    landmarks: Optional[LandmarkSet] = None
    geometry: Optional[ImageGeometry] = None
    is_test: bool = False
    file_names: Tuple[str, ...] = ()  # landmark names as read, before exclude_names


# ---------------------------------------------------------------------------------------- folders
def dataset_folder_name(dataset_id: int, dataset_name: str) -> str:
    if not isinstance(dataset_id, (int, np.integer)) or not 0 < int(dataset_id) <= 999:
        raise ConversionError(f"dataset id must be an integer in 1..999, got {dataset_id!r}")
    if not dataset_name or not re.fullmatch(r"[A-Za-z0-9_\-]+", str(dataset_name)):
        raise ConversionError(f"dataset name {dataset_name!r} must be non-empty letters, digits, '_' or '-'")
    return f"Dataset{int(dataset_id):03d}_{dataset_name}"


def raw_dataset_folder(dataset_id: int, dataset_name: str) -> Path:
    """$nnUNet_raw/DatasetXXX_Name; refuses an id already used by a dataset of another name."""
    raw = os.environ.get("nnUNet_raw")
    if not raw:
        raise ConversionError("nnUNet_raw is not set: export nnUNet_raw=/path/to/nnUNet_raw or give an output folder")
    name = dataset_folder_name(dataset_id, dataset_name)
    raw = Path(raw)
    if raw.is_dir():
        clash = [p.name for p in raw.glob(f"Dataset{int(dataset_id):03d}_*") if p.name != name]
        if clash:
            raise ConversionError(f"{raw}: dataset id {int(dataset_id)} is already used by {clash}; nnU-Net needs unique ids")
    return raw / name


def install_splits(dataset_folder) -> Optional[Path]:
    """Copy dataset_folder/splits_final.json to $nnUNet_preprocessed/<dataset>/ when that is set."""
    src = Path(dataset_folder) / "splits_final.json"
    pre = os.environ.get("nnUNet_preprocessed")
    if not src.is_file() or not pre:
        return None
    dst = Path(pre) / Path(dataset_folder).name / "splits_final.json"
    dst.parent.mkdir(parents=True, exist_ok=True)
    from nnlandmark_h3de.landmarks.atomic import atomic_path
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return dst


# ------------------------------------------------------------------------------------ reading
def _image_header(c: _Case) -> ImageGeometry:
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


def _read_image(c: _Case):
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


# ---------------------------------------------------------------------------------- checking
def _outside_fov(c: _Case) -> np.ndarray:
    """Mask of present landmarks beyond the image's field of view (voxel centres +- half a voxel; for a
    2D image also off the image plane, |z| > PLANE_TOLERANCE_MM)."""
    ls, geo = c.landmarks, c.geometry
    outside = np.zeros(len(ls.names), bool)
    present = ls.present
    if present.any():
        idx = geo.world_to_array_index(ls.points_lps[present])
        outside[present] = ~geo.contains_array_index(idx, margin=FOV_MARGIN_VOXELS)
        if geo.ndim == 2:  # the plane's normal is the k axis, of spacing 1: idx z is the distance in mm
            outside[present] |= np.abs(idx[:, 0]) > PLANE_TOLERANCE_MM
    return outside


def _onto_plane(ls: LandmarkSet) -> LandmarkSet:
    """A 2D image's landmarks (all on the plane, within PLANE_TOLERANCE_MM) with z exactly 0."""
    present = ls.present
    if not present.any() or np.all(ls.points_lps[present, 2] == 0):
        return ls
    pts = ls.points_lps.copy()
    pts[present, 2] = 0.0
    return LandmarkSet(list(ls.names), pts, ls.confidence, ls.uncertainty_mm, ls.descriptions, ls.source)


def _looks_like_wrong_frame(n_outside: int, n_present: int) -> bool:
    """Most present landmarks outside (> half, at least 2): a RAS/LPS mix-up or wrong image, not a cut-off view."""
    return n_outside >= 2 and 2 * n_outside > n_present


def _describe(c: _Case, mask: np.ndarray) -> str:
    return "; ".join(f"{n} at LPS {np.round(p, 2).tolist()}"
                     for n, p in zip(np.asarray(c.landmarks.names)[mask], c.landmarks.points_lps[mask]))


def _without(ls: LandmarkSet, mask: np.ndarray) -> LandmarkSet:
    """A copy of `ls` with the masked landmarks absent (the caller's LandmarkSet is left untouched)."""
    pts = ls.points_lps.copy()
    pts[mask] = np.nan
    return LandmarkSet(list(ls.names), pts, ls.confidence, ls.uncertainty_mm, ls.descriptions, ls.source)


def _check_inside(c: _Case, outside_fov: str = "absent") -> None:
    """Landmarks cut off by the field of view become absent (warned); most of them outside is an error."""
    outside = _outside_fov(c)
    n_out, n_present = int(outside.sum()), int(c.landmarks.present.sum())
    plane = (f"; a 2D image's landmarks lie in its plane z = 0 (within {PLANE_TOLERANCE_MM} mm)"
             if c.geometry.ndim == 2 else "")
    if n_out:
        if outside_fov == "error" or _looks_like_wrong_frame(n_out, n_present):
            raise CaseError(f"{c.landmarks.source}: {n_out} of {n_present} landmark(s) outside the image "
                            f"{c.image_label} (shape zyx {c.geometry.shape_zyx}{plane}): {_describe(c, outside)}. "
                            "Wrong coordinate system (RAS vs LPS) or wrong image?")
        warnings.warn(f"case {c.case}: {c.landmarks.source}: landmark(s) {_describe(c, outside)} lie outside the image "
                      f"{c.image_label} (shape zyx {c.geometry.shape_zyx}{plane}), cut off by the field of view -> "
                      "absent (null in landmarks.json, no label ball)", ConversionWarning, stacklevel=4)
        c.landmarks = _without(c.landmarks, outside)
    if c.geometry.ndim == 2:
        c.landmarks = _onto_plane(c.landmarks)


def _validate_pairs(pairs, names: Sequence[str]) -> List[Tuple[str, str]]:
    out, seen = [], set()
    for pair in pairs:
        if isinstance(pair, str) or len(pair) != 2:
            raise ConversionError(f"landmark pair {pair!r} must be two names (left, right)")
        a, b = (str(x) for x in pair)
        unknown = [x for x in (a, b) if x not in names]
        if unknown:
            raise ConversionError(f"landmark pair ({a}, {b}): unknown name(s) {unknown}; landmarks are {list(names)}")
        if a == b or a in seen or b in seen:
            raise ConversionError(f"landmark pair ({a}, {b}): a landmark may appear in only one pair, never twice")
        seen.update((a, b))
        out.append((a, b))
    return out


def _validate_names(names: Sequence[str], where: str) -> List[str]:
    names = [str(n) for n in names]
    if not names:
        raise ConversionError(f"{where}: no landmark names")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConversionError(f"{where}: duplicate landmark names {dupes}")
    reserved = [n for n in names if n.lower() in RESERVED_NAMES or not n.strip()]
    if reserved:
        raise ConversionError(f"{where}: landmark names {reserved} are reserved by nnU-Net or empty")
    return names


# ----------------------------------------------------------------------------------- writing
def _write_case(c: _Case, out: Path, names: Sequence[str], radius: float) -> None:
    import SimpleITK as sitk
    image = _read_image(c)
    arr = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        raise CaseError(f"{c.image_label}: image contains NaN or infinite intensities")
    if ImageGeometry.from_sitk(image) != c.geometry:
        raise CaseError(f"{c.image_label}: image geometry changed while converting")
    if c.is_test:
        sitk.WriteImage(image, str(out / "imagesTs" / f"{c.case}_0000{FILE_ENDING}"), useCompression=True)
        return
    labels, _ = draw_balls(c.geometry, c.landmarks.points_lps, radius, label_dtype(len(names)))
    label_img = sitk.GetImageFromArray(labels[0] if c.geometry.ndim == 2 else labels)  # 2D: disks, a 2D map
    label_img.CopyInformation(image)
    sitk.WriteImage(image, str(out / "imagesTr" / f"{c.case}_0000{FILE_ENDING}"), useCompression=True)
    sitk.WriteImage(label_img, str(out / "labelsTr" / f"{c.case}{FILE_ENDING}"), useCompression=True)


def _remove_case_files(out: Path, case: str) -> None:
    for p in (out / "imagesTr" / f"{case}_0000{FILE_ENDING}", out / "labelsTr" / f"{case}{FILE_ENDING}",
              out / "imagesTs" / f"{case}_0000{FILE_ENDING}"):
        if p.exists():
            p.unlink()


def _dump_json(obj, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


# ------------------------------------------------------------------------------------- steps
class _Problems:
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


def resolve_output_folder(output_folder, dataset_id: Optional[int], dataset_name: Optional[str],
                          overwrite: bool) -> Path:
    """The dataset folder to write: `output_folder`, or (id, name) / the two keywords under $nnUNet_raw;
    an existing one without `overwrite` is an error (checked before any work, by every writer)."""
    if isinstance(output_folder, tuple):
        (dataset_id, dataset_name), output_folder = output_folder, None
    if output_folder is None:
        if dataset_id is None or dataset_name is None:
            raise ConversionError("give an output folder or both dataset_id and dataset_name")
        target = raw_dataset_folder(dataset_id, dataset_name)
    else:
        target = Path(output_folder)
    if target.exists() and not overwrite:
        raise ConversionError(f"{target}: already exists (use overwrite=True / --overwrite to replace it)")
    return target


def _check_case_ids(cases: Mapping, test_cases: Sequence[str]) -> set:
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


def _open_2d(c: _Case, spacing: Optional[Tuple[float, float]], notes: Dict[str, List[str]]) -> None:
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


def _some(items: List[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _read_cases(cases: Mapping, test_set: set, exclude: Sequence[str], problems: _Problems,
                progress: bool, spacing: Optional[Tuple[float, float]] = None) -> List[_Case]:
    """Pass 1: image headers and landmark files (no voxel data read)."""
    import SimpleITK as sitk
    items: List[_Case] = []
    notes: Dict[str, List[str]] = {"grey": [], "spacing": []}
    for case, (image, lm) in tqdm(list(cases.items()), desc="Reading cases", unit="case", disable=not progress):
        case = str(case)
        label = f"{case} (in-memory image)" if isinstance(image, sitk.Image) else str(image)
        c = _Case(case, image, label, is_test=case in test_set)
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
                      f"{_some(notes['grey'])}", ConversionWarning, stacklevel=3)
    if notes["spacing"]:
        warnings.warn(f"spacing {list(spacing)} mm per pixel (x, y) overrides the spacing of {len(notes['spacing'])} "
                      f"2D image file(s): {_some(notes['spacing'])}", ConversionWarning, stacklevel=3)
    dims = {c.geometry.ndim for c in items}
    if len(dims) > 1:
        by_dim = {d: [c.image_label for c in items if c.geometry.ndim == d] for d in sorted(dims)}
        raise ConversionError("a dataset holds 2D or 3D images, not both (nnU-Net plans one kind): "
                              + "; ".join(f"{d}D: {_some(v, 3)}" for d, v in by_dim.items()))
    return items


def _channel_names(items: List[_Case], names: Optional[Sequence[str]], exclude: Sequence[str],
                   problems: _Problems) -> List[str]:
    """Landmark channel order: the given names, else the first readable case's; checked."""
    if exclude:
        seen = {n for c in items for n in c.file_names} | set(names or ())
        never = [n for n in exclude if n not in seen]
        if items and never:
            raise ConversionError(f"exclude_names {never} do not occur in any case")
    if names is None:
        if not items:
            raise ConversionError("no readable case:\n" + problems.listing())
        return _validate_names(list(items[0].landmarks.names), f"names from {items[0].landmarks.source}")
    return _validate_names([n for n in names if n not in exclude], "given names")


def _reorder_and_check(items: List[_Case], names: Sequence[str], problems: _Problems,
                       outside_fov: str = "absent") -> List[_Case]:
    """Every case in channel order; present landmarks inside the image or absent (see `_check_inside`)."""
    kept: List[_Case] = []
    for c in items:
        try:
            try:
                c.landmarks = c.landmarks.reordered(names)
            except LandmarkError as e:
                raise CaseError(str(e)) from None
            _check_inside(c, outside_fov)
        except CaseError as e:
            problems.fail(c.case, str(e))
            continue
        kept.append(c)
    return kept


def _ball_radius(train: List[_Case], kept: List[_Case], target_spacing, ball_radius_mm: Optional[float],
                 min_radius_voxels: float) -> float:
    """The given radius (a warning under the rule), else the rule over the training cases' spacings.

    2D images: in-plane spacings (x, y) only, and `target_spacing` is 2 numbers (x, y).
    """
    ref = train or kept
    ndim = ref[0].geometry.ndim if ref else 3
    spacings = [c.geometry.spacing[:ndim] for c in ref]
    shapes = [c.geometry.shape_ijk[:ndim] for c in ref]
    try:
        target_sp = (np.asarray(target_spacing, dtype=np.float64) if target_spacing is not None
                     else nnunet_target_spacing(spacings, shapes) if spacings else np.ones(ndim))
    except (TypeError, ValueError):
        target_sp = np.zeros(0)
    if target_sp.shape != (ndim,) or not np.all(target_sp > 0):
        raise ConversionError(f"target spacing must be {ndim} positive numbers"
                              f"{' (x, y) for 2D images' if ndim == 2 else ''}, got {target_spacing!r}")
    advised = radius_rule(spacings, target_sp, min_voxels=min_radius_voxels) if spacings else 1.0
    if ball_radius_mm is None:
        return advised
    if ball_radius_mm < advised:
        warnings.warn(f"ball radius {ball_radius_mm} mm is under {min_radius_voxels} voxels of the coarsest spacing "
                      f"({advised} mm advised): balls may vanish in nnU-Net's resampling, and patches are then "
                      "sampled less often around those landmarks (targets use the exact points)",
                      ConversionWarning, stacklevel=3)
    return float(ball_radius_mm)


def _write_cases(cases: List[_Case], tmp: Path, names: Sequence[str], radius: float, problems: _Problems,
                 progress: bool) -> List[_Case]:
    """Pass 2: images and label balls into the temporary folder; returns the cases written."""
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (tmp / sub).mkdir(parents=True)
    written: List[_Case] = []
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


def _dataset_json(target: Path, names: Sequence[str], pairs, radius: float, channel_name: str, n_train: int,
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
        "landmarks": landmark_info_dict(names, pairs, radius),
    }


def replace_folder(tmp: Path, target: Path) -> None:
    """Rename the finished temporary folder onto `target` (an existing one is moved aside first)."""
    if target.exists():
        trash = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, trash)
        os.replace(tmp, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, target)


# ------------------------------------------------------------------------------------- main
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
                    test_sets: Optional[Mapping[str, Sequence[str]]] = None) -> Path:
    """Write `DatasetXXX_Name/` (imagesTr, labelsTr, imagesTs, dataset.json, landmarks.json) and return it.

    cases: case id -> (image path, SimpleITK image or LazyImage, landmark file path or LandmarkSet).
        Image files: 3D or 2D NIfTI/NRRD/MHA, or 2D PNG/BMP/TIFF/JPEG pictures (these need `spacing`);
        a CSV landmark file may give pixel coordinates (`x_px,y_px` columns, see io_csv.py).
    output_folder: the dataset folder itself, or (dataset_id, dataset_name) under $nnUNet_raw
        (the keyword arguments `dataset_id`/`dataset_name` do the same).
    names: landmark (channel) order; default: the first case's order. Every case is reordered to it;
        a case naming a landmark outside `names` is an error. `exclude_names` are removed from every
        case first.
    pairs: left/right pairs; default `find_lr_pairs(names)`.
    test_cases: case ids written to imagesTs (no label; their points still go to landmarks.json).
    ball_radius_mm: default `ball_radius.ball_radius_mm` over the training cases' spacings and
        `target_spacing` (default: what nnU-Net's planner will pick); where balls meet, the
        nearest landmark takes the voxel.
    on_error: "raise" (all per-case problems reported together, nothing written) or "drop"
        (offending cases skipped with a ConversionWarning).
    outside_fov: "absent" (a landmark cut off by the field of view becomes absent, with a
        ConversionWarning; most of a case's landmarks outside is still an error) or "error" (any
        landmark outside the image is an error). See the module docstring.
    splits: optional nnU-Net splits (list of {"train": [...], "val": [...]}) written to
        splits_final.json beside dataset.json (dropped cases removed) and copied to
        $nnUNet_preprocessed/<dataset>/ when that is set.
    spacing: (sx, sy) or one value, mm per pixel, for 2D images given as files: required for
        PNG/BMP/TIFF/JPEG pictures; overrides a 2D NIfTI/NRRD/MHA file's spacing with a
        ConversionWarning; an error for 3D images (see images_2d.py).
    test_sets: optional named groups of test cases (e.g. {"test1": [...], "test2": [...]}), each a
        subset of `test_cases` (default `test_cases`: their union), written to landmarks.json
        (`test_sets`, dropped cases removed) so each group can be evaluated on its own.
    """
    problems = _Problems(on_error)
    if outside_fov not in OUTSIDE_FOV_CHOICES:
        raise ConversionError(f"outside_fov must be one of {OUTSIDE_FOV_CHOICES}, got {outside_fov!r}")
    target = resolve_output_folder(output_folder, dataset_id, dataset_name, overwrite)
    test_sets = _check_test_sets(test_sets, test_cases)
    if test_sets and not test_cases:
        test_cases = sorted({c for group in test_sets.values() for c in group})
    test_set = _check_case_ids(cases, test_cases)
    spacing = parse_spacing(spacing)
    if ball_radius_mm is not None and not (np.isfinite(ball_radius_mm) and ball_radius_mm > 0):
        raise ConversionError(f"ball radius must be a positive number of mm, got {ball_radius_mm!r}")
    exclude = [str(n) for n in exclude_names]

    items = _read_cases(cases, test_set, exclude, problems, progress, spacing)
    names = _channel_names(items, names, exclude, problems)
    if pairs is None:
        from nnlandmark_h3de.landmarks.pairs import find_lr_pairs
        pairs = find_lr_pairs(names)
    pairs = _validate_pairs(pairs, names)
    kept = _reorder_and_check(items, names, problems, outside_fov)
    train = [c for c in kept if not c.is_test]
    if not train and on_error == "drop":
        raise ConversionError("no training case left after dropping bad cases:\n" + problems.listing())
    radius = _ball_radius(train, kept, target_spacing, ball_radius_mm, min_radius_voxels)
    problems.raise_if_any()

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        written = _write_cases(train + [c for c in kept if c.is_test], tmp, names, radius, problems, progress)
        n_train = sum(not c.is_test for c in written)
        ndim = written[0].geometry.ndim
        _dump_json(_dataset_json(target, names, pairs, radius, channel_name, n_train, ndim), tmp / "dataset.json")
        done = {c.case for c in written}
        _dump_json(landmarks_json_dict({c.case: c.landmarks for c in written}, names,
                                       [c.case for c in written if c.is_test],
                                       None if not test_sets else
                                       {k: [x for x in v if x in done] for k, v in test_sets.items()}),
                   tmp / LANDMARKS_FILE)
        if splits is not None:
            _dump_json(_filter_splits(splits, {c.case for c in written if not c.is_test}, {str(k) for k in cases}),
                       tmp / "splits_final.json")
        replace_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if splits is not None:
        install_splits(target)
    return target


def _check_test_sets(test_sets, test_cases: Sequence[str]) -> Dict[str, List[str]]:
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


def _filter_splits(splits: List[dict], train_cases: set, all_cases: set) -> List[dict]:
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
                              f"(dropped or test): {missing[:10]}", ConversionWarning, stacklevel=3)
            new[key] = [x for x in ids if x in train_cases]
        out.append(new)
    return out
