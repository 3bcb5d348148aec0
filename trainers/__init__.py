"""Thin shims found by nnU-Net through `export nnUNet_extTrainer=$(nnLandmark_trainer_path)`.
Each module only re-exports trainer classes from `nnlandmark_h3de.training`; no code lives here."""
