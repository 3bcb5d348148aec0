"""Image geometry: world (LPS mm) <-> continuous voxel index.

This module is the ONE place where the numpy (z, y, x) order of `sitk.GetArrayFromImage` and
nnU-Net arrays meets ITK's (i, j, k) order. Everything else asks for `array` or `itk` indices
by name and never reverses axes itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Tuple

import numpy as np


@dataclass(frozen=True)
class ImageGeometry:
    """ITK convention: point = origin + direction @ diag(spacing) @ (i, j, k)."""

    shape_ijk: Tuple[int, int, int]
    spacing: Tuple[float, float, float]  # (x, y, z) like sitk.GetSpacing()
    origin: Tuple[float, float, float]
    direction: Tuple[float, ...]  # row-major 3x3 like sitk.GetDirection()

    # ------------------------------------------------------------ constructors
    @classmethod
    def from_sitk(cls, image) -> "ImageGeometry":
        return cls(tuple(int(s) for s in image.GetSize()), tuple(float(s) for s in image.GetSpacing()),
                   tuple(float(o) for o in image.GetOrigin()), tuple(float(d) for d in image.GetDirection()))

    @classmethod
    def from_file(cls, path) -> "ImageGeometry":
        """Reads only the header."""
        reader = read_image_header(path)
        return cls(tuple(int(s) for s in reader.GetSize()[:3]), tuple(float(s) for s in reader.GetSpacing()[:3]),
                   tuple(float(o) for o in reader.GetOrigin()[:3]),
                   tuple(float(d) for d in np.asarray(reader.GetDirection()).reshape(reader.GetDimension(), -1)[:3, :3].ravel()))

    @classmethod
    def from_sitk_stuff(cls, sitk_stuff: dict, shape_zyx: Sequence[int]) -> "ImageGeometry":
        """From nnU-Net's `properties['sitk_stuff']` and the original array shape (z, y, x)."""
        return cls(tuple(int(s) for s in shape_zyx[::-1]), tuple(float(s) for s in sitk_stuff["spacing"]),
                   tuple(float(o) for o in sitk_stuff["origin"]), tuple(float(d) for d in sitk_stuff["direction"]))

    def to_sitk_image(self, array_zyx: np.ndarray):
        import SimpleITK as sitk
        img = sitk.GetImageFromArray(array_zyx)
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(self.direction)
        return img

    # --------------------------------------------------------------- matrices
    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def index_to_world_matrix(self) -> np.ndarray:
        return self.direction_matrix @ np.diag(self.spacing)

    @property
    def shape_zyx(self) -> Tuple[int, int, int]:
        return tuple(self.shape_ijk[::-1])

    @property
    def spacing_zyx(self) -> Tuple[float, float, float]:
        return tuple(self.spacing[::-1])

    # ------------------------------------------------------------ transforms
    def itk_index_to_world(self, ijk: np.ndarray) -> np.ndarray:
        ijk = np.asarray(ijk, dtype=np.float64)
        return ijk @ self.index_to_world_matrix.T + np.asarray(self.origin)

    def world_to_itk_index(self, xyz: np.ndarray) -> np.ndarray:
        xyz = np.asarray(xyz, dtype=np.float64)
        # row-vector form so any (..., 3) batch works, like itk_index_to_world
        return (xyz - np.asarray(self.origin)) @ np.linalg.inv(self.index_to_world_matrix).T

    def array_index_to_world(self, zyx: np.ndarray) -> np.ndarray:
        """Continuous index into the numpy array (z, y, x) -> LPS world point."""
        return self.itk_index_to_world(np.asarray(zyx, dtype=np.float64)[..., ::-1])

    def world_to_array_index(self, xyz: np.ndarray) -> np.ndarray:
        """LPS world point -> continuous numpy array index (z, y, x)."""
        return self.world_to_itk_index(xyz)[..., ::-1]

    def contains_array_index(self, zyx: np.ndarray, margin: float = 0.5) -> np.ndarray:
        """True where a continuous array index lies inside the image (voxel centres +- margin)."""
        zyx = np.atleast_2d(zyx)
        shape = np.asarray(self.shape_zyx)
        return np.all((zyx >= -margin) & (zyx <= shape - 1 + margin), axis=-1)


def read_image_header(path):
    """A SimpleITK reader with the header read (no pixels); an unreadable file is a ValueError naming it."""
    import SimpleITK as sitk
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise ValueError(f"{path}: unreadable image ({str(e).strip().splitlines()[-1]})") from None
    return reader


def read_image(path):
    """SimpleITK read with an error that names the file."""
    import SimpleITK as sitk
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: image file not found")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise ValueError(f"{path}: unreadable image ({str(e).strip().splitlines()[-1]})") from None
