"""An image known by its header now and loaded only when written.

Converting hundreds of volumes that must be decoded in memory first (MML's nrrd + spacing .npy)
then holds one volume at a time instead of all of them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from nnlandmark_h3de.landmarks.geometry import ImageGeometry


@dataclass(frozen=True)
class LazyImage:
    geometry: ImageGeometry  # must equal the geometry of what `load` returns
    load: Callable[[], "SimpleITK.Image"]  # noqa: F821
    label: str  # names the source in messages (e.g. the volume file)

    def __str__(self) -> str:
        return self.label
