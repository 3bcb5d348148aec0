"""One case of the MML dataset (Mandibular Molar Landmarking): nrrd volume + .npy landmarks + .npy spacing.

The nrrd header carries no spacing, so the image gets origin 0, identity direction and the spacing
from `*_spacing.npy`; landmarks are voxel indices in the axis order of the array pynrrd returns
(index_order 'F': arr[i, j, k]), i.e. ITK (i, j, k) order. Coordinates < 0 or NaN mark a missing one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Tuple

import numpy as np

from nnlandmark_h3de.landmarks.geometry import ImageGeometry
from nnlandmark_h3de.landmarks.landmark_set import LandmarkError, LandmarkSet

MML_NAMES = ["L0", "La", "Lb", "Lc", "Ld", "Le", "Lf", "R0", "Ra", "Rb", "Rc", "Rd", "Re", "Rf"]


def _load_npy(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise LandmarkError(f"{path}: MML {what} file not found")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise LandmarkError(f"{path}: unreadable .npy {what} file ({e})") from None


def read_mml_spacing(spacing_path) -> Tuple[float, float, float]:
    """Voxel spacing in mm, in the (i, j, k) order of the pynrrd array."""
    path = Path(spacing_path)
    raw = _load_npy(path, "spacing")
    if not np.issubdtype(raw.dtype, np.number):
        raise LandmarkError(f"{path}: spacing must be numeric, got dtype {raw.dtype}")
    spacing = raw.astype(np.float64).reshape(-1)
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise LandmarkError(f"{path}: spacing must be 3 positive finite numbers, got {spacing.tolist()}")
    return tuple(float(s) for s in spacing)


def read_mml_landmarks(label_path, geometry: ImageGeometry) -> LandmarkSet:
    """The (14, 3) voxel-index array as world LPS mm; rows with a negative or NaN coordinate are absent."""
    path = Path(label_path)
    ijk = _load_npy(path, "label")
    if ijk.shape != (len(MML_NAMES), 3) or not np.issubdtype(ijk.dtype, np.number):
        raise LandmarkError(f"{path}: expected a numeric ({len(MML_NAMES)}, 3) array of voxel indices, "
                            f"got {ijk.dtype} {ijk.shape}")
    ijk = ijk.astype(np.float64)
    missing = np.isnan(ijk).any(axis=1) | (ijk < 0).any(axis=1)
    if np.isinf(ijk[~missing]).any():
        bad = [MML_NAMES[i] for i in np.flatnonzero(np.isinf(ijk).any(axis=1))]
        raise LandmarkError(f"{path}: infinite voxel indices for {bad}")
    points = geometry.itk_index_to_world(np.where(missing[:, None], 0.0, ijk))
    points[missing] = np.nan
    return LandmarkSet(list(MML_NAMES), points, source=str(path))


def _pynrrd_array_to_zyx(array_ijk: np.ndarray) -> np.ndarray:
    """pynrrd's arr[i, j, k] (index_order 'F') -> the arr[k, j, i] layout SimpleITK arrays use."""
    return np.ascontiguousarray(array_ijk.transpose(2, 1, 0))


def read_mml_case(volume_path, label_path, spacing_path):
    """(SimpleITK image, LandmarkSet in LPS mm) for one MML case."""
    import nrrd

    volume_path = Path(volume_path)
    if not volume_path.is_file():
        raise LandmarkError(f"{volume_path}: MML volume file not found")
    try:
        array_ijk, _header = nrrd.read(str(volume_path))
    except Exception as e:  # pynrrd raises NRRDError, OSError, ValueError... all mean the same here
        raise LandmarkError(f"{volume_path}: unreadable nrrd volume ({e})") from None
    if array_ijk.ndim != 3:
        raise LandmarkError(f"{volume_path}: expected a 3D volume, got shape {array_ijk.shape}")
    spacing = read_mml_spacing(spacing_path)
    geometry = ImageGeometry(shape_ijk=tuple(int(s) for s in array_ijk.shape), spacing=spacing,
                             origin=(0.0, 0.0, 0.0), direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    image = geometry.to_sitk_image(_pynrrd_array_to_zyx(array_ijk))
    return image, read_mml_landmarks(label_path, geometry)
