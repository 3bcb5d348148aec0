"""Landmark positions in an augmented patch, and their heatmap targets (one per landmark and scale).

Why the targets are drawn late: the heatmap comes LAST, after nnU-Net's crop and spatial augmentation,
from wherever the augmentation put each landmark; and it is drawn where the network runs: nnU-Net's
loader carries only the points (LandmarkPointsTransform, target_transforms.py: (L, ndim) per sample,
B x L x ndim per batch), and the trainer draws every deep-supervision scale on its device
(`HeatmapTargets`). Dense (L, *patch) float volumes through the loader's worker processes would be
~270 MB per sample for 32 landmarks at 128^3. Two sources of the position:
- exact points (`keypoints`, see keypoint_transforms.py): the converter's world coordinates mapped
  into the preprocessed grid and moved by the same crop/rotation/scaling/mirroring as the image. A
  landmark is present in the patch when its point lies within the patch's voxels
  (-0.5 <= x <= n - 0.5 on every axis); no limit on how close landmarks are or how coarse the grid is;
- label balls (fallback for hand-made datasets without landmarks.json): the sub-voxel centre of
  mass of each ball (one pass over the foreground voxels: bincount / index_add by label value).
The Gaussian is a separable outer product of one 1D profile per axis per landmark, so the cost is one
write of the (..., L, *shape) target per scale.

Ball presence rule (an absent landmark has a NaN point and an all-zero heatmap): the ball has at
least one voxel in the patch AND either it does not touch the patch border (the whole ball is
visible, whatever the scaling augmentation did to its size) or its visible voxel count is at least
`min_visible_fraction` of the ball's expected volume. A ball cut by the border has a centre of mass
biased towards the inside (3/8 of the radius for half a ball), so slivers must not become targets.
Without an expected volume, every ball touching the border counts as absent.

Deep supervision: nnU-Net's decoder output k has shape round(n * s_k) and its voxel i covers the
full-resolution interval centred on (i + 0.5) / s_k - 0.5; a full-resolution point c is therefore
at (c + 0.5) * s_k - 0.5 there, with sigma * s_k.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch

__all__ = ["ball_centres", "keypoint_centres", "gaussian_heatmaps", "expected_ball_voxels", "HeatmapTargets",
           "GaussianTargets"]


def expected_ball_voxels(radius_mm: Optional[float], spacing: Sequence[float]) -> Optional[float]:
    """Voxel count of a ball of `radius_mm` on a grid of `spacing` (mm per axis); None if unknown.
    A 2D grid (two spacings) holds the ball's disk (2D datasets draw disks)."""
    if radius_mm is None or radius_mm <= 0:
        return None
    vol = math.pi * radius_mm ** 2 if len(spacing) == 2 else 4.0 / 3.0 * math.pi * radius_mm ** 3
    return vol / math.prod(float(s) for s in spacing)


def ball_centres(label_map: torch.Tensor, num_landmarks: int, expected_voxels: Optional[float] = None,
                 min_visible_fraction: float = 0.5) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sub-voxel centre of mass of every label 1..L in `label_map` (spatial dims only).

    Returns centres (L, ndim) float64 (NaN where absent) and present (L,) bool (see module doc).
    """
    shape = label_map.shape
    ndim = label_map.ndim
    fg = label_map > 0
    coords = fg.nonzero()  # (N, ndim), row-major like label_map[fg]
    labels = label_map[fg].long() - 1
    if labels.numel() and int(labels.max()) >= num_landmarks:
        raise ValueError(f"label value {int(labels.max()) + 1} in the patch but only {num_landmarks} landmarks "
                         "(labels must be 1..L, one per landmark; is dataset.json's `labels` complete?)")
    counts = torch.bincount(labels, minlength=num_landmarks)
    sums = torch.zeros((num_landmarks, ndim), dtype=torch.float64).index_add_(0, labels, coords.double())
    present = counts > 0
    centres = sums / counts.clamp(min=1)[:, None]
    centres[~present] = float("nan")
    if bool(present.any()):
        index = labels[:, None].expand(-1, ndim)
        big = max(shape)
        mins = torch.full((num_landmarks, ndim), big, dtype=torch.long).scatter_reduce(0, index, coords, "amin")
        maxs = torch.full((num_landmarks, ndim), -1, dtype=torch.long).scatter_reduce(0, index, coords, "amax")
        upper = torch.tensor(shape, dtype=torch.long) - 1
        touches = ((mins == 0) | (maxs == upper)).any(1)
        if expected_voxels is None:
            enough = torch.zeros_like(present)
        else:
            enough = counts.double() >= min_visible_fraction * float(expected_voxels)
        present &= ~touches | enough
        centres[~present] = float("nan")
    return centres, present


def keypoint_centres(keypoints: torch.Tensor, shape: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact points (L, ndim) in patch voxels -> centres (NaN where absent) and present (L,): a point
    counts when it is finite and lies within the patch's voxels (-0.5 <= x <= n - 0.5 per axis)."""
    kp = torch.as_tensor(keypoints, dtype=torch.float64)
    if kp.ndim != 2 or kp.shape[1] != len(shape):
        raise ValueError(f"keypoints of shape {tuple(kp.shape)} do not match a {len(shape)}D patch")
    upper = torch.tensor([n - 0.5 for n in shape], dtype=torch.float64)
    finite = torch.isfinite(kp).all(1)
    inside = ((kp >= -0.5) & (kp <= upper)).all(1)
    present = finite & inside
    centres = kp.clone()
    centres[~present] = float("nan")
    return centres, present


