"""nnH3DETrainer: the heatmap trainer (nnLandmarkTrainer) with the H3DE network as its body.

Only the body changes: H3DEUNet is built from the configuration's own architecture kwargs (the conv
stages nnU-Net planned) plus the patch size, which picks the V-BRA stages. The constant-zero channel 0,
loss, optimiser, targets and validation all come from nnLandmarkTrainer unchanged.
"""
from __future__ import annotations

import inspect

import torch

from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from nnlandmark_h3de.networks.h3de_unet import H3DEUNet
from nnlandmark_h3de.training.nnLandmarkTrainer import nnLandmarkTrainer
from nnlandmark_h3de.training.schedule import schedule_init, smoke_init

__all__ = ["nnH3DETrainer", "nnH3DETrainer_1epoch", "nnH3DETrainer_5epochs", "nnH3DETrainer_2epochs_3iters",
           "h3de_arch_kwargs"]

H3DE_CLASS = f"{H3DEUNet.__module__}.{H3DEUNet.__qualname__}"
_ACCEPTED = set(inspect.signature(H3DEUNet.__init__).parameters) - {"self", "input_channels", "num_classes"}


def h3de_arch_kwargs(configuration_manager, overrides: dict | None = None) -> tuple[dict, list]:
    """(kwargs, req_import) for H3DEUNet from a configuration planned for any nnU-Net U-Net.

    Plain U-Net plans pass through; residual-encoder plans (n_blocks_per_stage) get 2 convs per stage;
    keys H3DEUNet does not know are dropped; `patch_size` defaults to the configuration's.
    """
    kwargs = dict(configuration_manager.network_arch_init_kwargs)
    if "n_conv_per_stage" not in kwargs:
        kwargs["n_conv_per_stage"] = [2] * kwargs["n_stages"]
    kwargs = {k: v for k, v in kwargs.items() if k in _ACCEPTED}
    kwargs.setdefault("patch_size", list(configuration_manager.patch_size))
    kwargs.update(overrides or {})
    req_import = [k for k in configuration_manager.network_arch_init_kwargs_req_import if k in kwargs]
    return kwargs, req_import


class nnH3DETrainer(nnLandmarkTrainer):
    # one full-resolution refinement conv (H3DEUNet's default is 2): the refinement is the most expensive
    # part at full resolution; one conv brings the CPU step to ~1.95x the stock U-Net's (bench_train_step)
    h3de_kwargs: dict = {"n_conv_refinement": 1}  # H3DEUNet keyword overrides for subclasses

    @classmethod
    def build_landmark_body(cls, plans_manager, configuration_manager, num_input_channels: int, num_landmarks: int,
                            enable_deep_supervision: bool = True) -> torch.nn.Module:
        kwargs, req_import = h3de_arch_kwargs(configuration_manager, cls.h3de_kwargs)
        return get_network_from_plans(H3DE_CLASS, kwargs, req_import, num_input_channels, num_landmarks,
                                      allow_init=True, deep_supervision=enable_deep_supervision)


class nnH3DETrainer_1epoch(nnH3DETrainer):
    __init__ = schedule_init(nnH3DETrainer, 1)


class nnH3DETrainer_5epochs(nnH3DETrainer):
    __init__ = schedule_init(nnH3DETrainer, 5)


class nnH3DETrainer_2epochs_3iters(nnH3DETrainer):
    """Smoke runs and tests: 2 epochs of 3 training and 2 validation batches."""
    __init__ = smoke_init(nnH3DETrainer)
