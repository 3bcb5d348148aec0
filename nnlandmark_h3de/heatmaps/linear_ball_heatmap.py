"""The public nnLandmark code's default target: a linear distance ball, 1 at the landmark falling
to 0 at `radius` voxels (15 there), instead of the paper's Gaussian. Same centres, presence rule
and deep-supervision scales as LandmarkHeatmapTransform; only the profile differs."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from nnlandmark_h3de.heatmaps.gaussian_heatmap import LandmarkHeatmapTransform

__all__ = ["LinearBallHeatmapTransform", "linear_ball_heatmaps"]


def linear_ball_heatmaps(centres: torch.Tensor, present: torch.Tensor, shape: Sequence[int],
                         radius: Sequence[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(L, *shape) max(0, 1 - |x - c| / radius) (per-axis radius), zeros where not present."""
    L = centres.shape[0]
    d2 = None
    for axis, n in enumerate(shape):
        grid = torch.arange(n, dtype=torch.float64)
        c = torch.where(present, centres[:, axis], torch.zeros((), dtype=torch.float64))
        term = (((grid[None, :] - c[:, None]) / float(radius[axis])) ** 2).to(dtype)
        view = [L] + [1] * len(shape)
        view[axis + 1] = n
        term = term.view(view)
        d2 = term if d2 is None else d2 + term
    out = (1 - d2.sqrt()).clamp_(min=0)
    return out * present.to(dtype).view([L] + [1] * len(shape))


class LinearBallHeatmapTransform(LandmarkHeatmapTransform):
    def __init__(self, num_landmarks: int, radius: Union[float, Sequence[float]] = 15.0,
                 ds_scales: Optional[Sequence[Sequence[float]]] = None,
                 expected_voxels: Optional[float] = None, min_visible_fraction: float = 0.5,
                 from_keypoints: bool = False):
        super().__init__(num_landmarks, sigma=radius, ds_scales=ds_scales, expected_voxels=expected_voxels,
                         min_visible_fraction=min_visible_fraction, from_keypoints=from_keypoints)
        self.radius = radius

    def render(self, centres, present, shape, ratio):
        radius = self._per_axis(self.radius, len(shape))
        return linear_ball_heatmaps(centres, present, shape, [r * f for r, f in zip(radius, ratio)])
