"""2D images (X-rays) for conversion: picture files without a spacing, spacing overrides, grey, downscaling.

A 2D image is what nnU-Net makes of it: an (1, y, x) array with a 2D `ImageGeometry` (`ndim` = 2,
see landmarks/geometry.py). The raw dataset stores it as a 2D NIfTI with the pixel spacing in the
header, so nnU-Net's SimpleITKIO reads the geometry and plans a `2d` configuration.

- Picture files (PNG, BMP, TIFF, JPEG; `PICTURE_SUFFIXES`) carry no usable pixel spacing (their DPI
  fields, when SimpleITK reads them at all, describe a printer, not the detector): a spacing in mm
  per pixel must be given (`spacing=` / `nnLandmark_convert --spacing SX [SY]`), else the case is an
  error naming the file. The image gets origin (0, 0), identity direction, the given spacing, so a
  landmark file in world mm must use that frame (world = pixel index x spacing); annotations made on
  the picture in another tool's frame (e.g. 1 mm pixels) are safer as pixel coordinates (a CSV
  file with x_px,y_px columns, see landmarks/io_csv.py).
  Colour pictures (RGB, RGBA, grey + alpha; SimpleITK also reads palette BMPs as RGB) become one
  grey channel, 0.299 R + 0.587 G + 0.114 B rounded back to the pixel type (exact for a grey picture
  stored as colour), alpha ignored; the conversion reports that with one ConversionWarning.
  Multi-page (3D) TIFFs are an error.
- 2D NIfTI/NRRD/MHA files keep their own spacing, origin and direction. A given spacing that differs
  from the file's overrides it (origin and direction kept) with a ConversionWarning: the user asked
  for it, and files converted from DICOM without pixel spacing often say 1 mm. For a 3D image a
  given spacing is an error (it is 2D only).
- `downscale_2d` / `downscaled_geometry`: block averaging by an integer factor with exact geometry
  (spacing x factor, origin moved to the centre of the first block, remainder rows/columns dropped
  as SimpleITK's BinShrink does), so world landmarks stay where they are.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

from nnlandmark_h3de.conversion.errors import ConversionError
from nnlandmark_h3de.conversion.lazy_image import LazyImage
from nnlandmark_h3de.landmarks.geometry import ImageGeometry, read_image_header

PICTURE_SUFFIXES = (".png", ".bmp", ".tiff", ".tif", ".jpeg", ".jpg")
GREY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma
_IDENTITY_2D = (1.0, 0.0, 0.0, 1.0)


class ImageInputError(ConversionError):
    """A 2D image input cannot be used; the message names the file."""


def is_picture_file(path) -> bool:
    """PNG, BMP, TIFF or JPEG (no pixel spacing in the file), by file name."""
    return Path(path).name.lower().endswith(PICTURE_SUFFIXES)


def parse_spacing(spacing: Optional[Sequence[float]]) -> Optional[Tuple[float, float]]:
    """(sx, sy) mm per pixel from one value (square pixels) or two (x, y); None stays None."""
    if spacing is None:
        return None
    values = [spacing] if isinstance(spacing, (int, float)) else list(spacing)
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ImageInputError(f"spacing must be 1 or 2 numbers (mm per pixel, x then y), got {spacing!r}") from None
    if len(values) not in (1, 2) or not all(math.isfinite(v) and v > 0 for v in values):
        raise ImageInputError(f"spacing must be 1 or 2 positive numbers (mm per pixel, x then y), got {spacing!r}")
    return (values[0], values[-1])


def to_grey(image):
    """A single-component image: colour (3 or 4 components) -> BT.601 luma, 2 components (grey + alpha)
    -> the first; the pixel type and geometry are kept. Returns the image unchanged when it is grey."""
    import SimpleITK as sitk
    n = image.GetNumberOfComponentsPerPixel()
    if n == 1:
        return image
    arr = sitk.GetArrayFromImage(image)  # (..., n)
    if n == 2:
        grey = arr[..., 0]
    else:
        grey = np.tensordot(arr[..., :3].astype(np.float64), np.asarray(GREY_WEIGHTS), axes=([-1], [0]))
        if np.issubdtype(arr.dtype, np.integer):
            info = np.iinfo(arr.dtype)
            grey = np.clip(np.rint(grey), info.min, info.max)
        grey = grey.astype(arr.dtype)
    out = sitk.GetImageFromArray(np.ascontiguousarray(grey))
    out.SetSpacing(image.GetSpacing())
    out.SetOrigin(image.GetOrigin())
    out.SetDirection(image.GetDirection())
    return out


def _header(path: Path):
    if not path.is_file():
        raise ImageInputError(f"{path}: image file not found")
    try:
        return read_image_header(path)
    except ValueError as e:
        raise ImageInputError(str(e)) from None


def picture_geometry(path, spacing: Optional[Sequence[float]]) -> Tuple[ImageGeometry, int]:
    """(2D geometry with the given spacing, number of components) of a PNG/BMP/TIFF/JPEG file's header."""
    path = Path(path)
    sp = parse_spacing(spacing)
    reader = _header(path)
    if sp is None:
        raise ImageInputError(f"{path}: a {path.suffix.lstrip('.').upper()} picture carries no pixel spacing; give it "
                              "in mm per pixel (spacing=(sx, sy) / nnLandmark_convert --spacing SX [SY])")
    if reader.GetDimension() != 2:
        raise ImageInputError(f"{path}: expected a 2D picture, got {reader.GetDimension()}D of size "
                              f"{tuple(reader.GetSize())} (multi-page TIFF?)")
    n = reader.GetNumberOfComponents()
    if n not in (1, 2, 3, 4):
        raise ImageInputError(f"{path}: {n} components per pixel (expected grey, grey + alpha, RGB or RGBA)")
    geo = ImageGeometry.create(reader.GetSize(), sp, (0.0, 0.0), _IDENTITY_2D)
    if min(geo.shape_ijk) < 1:
        raise ImageInputError(f"{path}: empty picture (size {tuple(reader.GetSize())})")
    return geo, n


