"""nnLandmarkSelfSupervisedTrainer: nnU-Net's trainer learning CC2D's multi-scale point features
(Yao et al., MICCAI 2021) on any converted landmark dataset, labels ignored.

`nnUNetv2_train D CONFIG F -tr nnLandmarkSelfSupervisedTrainer` trains the plans' U-Net (built by
nnU-Net) with `feature_dim` output channels and deep supervision on: its decoder outputs at the
finest `n_feature_scales` resolutions ARE the multi-scale features (L2-normalised per voxel where
used). What changes against nnUNetTrainer, and only that:
- train step: nnU-Net's loader and augmentation give view 1; view 2 is made on the device by a random
  affine + intensity jitter (contrastive_views.py); both go through the network as one batch of 2 B,
  and the loss is the sum over scales of InfoNCE between corresponding points (temperature 0.1).
  nnU-Net's own `train_step` runs it (autocast and grad scaler on cuda, gradient clipping, DDP);
- targets: unused (no segmentation downsampling for deep supervision);
- optimiser: Adam lr 1e-3, nnU-Net's poly schedule;
- validation: matching accuracy (fraction of sampled points whose nearest view-2 feature is their
  partner) per scale instead of Dice; `mean_fg_dice` = the finest scale's accuracy, so nnU-Net's EMA
  picks checkpoint_best by it. The final validation only measures that accuracy on fixed views of
  each validation case's centre patch and writes validation/summary.json (no segmentation export).

The trained model folder is what `nnlandmark_h3de.oneshot.feature_matching.FeatureExtractor` loads.
"""
from __future__ import annotations

import json
import os
from os.path import join
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch._dynamo import OptimizedModule

from batchgenerators.utilities.file_and_folder_operations import maybe_mkdir_p
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.helpers import dummy_context

from nnlandmark_h3de.training.validation_totals import summed_over_ranks
from nnlandmark_h3de.training.contrastive_views import (MultiScaleInfoNCE, jitter_intensities, matching_accuracy,
                                                        pack_points, random_view_transforms,
                                                        sample_corresponding_points, warp_views)
from nnlandmark_h3de.training.schedule import schedule_init, smoke_init

__all__ = ["nnLandmarkSelfSupervisedTrainer", "nnLandmarkSelfSupervisedTrainer_2epochs_3iters",
           "nnLandmarkSelfSupervisedTrainer_30epochs", "feature_strides"]


def feature_strides(configuration_manager, max_scales: int) -> List[List[int]]:
    """Per-axis strides (input voxels per feature voxel) of the decoder outputs used as features,
    finest first: nnU-Net's deep-supervision outputs, at most `max_scales`, and only those whose map
    of a patch still has >= 2 voxels along every axis."""
    pools = np.cumprod(np.vstack(configuration_manager.pool_op_kernel_sizes), axis=0)[:-1]  # DS outputs
    patch = np.asarray(configuration_manager.patch_size)
    out = [[int(v) for v in s] for s in pools if np.all(patch / s >= 2)]
    return out[:max(1, int(max_scales))]


