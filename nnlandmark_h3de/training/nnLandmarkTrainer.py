"""nnLandmarkTrainer: nnU-Net's trainer doing heatmap regression (the nnLandmark paper recipe).

What changes against nnUNetTrainer, and only that:
- targets: each case's exact landmark points (landmarks.json, mapped into the preprocessed grid) ride
  through the crop and augmentation as `keypoints` (nnLandmarkDataLoader, keypoint-aware spatial,
  mirror and dummy-2D transforms); the loader's target is those points, B x L x ndim with NaN rows
  for landmarks outside the patch (LandmarkPointsTransform, appended last, replacing
  DownsampleSegForDSTransform), and `train_step` / `validation_step` draw the Gaussian heatmaps of
  every deep-supervision scale on the training device (`targets_from_points`). The label balls then
  only serve nnU-Net's planning and foreground sampling. Datasets without landmarks.json fall back to
  the balls' centres of mass (computed in the loader's workers), with a warning;
- network: the plans' network with L outputs, wrapped to emit 1 + L channels (channel 0 = 0), so the
  stock predictor still runs; built in `build_landmark_body` (subclasses swap the body there);
- loss: MSE of sigmoid(channels 1..L) vs heatmaps, deep supervision weighted like nnU-Net;
- optimiser: Adam lr 5e-4, step decay x0.1 at 80 % of the epochs (800/1000), gradient norm clipped to 1;
- mirroring: the left/right array axis is mirrored only with the left/right pair labels swapped,
  and never at inference (the stock predictor cannot swap channels); see `_landmark_mirror_axes`;
- validation: radial error (mm) on the validation patches instead of pseudo Dice; best checkpoint
  by its moving average; the final validation writes <case>.mrk.json, summary.json and
  landmark_thresholds.json instead of segmentations.
"""
from __future__ import annotations

import os
import warnings
from os.path import isfile, join
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch._dynamo import OptimizedModule

from batchgenerators.utilities.file_and_folder_operations import load_pickle
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from nnunetv2.paths import nnUNet_raw
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.helpers import dummy_context

from nnlandmark_h3de.landmarks import landmark_names
from nnlandmark_h3de.heatmaps import (GaussianTargets, HeatmapTargets, LandmarkPointsTransform, dataset_left_right_axes,
                                      expected_ball_voxels, make_landmark_aware, pair_permutation)
from nnlandmark_h3de.training.landmark_data_loader import exact_points_per_case, loaders_built_as
from nnlandmark_h3de.training.landmark_loss import HeatmapMSELoss
from nnlandmark_h3de.training.landmark_network import LandmarkHeatmapNetwork
from nnlandmark_h3de.training.landmark_progress import LandmarkLocalLogger
from nnlandmark_h3de.training.landmark_validation import patch_radial_errors
from nnlandmark_h3de.training.step_lr import StepLRScheduler
from nnlandmark_h3de.training.validation_totals import summed_over_ranks
from nnlandmark_h3de.utilities.orientation import mixed_orientations_message

__all__ = ["nnLandmarkTrainer", "landmark_info_from_dataset_json"]


def landmark_info_from_dataset_json(dataset_json: dict, foreground_labels: Sequence[int]) -> dict:
    """names / pairs / ball_radius_mm from dataset.json's `landmarks` block, checked against `labels`.

    Without the block (a hand-made dataset) the label names are the landmark names, without pairs.
    """
    L = len(foreground_labels)
    if list(foreground_labels) != list(range(1, L + 1)):
        raise ValueError(f"landmark datasets need labels 1..L (one per landmark), got {list(foreground_labels)}")
    block = dataset_json.get("landmarks") or {}
    names = landmark_names(dataset_json)
    if len(names) != L:
        raise ValueError(f"dataset.json: {len(names)} landmark names but {L} foreground labels")
    pairs = [tuple(p) for p in block.get("pairs", [])]
    radius = block.get("ball_radius_mm")
    return {"names": names, "pairs": pairs, "ball_radius_mm": None if radius is None else float(radius)}


