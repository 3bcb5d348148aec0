"""`nnLandmark_calibrate_global`: give a trained local model its global stage, then re-validate.

Order matters: the global stage is measured on the fold's validation cases (its error sets the local
search radius), and only then can the final validation predict those cases the way two-stage
prediction will, so that the existence thresholds and the uncertainty model are refitted on it
(nnU-Net's `--val` run of the trainer, which reads fold_X/global_stage.json).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional, Sequence

from nnlandmark_h3de.inference.global_stage import KINDS, GlobalStageChoice, calibrate_global_stage

__all__ = ["fold_cases", "calibrate_fold"]


def fold_cases(preprocessed_dataset: Path, fold: int):
    """(train, val) case ids of one fold from nnU-Net's splits_final.json (written when training starts)."""
    file = Path(preprocessed_dataset) / "splits_final.json"
    try:
        splits = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{file}: nnU-Net's splits are needed (train the fold first) ({e})") from None
    if not 0 <= fold < len(splits):
        raise ValueError(f"{file}: fold {fold} not among its {len(splits)} splits")
    return list(splits[fold]["train"]), list(splits[fold]["val"])


def calibrate_fold(dataset: str, configuration: str, fold: int, trainer: str = "nnLandmarkTrainer",
                   plans: str = "nnUNetPlans", kinds: Sequence[str] = KINDS, learned_model: Optional[Path] = None,
                   learned_folds: Sequence = (0,), n_atlases: int = 4, registration_spacing_mm: float = 4.0,
                   device: str = "cpu", revalidate: bool = True) -> GlobalStageChoice:
    import torch
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.run.run_training import run_training
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.file_path_utilities import get_output_folder
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    name = maybe_convert_to_dataset_name(dataset)
    model = Path(get_output_folder(name, trainer, plans, configuration))
    fold_folder = model / f"fold_{fold}"
    if not (fold_folder / "checkpoint_final.pth").is_file():
        raise FileNotFoundError(f"{fold_folder / 'checkpoint_final.pth'} not found: train the local model first")
    spacing = PlansManager(str(model / "plans.json")).get_configuration(configuration).spacing
    train, val = fold_cases(Path(nnUNet_preprocessed) / name, fold)
    if not val:
        raise ValueError(f"fold {fold} has no validation cases to calibrate the global stage on")
    started = time.monotonic()
    choice = calibrate_global_stage(fold_folder, Path(nnUNet_raw) / name, train, val, spacing, kinds,
                                    learned_model, learned_folds, n_atlases, registration_spacing_mm)
    measured = time.monotonic() - started
    for kind, v in choice.validation.items():
        timing = "" if v.get("seconds_per_case") is None else f", {v['seconds_per_case']:.1f} s per case"
        print(f"{kind} global stage on {len(val)} validation case(s): MRE {v['mre_mm']:.2f} mm, p90 "
              f"{v['p90_mm']:.2f} mm{timing} -> local search radius {v['radius_mm']:.1f} mm")
    if any(sorted(v) != sorted(choice.atlases) for v in choice.validation_atlases.values()):
        print("validation cases registered with atlases of other subjects (landmarks.json subjects): " + "; ".join(
            f"{case}: {', '.join(used)}" for case, used in choice.validation_atlases.items()))
    print(f"kept: {choice.kind} (lower validation MRE); written to {fold_folder / 'global_stage.json'}; global "
          f"stages measured in {measured:.1f} s")
    if revalidate:
        print("re-running the final validation in two stages (thresholds and uncertainty refitted; the validation "
              "cases' registrations above are reused)")
        started = time.monotonic()
        run_training(name, configuration, fold, trainer, plans, only_run_validation=True, device=torch.device(device))
        print(f"calibration took {measured + time.monotonic() - started:.1f} s: global stages {measured:.1f} s, "
              f"two-stage final validation {time.monotonic() - started:.1f} s (its passes: "
              f"{fold_folder / 'validation' / 'summary.json'}, final_validation_seconds)")
    return choice
