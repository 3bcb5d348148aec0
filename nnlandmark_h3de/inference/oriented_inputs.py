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
from typing import Dict, Iterator, Optional

from tqdm import tqdm

from nnlandmark_h3de.landmarks.geometry import read_image_header
from nnlandmark_h3de.utilities.orientation import orientation_code, to_orientation

__all__ = ["InputHeaderError", "misoriented_inputs", "inputs_in_orientation"]


class InputHeaderError(ValueError):
    """An input image whose header cannot be read."""


def misoriented_inputs(folder: Path, file_ending: str, code: str) -> Dict[Path, str]:
    """The 3D images in `folder` (files ending in `file_ending`) whose orientation is not `code`, with
    their own orientation; only their headers are read."""
    out = {}
    for path in sorted(Path(folder).glob(f"*{file_ending}")):
        try:
            reader = read_image_header(path)
        except ValueError as e:
            raise InputHeaderError(str(e)) from None
        own = orientation_code(reader.GetDirection()) if reader.GetDimension() == 3 else code
        if own != code:
            out[path] = own
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
    example = next(iter(wrong))
    print(f"{len(wrong)} input image(s) stored in another orientation than the model's training images ({code}), "
          f"e.g. {example.name} ({wrong[example]}): predicting on copies reoriented to {code} (no resampling; "
          "the landmarks' world coordinates are the same)")
    tmp = Path(tempfile.mkdtemp(prefix="nnlandmark_oriented_"))
    try:
        for path in sorted(Path(folder).glob(f"*{file_ending}")):
            if path not in wrong:
                os.symlink(path.resolve(), tmp / path.name)
        for path in tqdm(wrong, desc="reorienting inputs", unit="image"):
            sitk.WriteImage(to_orientation(sitk.ReadImage(str(path)), code), str(tmp / path.name), useCompression=True)
        yield str(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