class nnLandmarkSelfSupervisedTrainer(nnUNetTrainer):
    feature_dim = 32  # output channels = feature dimension
    max_feature_scales = 4  # finest decoder outputs used (CC2D: several scales, coarse to fine)
    ssl_points = 128  # points per sample and view
    ssl_temperature = 0.1
    view_rotation_deg = 15.0
    view_scale_range = (0.85, 1.15)
    view_translation_fraction = 0.1  # of the half patch per axis
    view_contrast_range = (0.8, 1.2)
    view_brightness = 0.2
    view_noise_std = 0.05
    final_validation_views = 4  # fixed views per validation case in perform_actual_validation

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if len(self.configuration_manager.patch_size) not in (2, 3):
            raise ValueError(f"{self.__class__.__name__}: 2D or 3D configurations only, got patch size "
                             f"{self.configuration_manager.patch_size}")
        self.initial_lr = 1e-3
        self.strides = self.feature_strides(self.configuration_manager)
        if self.device.type == "cpu" and hasattr(os, "sched_getaffinity"):
            from nnlandmark_h3de.utilities.cpu_threads import limit_torch_threads
            limit_torch_threads()

    # ------------------------------------------------------------------ network
    @classmethod
    def feature_strides(cls, configuration_manager) -> List[List[int]]:
        return feature_strides(configuration_manager, cls.max_feature_scales)

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> torch.nn.Module:
        """The plans' network with `feature_dim` outputs (nnU-Net's segmentation head count is ignored)."""
        return nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                        cls.feature_dim, enable_deep_supervision)

    def _unwrapped_network(self) -> torch.nn.Module:
        mod = self.network.module if self.is_ddp else self.network
        return mod._orig_mod if isinstance(mod, OptimizedModule) else mod

    # -------------------------------------------------------------- loss, optim
    def _get_deep_supervision_scales(self):
        return None  # the labels are not targets: nnU-Net's transforms need not downsample them

    def _build_loss(self):
        return MultiScaleInfoNCE(self.configuration_manager.patch_size, self.strides, self.ssl_temperature)

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    # ------------------------------------------------------------------- views
    def make_views(self, data: torch.Tensor, generator: Optional[torch.Generator] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, C, *patch) view 1 on the device -> ([view 1; view 2] (2 B, ...), packed points (B, N, 2 nd + 1))."""
        cm = self.configuration_manager
        with torch.no_grad():
            a, t = random_view_transforms(data.shape[0], cm.patch_size, cm.spacing, self.view_rotation_deg,
                                          self.view_scale_range, self.view_translation_fraction, generator,
                                          data.device)
            view2 = jitter_intensities(warp_views(data.float(), a, t), self.view_contrast_range,
                                       self.view_brightness, self.view_noise_std, generator).to(data.dtype)
            p1, p2, valid = sample_corresponding_points(a, t, self.ssl_points, generator=generator)
        return torch.cat([data, view2]), pack_points(p1, p2, valid)

    def train_step(self, batch: dict) -> dict:
        """nnU-Net's train step on [view 1; view 2] with the points as its target (see MultiScaleInfoNCE)."""
        data, points = self.make_views(batch["data"].to(self.device, non_blocking=True))
        return super().train_step({"data": data, "target": points})

    # ------------------------------------------------------- epoch validation
    def _scale_accuracy(self, output, points) -> Tuple[np.ndarray, np.ndarray]:
        correct, total = [], []
        for f1, f2, valid, exclude in self.loss.per_scale(output, points):
            c, n = matching_accuracy(f1, f2, valid, exclude)
            correct.append(c)
            total.append(n)
        return np.asarray(correct, dtype=np.float64), np.asarray(total, dtype=np.float64)

    def validation_step(self, batch: dict) -> dict:
        data, points = self.make_views(batch["data"].to(self.device, non_blocking=True))
        points = points.to(self.device)
        with torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            output = self.network(data)
            del data
            loss = self.loss(output, points)
        correct, total = self._scale_accuracy(output, points)
        return {"loss": loss.detach().cpu().numpy(), "correct": correct, "total": total}

    def on_validation_epoch_end(self, val_outputs: List[dict]):
        outputs = collate_outputs(val_outputs)
        correct, total = np.sum(outputs["correct"], 0), np.sum(outputs["total"], 0)
        correct, total, loss_here = summed_over_ranks(self.is_ddp, correct, total, outputs["loss"])
        with np.errstate(invalid="ignore", divide="ignore"):
            accuracy = correct / total
        # nnU-Net keeps the best checkpoint by the EMA of 'mean_fg_dice': the finest scale's matching accuracy
        self.logger.log("mean_fg_dice", float(np.nan_to_num(accuracy[0])), self.current_epoch)
        self.logger.log("dice_per_class_or_region", [float(v) for v in accuracy], self.current_epoch)
        self.logger.log("val_losses", loss_here, self.current_epoch)

    def on_epoch_end(self):
        acc = self.logger.get_value("dice_per_class_or_region", step=-1)
        self.print_to_log_file(f"val matching accuracy per scale (strides {self.strides}, finest first): "
                               f"{np.round(acc, 3).tolist()}; 'Pseudo dice' below = this accuracy, its EMA "
                               "(finest scale) picks checkpoint_best")
        super().on_epoch_end()

    # -------------------------------------------------------- final validation
    def _centre_patch(self, data: np.ndarray) -> torch.Tensor:
        """(C, *spatial) preprocessed case -> (1, C, *patch): its centre patch (zero-padded); a 2D
        configuration takes the middle slice."""
        patch = list(self.configuration_manager.patch_size)
        arr = np.asarray(data, dtype=np.float32)
        if len(patch) == 2:
            arr = arr[:, arr.shape[1] // 2]
        out = np.zeros((arr.shape[0], *patch), dtype=np.float32)
        src, dst = [slice(None)], [slice(None)]
        for size, p in zip(arr.shape[1:], patch):
            lo = max(0, (size - p) // 2)
            n = min(size, p)
            src.append(slice(lo, lo + n))
            off = (p - n) // 2
            dst.append(slice(off, off + n))
        out[tuple(dst)] = arr[tuple(src)]
        return torch.from_numpy(out)[None]

    def perform_actual_validation(self, save_probabilities: bool = False):
        """Matching accuracy on `final_validation_views` fixed views of each validation case's centre
        patch -> validation/summary.json. Cheap: one forward pass per view, no export (rank 0 only)."""
        if self.local_rank != 0:
            return
        network = self._unwrapped_network()
        network.eval()
        _, val_keys = self.do_split()
        dataset = self.dataset_class(self.preprocessed_dataset_folder, val_keys,
                                     folder_with_segs_from_previous_stage=self.folder_with_segs_from_previous_stage)
        per_case = {}
        correct_all, total_all = 0.0, 0.0
        with torch.no_grad():
            for i, key in enumerate(val_keys):
                data, _, _, _ = dataset.load_case(key)
                patch = self._centre_patch(data).to(self.device)
                gen = torch.Generator().manual_seed(1000 + i)
                correct, total = 0.0, 0.0
                for _ in range(self.final_validation_views):
                    views, points = self.make_views(patch, gen)
                    points = points.to(self.device)
                    with torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda" \
                            else dummy_context():
                        output = network(views)
                    c, n = self._scale_accuracy(output, points)
                    correct, total = correct + c, total + n
                per_case[key] = (correct / np.maximum(total, 1)).tolist()
                correct_all, total_all = correct_all + correct, total_all + total
        mean = (np.asarray(correct_all) / np.maximum(total_all, 1)).tolist() if val_keys else []
        summary = {"metric": "matching accuracy: fraction of sampled points of a view whose most similar feature "
                             "in a randomly warped view is their true partner (per scale, finest first)",
                   "strides": self.strides, "views_per_case": self.final_validation_views,
                   "points_per_view": self.ssl_points, "mean_per_scale": mean, "per_case": per_case}
        folder = join(self.output_folder, "validation")
        maybe_mkdir_p(folder)
        with open(join(folder, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        self.print_to_log_file(f"final validation: matching accuracy per scale {np.round(mean, 3).tolist()} "
                               f"({len(val_keys)} cases, {self.final_validation_views} views each)")


class nnLandmarkSelfSupervisedTrainer_2epochs_3iters(nnLandmarkSelfSupervisedTrainer):
    """Smoke runs and tests: 2 epochs of 3 training and 2 validation batches."""
    __init__ = smoke_init(nnLandmarkSelfSupervisedTrainer)


class nnLandmarkSelfSupervisedTrainer_30epochs(nnLandmarkSelfSupervisedTrainer):
    """A few minutes of CPU: 30 epochs of 20 batches (10 validation). About 4 minutes on 2 shared
    cores with a 32^3, 8..32-feature small configuration (nnLandmark_add_small_config); on 3D phantoms
    it reaches a finest-scale matching accuracy of about 0.8 (128 points per view, chance 1/128)."""
    __init__ = schedule_init(nnLandmarkSelfSupervisedTrainer, 30, 20, 10)
