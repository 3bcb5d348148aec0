"""Image geometry: world (LPS mm) <-> continuous voxel index.

This module is the ONE place where the numpy (z, y, x) order of `sitk.GetArrayFromImage` and
nnU-Net arrays meets ITK's (i, j, k) order. Everything else asks for `array` or `itk` indices
by name and never reverses axes itself.

2D images (X-rays) are the z = 0 slice of a 3D geometry (`ndim` = 2): size 1 and spacing 1 along k,
the 2x2 direction embedded in a 3x3 one. That is nnU-Net's own view of a 2D image (an array
(1, y, x)), so every mapping below is the 3D one, and a 2D image's world points have z = 0 (the
plane 3D Slicer shows the image in).
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
    ndim: int = 3  # 2: a 2D image, stored as the z = 0 slice (see module doc)

    # ------------------------------------------------------------ constructors
    @classmethod
    def create(cls, size: Sequence[int], spacing: Sequence[float], origin: Sequence[float],
               direction: Sequence[float]) -> "ImageGeometry":
        """From ITK-ordered values of a 2D or 3D image (a 4D image's first three axes)."""
        n = len(spacing)
        if n == 2:
            d = np.asarray(direction, dtype=np.float64).reshape(2, 2)
            d3 = np.eye(3)
            d3[:2, :2] = d
            return cls((int(size[0]), int(size[1]), 1), (float(spacing[0]), float(spacing[1]), 1.0),
                       (float(origin[0]), float(origin[1]), 0.0), tuple(float(v) for v in d3.ravel()), 2)
        if n < 2:
            raise ValueError(f"a {n}D image has no landmark geometry (2D or 3D images only)")
        d = np.asarray(direction, dtype=np.float64).reshape(n, n)[:3, :3]
        return cls(tuple(int(s) for s in size[:3]), tuple(float(s) for s in spacing[:3]),
                   tuple(float(o) for o in origin[:3]), tuple(float(v) for v in d.ravel()))

    @classmethod
    def from_sitk(cls, image) -> "ImageGeometry":
        return cls.create(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())

    @classmethod
    def from_file(cls, path) -> "ImageGeometry":
        """Reads only the header."""
        reader = read_image_header(path)
        return cls.create(reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())

    @classmethod
    def from_sitk_stuff(cls, sitk_stuff: dict, shape_zyx: Sequence[int]) -> "ImageGeometry":
        """From nnU-Net's `properties['sitk_stuff']` and the original array shape (z, y, x) (for a 2D
        image nnU-Net's (1, y, x))."""
        n = len(sitk_stuff["spacing"])
        size = tuple(int(s) for s in shape_zyx[::-1])[:n]
        if len(size) < n:
            size = size + (0,) * (n - len(size))
        return cls.create(size, sitk_stuff["spacing"], sitk_stuff["origin"], sitk_stuff["direction"])

    def to_sitk_image(self, array_zyx: np.ndarray):
        """The array (z, y, x) as an image of this geometry; a 2D geometry takes (1, y, x) or (y, x) and
        makes a 2D image."""
        import SimpleITK as sitk
        array = np.asarray(array_zyx)
        if self.ndim == 2:
            if array.ndim == 3:
                if array.shape[0] != 1:
                    raise ValueError(f"a 2D image geometry needs a (1, y, x) array, got shape {array.shape}")
                array = array[0]
            img = sitk.GetImageFromArray(array)
            img.SetSpacing(self.spacing[:2])
            img.SetOrigin(self.origin[:2])
            img.SetDirection(tuple(self.direction_matrix[:2, :2].ravel()))
            return img
        img = sitk.GetImageFromArray(array)
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
        """True where a continuous array index lies inside the image (voxel centres +- margin). A 2D
        image's points must also lie on its plane (z index within half a voxel of 0), whatever the
        in-plane margin."""
        zyx = np.atleast_2d(zyx)
        shape = np.asarray(self.shape_zyx)
        margins = np.array([0.5 if self.ndim == 2 else margin, margin, margin])
        return np.all((zyx >= -margins) & (zyx <= shape - 1 + margins), axis=-1)


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
