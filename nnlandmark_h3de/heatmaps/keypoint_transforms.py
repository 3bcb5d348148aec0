"""Exact landmark points (`keypoints`) carried through nnU-Net's augmentation, next to the patch.

batchgeneratorsv2 reserves a `keypoints` entry and `_apply_to_keypoints` in its transforms but does
not implement it; these subclasses do, for the transforms nnU-Net's default pipeline uses.

Keypoints: a float64 tensor (L, ndim) of continuous array indices of the current image (voxel
centres at integers), one row per landmark in channel order, NaN rows for absent landmarks. A point
that leaves the patch keeps its coordinates (the heatmap transform decides what is "in the patch").

The spatial transform samples output voxel o from input position p = A (o - (P - 1) / 2) + c - 1/2
(P: patch size, c: `center_location_in_pixels`, A: rotation x scaling; grid_sample with
align_corners=False), so a point moves to o = A^-1 (p - c + 1/2) + (P - 1) / 2. Without rotation
or scaling it crops: o = p - floor(c) + P // 2. An elastic deformation (off by default in nnU-Net, a
trainer's `elastic_deformation` turns it on) has no closed-form inverse: each point is found in the
sampling grid itself by fixed-point iteration (`invert_sampling_grid`).
"""
from __future__ import annotations

import copy
import math
from typing import Optional, Sequence

import numpy as np
import torch

from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform

from nnlandmark_h3de.heatmaps.mirror_pairs import MirrorWithPairSwapTransform

__all__ = ["SpatialTransformWithKeypoints", "invert_sampling_grid", "Convert3DTo2DWithKeypoints",
           "Convert2DTo3DWithKeypoints", "LabelsToPaddingMaskTransform", "as_keypoints", "make_landmark_aware"]


def as_keypoints(points) -> torch.Tensor:
    """(L, ndim) float64 tensor from any array-like (NaN rows = absent)."""
    kp = torch.as_tensor(np.asarray(points, dtype=np.float64))
    if kp.ndim != 2:
        raise ValueError(f"keypoints must be (L, ndim), got shape {tuple(kp.shape)}")
    return kp


def invert_sampling_grid(grid: torch.Tensor, input_shape: Sequence[int], affine, points: torch.Tensor,
                         iterations: int = 30, tolerance: float = 1e-4) -> torch.Tensor:
    """Output indices o (N, ndim) where a grid_sample grid (align_corners=False) samples input indices `points`.

    The grid maps o to input index I(o) = (flip(grid(o)) + 1) S / 2 - 1/2, i.e. (o + elastic offset(o)) A^T + t:
    near-affine, so o <- o + (p - I(o)) A^-T converges while the offsets' gradient stays under 1 (smooth
    fields). I between voxels is linear (scipy's map_coordinates); beyond the patch it continues along A (a
    point outside keeps coordinates outside, as the crop path gives). NaN rows stay NaN.
    """
    ndim = len(input_shape)
    size = torch.tensor([float(s) for s in input_shape], dtype=torch.float64)
    field = (torch.flip(grid.double(), (-1,)) + 1) * size / 2 - 0.5  # (*patch, ndim) input index per voxel
    a = np.eye(ndim) if affine is None else np.asarray(affine, dtype=np.float64)
    step = torch.as_tensor(np.linalg.inv(a).T)
    hi = torch.tensor([float(n - 1) for n in field.shape[:-1]], dtype=torch.float64)
    a_t = torch.as_tensor(a.T)
    p = torch.as_tensor(points, dtype=torch.float64)
    ok = torch.isfinite(p).all(1)
    o = (hi / 2).expand_as(p[ok]).clone()
    for _ in range(iterations):
        inside = torch.minimum(torch.clamp(o, min=0), hi)
        sampled = _linear_at(field, inside) + (o - inside) @ a_t
        move = (p[ok] - sampled) @ step
        o += move
        if move.abs().max() < tolerance:
            break
    out = torch.full_like(p, float("nan"))
    out[ok] = o
    return out


