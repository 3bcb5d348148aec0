"""The public nnLandmark code's default target: a linear distance ball, 1 at the landmark falling
to 0 at `radius` voxels (15 there), instead of the paper's Gaussian. Same centres, presence rule
and deep-supervision scales as the Gaussian targets; only the profile differs."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from nnlandmark_h3de.heatmaps.gaussian_heatmap import HeatmapTargets, axis_profiles
from nnlandmark_h3de.heatmaps.target_transforms import LandmarkHeatmapTransform

__all__ = ["LinearBallTargets", "LinearBallHeatmapTransform", "linear_ball_heatmaps"]


def linear_ball_heatmaps(centres: torch.Tensor, present: torch.Tensor, shape: Sequence[int],
                         radius: Sequence[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(..., L, *shape) max(0, 1 - |x - c| / radius) (per-axis radius), zeros where not present."""
    d2 = None
    for axis, d, view in axis_profiles(centres, present, shape):
        term = ((d / float(radius[axis])) ** 2).to(dtype).view(view)
        d2 = term if d2 is None else d2 + term
    out = (1 - d2.sqrt()).clamp_(min=0)
    return out * present.to(dtype).view(*present.shape, *([1] * len(shape)))


class LinearBallTargets(HeatmapTargets):
    """Linear balls of `radius` voxels, drawn on the points' device (see HeatmapTargets)."""

    def __init__(self, radius: Union[float, Sequence[float]] = 15.0,
                 ds_scales: Optional[Sequence[Sequence[float]]] = None):
        super().__init__(radius, ds_scales)

    def render(self, centres, present, shape, ratio):
        return linear_ball_heatmaps(centres, present, shape, self.widths(len(shape), ratio))


class LinearBallHeatmapTransform(LandmarkHeatmapTransform):
    """The dense CPU path of LinearBallTargets (reference, like LandmarkHeatmapTransform)."""

    def __init__(self, num_landmarks: int, radius: Union[float, Sequence[float]] = 15.0,
                 ds_scales: Optional[Sequence[Sequence[float]]] = None,
                 expected_voxels: Optional[float] = None, min_visible_fraction: float = 0.5,
                 from_keypoints: bool = False):
        super().__init__(num_landmarks, sigma=radius, expected_voxels=expected_voxels,
                         min_visible_fraction=min_visible_fraction, from_keypoints=from_keypoints,
                         targets=LinearBallTargets(radius, ds_scales))
        self.radius = radius
