"""nnLandmarkTrainerPrior: the local stage of two-stage prediction, given the global stage's estimate.

The network takes the image and, as L more channels, a Gaussian at each landmark's global estimate
(heatmaps.estimate_channels). In training the estimates are simulated: the patch's true points moved
by a normal offset whose RMS length is `estimate_error_mm` (about what a registration leaves on
nonlinearly different subjects), so the network learns to move a rough point onto the structure next
to it rather than to recognise 32 landmarks from scratch; patches are centred near landmarks
(nnLandmarkTrainerLocal). In prediction (`nnLandmark_predict --global ...`) the channels are drawn at the
global stage's estimates in every tile; over the whole image, without estimates, the model cannot run.

Its final validation therefore needs the fold's global stage: training ends without one (the log says
so) and `nnLandmark_calibrate_global` measures the global stage and runs the final validation in two
stages, as it does for any local model.
"""
from __future__ import annotations

import numpy as np
import torch

from nnlandmark_h3de.heatmaps.estimate_channels import estimate_channels, simulated_estimates
from nnlandmark_h3de.training.schedule import smoke_init
from nnlandmark_h3de.training.variants import nnLandmarkTrainerLocal

__all__ = ["nnLandmarkTrainerPrior", "nnLandmarkTrainerPrior_2epochs_3iters"]


class nnLandmarkTrainerPrior(nnLandmarkTrainerLocal):
    estimate_error_mm = 4.0  # RMS distance of the simulated global estimates from the truth
    estimate_sigma = 4.0  # voxels: the width of the estimate channels' Gaussians
    needs_global_stage = True
    mirror_left_right_at_inference = False  # its estimate channels' mirror at test time is not measured yet

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> torch.nn.Module:
        """The landmark network with one more input channel per landmark (num_output_channels - 1)."""
        net = super().build_network_architecture(plans_manager, configuration_manager,
                                                 num_input_channels + num_output_channels - 1, num_output_channels,
                                                 enable_deep_supervision)
        net.estimate_sigma = float(cls.estimate_sigma)
        return net

    def estimate_error_sd_voxels(self) -> np.ndarray:
        """Per patch axis: the normal offset's standard deviation, so that its RMS length is estimate_error_mm."""
        spacing = np.asarray(self.configuration_manager.spacing, dtype=np.float64)
        return self.estimate_error_mm / np.sqrt(len(spacing)) / spacing

    def network_input(self, data: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """The image and the simulated global estimates' channels."""
        estimates = simulated_estimates(points, self.estimate_error_sd_voxels())
        prior = estimate_channels(estimates, data.shape[2:], self.estimate_sigma, dtype=data.dtype)
        return torch.cat((data, prior), 1)

    def on_train_start(self):
        super().on_train_start()
        self.print_to_log_file(f"local stage with the global estimate as input: {self.num_landmarks} estimate "
                               f"channels (Gaussians of {self.estimate_sigma} voxels), simulated in training "
                               f"{self.estimate_error_mm} mm RMS from the truth")

    def perform_actual_validation(self, save_probabilities: bool = False):
        """Two-stage only: without the fold's global stage there are no estimates to refine yet."""
        from nnlandmark_h3de.training.final_validation import has_global_stage
        if not has_global_stage(self):
            self.print_to_log_file("final validation skipped: this local model refines a global stage's estimates; "
                                   "run nnLandmark_calibrate_global for this fold, which measures the global stage "
                                   "and runs the final validation in two stages", also_print_to_console=True)
            return
        super().perform_actual_validation(save_probabilities)


class nnLandmarkTrainerPrior_2epochs_3iters(nnLandmarkTrainerPrior):
    __init__ = smoke_init(nnLandmarkTrainerPrior)
