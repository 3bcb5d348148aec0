"""A synthetic landmark dataset that a tiny network learns in minutes on a CPU, for trainer smoke
tests and the accuracy benchmark: noisy volumes with a bright midline plate, a bright blob on
each side of it (the left/right pair L0/R0) and a dark blob on the midline (M). The plate makes
left and right tell-apart from any patch, so left/right mirroring with pair swap is learnable.
Landmarks are the exact blob centres (world LPS), written through `convert_dataset`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Sequence, Tuple

import numpy as np

__all__ = ["BLOB_NAMES", "make_blob_case", "make_blob_dataset"]

BLOB_NAMES = ("L0", "R0", "M")


def make_blob_case(rng: np.random.Generator, shape_zyx: Sequence[int] = (40, 40, 40),
                   spacing_xyz: Sequence[float] = (1.0, 1.0, 1.0), noise: float = 0.25, absent: Sequence[str] = ()):
    """One case: (SimpleITK image, LandmarkSet). Identity direction, origin 0: LPS x grows with array axis 2."""
    import SimpleITK as sitk
    from nnlandmark_h3de.landmarks import ImageGeometry, LandmarkSet

    shape = np.asarray(shape_zyx)
    sp_zyx = np.asarray(spacing_xyz, dtype=np.float64)[::-1]
    extent = (shape - 1) * sp_zyx  # mm, zyx
    grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, sp_zyx)], indexing="ij"), -1)
    mid_x = extent[2] / 2 + rng.uniform(-2, 2)
    img = rng.normal(0, noise, size=tuple(shape)).astype(np.float32)
    img += (0.6 * np.exp(-0.5 * ((grid[..., 2] - mid_x) / 1.0) ** 2)).astype(np.float32)

    margin = 7.0
    def point(x_lo, x_hi):
        z = rng.uniform(margin, extent[0] - margin)
        y = rng.uniform(margin, extent[1] - margin)
        return np.array([z, y, rng.uniform(x_lo, x_hi)])
    span = extent[2] / 2 - margin
    centres = {"L0": point(mid_x + 6, mid_x + span), "R0": point(mid_x - span, mid_x - 6), "M": point(mid_x, mid_x)}
    amplitude = {"L0": 2.0, "R0": 2.0, "M": -2.0}
    for name, c in centres.items():
        if name in absent:
            continue
        img += (amplitude[name] * np.exp(-0.5 * np.sum((grid - c) ** 2, -1) / 1.5 ** 2)).astype(np.float32)

    image = sitk.GetImageFromArray(img)
    image.SetSpacing(tuple(float(s) for s in spacing_xyz))
    geometry = ImageGeometry.from_sitk(image)
    points = np.array([geometry.array_index_to_world(centres[n] / sp_zyx) if n not in absent else [np.nan] * 3
                       for n in BLOB_NAMES])
    return image, LandmarkSet(list(BLOB_NAMES), points)


def make_blob_dataset(dataset_id: int, n_cases: int = 6, seed: int = 0, name: str = "Blobs",
                      shape_zyx: Sequence[int] = (40, 40, 40), spacing_xyz: Sequence[float] = (1.0, 1.0, 1.0),
                      absent_every: int = 0, output_folder=None) -> Path:
    """Write DatasetXXX_Blobs under $nnUNet_raw (or `output_folder`); every `absent_every`-th case
    (if > 0) lacks its M landmark. Returns the dataset folder."""
    from nnlandmark_h3de.conversion import convert_dataset

    rng = np.random.default_rng(seed)
    cases: Dict[str, Tuple] = {}
    for i in range(n_cases):
        absent = ("M",) if absent_every and i % absent_every == absent_every - 1 else ()
        cases[f"blob_{i:03d}"] = make_blob_case(rng, shape_zyx, spacing_xyz, absent=absent)
    target = output_folder if output_folder is not None else (dataset_id, name)
    return Path(convert_dataset(cases, target, names=list(BLOB_NAMES), pairs=[("L0", "R0")], progress=False,
                                overwrite=True))
