"""Shim for nnU-Net's `nnUNet_extTrainer` lookup: re-exports the landmark-adapter trainers (no code here)."""
from nnlandmark_h3de.training.adapter_trainers import (nnH3DETrainerAdapter,  # noqa: F401
                                                       nnH3DETrainerAdapter_2epochs_3iters, nnLandmarkTrainerAdapter,
                                                       nnLandmarkTrainerAdapter_2epochs_3iters)
