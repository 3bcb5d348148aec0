"""Shim for nnU-Net's `nnUNet_extTrainer` lookup: re-exports the H3DE trainers (no code here)."""
from nnlandmark_h3de.training.nnH3DETrainer import (nnH3DETrainer, nnH3DETrainer_1epoch,  # noqa: F401
                                                    nnH3DETrainer_2epochs_3iters, nnH3DETrainer_5epochs)
