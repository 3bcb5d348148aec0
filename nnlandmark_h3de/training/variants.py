"""Trainer variants selectable with `-tr NAME`: the local stage of two-stage prediction, shorter schedules,
and the public nnLandmark code's default recipe for comparison with the paper recipe on the same data."""
from __future__ import annotations

from typing import Optional

import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnlandmark_h3de.heatmaps.linear_ball_heatmap import LinearBallTargets
from nnlandmark_h3de.networks.building_blocks.output_heads import use_nonlinear_output_heads
from nnlandmark_h3de.training.landmark_loss import TopKHeatmapBCELoss
from nnlandmark_h3de.training.nnLandmarkTrainer import nnLandmarkTrainer
from nnlandmark_h3de.training.schedule import schedule_init, smoke_init

__all__ = ["nnLandmarkTrainerLocal", "nnLandmarkTrainerLocalAllMirrors", "nnLandmarkTrainerLocalElastic",
           "nnLandmarkTrainerLocalLR5e4", "nnLandmarkTrainerLocalStepLR",
           "nnLandmarkTrainerLocalLinearHeads", "nnLandmarkTrainerLocalMSE",
           "nnLandmarkTrainerLocal_2epochs_3iters", "nnLandmarkTrainer_1epoch",
           "nnLandmarkTrainer_5epochs", "nnLandmarkTrainer_50epochs",
           "nnLandmarkTrainer_250epochs", "nnLandmarkTrainer_2epochs_3iters", "nnLandmarkTrainer_publicDefault"]


class nnLandmarkTrainerLocal(nnLandmarkTrainer):
    """The local stage of two-stage prediction: every patch centred on a landmark moved by up to 12 mm
    (about the search radius an atlas global stage calibrates to on brain MRI), so the budget goes to
    the neighbourhoods the local stage is asked about, not to random background.

    Loss: BCE over every voxel, not the paper's MSE of sigmoids. The MSE's gradient carries a factor
    sigmoid' (0.018 at the start, logit -4) and the background pushes every channel down, so the channels
    of landmarks that few patches show sink further and stay flat for a whole short training (AFIDs, 20
    CPU minutes: 11-12 of 32 channels; BCE: 3). BCE's gradient (sigmoid - target) has no such factor.

    Output heads with a hidden layer of `head_features` (networks/building_blocks/output_heads.py): a small
    configuration's last stage has fewer features (8) than AFIDs has landmarks (32). With the BCE they lowered
    the validation error (and without the BCE they did not help; docs/benchmarks.md); about 2 % more time per step.

    Mirroring: along the left/right axis only (pair swap), not upside down or back to front as nnU-Net does: no
    scan shows those, and a network this small then spends its steps on anatomy it will see (AFIDs, 10 CPU
    minutes, validation local peaks 3.61 against 4.19 mm; 20 minutes, unseen test template, two stages 2.84
    against 3.20 mm). At test time the same left/right mirror runs (pair-swapped; nnLandmarkPredictor), two
    passes over each tile: on the same three AFIDs models, recalibrated with it, two stages 2.96/2.87/2.79 ->
    2.83/2.81/2.77 mm.

    Adam 2e-3, not the paper's 5e-4: a budget of minutes ends long before a low rate has converged (AFIDs,
    10 CPU minutes, validation local peaks 2.68 against 3.05 mm; Gaussian targets of 2 instead of 4 voxels:
    4.07 mm; docs/benchmarks.md). nnU-Net's poly decay, not the paper's step (x0.1 at 80 %): the rate falls
    all through the budget (10 CPU minutes: 2.37 against 2.62 mm; Adam 4e-3: 3.15 mm step, 2.44 mm poly)."""
    learning_rate = 2e-3
    lr_schedule = "poly"
    local_patch_jitter_mm = 12.0
    mirror_left_right_only = True
    mirror_left_right_at_inference = True
    head_features: Optional[int] = 32  # hidden features of the output heads (output_heads.py); None: 1x1 convs

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.oversample_foreground_percent = 1.0

    def build_heatmap_loss(self):
        return TopKHeatmapBCELoss(100.0)

    @classmethod
    def build_landmark_body(cls, plans_manager, configuration_manager, num_input_channels: int, num_landmarks: int,
                            enable_deep_supervision: bool = True):
        body = nnLandmarkTrainer.build_landmark_body(plans_manager, configuration_manager, num_input_channels,
                                                     num_landmarks, enable_deep_supervision)
        if cls.head_features:
            use_nonlinear_output_heads(body.decoder, cls.head_features)
        return body


