"""What a training batch costs to make and carry: today's path (dense heatmaps drawn per sample in
the loader, LandmarkHeatmapTransform last) vs the product path (the loader carries the points,
LandmarkPointsTransform last, and the trainer draws the heatmaps on its device).

Both paths run the same loader with the same seeds, so each batch pair has the same patches and the
same augmentation draws (asserted: identical images); only the last transform differs.

- bytes: every tensor the batch carries out of the loader (image included);
- worker time: CPU seconds of `generate_train_batch` (nnU-Net's loader runs its transforms inside
  threadpool_limits(1)) plus moving the batch's tensors into shared memory, which is what sending it
  through the multiprocessing queue of nnU-Net's augmenter costs a worker;
- drawing: wall seconds of the trainer's `targets_from_points` on the batch (the part of the new
  training step that the worker did before), and the largest difference to the dense targets.

`afids_like_loader` builds the 32-landmark, 128^3 case without planning a dataset: nnU-Net's own
training transforms (3D rotation +-30 deg, scaling, mirroring with a left/right pair swap) on a
synthetic image, in nnU-Net's enlarged initial patch, cut by nnLandmarkDataLoader.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch


def batch_bytes(batch: dict) -> int:
    """Bytes of every tensor in the batch (lists of tensors included)."""
    total = 0
    for v in batch.values():
        for t in (v if isinstance(v, (list, tuple)) else [v]):
            if torch.is_tensor(t):
                total += t.numel() * t.element_size()
    return total


def shared_memory_seconds(batch: dict) -> float:
    """CPU seconds to move the batch's tensors into shared memory (what a worker's queue put does)."""
    t0 = time.process_time()
    for v in batch.values():
        for t in (v if isinstance(v, (list, tuple)) else [v]):
            if torch.is_tensor(t):
                t.share_memory_()
    return time.process_time() - t0


@contextlib.contextmanager
def last_transform(compose, transform):
    """Within the block, the pipeline's last transform is `transform`."""
    original = compose.transforms[-1]
    compose.transforms[-1] = transform
    try:
        yield
    finally:
        compose.transforms[-1] = original


def _one_batch(loader, seed: int) -> tuple:
    np.random.seed(seed)
    torch.manual_seed(seed)
    t0 = time.process_time()
    batch = loader.generate_train_batch()
    return batch, time.process_time() - t0


def compare_loader_paths(loader, compose, dense_transform, points_transform,
                         draw: Callable[[torch.Tensor, Sequence[int]], object], n_batches: int = 3,
                         warmup: int = 1) -> Dict:
    """Today's loader (dense_transform last) vs the new one (points_transform last) + the drawing,
    alternated over `warmup + n_batches` seeds; medians over the measured batches."""
    rows: Dict[str, List[float]] = {k: [] for k in ("old_s", "new_s", "old_shm_s", "new_shm_s", "draw_s")}
    sizes, max_diff = {}, 0.0
    for i in range(warmup + n_batches):
        with last_transform(compose, dense_transform):
            old, old_s = _one_batch(loader, 1000 + i)
        with last_transform(compose, points_transform):
            new, new_s = _one_batch(loader, 1000 + i)
        if not torch.equal(old["data"], new["data"]):
            raise RuntimeError("the two paths did not produce the same patches (seeding)")
        sizes = {"old": batch_bytes(old), "new": batch_bytes(new)}
        t0 = time.perf_counter()
        drawn = draw(new["target"], new["data"].shape[2:])
        draw_s = time.perf_counter() - t0
        dense = old["target"] if isinstance(old["target"], list) else [old["target"]]
        drawn = drawn if isinstance(drawn, list) else [drawn]
        max_diff = max([max_diff] + [float((a - b).abs().max()) for a, b in zip(dense, drawn)])
        old_shm, new_shm = shared_memory_seconds(old), shared_memory_seconds(new)
        del old, new, dense, drawn
        if i >= warmup:
            for k, v in zip(rows, (old_s, new_s, old_shm, new_shm, draw_s)):
                rows[k].append(v)
    med = {k: statistics.median(v) for k, v in rows.items()}
    old_t, new_t = med["old_s"] + med["old_shm_s"], med["new_s"] + med["new_shm_s"]
    return {"loader_bytes_per_batch_ratio": sizes["old"] / sizes["new"],
            "loader_time_per_batch_ratio": old_t / new_t,
            "loader_bytes_per_batch": sizes, "loader_cpu_s_per_batch": {"old": old_t, "new": new_t},
            "generate_train_batch_cpu_s": {"old": med["old_s"], "new": med["new_s"]},
            "shared_memory_cpu_s": {"old": med["old_shm_s"], "new": med["new_shm_s"]},
            "device_drawing_s_per_batch": med["draw_s"], "max_abs_diff_dense_vs_device": max_diff,
            "batches": n_batches, "all_s": rows}


