"""The global stage of two-stage prediction: which kind, how far to search locally, chosen on validation.

Two kinds behind one interface (`estimate(case image file) -> LandmarkSet` with an uncertainty):
- atlas: a few training images (chosen for coverage) registered to the case (atlas.py);
- learned: a model of a coarse whole-image configuration (e.g. `nnLandmark_add_small_config
  --spacing 4 4 4`) predicted with nnLandmarkPredictor.
`calibrate_global_stage` measures each available kind on the local model's validation cases (the atlas
on the fold's validation images with atlases from its training cases; the learned model by its own
final validation, the same cases when both use the same splits), keeps the one with the lower mean
radial error, and sets the local search radius to twice its 90th-percentile error (at least 3 voxels
of the local configuration). The choice is written next to the local model as
`fold_X/global_stage.json`, which `nnLandmark_predict --global auto` reads.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from nnlandmark_h3de.landmarks.atomic import atomic_write_text
from nnlandmark_h3de.landmarks.landmark_set import LandmarkSet

__all__ = ["GLOBAL_STAGE_FILE", "GlobalStageChoice", "search_radius_mm", "atlas_validation_errors",
           "learned_validation_errors", "calibrate_global_stage", "AtlasGlobalStage"]

GLOBAL_STAGE_FILE = "global_stage.json"
KINDS = ("atlas", "learned")


@dataclass
class GlobalStageChoice:
    kind: str
    radius_mm: float
    atlases: List[str] = field(default_factory=list)  # training case ids (atlas kind)
    registration_spacing_mm: float = 4.0
    learned_model: Optional[str] = None  # model folder of the coarse configuration (learned kind)
    learned_folds: List = field(default_factory=list)
    validation: Dict[str, dict] = field(default_factory=dict)  # per kind: mre_mm, p90_mm, n

    def write(self, path) -> Path:
        atomic_write_text(path, json.dumps(self.__dict__, indent=2) + "\n")
        return Path(path)

    @classmethod
    def read(cls, path) -> "GlobalStageChoice":
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
            choice = cls(**d)
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"{path}: not a readable global stage file ({e})") from None
        if choice.kind not in KINDS or not choice.radius_mm > 0:
            raise ValueError(f"{path}: kind must be one of {KINDS} and radius_mm > 0, got {choice.kind!r}, "
                             f"{choice.radius_mm!r}")
        return choice


def search_radius_mm(errors_mm: np.ndarray, floor_mm: float) -> float:
    """Twice the 90th percentile of the validation errors, never below `floor_mm`."""
    e = np.asarray(errors_mm, dtype=np.float64)
    e = e[np.isfinite(e)]
    if e.size == 0:
        raise ValueError("no finite validation error to size the local search radius from")
    return float(max(floor_mm, 2.0 * np.percentile(e, 90)))


def _error_stats(errors: np.ndarray) -> dict:
    e = np.asarray(errors, dtype=np.float64)
    e = e[np.isfinite(e)]
    return {"mre_mm": float(e.mean()), "median_mm": float(np.median(e)), "p90_mm": float(np.percentile(e, 90)),
            "n": int(e.size)}


class AtlasGlobalStage:
    """Atlas registration from raw training cases (images + landmarks.json of the raw dataset)."""

    def __init__(self, raw_dataset: Path, atlas_cases: Sequence[str], registration_spacing_mm: float = 4.0):
        import SimpleITK as sitk
        from nnlandmark_h3de.conversion.dataset_landmarks import load_dataset_landmarks
        from nnlandmark_h3de.inference.atlas import Atlas
        raw_dataset = Path(raw_dataset)
        landmarks = load_dataset_landmarks(raw_dataset)
        self.atlases = []
        for case in atlas_cases:
            image_file = raw_dataset / "imagesTr" / f"{case}_0000.nii.gz"
            if not image_file.is_file() or case not in landmarks:
                raise FileNotFoundError(f"atlas case {case!r}: {image_file} or its landmarks in "
                                        f"{raw_dataset / 'landmarks.json'} not found")
            self.atlases.append(Atlas(case, sitk.ReadImage(str(image_file), sitk.sitkFloat32), landmarks[case]))
        self.names = list(self.atlases[0].landmarks.names)
        self.spacing = float(registration_spacing_mm)

    def estimate_image(self, image) -> LandmarkSet:
        from nnlandmark_h3de.inference.atlas import atlas_estimate
        est = atlas_estimate(image, self.atlases, self.spacing)
        return LandmarkSet(self.names, est.points_lps, uncertainty_mm=est.spread_mm, source="atlas global stage")

    def estimate(self, image_file) -> LandmarkSet:
        import SimpleITK as sitk
        return self.estimate_image(sitk.ReadImage(str(image_file), sitk.sitkFloat32))


def atlas_validation_errors(raw_dataset: Path, train_cases: Sequence[str], val_cases: Sequence[str],
                            n_atlases: int = 4, registration_spacing_mm: float = 4.0):
    """(chosen atlas case ids, (V, L) radial errors in mm of the atlas estimate on the validation cases)."""
    from tqdm import tqdm
    from nnlandmark_h3de.conversion.dataset_landmarks import load_dataset_landmarks
    from nnlandmark_h3de.inference.atlas import choose_atlases
    landmarks = load_dataset_landmarks(raw_dataset)
    train_cases = [c for c in train_cases if c in landmarks]
    chosen = [train_cases[i] for i in choose_atlases([landmarks[c] for c in train_cases], n_atlases)]
    stage = AtlasGlobalStage(raw_dataset, chosen, registration_spacing_mm)
    errors = []
    for case in tqdm(val_cases, desc="Atlas global stage on validation cases", unit="case"):
        est = stage.estimate(Path(raw_dataset) / "imagesTr" / f"{case}_0000.nii.gz")
        errors.append(np.linalg.norm(est.points_lps - landmarks[case].reordered(est.names).points_lps, axis=1))
    return chosen, np.asarray(errors)


def learned_validation_errors(coarse_fold_folder: Path) -> np.ndarray:
    """Radial errors (mm) of the coarse model's own final validation (its summary.json), true positives."""
    summary_file = Path(coarse_fold_folder) / "validation" / "summary.json"
    try:
        summary = json.loads(summary_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{summary_file}: the coarse model's final validation is needed ({e})") from None
    return np.asarray([m["radial_error_mm"] for c in summary["metric_per_case"] for m in c["metrics"].values()
                       if m.get("radial_error_mm") is not None], dtype=np.float64)


def calibrate_global_stage(local_fold_folder: Path, raw_dataset: Path, train_cases: Sequence[str],
                           val_cases: Sequence[str], local_spacing: Sequence[float], kinds: Sequence[str] = KINDS,
                           learned_model: Optional[Path] = None, learned_fold=0, n_atlases: int = 4,
                           registration_spacing_mm: float = 4.0) -> GlobalStageChoice:
    """Measure each kind on validation, keep the better one, write fold_X/global_stage.json."""
    validation, candidates = {}, {}
    floor = 3.0 * float(max(local_spacing))
    if "atlas" in kinds:
        chosen, errors = atlas_validation_errors(raw_dataset, train_cases, val_cases, n_atlases, registration_spacing_mm)
        validation["atlas"] = _error_stats(errors)
        candidates["atlas"] = GlobalStageChoice("atlas", search_radius_mm(errors, floor), atlases=chosen,
                                                registration_spacing_mm=registration_spacing_mm)
    if "learned" in kinds and learned_model is not None:
        errors = learned_validation_errors(Path(learned_model) / f"fold_{learned_fold}")
        validation["learned"] = _error_stats(errors)
        candidates["learned"] = GlobalStageChoice("learned", search_radius_mm(errors, floor),
                                                  learned_model=str(Path(learned_model).resolve()),
                                                  learned_folds=[learned_fold])
    if not candidates:
        raise ValueError(f"no global stage to calibrate among {list(kinds)} (a learned one needs its model folder)")
    best = min(candidates, key=lambda k: validation[k]["mre_mm"])
    choice = candidates[best]
    choice.validation = validation
    choice.write(Path(local_fold_folder) / GLOBAL_STAGE_FILE)
    return choice
