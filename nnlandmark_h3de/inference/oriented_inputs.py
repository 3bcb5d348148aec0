"""Prediction inputs in the orientation the model was trained in.

A model converted by nnlandmark_h3de saw every 3D image with one voxel-axis orientation
(utilities/orientation.py). An input stored otherwise (an LAS NIfTI for an LPS-trained model) would show it
mirrored anatomy, so its left/right landmarks would be swapped or lost. Such inputs are reoriented
(no resampling) into a temporary folder. The others are linked there, and that folder is predicted.
The landmarks are written in world coordinates, which reorienting does not change.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, List, Optional

from tqdm import tqdm

from nnlandmark_h3de.landmarks.geometry import read_image_header
from nnlandmark_h3de.utilities.orientation import orientation_code, to_orientation

__all__ = ["InputHeaderError", "misoriented_inputs", "inputs_in_orientation"]


class InputHeaderError(ValueError):
    """An input image whose header cannot be read."""


def misoriented_inputs(folder: Path, file_ending: str, code: str) -> List[Path]:
    """The 3D images in `folder` (files ending in `file_ending`) whose orientation is not `code`;
    only their headers are read."""
    out = []
    for path in sorted(Path(folder).glob(f"*{file_ending}")):
        try:
            reader = read_image_header(path)
        except ValueError as e:
            raise InputHeaderError(str(e)) from None
        if reader.GetDimension() == 3 and orientation_code(reader.GetDirection()) != code:
            out.append(path)
    return out


@contextlib.contextmanager
def inputs_in_orientation(folder, file_ending: str, code: Optional[str]) -> Iterator[str]:
    """The folder to predict: `folder` itself when every input already has orientation `code` (or the
    model records none), else a temporary folder with the misoriented inputs reoriented, removed on exit."""
    if code is None:
        yield str(folder)
        return
    wrong = misoriented_inputs(Path(folder), file_ending, code)
    if not wrong:
        yield str(folder)
        return
    import SimpleITK as sitk
    print(f"{len(wrong)} input image(s) stored in another orientation than the model's training images ({code}), "
          f"e.g. {wrong[0].name} ({_code_of(wrong[0])}): predicting on copies reoriented to {code} (no resampling; "
          "the landmarks' world coordinates are the same)")
    tmp = Path(tempfile.mkdtemp(prefix="nnlandmark_oriented_"))
    try:
        wrong_names = {p.name for p in wrong}
        for path in sorted(Path(folder).glob(f"*{file_ending}")):
            if path.name not in wrong_names:
                os.symlink(path.resolve(), tmp / path.name)
        for path in tqdm(wrong, desc="reorienting inputs", unit="image"):
            sitk.WriteImage(to_orientation(sitk.ReadImage(str(path)), code), str(tmp / path.name), useCompression=True)
        yield str(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _code_of(path: Path) -> str:
    return orientation_code(read_image_header(path).GetDirection())
