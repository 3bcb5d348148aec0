"""Short-schedule trainer variants (`-tr nnLandmarkTrainer_5epochs`, smoke runs) from one factory."""
from __future__ import annotations

from typing import Optional

import torch


def schedule_init(base, num_epochs: int, iterations: Optional[int] = None, val_iterations: Optional[int] = None):
    """An `__init__` for `class V(base)`: base's, then nnU-Net's epoch / iteration counts.

    The signature is nnU-Net's own: it records a trainer's init arguments by inspecting `__init__`.
    """
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        self.num_epochs = num_epochs
        if iterations is not None:
            self.num_iterations_per_epoch = iterations
        if val_iterations is not None:
            self.num_val_iterations_per_epoch = val_iterations
    return __init__


def smoke_init(base):
    """2 epochs of 3 training and 2 validation batches: smoke runs and tests."""
    return schedule_init(base, 2, 3, 2)
