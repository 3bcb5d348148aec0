"""Trainers whose final heatmap head is a `LandmarkAdapterHead` (landmark-specific channels).

`AdapterTrainerMixin` in front of a landmark trainer replaces the body's full-resolution 1x1 head
(`decoder.head` of H3DEUNet, `decoder.seg_layers[-1]` of nnU-Net's U-Nets) by the adapter head on
the same features. The lower-resolution deep-supervision heads stay shared 1x1 convs, so deep
supervision, the 1 + L channel wrapper, loss and validation are unchanged.
"""
from __future__ import annotations

from torch import nn

from nnlandmark_h3de.networks.building_blocks.landmark_adapters import attach_adapter_head
from nnlandmark_h3de.training.nnH3DETrainer import nnH3DETrainer
from nnlandmark_h3de.training.nnLandmarkTrainer import nnLandmarkTrainer
from nnlandmark_h3de.training.schedule import smoke_init

__all__ = ["AdapterTrainerMixin", "nnLandmarkTrainerAdapter", "nnH3DETrainerAdapter",
           "nnLandmarkTrainerAdapter_2epochs_3iters", "nnH3DETrainerAdapter_2epochs_3iters"]


class AdapterTrainerMixin:
    """`class T(AdapterTrainerMixin, SomeLandmarkTrainer)`; C_A = `adapter_channels` per landmark."""
    adapter_channels: int = 16
    adapter_kernel_size: int = 3
    n_adapter_convs: int = 1

    @classmethod
    def build_landmark_body(cls, plans_manager, configuration_manager, num_input_channels: int, num_landmarks: int,
                            enable_deep_supervision: bool = True) -> nn.Module:
        body = super().build_landmark_body(plans_manager, configuration_manager, num_input_channels, num_landmarks,
                                           enable_deep_supervision)
        return attach_adapter_head(body, cls.adapter_channels, cls.adapter_kernel_size, cls.n_adapter_convs)


class nnLandmarkTrainerAdapter(AdapterTrainerMixin, nnLandmarkTrainer):
    """nnLandmarkTrainer with landmark adapters in the full-resolution head."""


class nnH3DETrainerAdapter(AdapterTrainerMixin, nnH3DETrainer):
    """nnH3DETrainer with landmark adapters in the full-resolution head."""


class nnLandmarkTrainerAdapter_2epochs_3iters(nnLandmarkTrainerAdapter):
    __init__ = smoke_init(nnLandmarkTrainerAdapter)


class nnH3DETrainerAdapter_2epochs_3iters(nnH3DETrainerAdapter):
    __init__ = smoke_init(nnH3DETrainerAdapter)