class nnLandmarkTrainer(nnUNetTrainer):
    heatmap_sigma = 4.0  # voxels of the target spacing (the paper's value)
    min_visible_fraction = 0.5  # of a ball's volume, for balls cut by the patch border
    mirror_left_right_with_pair_swap = True
    mirror_left_right_only = False  # True: anatomy's one mirror symmetry only, never upside-down or back-to-front
    # True: nnLandmarkPredictor adds the left/right test-time mirror (pair-swapped per case); the checkpoint's
    # inference axes leave it out for nnU-Net's stock predictor, which cannot swap
    mirror_left_right_at_inference = False
    # nnU-Net leaves elastic deformation off. (probability, smoothing sigma as a fraction of the patch edge
    # (range), largest displacement in voxels (range)) turns it on; the points follow it (keypoint_transforms.py)
    elastic_deformation: Optional[Tuple[float, Tuple[float, float], Tuple[float, float]]] = None
    learning_rate = 5e-4  # Adam (the paper's value)
    lr_schedule = "step"  # "step": x lr_gamma at lr_step_fraction (the paper's); "poly": nnU-Net's PolyLR
    lr_step_fraction = 0.8  # StepLR 800 / 1000 epochs
    lr_gamma = 0.1
    grad_clip_norm = 1.0
    # Local-stage training (two-stage prediction): None = nnU-Net's patch sampling; a distance in mm =
    # foreground patches centred on a landmark moved by up to this much (nnLandmarkDataLoader).
    local_patch_jitter_mm: Optional[float] = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.label_manager.has_regions or self.label_manager.has_ignore_label:
            raise ValueError(f"{self.__class__.__name__}: region labels / an ignore label are not landmark datasets")
        if len(self.configuration_manager.patch_size) not in (2, 3):
            raise ValueError(f"{self.__class__.__name__}: 2D or 3D configurations only, got patch size "
                             f"{self.configuration_manager.patch_size}")
        # a 2D configuration's patch axis a is axis a + 1 of the (1, y, x) / (z, y, x) preprocessed arrays
        self.patch_axis_offset = 3 - len(self.configuration_manager.patch_size)
        info = landmark_info_from_dataset_json(dataset_json, self.label_manager.foreground_labels)
        self.landmark_names: List[str] = info["names"]
        self.landmark_pairs = info["pairs"]
        self.ball_radius_mm: Optional[float] = info["ball_radius_mm"]
        self.num_landmarks = len(self.landmark_names)
        self.pair_permutation = pair_permutation(self.landmark_names, self.landmark_pairs)
        self.left_right_axis: Optional[int] = None  # set in configure_rotation_dummyDA_mirroring_and_inital_patch_size
        self.exact_points: Optional[dict] = None  # case -> (L, 3) preprocessed-grid indices; set in get_dataloaders
        self.initial_lr = self.learning_rate
        self.logger.local_logger = LandmarkLocalLogger()
        if self.device.type == "cpu" and hasattr(os, "sched_getaffinity"):
            # nnUNetv2_train sets one thread per core of the machine; in a container or under taskset only
            # the allowed cores exist, and oversubscribed OpenMP threads make CPU training many times slower
            from nnlandmark_h3de.utilities.cpu_threads import limit_torch_threads
            limit_torch_threads()

    # ------------------------------------------------------------------ network
    @staticmethod
    def build_landmark_body(plans_manager, configuration_manager, num_input_channels: int, num_landmarks: int,
                            enable_deep_supervision: bool = True) -> torch.nn.Module:
        """The network emitting L heatmap logits (list per scale under deep supervision); override to swap it."""
        return nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                        num_landmarks, enable_deep_supervision)

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> torch.nn.Module:
        """num_output_channels is nnU-Net's 1 + L (background + landmarks); the body makes L of them."""
        body = cls.build_landmark_body(plans_manager, configuration_manager, num_input_channels,
                                       num_output_channels - 1, enable_deep_supervision)
        return LandmarkHeatmapNetwork(body)

    def _unwrapped_network(self) -> LandmarkHeatmapNetwork:
        mod = self.network.module if self.is_ddp else self.network
        return mod._orig_mod if isinstance(mod, OptimizedModule) else mod

    def set_deep_supervision_enabled(self, enabled: bool):
        self._unwrapped_network().set_deep_supervision(enabled)

    # -------------------------------------------------------------- loss, optim
    def build_heatmap_loss(self) -> torch.nn.Module:
        return HeatmapMSELoss()

    def _build_loss(self):
        """nnU-Net's own loss construction (its deep-supervision weights, DDP rule included) with the
        heatmap loss put in place of Dice + CE."""
        loss = super()._build_loss()
        if isinstance(loss, DeepSupervisionWrapper):
            loss.loss = self.build_heatmap_loss()
            return loss
        return self.build_heatmap_loss()

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay)
        if self.lr_schedule == "poly":
            lr_scheduler = PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)
        elif self.lr_schedule == "step":
            step_size = max(1, int(round(self.lr_step_fraction * self.num_epochs)))
            lr_scheduler = StepLRScheduler(optimizer, self.initial_lr, step_size, self.lr_gamma)
        else:
            raise ValueError(f"{self.__class__.__name__}.lr_schedule must be 'step' or 'poly', got {self.lr_schedule!r}")
        self._add_grad_clip_hook(optimizer)
        return optimizer, lr_scheduler

    def _add_grad_clip_hook(self, optimizer):
        """Clip to `grad_clip_norm` right before every optimizer step. nnU-Net's train_step clips to 12
        first (a no-op after this one) and, with AMP, unscales before and skips steps with inf grads,
        so the hook always sees the true gradients of a step that is taken."""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        max_norm = self.grad_clip_norm

        def clip(opt, args, kwargs):
            torch.nn.utils.clip_grad_norm_(params, max_norm)

        optimizer.register_step_pre_hook(clip)

    # ------------------------------------------------------------ augmentation
    def _training_case_properties(self):
        tr_keys, _ = self.do_split()
        return [load_pickle(join(self.preprocessed_dataset_folder, k + ".pkl")) for k in tr_keys]

    def _landmark_mirror_axes(self, mirror_axes) -> Tuple[Tuple[int, ...], Optional[int]]:
        """(training mirror axes, left/right axis to pair-swap or None).

        Mirroring the left/right axis is only safe when it is the same array axis in every training
        case (direction + transpose_forward) and there are left/right pairs to swap (unpaired
        landmarks are taken as midline). An axis that is left/right in some case but cannot be
        swapped is not mirrored; if some case's left/right axis is unknown, nothing is mirrored.
        `mirror_left_right_only` keeps only the left/right axis (with its pair swap): no real scan shows
        anatomy upside down or back to front, so a small network need not learn those views.
        """
        if not mirror_axes:
            return tuple(mirror_axes or ()), None
        lr_axes = dataset_left_right_axes(self._training_case_properties(), self.plans_manager.transpose_forward)
        if None not in lr_axes:  # array axes -> patch axes; a 2D configuration's slice axis is never mirrored
            lr_axes = tuple(a - self.patch_axis_offset for a in lr_axes)  # -1: left/right across slices
            if all(a < 0 for a in lr_axes):
                return (() if self.mirror_left_right_only else tuple(mirror_axes)), None
        if None in lr_axes:
            self.print_to_log_file("Mirroring disabled: the left/right axis of some training case is unknown "
                                   "(no SimpleITK geometry or an oblique direction)")
            return (), None
        swappable = len(lr_axes) == 1 and self.landmark_pairs and self.mirror_left_right_with_pair_swap
        if swappable:
            kept = tuple(a for a in mirror_axes if a == lr_axes[0] or not self.mirror_left_right_only)
            self.print_to_log_file(f"Mirroring axes {kept}; left/right axis {lr_axes[0]} with "
                                   f"pair swap {self.landmark_pairs}")
            return kept, lr_axes[0]
        kept = tuple(a for a in mirror_axes if a not in lr_axes and not self.mirror_left_right_only)
        self.print_to_log_file(f"Mirroring axes {kept}: left/right axes {lr_axes} are not mirrored "
                               f"({'no left/right pairs' if not self.landmark_pairs else 'not one axis for all cases'})")
        return kept, None

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        mirror_axes, self.left_right_axis = self._landmark_mirror_axes(mirror_axes)
        inference_axes = tuple(a for a in mirror_axes if a != self.left_right_axis)
        self.inference_allowed_mirroring_axes = inference_axes if inference_axes else None
        return rotation, dummy_2d, initial_patch_size, mirror_axes

    def build_points_transform(self) -> BasicTransform:
        """The pipelines' last transform: the patch's landmark points (exact, or the balls' centres) as target."""
        return LandmarkPointsTransform(
            self.num_landmarks, expected_voxels=expected_ball_voxels(self.ball_radius_mm, self.configuration_manager.spacing),
            min_visible_fraction=self.min_visible_fraction, from_keypoints=self.exact_points is not None)

    def _with_landmark_transforms(self, compose) -> BasicTransform:
        compose = make_landmark_aware(compose, self.left_right_axis, self.pair_permutation,
                                      exact_points=self.exact_points is not None)
        if self.elastic_deformation:
            for t in compose.transforms:
                if isinstance(t, SpatialTransform):
                    t.p_elastic_deform, t.elastic_deform_scale, t.elastic_deform_magnitude = self.elastic_deformation
        return compose

    def get_training_transforms(self, patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                do_dummy_2d_data_aug, use_mask_for_norm=None, is_cascaded=False,
                                foreground_labels=None, regions=None, ignore_label=None) -> BasicTransform:
        """nnU-Net's pipeline without its seg downsampling, landmark-aware moves, heatmaps last."""
        compose = super().get_training_transforms(patch_size, rotation_for_DA, None, mirror_axes, do_dummy_2d_data_aug,
                                                  use_mask_for_norm, is_cascaded, foreground_labels, regions,
                                                  ignore_label)
        compose = self._with_landmark_transforms(compose)
        compose.transforms.append(self.build_points_transform())
        return compose

    def get_validation_transforms(self, deep_supervision_scales, is_cascaded=False, foreground_labels=None,
                                  regions=None, ignore_label=None) -> BasicTransform:
        compose = super().get_validation_transforms(None, is_cascaded, foreground_labels, regions, ignore_label)
        compose = self._with_landmark_transforms(compose)
        compose.transforms.append(self.build_points_transform())
        return compose

    # --------------------------------------------------- targets on the device
    def build_heatmap_targets(self, deep_supervision_scales) -> HeatmapTargets:
        """What `targets_from_points` draws (override to change the profile)."""
        return GaussianTargets(self.heatmap_sigma, deep_supervision_scales)

    def batch_points(self, batch: dict) -> torch.Tensor:
        """The batch's landmark points (B, L, ndim) on the training device (NaN rows = absent)."""
        points = batch["target"]
        if not torch.is_tensor(points) or points.ndim != 3 or points.shape[1] != self.num_landmarks \
                or not points.is_floating_point():
            what = f"a list of {len(points)}" if isinstance(points, (list, tuple)) else \
                f"{type(points).__name__} {tuple(getattr(points, 'shape', ()))}"
            raise ValueError(f"{self.__class__.__name__}: the batch's target must be the landmark points "
                             f"(B, {self.num_landmarks}, ndim) float that LandmarkPointsTransform gives, got {what} "
                             "(a pipeline drawing dense targets in the loader?)")
        return points.to(self.device, non_blocking=True)

    def targets_from_points(self, points: torch.Tensor, patch_shape: Sequence[int]):
        """nnU-Net's target for the loss: the heatmaps of `points` (B, L, ndim) at every deep-supervision
        scale (a list, full resolution first; one tensor without deep supervision), drawn where they are."""
        return self.build_heatmap_targets(self._get_deep_supervision_scales())(points, tuple(patch_shape))

    def network_input(self, data: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """What the network sees of a training or validation batch: the image channels (a subclass may
        add channels drawn from the points, e.g. a simulated global estimate)."""
        return data

    def train_step(self, batch: dict) -> dict:
        """nnU-Net's train step on the heatmaps drawn on the device from the batch's points."""
        data = batch["data"].to(self.device, non_blocking=True)
        points = self.batch_points(batch)
        target = self.targets_from_points(points, data.shape[2:])
        return super().train_step({**batch, "data": self.network_input(data, points), "target": target})

    # ------------------------------------------------------------- data loading
    def load_exact_points(self) -> Optional[dict]:
        """Every training/validation case's exact points in its preprocessed grid, or None (with a
        warning) when the dataset has no landmarks.json: then the label balls' centres are the targets."""
        from nnlandmark_h3de.landmarks.dataset_file import load_dataset_landmarks
        file = self.reference_landmarks_file()
        if file is None:
            msg = ("no landmarks.json for this dataset (nnUNet_raw/<dataset>/ or beside the plans): heatmap targets "
                   "fall back to the centres of the label balls (up to ~0.4 voxel off, balls must not overlap)")
            self.print_to_log_file("WARNING: " + msg)
            warnings.warn(msg, stacklevel=2)
            return None
        tr_keys, val_keys = self.do_split()
        points = exact_points_per_case(load_dataset_landmarks(file), list(tr_keys) + list(val_keys),
                                       self.preprocessed_dataset_folder, self.plans_manager,
                                       self.configuration_manager, source=file)
        self.print_to_log_file(f"Heatmap targets at the exact landmark points of {file} ({len(points)} cases)")
        self._warn_if_orientations_differ(list(points))
        return points

    def _warn_if_orientations_differ(self, cases: List[str]) -> None:
        """Mixed orientations: a warning (a dataset converted elsewhere; nnLandmark_convert writes one)."""
        properties = {c: load_pickle(join(self.preprocessed_dataset_folder, c + ".pkl")) for c in cases}
        directions = {c: p.get("sitk_stuff", {}).get("direction", ()) for c, p in properties.items()}  # other readers: ()
        msg = mixed_orientations_message(directions)
        if msg is not None:
            self.print_to_log_file("WARNING: " + msg)
            warnings.warn(msg, stacklevel=2)

    def get_dataloaders(self):
        self.exact_points = self.load_exact_points()
        jitter = None
        if self.local_patch_jitter_mm is not None and self.exact_points is not None:
            jitter = self.local_patch_jitter_mm / np.asarray(self.configuration_manager.spacing, dtype=np.float64)
            jitter = np.concatenate([np.zeros(self.patch_axis_offset), jitter])  # a 2D patch's slice: no jitter
            self.print_to_log_file(f"local-stage patches: {self.oversample_foreground_percent:.0%} centred on a "
                                   f"landmark +- {self.local_patch_jitter_mm} mm")
        with loaders_built_as(self.exact_points, jitter):
            return super().get_dataloaders()

    # ------------------------------------------------------- epoch validation
    def validation_step(self, batch: dict) -> dict:
        """Loss on the heatmaps drawn from the batch's points, radial errors of the peaks vs the points."""
        data = batch["data"].to(self.device, non_blocking=True)
        points = self.batch_points(batch)
        target = self.targets_from_points(points, data.shape[2:])
        data = self.network_input(data, points)
        with torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            output = self.network(data)
            del data
            loss = self.loss(output, target)
        if self.enable_deep_supervision:
            output = output[0]
        re_sum, re_count = patch_radial_errors(output, points, self.configuration_manager.spacing)
        return {"loss": loss.detach().cpu().numpy(), "re_sum": re_sum, "re_count": re_count}

    def _worst_error_mm(self) -> float:
        """Stand-in score for an epoch without any landmark in its patches: the patch diagonal."""
        return float(np.linalg.norm(np.asarray(self.configuration_manager.patch_size) *
                                    np.asarray(self.configuration_manager.spacing)))

    def on_validation_epoch_end(self, val_outputs: List[dict]):
        outputs = collate_outputs(val_outputs)
        re_sum = np.sum(outputs["re_sum"], 0)
        re_count = np.sum(outputs["re_count"], 0)
        re_sum, re_count, loss_here = summed_over_ranks(self.is_ddp, re_sum, re_count, outputs["loss"])
        with np.errstate(invalid="ignore", divide="ignore"):
            per_landmark = re_sum / re_count
        mre = float(re_sum.sum() / re_count.sum()) if re_count.sum() > 0 else float("nan")
        # nnU-Net keeps the best checkpoint by the EMA of 'mean_fg_dice' (higher is better): feed it -MRE, so
        # ema_fg_dice == -EMA(MRE). An epoch without landmarks repeats the last finite error.
        score = mre if np.isfinite(mre) else self.logger.local_logger.latest_finite("val_mre_mm")
        if not np.isfinite(score):
            score = self._worst_error_mm()
        self.logger.log("val_mre_mm", mre, self.current_epoch)
        self.logger.log("val_re_per_landmark_mm", [float(v) for v in per_landmark], self.current_epoch)
        self.logger.log("mean_fg_dice", -score, self.current_epoch)
        self.logger.log("ema_val_mre_mm", -self.logger.get_value("ema_fg_dice", step=-1), self.current_epoch)
        self.logger.log("dice_per_class_or_region", [-float(v) for v in per_landmark], self.current_epoch)
        self.logger.log("val_losses", loss_here, self.current_epoch)

    def on_epoch_end(self):
        self.print_to_log_file(f"val MRE (mm, validation patches): {np.round(self.logger.get_value('val_mre_mm', -1), 3)}, "
                               f"moving average {np.round(self.logger.get_value('ema_val_mre_mm', -1), 3)}; "
                               "'pseudo dice' below = -MRE per landmark, its EMA picks checkpoint_best")
        super().on_epoch_end()

    # -------------------------------------------------------- final validation
    def reference_landmarks_file(self) -> Optional[str]:
        """$nnUNet_raw/<dataset>/landmarks.json, else a copy beside the preprocessed plans."""
        candidates = []
        if nnUNet_raw.is_set():
            candidates.append(join(nnUNet_raw.get(), self.plans_manager.dataset_name, "landmarks.json"))
        if self.preprocessed_dataset_folder_base is not None:
            candidates.append(join(self.preprocessed_dataset_folder_base, "landmarks.json"))
        return next((c for c in candidates if isfile(c)), None)

    def perform_actual_validation(self, save_probabilities: bool = False):
        from nnlandmark_h3de.training.final_validation import run_final_validation
        self.set_deep_supervision_enabled(False)
        self.network.eval()
        try:
            run_final_validation(self)
        finally:
            self.set_deep_supervision_enabled(True)
