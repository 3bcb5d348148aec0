"""Shim for nnU-Net's `nnUNet_extTrainer` lookup: re-exports the landmark trainers (no code here)."""
from nnlandmark_h3de.training.nnLandmarkTrainer import nnLandmarkTrainer  # noqa: F401
from nnlandmark_h3de.training.nnLandmarkTrainerPrior import (nnLandmarkTrainerPrior,  # noqa: F401
                                                            nnLandmarkTrainerPrior_2epochs_3iters)
from nnlandmark_h3de.training.variants import (nnLandmarkTrainerLocal, nnLandmarkTrainerLocal_2epochs_3iters,  # noqa: F401
                                               nnLandmarkTrainerLocalAllMirrors, nnLandmarkTrainerLocalElastic,  # noqa: F401
                                               nnLandmarkTrainerLocalLR5e4,  # noqa: F401
                                               nnLandmarkTrainerLocalLinearHeads, nnLandmarkTrainerLocalMSE,  # noqa: F401
                                               nnLandmarkTrainer_1epoch, nnLandmarkTrainer_2epochs_3iters,  # noqa: F401
                                               nnLandmarkTrainer_5epochs, nnLandmarkTrainer_50epochs,
                                               nnLandmarkTrainer_250epochs, nnLandmarkTrainer_publicDefault)
