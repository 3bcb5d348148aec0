"""One array orientation for every 3D image a landmark network sees.

Why: nnU-Net trains on the stored voxel arrays as they are. Two scans stored with opposite left-right
axes (e.g. an RAS and an LAS NIfTI) show the same anatomy mirrored in array space. Mirroring is one of
the training augmentations, so the network cannot tell anatomical left from right by appearance. The
side of the array is its only cue, and mixed orientations give each left/right channel contradictory
targets. Conversion therefore writes every 3D image reoriented (a permutation and flips of the voxel
axes; no resampling, the world coordinates of every voxel are unchanged) to `CANONICAL_ORIENTATION`
and records it in dataset.json. Prediction gives its inputs the same orientation.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

__all__ = ["CANONICAL_ORIENTATION", "orientation_code", "to_orientation", "dataset_orientation",
           "mixed_orientations_message"]

# ITK's code of the identity direction: voxel axes i, j, k run towards left, posterior, superior
CANONICAL_ORIENTATION = "LPS"


def orientation_code(direction) -> str:
    """ITK's three-letter code of a 3D direction matrix (flattened 9 values); oblique axes: the closest."""
    import SimpleITK as sitk
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines([float(v) for v in direction])


def to_orientation(image, code: str = CANONICAL_ORIENTATION):
    """The 3D image with its voxel axes permuted and flipped to `code`. The image itself is returned if it
    already has that orientation or is not 3D. Voxel values and world positions do not change."""
    import SimpleITK as sitk
    if image.GetDimension() != 3 or orientation_code(image.GetDirection()) == code:
        return image
    return sitk.DICOMOrient(image, code)


def dataset_orientation(dataset_json: Optional[dict]) -> Optional[str]:
    """The orientation a converted dataset's images were written in (dataset.json's landmarks block),
    None for datasets converted before conversion reoriented images (their images are as stored)."""
    block = (dataset_json or {}).get("landmarks") or {}
    code = block.get("image_orientation")
    return str(code) if code else None


def mixed_orientations_message(directions: Mapping[str, Sequence[float]]) -> Optional[str]:
    """A warning when 3D cases (case id -> flattened direction) are stored in more than one orientation,
    else None: a network trained on them mixes up left and right (module docstring)."""
    groups: Dict[str, List[str]] = {}
    for case, direction in directions.items():
        if len(direction) == 9:
            groups.setdefault(orientation_code(direction), []).append(case)
    if len(groups) < 2:
        return None
    listing = "; ".join(f"{code}: {len(cases)} (e.g. {sorted(cases)[0]})" for code, cases in sorted(groups.items()))
    return (f"the training cases are stored in {len(groups)} voxel-axis orientations ({listing}). The network sees "
            "mirrored arrays, so left/right landmarks get contradictory targets. Convert the dataset with "
            f"nnLandmark_convert (it writes every image in {CANONICAL_ORIENTATION}) and plan and preprocess it again")
