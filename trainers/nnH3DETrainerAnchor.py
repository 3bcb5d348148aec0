"""Shim for nnU-Net's `nnUNet_extTrainer` lookup: re-exports the anchor-head trainers (no code here)."""
from nnlandmark_h3de.training.nnH3DETrainerAnchor import (nnH3DETrainerAnchor,  # noqa: F401
                                                          nnH3DETrainerAnchor_2epochs_3iters, nnLandmarkTrainerAnchor,
                                                          nnLandmarkTrainerAnchor_2epochs_3iters)