def _linear_at(field: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """field (*shape, C) linearly interpolated at continuous indices `at` (N, ndim) inside the shape."""
    from scipy.ndimage import map_coordinates
    values = field.numpy()
    coords = at.numpy().T
    return torch.from_numpy(np.stack([map_coordinates(values[..., c], coords, order=1, mode="nearest")
                                      for c in range(values.shape[-1])], 1))


class SpatialTransformWithKeypoints(SpatialTransform):
    """nnU-Net's SpatialTransform (crop, rotation, scaling, elastic deformation) that also moves the keypoints."""

    def get_parameters(self, **data_dict) -> dict:
        params = super().get_parameters(**data_dict)
        params["input_shape"] = tuple(data_dict["image"].shape[1:])  # the grid's normalisation, for the inverse
        return params

    def _apply_to_keypoints(self, keypoints: torch.Tensor, **params) -> torch.Tensor:
        if params.get("elastic_offsets") is not None:
            return invert_sampling_grid(params["grid"], params["input_shape"], params["affine"], keypoints)
        kp = torch.as_tensor(keypoints, dtype=torch.float64)
        size = torch.tensor([float(s) for s in self.patch_size], dtype=torch.float64)
        centre = torch.tensor([float(c) for c in params["center_location_in_pixels"]], dtype=torch.float64)
        if params["grid"] is None:
            floor_c = torch.tensor([math.floor(c) for c in params["center_location_in_pixels"]], dtype=torch.float64)
            return kp - floor_c + torch.floor(size / 2)
        affine = torch.as_tensor(np.asarray(params["affine"], dtype=np.float64))
        inv = torch.linalg.inv(affine)
        return (kp - centre + 0.5) @ inv.T + (size - 1) / 2


class Convert3DTo2DWithKeypoints(Convert3DTo2DTransform):
    """Dummy 2D augmentation: the first spatial axis is folded into channels, so keypoints lose their
    first coordinate until Convert2DTo3DWithKeypoints puts it back (it is never augmented)."""

    def apply(self, data_dict, **params):
        kp = data_dict.get("keypoints")
        if kp is not None:
            data_dict["keypoints_axis0"] = kp[:, :1].clone()
        return super().apply(data_dict, **params)

    def _apply_to_keypoints(self, keypoints, **params):
        return keypoints[:, 1:].clone()


class Convert2DTo3DWithKeypoints(Convert2DTo3DTransform):
    """Inverse of Convert3DTo2DWithKeypoints."""

    def get_parameters(self, **data_dict) -> dict:
        params = super().get_parameters(**data_dict)
        params["keypoints_axis0"] = data_dict.get("keypoints_axis0")
        return params

    def apply(self, data_dict, **params):
        data_dict = super().apply(data_dict, **params)
        data_dict.pop("keypoints_axis0", None)
        return data_dict

    def _apply_to_keypoints(self, keypoints, **params):
        axis0: Optional[torch.Tensor] = params.get("keypoints_axis0")
        if axis0 is None:
            raise RuntimeError("Convert2DTo3DWithKeypoints without a preceding Convert3DTo2DWithKeypoints")
        return torch.cat([axis0.to(keypoints.dtype), keypoints], 1)


class LabelsToPaddingMaskTransform(BasicTransform):
    """With exact keypoints the label balls are no longer targets: keep only what nnU-Net's later
    transforms read from the segmentation (-1 = padding outside the image, 0 = inside), so the
    spatial transform resamples two labels instead of L + 1."""

    def apply(self, data_dict, **params):
        seg = data_dict.get("segmentation")
        if seg is not None:
            data_dict["segmentation"] = torch.where(seg < 0, -1, 0).to(seg.dtype)
        return data_dict


_KEYPOINT_VERSIONS = {SpatialTransform: SpatialTransformWithKeypoints,
                      Convert3DTo2DTransform: Convert3DTo2DWithKeypoints,
                      Convert2DTo3DTransform: Convert2DTo3DWithKeypoints}
_LANDMARK_AWARE = tuple(_KEYPOINT_VERSIONS.values()) + (MirrorWithPairSwapTransform,)


def make_landmark_aware(compose: ComposeTransforms, lr_axis: Optional[int], permutation: Sequence[int],
                        exact_points: bool) -> ComposeTransforms:
    """nnU-Net's pipeline, in place: mirroring with pair swap; with exact points, keypoint-aware
    spatial and dummy-2D transforms (nnU-Net's settings kept) and the labels reduced to the padding
    mask. A transform that moves voxels without landmark support is an error, never a silent skip."""
    moves_voxels = (MirrorTransform,) + (tuple(_KEYPOINT_VERSIONS) if exact_points else ())
    for i, t in enumerate(compose.transforms):
        if type(t) is MirrorTransform:
            compose.transforms[i] = MirrorWithPairSwapTransform(t.allowed_axes, lr_axis, permutation)
        elif exact_points and type(t) in _KEYPOINT_VERSIONS:
            new = copy.copy(t)  # nnU-Net's settings as they are; the subclass only adds keypoint methods
            new.__class__ = _KEYPOINT_VERSIONS[type(t)]
            compose.transforms[i] = new
        elif isinstance(t, moves_voxels) and not isinstance(t, _LANDMARK_AWARE):
            raise TypeError(f"{type(t).__name__} in the training transforms moves voxels but has no landmark "
                            "support (pair swap / keypoints): subclass the landmark-aware version instead")
    if exact_points:
        compose.transforms.insert(0, LabelsToPaddingMaskTransform())
    return compose