def axis_profiles(centres: torch.Tensor, present: torch.Tensor, shape: Sequence[int]):
    """Per axis: (the voxel grid minus each centre) (..., L, n_axis) in the centres' dtype and device
    (absent centres at 0), and the view that puts that axis in place in a (..., L, *shape) tensor."""
    lead = list(centres.shape[:-1])
    zero = torch.zeros((), dtype=centres.dtype, device=centres.device)
    for axis, n in enumerate(shape):
        grid = torch.arange(n, dtype=centres.dtype, device=centres.device)
        c = torch.where(present, centres[..., axis], zero)
        view = lead + [1] * len(shape)
        view[len(lead) + axis] = n
        yield axis, grid - c[..., None], view


def gaussian_heatmaps(centres: torch.Tensor, present: torch.Tensor, shape: Sequence[int],
                      sigma: Sequence[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(..., L, *shape) heatmaps exp(-|x - c|^2 / 2 sigma^2) (peak 1 at c), zeros where not present.

    centres (..., L, ndim), present (..., L); on their device. Built as an outer product of one 1D
    profile per axis: L * sum(shape) exponentials (in the centres' dtype), products in `dtype`.
    """
    out = None
    for axis, d, view in axis_profiles(centres, present, shape):
        prof = torch.exp(-0.5 * (d / float(sigma[axis])) ** 2)
        if axis == 0:
            prof = prof * present[..., None]
        prof = prof.to(dtype).view(view)
        out = prof if out is None else out * prof
    return out.contiguous()


def _per_axis(value, ndim: int) -> List[float]:
    return [float(value)] * ndim if not isinstance(value, (list, tuple)) else [float(v) for v in value]


class HeatmapTargets:
    """Heatmaps of points at full resolution, or one per deep-supervision scale (nnU-Net's
    `_get_deep_supervision_scales()` order: full resolution first), drawn on the points' device.

    width: the profile's width in voxels of the full-resolution patch (scalar or one per axis);
    subclasses define the profile in `render`.
    """

    def __init__(self, width: Union[float, Sequence[float]], ds_scales: Optional[Sequence[Sequence[float]]] = None):
        self.width = width
        self.ds_scales = None if ds_scales is None else [tuple(float(x) for x in s) for s in ds_scales]

    def __call__(self, points: torch.Tensor, shape: Sequence[int]) -> Union[torch.Tensor, List[torch.Tensor]]:
        """points (..., L, ndim) indices in the patch (NaN rows = absent, as the loader gives them)."""
        if points.ndim < 2 or points.shape[-1] != len(shape):
            raise ValueError(f"points of shape {tuple(points.shape)} do not match a {len(shape)}D patch "
                             "(expected (..., L, ndim), NaN rows for absent landmarks)")
        # float64 profiles where the device has it (the loader's points are float64); MPS has no float64
        dtype = torch.float32 if points.device.type == "mps" else torch.float64
        return self.render_scales(points.to(dtype), torch.isfinite(points).all(-1), shape)

    def render_scales(self, centres: torch.Tensor, present: torch.Tensor,
                      shape: Sequence[int]) -> Union[torch.Tensor, List[torch.Tensor]]:
        """The target at full resolution, or one per deep-supervision scale."""
        ndim = len(shape)
        if self.ds_scales is None:
            return self.render(centres, present, shape, [1.0] * ndim)
        results = []
        for s in self.ds_scales:
            if len(s) != ndim:
                raise ValueError(f"deep supervision scale {s} does not match a {ndim}D patch")
            new_shape = [round(n * f) for n, f in zip(shape, s)]
            ratio = [m / n for m, n in zip(new_shape, shape)]
            c = (centres + 0.5) * centres.new_tensor(ratio) - 0.5
            results.append(self.render(c, present, new_shape, ratio))
        return results

    def widths(self, ndim: int, ratio: Sequence[float]) -> List[float]:
        """The profile width per axis at a scale of `ratio` voxels per full-resolution voxel."""
        width = _per_axis(self.width, ndim)
        if len(width) != ndim:
            raise ValueError(f"heatmap width {self.width} does not match a {ndim}D patch")
        return [w * r for w, r in zip(width, ratio)]

    def render(self, centres: torch.Tensor, present: torch.Tensor, shape: Sequence[int],
               ratio: Sequence[float]) -> torch.Tensor:
        raise NotImplementedError


class GaussianTargets(HeatmapTargets):
    """Gaussians of `sigma` voxels (the nnLandmark paper's target)."""

    def __init__(self, sigma: Union[float, Sequence[float]] = 4.0,
                 ds_scales: Optional[Sequence[Sequence[float]]] = None):
        super().__init__(sigma, ds_scales)

    def render(self, centres, present, shape, ratio):
        return gaussian_heatmaps(centres, present, shape, self.widths(len(shape), ratio))
