"""Shim for nnU-Net's `nnUNet_extTrainer` lookup: re-exports the landmark trainers (no code here)."""
from nnlandmark_h3de.training.nnLandmarkTrainer import nnLandmarkTrainer  # noqa: F401
from nnlandmark_h3de.training.nnLandmarkTrainerPrior import (nnLandmarkTrainerPrior,  # noqa: F401
                                                            nnLandmarkTrainerPrior_2epochs_3iters)
from nnlandmark_h3de.training.variants import *  # noqa: F401,F403  (its __all__: every variant, none listed twice)
