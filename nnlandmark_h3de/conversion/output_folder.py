"""Where a converted dataset goes: `DatasetXXX_Name` under $nnUNet_raw or a given folder, refused when
it exists (unless overwriting), built in a hidden staging folder and renamed into place only when
complete, so a failed conversion never leaves a half-written dataset. The one-shot dataset writer
(oneshot/pseudo_dataset.py) uses the same steps."""
from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Optional

import numpy as np

from nnlandmark_h3de.conversion.errors import ConversionError


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


def staging_folder(target: Path) -> Path:
    """A fresh hidden folder name beside `target` to build the dataset in (created by the caller)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"


def replace_folder(tmp: Path, target: Path) -> None:
    """Rename the finished temporary folder onto `target` (an existing one is moved aside first)."""
    if target.exists():
        trash = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, trash)
        os.replace(tmp, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, target)


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