class _SyntheticCases:
    """What nnUNetDataLoader reads from a dataset (identifiers, load_case): smooth random images,
    no label volume content beyond one voxel per landmark (the exact points are the targets)."""

    def __init__(self, shape: Sequence[int], points: Dict[str, np.ndarray], seed: int = 0):
        self.identifiers = sorted(points)
        self.shape, self.points = tuple(shape), points
        rng = np.random.default_rng(seed)
        small = torch.from_numpy(rng.standard_normal((1, 1, *[max(2, n // 8) for n in shape])).astype(np.float32))
        self.image = torch.nn.functional.interpolate(small, size=self.shape, mode="trilinear")[0].numpy()

    def load_case(self, identifier):
        pts = self.points[identifier]
        seg = np.zeros((1, *self.shape), dtype=np.int16)
        vox = np.clip(np.round(pts), 0, np.asarray(self.shape) - 1).astype(int)
        locations = {}
        for k, v in enumerate(vox):
            seg[(0, *v)] = k + 1
            locations[k + 1] = np.concatenate([[0], v])[None]
        return self.image, seg, None, {"class_locations": locations}


def afids_like_loader(patch: Sequence[int] = (128, 128, 128), n_landmarks: int = 32, batch_size: int = 2,
                      image_shape: Sequence[int] = (176, 208, 176), seed: int = 0):
    """(loader, its ComposeTransforms, landmark pairs permutation, deep-supervision scales) for
    `n_landmarks` points (16 left/right pairs) spread over the brain-sized image, nnU-Net's 3D
    training transforms made landmark-aware (exact points)."""
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    from nnlandmark_h3de.heatmaps import make_landmark_aware
    from nnlandmark_h3de.training.landmark_data_loader import nnLandmarkDataLoader
    rng = np.random.default_rng(seed)
    centre = (np.asarray(image_shape) - 1) / 2
    points = {f"case{i}": centre + rng.uniform(-0.3, 0.3, (n_landmarks, 3)) * np.asarray(image_shape)
              for i in range(4)}
    rotation = (-30 / 360 * 2 * np.pi, 30 / 360 * 2 * np.pi)
    initial = get_patch_size(patch, rotation, rotation, rotation, (0.85, 1.25))
    compose = nnUNetTrainer.get_training_transforms(list(patch), rotation, None, (0, 1, 2), False)
    perm = [i + 1 if i % 2 == 0 else i - 1 for i in range(n_landmarks)]  # pairs (0, 1), (2, 3), ...
    compose = make_landmark_aware(compose, 2, perm, exact_points=True)
    compose.transforms.append(None)  # the last transform: set by compare_loader_paths' caller
    labels = {"background": 0, **{f"l{i}": i + 1 for i in range(n_landmarks)}}
    loader = nnLandmarkDataLoader(_SyntheticCases(image_shape, points, seed), batch_size, initial, list(patch),
                                  LabelManager(labels, regions_class_order=None), oversample_foreground_percent=0.33,
                                  transforms=compose, points_by_case=points)
    pools = [[1, 1, 1]] + [[2, 2, 2]] * 5  # nnU-Net's 3d_fullres topology for a 128^3 patch
    ds_scales = [list(s) for s in 1 / np.cumprod(np.vstack(pools), axis=0)][:-1]
    return loader, compose, ds_scales
