"""nnU-Net's data loader, plus each case's exact landmark points handed to the transforms as `keypoints`.

The converter keeps every landmark's world coordinates (`landmarks.json`); `exact_points_per_case`
maps them once into each case's preprocessed grid (nnU-Net's transpose, crop and resampling, inverted
by `world_to_network_index`). For every patch the loader shifts them by the patch's crop origin
(`get_bbox`), and the transforms move them with the image (keypoint_transforms.py) until the last
one (LandmarkPointsTransform) makes them the batch's target, B x L x ndim (the trainer draws the
heatmaps from them on its device).

nnUNetDataLoader.generate_train_batch loads, crops and transforms one case at a time
(get_indices -> per key: load_case, get_bbox, transforms), so the loader records the keys and the
crop origin in its own `get_indices` / `get_bbox` and wraps the transforms: no nnU-Net code copied.
`nnUNetTrainer.get_dataloaders` builds `nnUNetDataLoader` by its module-level name;
`loaders_built_as` substitutes ours for the duration of that call.

2D configurations: nnU-Net crops a (1, y, x) slab (patch size (1, py, px)) and drops the slice axis;
the keypoints do the same: a point belongs to the slice when it lies within half a voxel of it (a
2D image has one slice, so all its points do), the others are absent from that patch.
"""
from __future__ import annotations

import contextlib
import functools
import sys
from os.path import join
from typing import Callable, Dict, Iterable, Optional

import numpy as np
import torch

from batchgenerators.utilities.file_and_folder_operations import load_pickle
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

from nnlandmark_h3de.inference.index_mapping import world_to_network_index
from nnlandmark_h3de.landmarks.landmark_set import LandmarkSet

__all__ = ["nnLandmarkDataLoader", "exact_points_per_case", "loaders_built_as"]


def exact_points_per_case(landmarks: Dict[str, LandmarkSet], case_ids: Iterable[str], preprocessed_folder: str,
                          plans_manager, configuration_manager, source: str = "landmarks.json") -> Dict[str, np.ndarray]:
    """Case id -> (L, 3) continuous indices into its preprocessed array (NaN rows = absent)."""
    out = {}
    for case in case_ids:
        if case not in landmarks:
            raise KeyError(f"{source}: no landmarks for training case {case!r} (was the dataset converted again "
                           "without re-running nnUNetv2_plan_and_preprocess?)")
        properties = load_pickle(join(preprocessed_folder, case + ".pkl"))
        out[case] = world_to_network_index(landmarks[case].points_lps, properties, plans_manager, configuration_manager)
    return out


class _TransformsWithKeypoints:
    """Calls the wrapped transforms with the current patch's keypoints added."""

    def __init__(self, transforms, current_keypoints: Callable[[], torch.Tensor]):
        self.transforms = transforms
        self.current_keypoints = current_keypoints

    def __call__(self, **data_dict):
        data_dict["keypoints"] = self.current_keypoints()
        return self.transforms(**data_dict)


class nnLandmarkDataLoader(nnUNetDataLoader):
    """nnUNetDataLoader whose transforms also receive `keypoints`: (L, ndim) float64 patch indices
    (ndim = 2 for a 2D configuration: see the module doc).

    `centre_jitter` (voxels per axis, or None): the foreground-oversampled patches are centred on one
    landmark (drawn at random among the case's points inside the image) moved by a uniform offset of
    up to +-centre_jitter, instead of on a random voxel of a label ball. For a local stage that is only
    asked about the neighbourhood of a global estimate: it learns what it will be shown (the
    landmark, somewhere within the global stage's error of the patch centre). nnU-Net still places
    and clips the patch (its get_bbox, given that one voxel as the foreground location).
    """

    def __init__(self, *args, points_by_case: Dict[str, np.ndarray], centre_jitter: Optional[np.ndarray] = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.centre_jitter = None if centre_jitter is None else np.asarray(centre_jitter, dtype=np.float64)
        missing = [k for k in self.indices if k not in points_by_case]
        if missing:
            raise KeyError(f"no exact landmark points for cases {missing[:5]}")
        self.points_by_case = points_by_case
        if self.transforms is None:
            raise ValueError("nnLandmarkDataLoader needs transforms ending in LandmarkPointsTransform "
                             "(the keypoints become the target there)")
        self.transforms = _TransformsWithKeypoints(self.transforms, self._current_keypoints)
        self._keys, self._next, self._origin = [], 0, None

    def get_indices(self):
        self._keys, self._next = list(super().get_indices()), 0
        return self._keys

    def get_bbox(self, data_shape, force_fg, class_locations, overwrite_class=None, verbose=False):
        if force_fg and self.centre_jitter is not None:
            centre = self._jittered_landmark(self._keys[self._next], np.asarray(data_shape))
            if centre is not None:
                class_locations, overwrite_class = {1: np.concatenate([[0], centre])[None]}, 1
        lbs, ubs = super().get_bbox(data_shape, force_fg, class_locations, overwrite_class, verbose)
        self._origin = (self._keys[self._next], np.asarray(lbs, dtype=np.float64))
        self._next += 1
        return lbs, ubs

    def _jittered_landmark(self, case: str, shape: np.ndarray) -> Optional[np.ndarray]:
        """A random landmark of the case inside the image, moved by the jitter, as an integer voxel."""
        pts = self.points_by_case[case]
        inside = np.all(np.isfinite(pts) & (pts >= -0.5) & (pts <= shape - 0.5), axis=1)
        if not inside.any():
            return None
        p = pts[np.random.choice(np.flatnonzero(inside))]
        p = p + np.random.uniform(-1.0, 1.0, size=p.shape) * self.centre_jitter
        return np.clip(np.round(p), 0, shape - 1).astype(np.int64)

    def _current_keypoints(self) -> torch.Tensor:
        case, origin = self._origin
        points = self.points_by_case[case] - origin
        if self.patch_size_was_2d:
            points = np.where(np.abs(points[:, :1]) <= 0.5, points, np.nan)[:, 1:]
        return torch.from_numpy(np.ascontiguousarray(points))


@contextlib.contextmanager
def loaders_built_as(points_by_case: Optional[Dict[str, np.ndarray]], centre_jitter: Optional[np.ndarray] = None):
    """Within the block, nnUNetTrainer builds nnLandmarkDataLoader (no-op when points_by_case is None)."""
    if points_by_case is None:
        yield
        return
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    trainer_module = sys.modules[nnUNetTrainer.__module__]
    original = trainer_module.nnUNetDataLoader
    trainer_module.nnUNetDataLoader = functools.partial(nnLandmarkDataLoader, points_by_case=points_by_case,
                                                       centre_jitter=centre_jitter)
    try:
        yield
    finally:
        trainer_module.nnUNetDataLoader = original
