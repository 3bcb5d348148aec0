"""The last transform of the landmark pipelines: the augmented patch's landmarks as the target.

`LandmarkPointsTransform` (what the trainers use) replaces the segmentation by the landmarks' points
(L, ndim) float64, NaN rows for landmarks absent from the patch. nnU-Net's loader batches whatever
the transforms leave in `segmentation` as `target`, so a batch carries B x L x ndim numbers next to
the image and the trainer draws the heatmaps on its device (nnLandmarkTrainer.targets_from_points).

`LandmarkHeatmapTransform` draws the dense heatmaps right there instead, per sample on the CPU: the
pipeline as it was before the targets moved to the device, kept as the reference the device drawing
is tested against and for benchmarks (bench_train_step.py measures both).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform

from nnlandmark_h3de.heatmaps.gaussian_heatmap import GaussianTargets, HeatmapTargets, ball_centres, keypoint_centres

__all__ = ["LandmarkPointsTransform", "LandmarkHeatmapTransform"]


class LandmarkPointsTransform(BasicTransform):
    """Replaces the label patch (1, ...) by the landmarks' points (L, ndim) in the patch, NaN = absent.

    from_keypoints: take the landmarks from the `keypoints` entry (exact points); a pipeline that lost
        them is an error. False: the centres of the label balls (datasets without exact points), with
        the partial-ball rule of gaussian_heatmap.py (expected_voxels / min_visible_fraction).
    """

    def __init__(self, num_landmarks: int, expected_voxels: Optional[float] = None,
                 min_visible_fraction: float = 0.5, from_keypoints: bool = False):
        super().__init__()
        if num_landmarks < 1:
            raise ValueError(f"num_landmarks must be >= 1, got {num_landmarks}")
        self.num_landmarks = int(num_landmarks)
        self.expected_voxels = expected_voxels
        self.min_visible_fraction = float(min_visible_fraction)
        self.from_keypoints = bool(from_keypoints)

    def centres(self, data_dict) -> Tuple[torch.Tensor, torch.Tensor, Tuple[int, ...]]:
        """(centres (L, ndim) float64 NaN where absent, present (L,), patch shape) of this sample."""
        segmentation = data_dict.get("segmentation")
        if segmentation is None:
            raise ValueError(f"{type(self).__name__} needs the 'segmentation' entry (its patch shape, or its balls)")
        shape = tuple(segmentation.shape[1:])
        if self.from_keypoints:
            keypoints = data_dict.get("keypoints")
            if keypoints is None:
                raise ValueError(f"{type(self).__name__}(from_keypoints=True): the data has no 'keypoints' "
                                 "(a transform without keypoint support dropped them, or the loader did not add them)")
            if keypoints.shape[0] != self.num_landmarks:
                raise ValueError(f"{keypoints.shape[0]} keypoints for {self.num_landmarks} landmarks")
            centres, present = keypoint_centres(keypoints, shape)
        else:
            centres, present = ball_centres(segmentation[0], self.num_landmarks, self.expected_voxels,
                                            self.min_visible_fraction)
        return centres, present, shape

    def apply(self, data_dict, **params):
        centres, _, _ = self.centres(data_dict)
        data_dict["segmentation"] = centres.contiguous()
        return data_dict


class LandmarkHeatmapTransform(LandmarkPointsTransform):
    """The dense CPU path: replaces the label patch by float heatmaps (L, ...), or a list of them, one
    per deep-supervision scale (full resolution first). The trainers draw the same values on their
    device from LandmarkPointsTransform's points instead (see the module doc).

    sigma: voxels of the target spacing at full resolution (scalar or one per axis);
    targets: the drawing (default GaussianTargets(sigma, ds_scales)).
    """

    def __init__(self, num_landmarks: int, sigma: Union[float, Sequence[float]] = 4.0,
                 ds_scales: Optional[Sequence[Sequence[float]]] = None,
                 expected_voxels: Optional[float] = None, min_visible_fraction: float = 0.5,
                 from_keypoints: bool = False, targets: Optional[HeatmapTargets] = None):
        super().__init__(num_landmarks, expected_voxels, min_visible_fraction, from_keypoints)
        self.sigma = sigma
        self.targets = targets if targets is not None else GaussianTargets(sigma, ds_scales)

    @property
    def ds_scales(self):
        return self.targets.ds_scales

    def apply(self, data_dict, **params):
        centres, present, shape = self.centres(data_dict)
        data_dict["segmentation"] = self.targets.render_scales(centres, present, shape)
        return data_dict
