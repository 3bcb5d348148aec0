"""Shim for nnU-Net's `nnUNet_extTrainer` lookup: re-exports the self-supervised (CC2D) trainers (no code here)."""
from nnlandmark_h3de.training.self_supervised_trainer import (nnLandmarkSelfSupervisedTrainer,  # noqa: F401
                                                              nnLandmarkSelfSupervisedTrainer_2epochs_3iters,
                                                              nnLandmarkSelfSupervisedTrainer_30epochs)