class nnLandmarkTrainerLocalAllMirrors(nnLandmarkTrainerLocal):
    """nnLandmarkTrainerLocal mirrored along every axis, as nnU-Net does (its recipe until 2026-12-05), for
    comparison."""
    mirror_left_right_only = False
    mirror_left_right_at_inference = False  # as measured: the mirrors of the checkpoint only
    learning_rate, lr_schedule = 5e-4, "step"  # as measured


class nnLandmarkTrainerLocalElastic(nnLandmarkTrainerLocal):
    """nnLandmarkTrainerLocal with elastic deformation on a third of the patches (smoothing 15-30 % of the
    patch edge, up to 2-4 voxels), which nnU-Net leaves off: shapes the training cases do not show. On AFIDs
    (20 CPU minutes) it was worse than without, on validation and test (docs/benchmarks.md)."""
    elastic_deformation = (0.33, (0.15, 0.3), (2.0, 4.0))
    learning_rate, lr_schedule = 5e-4, "step"  # as measured


class nnLandmarkTrainerLocalStepLR(nnLandmarkTrainerLocal):
    """nnLandmarkTrainerLocal with the paper's step decay (x0.1 at 80 %) instead of nnU-Net's poly decay
    (its recipe until 2026-12-06), for comparison."""
    lr_schedule = "step"


class nnLandmarkTrainerLocalLR5e4(nnLandmarkTrainerLocalStepLR):
    """nnLandmarkTrainerLocalStepLR with the paper's Adam 5e-4 too (the local recipe until 2026-12-06), for
    comparison."""
    learning_rate = 5e-4


class nnLandmarkTrainerLocalLinearHeads(nnLandmarkTrainerLocalAllMirrors):
    """nnLandmarkTrainerLocal with nnU-Net's 1x1 output convolutions (the BCE alone) and every mirror, as it
    was measured, for comparison."""
    head_features = None


class nnLandmarkTrainerLocalMSE(nnLandmarkTrainerLocalLinearHeads):
    """nnLandmarkTrainerLocal as it was until 2026-12-05 (the paper's MSE of sigmoids, 1x1 output convolutions),
    for comparison."""

    def build_heatmap_loss(self):
        return nnLandmarkTrainer.build_heatmap_loss(self)


class nnLandmarkTrainerLocal_2epochs_3iters(nnLandmarkTrainerLocal):
    __init__ = smoke_init(nnLandmarkTrainerLocal)


class nnLandmarkTrainer_1epoch(nnLandmarkTrainer):
    __init__ = schedule_init(nnLandmarkTrainer, 1)


class nnLandmarkTrainer_5epochs(nnLandmarkTrainer):
    __init__ = schedule_init(nnLandmarkTrainer, 5)


class nnLandmarkTrainer_50epochs(nnLandmarkTrainer):
    __init__ = schedule_init(nnLandmarkTrainer, 50)


class nnLandmarkTrainer_250epochs(nnLandmarkTrainer):
    __init__ = schedule_init(nnLandmarkTrainer, 250)


class nnLandmarkTrainer_2epochs_3iters(nnLandmarkTrainer):
    """Smoke runs and tests: 2 epochs of 3 training and 2 validation batches."""
    __init__ = smoke_init(nnLandmarkTrainer)


class nnLandmarkTrainer_publicDefault(nnLandmarkTrainer):
    """The public nnLandmark code's defaults: linear distance ball (radius 15 voxels) target, BCE on
    the worst 20 % of voxels, nnU-Net's SGD (lr 1e-2, poly) and gradient clip 12, no mirroring.
    Centres stay our sub-voxel centres of mass (theirs: the deepest voxel) so only the recipe differs."""

    target_radius = 15.0
    topk_percent = 20.0
    learning_rate = 1e-2  # nnU-Net's SGD rate (configure_optimizers below)

    def build_heatmap_targets(self, deep_supervision_scales):
        return LinearBallTargets(self.target_radius, deep_supervision_scales)

    def build_heatmap_loss(self):
        return TopKHeatmapBCELoss(self.topk_percent)

    def configure_optimizers(self):
        return nnUNetTrainer.configure_optimizers(self)

    def _landmark_mirror_axes(self, mirror_axes):
        self.print_to_log_file("Mirroring disabled (public nnLandmark default)")
        return (), None
