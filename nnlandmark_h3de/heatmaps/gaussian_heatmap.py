"""Landmark positions in an augmented patch -> one Gaussian heatmap per landmark (the training target).

Why here and not in preprocessing: the heatmap is built LAST, after nnU-Net's crop and spatial
augmentation, from wherever the augmentation put each landmark. Two sources of that position:
- exact points (`keypoints`, see keypoint_transforms.py): the converter's world coordinates mapped
  into the preprocessed grid and moved by the same crop/rotation/scaling/mirroring as the image. A
  landmark is present in the patch when its point lies within the patch's voxels
  (-0.5 <= x <= n - 0.5 on every axis); no limit on how close landmarks are or how coarse the grid is;
- label balls (fallback for hand-made datasets without landmarks.json): the sub-voxel centre of
  mass of each ball (one pass over the foreground voxels: bincount / index_add by label value).
The Gaussian is a separable outer product of three 1D profiles per landmark, so the cost is one
write of the (L, ...) target per scale.

Ball presence rule (a landmark whose channel is all zeros is "absent from this patch"): the ball has at
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

from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform

__all__ = ["LandmarkHeatmapTransform", "ball_centres", "keypoint_centres", "gaussian_heatmaps", "expected_ball_voxels"]


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


def gaussian_heatmaps(centres: torch.Tensor, present: torch.Tensor, shape: Sequence[int],
                      sigma: Sequence[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(L, *shape) heatmaps exp(-|x - c|^2 / 2 sigma^2) (peak 1 at c), zeros where not present.

    Built as an outer product of one 1D profile per axis: L * sum(shape) exponentials.
    """
    L = centres.shape[0]
    out = None
    for axis, n in enumerate(shape):
        grid = torch.arange(n, dtype=torch.float64)
        c = torch.where(present, centres[:, axis], torch.zeros((), dtype=torch.float64))
        prof = torch.exp(-0.5 * ((grid[None, :] - c[:, None]) / float(sigma[axis])) ** 2)
        if axis == 0:
            prof = prof * present[:, None]
        view = [L] + [1] * len(shape)
        view[axis + 1] = n
        prof = prof.to(dtype).view(view)
        out = prof if out is None else out * prof
    return out.contiguous()


class LandmarkHeatmapTransform(BasicTransform):
    """Replaces the label patch (1, ...) by float heatmaps (L, ...), or a list of them, one per
    deep-supervision scale (nnU-Net's `_get_deep_supervision_scales()` order: full resolution first).

    from_keypoints: take the landmarks from the `keypoints` entry (exact points); a pipeline that lost
        them is an error. False: from the label balls (datasets without exact points).
    sigma: voxels of the target spacing at full resolution (scalar or one per axis).
    expected_voxels / min_visible_fraction: the partial-ball rule of the module doc (balls only).
    """

    def __init__(self, num_landmarks: int, sigma: Union[float, Sequence[float]] = 4.0,
                 ds_scales: Optional[Sequence[Sequence[float]]] = None,
                 expected_voxels: Optional[float] = None, min_visible_fraction: float = 0.5,
                 from_keypoints: bool = False):
        super().__init__()
        if num_landmarks < 1:
            raise ValueError(f"num_landmarks must be >= 1, got {num_landmarks}")
        self.num_landmarks = int(num_landmarks)
        self.sigma = sigma
        self.ds_scales = None if ds_scales is None else [tuple(float(x) for x in s) for s in ds_scales]
        self.expected_voxels = expected_voxels
        self.min_visible_fraction = float(min_visible_fraction)
        self.from_keypoints = bool(from_keypoints)

    def apply(self, data_dict, **params):
        segmentation = data_dict.get("segmentation")
        if segmentation is None:
            raise ValueError("LandmarkHeatmapTransform needs the 'segmentation' entry (its patch shape, or its balls)")
        shape = tuple(segmentation.shape[1:])
        if self.from_keypoints:
            keypoints = data_dict.get("keypoints")
            if keypoints is None:
                raise ValueError("LandmarkHeatmapTransform(from_keypoints=True): the data has no 'keypoints' "
                                 "(a transform without keypoint support dropped them, or the loader did not add them)")
            if keypoints.shape[0] != self.num_landmarks:
                raise ValueError(f"{keypoints.shape[0]} keypoints for {self.num_landmarks} landmarks")
            centres, present = keypoint_centres(keypoints, shape)
        else:
            centres, present = ball_centres(segmentation[0], self.num_landmarks, self.expected_voxels,
                                            self.min_visible_fraction)
        data_dict["segmentation"] = self.render_scales(centres, present, shape)
        return data_dict

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
            ratio = torch.tensor([m / n for m, n in zip(new_shape, shape)], dtype=torch.float64)
            c = (centres + 0.5) * ratio - 0.5
            results.append(self.render(c, present, new_shape, [float(r) for r in ratio]))
        return results

    @staticmethod
    def _per_axis(value, ndim: int = 3) -> List[float]:
        return [float(value)] * ndim if not isinstance(value, (list, tuple)) else [float(v) for v in value]

    def render(self, centres: torch.Tensor, present: torch.Tensor, shape: Sequence[int],
               ratio: Sequence[float]) -> torch.Tensor:
        """The target at one scale; `ratio` = this scale's voxels per full-resolution voxel, per axis."""
        sigma = self._per_axis(self.sigma, len(shape))
        if len(sigma) != len(shape):
            raise ValueError(f"sigma {self.sigma} does not match a {len(shape)}D patch")
        return gaussian_heatmaps(centres, present, shape, [sg * r for sg, r in zip(sigma, ratio)])
