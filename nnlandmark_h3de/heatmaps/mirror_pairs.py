"""Left/right mirroring that keeps landmark names right: flipping the patient's left/right axis
turns the left landmark of a pair into the right one, so the pair's label values are swapped.

Which array axis is left/right depends on each image's direction and on the plans'
`transpose_forward`; `left_right_axis` finds it from nnU-Net's per-case properties and returns
None when it cannot tell (no SimpleITK geometry, or an oblique image whose L/R world axis is not
close to one array axis). The trainer decides from that what to mirror (see nnLandmarkTrainer).
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform

__all__ = ["pair_permutation", "left_right_axis", "dataset_left_right_axes", "MirrorWithPairSwapTransform"]


def pair_permutation(names: Sequence[str], pairs: Iterable[Sequence[str]]) -> List[int]:
    """Channel permutation p (landmark i becomes p[i] after a left/right flip); identity for unpaired."""
    index = {n: i for i, n in enumerate(names)}
    perm = list(range(len(names)))
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"landmark pair {pair!r} must have exactly two names")
        a, b = pair
        missing = [n for n in (a, b) if n not in index]
        if missing:
            raise ValueError(f"landmark pair {pair!r} names unknown landmarks {missing} (known: {list(names)})")
        ia, ib = index[a], index[b]
        if perm[ia] != ia or perm[ib] != ib or ia == ib:
            raise ValueError(f"landmark pair {pair!r} overlaps another pair")
        perm[ia], perm[ib] = ib, ia
    return perm


def left_right_axis(properties: dict, transpose_forward: Sequence[int], min_cos: float = 0.9) -> Optional[int]:
    """Axis of the preprocessed (transposed) array along which world x (L/R) changes, or None.

    ITK axis c has world direction column c; it is numpy axis (2 - c) of the original array (a 2D
    image's array is nnU-Net's (1, y, x)), and transposed axis j holds original axis transpose_forward[j].
    """
    sitk_stuff = properties.get("sitk_stuff")
    if not sitk_stuff or "direction" not in sitk_stuff:
        return None
    direction = np.asarray(sitk_stuff["direction"], dtype=np.float64)
    ndim = int(round(np.sqrt(direction.size)))
    direction = direction.reshape(ndim, ndim)
    column = int(np.argmax(np.abs(direction[0])))
    if abs(direction[0, column]) < min_cos:
        return None
    original_axis = 2 - column
    return list(transpose_forward).index(original_axis)


def dataset_left_right_axes(properties_list: Iterable[dict], transpose_forward: Sequence[int]) -> Tuple[Optional[int], ...]:
    """The distinct `left_right_axis` values over cases (None among them = undetermined case)."""
    return tuple(sorted({left_right_axis(p, transpose_forward) for p in properties_list}, key=lambda a: (a is None, a)))


class MirrorWithPairSwapTransform(MirrorTransform):
    """nnU-Net's MirrorTransform, plus: when `lr_axis` is flipped, label k becomes label p[k-1]+1 and
    keypoint row k becomes row p[k]. Keypoints (L, ndim) move to n - 1 - x along each flipped axis."""

    def __init__(self, allowed_axes: Tuple[int, ...], lr_axis: Optional[int], permutation: Sequence[int]):
        super().__init__(allowed_axes)
        self.lr_axis = lr_axis
        self.permutation = list(permutation)
        # lookup for label values -1 (nnU-Net's padding), 0 (background), 1..L
        self._lut = torch.tensor([-1, 0] + [p + 1 for p in self.permutation], dtype=torch.long)

    def get_parameters(self, **data_dict) -> dict:
        params = super().get_parameters(**data_dict)
        params["spatial_shape"] = tuple(data_dict["image"].shape[1:])
        return params

    def _apply_to_keypoints(self, keypoints: torch.Tensor, **params) -> torch.Tensor:
        kp = torch.as_tensor(keypoints, dtype=torch.float64).clone()
        for axis in params["axes"]:
            kp[:, axis] = params["spatial_shape"][axis] - 1 - kp[:, axis]
        if self.lr_axis is not None and self.lr_axis in params["axes"]:
            if kp.shape[0] != len(self.permutation):
                raise ValueError(f"{kp.shape[0]} keypoints but a pair permutation of {len(self.permutation)} landmarks")
            kp = kp[torch.as_tensor(self.permutation)]  # new row i = old row p[i] (p is an involution)
        return kp

    def _apply_to_segmentation(self, segmentation: torch.Tensor, **params) -> torch.Tensor:
        segmentation = super()._apply_to_segmentation(segmentation, **params)
        if self.lr_axis is None or self.lr_axis not in params["axes"]:
            return segmentation
        if segmentation.max() > len(self.permutation) or segmentation.min() < -1:
            raise ValueError(f"label values outside -1..{len(self.permutation)} cannot be pair-swapped")
        return self._lut[segmentation.long() + 1].to(segmentation.dtype)