def read_picture(path, spacing: Sequence[float]):
    """A PNG/BMP/TIFF/JPEG file as a grey 2D SimpleITK image with the given spacing, origin 0, identity direction."""
    import SimpleITK as sitk
    path = Path(path)
    geo, _ = picture_geometry(path, spacing)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise ImageInputError(f"{path}: unreadable image ({str(e).strip().splitlines()[-1]})") from None
    image = to_grey(image)
    image.SetSpacing(geo.spacing[:2])
    image.SetOrigin(geo.origin[:2])
    image.SetDirection(_IDENTITY_2D)
    return image


def open_picture(path, spacing: Optional[Sequence[float]], label: Optional[str] = None) -> Tuple[LazyImage, int]:
    """(LazyImage of the grey picture with the given spacing, components in the file); pixels read on `load`."""
    geo, n = picture_geometry(path, spacing)
    return LazyImage(geo, lambda p=Path(path), s=geo.spacing[:2]: read_picture(p, s), label or str(path)), n


def open_with_spacing(path, spacing: Sequence[float], label: Optional[str] = None) -> Tuple[LazyImage, Tuple[float, float]]:
    """(LazyImage of a 2D NIfTI/NRRD/MHA file with its spacing replaced, the file's own spacing).

    Origin and direction stay the file's. A 3D image is an ImageInputError (a spacing is for 2D only).
    """
    import SimpleITK as sitk
    path = Path(path)
    sp = parse_spacing(spacing)
    reader = _header(path)
    if reader.GetDimension() != 2:
        raise ImageInputError(f"{path}: spacing=/--spacing is for 2D images only, but this image is "
                              f"{reader.GetDimension()}D (size {tuple(reader.GetSize())}); its file gives the spacing")
    if reader.GetNumberOfComponents() != 1:
        raise ImageInputError(f"{path}: expected a single-component 2D image, got {reader.GetNumberOfComponents()} "
                              "components per pixel")
    own = tuple(float(s) for s in reader.GetSpacing())
    geo = ImageGeometry.create(reader.GetSize(), sp, reader.GetOrigin(), reader.GetDirection())

    def load(p=path, s=sp):
        img = sitk.ReadImage(str(p))
        img.SetSpacing(s)
        return img
    return LazyImage(geo, load, label or str(path)), own


@dataclass(frozen=True)
class OpenedWithSpacing:
    """A 2D file opened with a given pixel spacing: the image, the components its file has (a picture
    in colour: > 1) and the spacing its file gave (None for a picture: it gives none)."""
    image: LazyImage
    components: int
    file_spacing: Optional[Tuple[float, float]]

    @property
    def spacing_replaced(self) -> bool:
        return self.file_spacing is not None and not np.allclose(self.file_spacing, self.image.geometry.spacing[:2],
                                                                 rtol=1e-9, atol=0)


def open_with_pixel_spacing(path, spacing: Optional[Sequence[float]],
                            label: Optional[str] = None) -> Optional[OpenedWithSpacing]:
    """The one rule for a file and a `spacing=`/--spacing: a picture is opened with it (an error without
    one), another file given one has its spacing replaced (2D only); None when neither applies (read
    the file as it is)."""
    if is_picture_file(path):
        image, n = open_picture(path, spacing, label)
        return OpenedWithSpacing(image, n, None)
    if spacing is not None:
        image, own = open_with_spacing(path, spacing, label)
        return OpenedWithSpacing(image, 1, own)
    return None


# -------------------------------------------------------------------------------------- downscale
def downscaled_geometry(geometry: ImageGeometry, factor: int) -> ImageGeometry:
    """The grid of `downscale_2d(image, factor)`: floor(size / factor) pixels of factor x the spacing,
    the first one centred on the first block of factor x factor original pixels."""
    factor = _check_factor(factor)
    if geometry.ndim != 2:
        raise ValueError("downscaled_geometry: a 2D geometry is needed")
    size = tuple(s // factor for s in geometry.shape_ijk[:2])
    if min(size) < 1:
        raise ValueError(f"downscale factor {factor} leaves no pixel of an image of size {geometry.shape_ijk[:2]}")
    shift = geometry.itk_index_to_world(np.array([(factor - 1) / 2, (factor - 1) / 2, 0.0]))
    d2 = geometry.direction_matrix[:2, :2].ravel()
    return ImageGeometry.create(size, tuple(s * factor for s in geometry.spacing[:2]), tuple(shift[:2]), tuple(d2))


def downscale_2d(image, factor: int):
    """Average factor x factor blocks of a grey 2D SimpleITK image (integer types rounded back)."""
    import SimpleITK as sitk
    factor = _check_factor(factor)
    if factor == 1:
        return image
    if image.GetDimension() != 2 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("downscale_2d: a grey 2D image is needed")
    geo = downscaled_geometry(ImageGeometry.from_sitk(image), factor)
    arr = sitk.GetArrayViewFromImage(image)
    ny, nx = geo.shape_ijk[1], geo.shape_ijk[0]
    blocks = np.asarray(arr[: ny * factor, : nx * factor], dtype=np.float64).reshape(ny, factor, nx, factor)
    mean = blocks.mean(axis=(1, 3))
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        mean = np.clip(np.rint(mean), info.min, info.max)
    return geo.to_sitk_image(mean.astype(arr.dtype))


def _check_factor(factor) -> int:
    if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 1:
        raise ValueError(f"downscale factor must be a positive integer, got {factor!r}")
    return int(factor)
