"""The global stage of two-stage prediction: where each landmark roughly is in the whole image.

Three kinds behind one interface, `estimate(image files) -> LandmarkSet` (world LPS mm, NaN = absent,
`uncertainty_mm`):
- atlas (`AtlasGlobalStage`): a few training images, chosen for coverage, registered (affine) to the
  case (atlas.py). They are stored with the model (`fold_X/global_atlases/`, resampled to the
  registration grid, a few hundred kB), so prediction needs no raw dataset;
- deformable (`AtlasGlobalStage(nonlinear=True)`): the same atlases, the affine registration followed
  by demons on the same grid (deformable_registration.py), for subjects that differ nonlinearly;
- learned (`LearnedGlobalStage`): a model of a coarse whole-image configuration (e.g.
  `nnLandmark_add_small_config --spacing 4 4 4`, or nnU-Net's 3d_lowres) predicted with
  nnLandmarkPredictor; its existence thresholds decide which landmarks are absent.
`calibrate_global_stage` measures each available kind on the local model's validation cases (the atlas
kinds on the fold's validation images with atlases from its training cases, both from one affine
registration per atlas, each with its seconds per case; the learned model by its own final
validation, the same cases when both use the same splits; where landmarks.json names the cases'
subjects, a validation case is registered only with atlases of other subjects), keeps the one with the
lowest mean radial error, and sets each kind's local search radius to twice its 90th-percentile error (at least 3
voxels of the local configuration). Everything is written to `fold_X/global_stage.json`, which
`nnLandmark_predict --global auto` reads. A fold ensemble predicts with the first fold's stage and
each fold's own local peak floor (`ensemble_local_peak_floors`).
"""
from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnlandmark_h3de.landmarks.atomic import atomic_write_text
from nnlandmark_h3de.inference.recorded_estimates import ESTIMATES_FILE, write_recorded_estimates
from nnlandmark_h3de.landmarks.landmark_set import LandmarkSet

__all__ = ["GLOBAL_STAGE_FILE", "ATLAS_FOLDER", "KINDS", "GlobalStageChoice", "search_radius_mm", "raw_case_images",
           "AtlasGlobalStage", "LearnedGlobalStage", "load_global_stage", "ensemble_local_peak_floors",
           "atlas_validation_errors",
           "registration_validation_errors", "learned_validation_errors", "calibrate_global_stage"]

GLOBAL_STAGE_FILE = "global_stage.json"
ATLAS_FOLDER = "global_atlases"
KINDS = ("atlas", "deformable", "learned")
ATLAS_KINDS = ("atlas", "deformable")  # registration kinds: the same atlases, affine or affine + demons


@dataclass
class GlobalStageChoice:
    kind: str  # the kind that validated best
    # per kind: mre_mm, p90_mm, rms_mm, n, radius_mm, seconds_per_case (None where not measured here)
    validation: Dict[str, dict] = field(default_factory=dict)
    atlases: List[str] = field(default_factory=list)  # training case ids (atlas and deformable kinds)
    registration_spacing_mm: float = 4.0
    learned_model: Optional[str] = None  # model folder of the coarse configuration (learned kind)
    learned_folds: List = field(default_factory=list)
    # per validation case, the training cases registered to it (`validation_atlas_cases`)
    validation_atlases: Dict[str, List[str]] = field(default_factory=dict)

    def radius_mm(self, kind: str) -> float:
        return float(self.validation[kind]["radius_mm"])

    def local_peak_floor(self, kind: str) -> Optional[np.ndarray]:
        """Per-landmark local peak heights below which the global estimate stands (fitted by the two-stage
        final validation; None before it ran)."""
        floor = self.validation[kind].get("local_peak_floor")
        return None if floor is None else np.asarray([np.inf if v is None else v for v in floor], dtype=np.float64)

    def local_weight(self, kind: str):
        """How far the local peak moves the global estimate (global + w (local - global)), fitted on
        validation: one per landmark (L,) where fitted so, else one number (files before 2026-12-06); 1
        (the local peak) in files written before the weight existed."""
        per_landmark = self.validation[kind].get("local_weights")
        if per_landmark is not None:
            return np.asarray(per_landmark, dtype=np.float64)
        return float(self.validation[kind].get("local_weight", 1.0))

    def fallback_uncertainty_mm(self, kind: str) -> float:
        """What a global estimate is worth where the local stage found no peak: its validated RMS error."""
        return float(self.validation[kind]["rms_mm"])

    def write(self, path) -> Path:
        atomic_write_text(path, json.dumps(asdict(self), indent=2) + "\n")
        return Path(path)

    @classmethod
    def read(cls, path) -> "GlobalStageChoice":
        try:
            choice = cls(**json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"{path}: not a readable global stage file ({e})") from None
        bad = [k for k, v in choice.validation.items() if k not in KINDS or not v.get("radius_mm", 0) > 0]
        if choice.kind not in choice.validation or bad:
            raise ValueError(f"{path}: kind {choice.kind!r} must be one of the validated kinds "
                             f"{sorted(choice.validation)} (each in {KINDS} with radius_mm > 0)")
        return choice


def search_radius_mm(errors_mm: np.ndarray, floor_mm: float) -> float:
    """Twice the 90th percentile of the validation errors, never below `floor_mm`."""
    e = np.asarray(errors_mm, dtype=np.float64)
    e = e[np.isfinite(e)]
    if e.size == 0:
        raise ValueError("no finite validation error to size the local search radius from")
    return float(max(floor_mm, 2.0 * np.percentile(e, 90)))


def _error_stats(errors: np.ndarray, floor_mm: float) -> dict:
    e = np.asarray(errors, dtype=np.float64)
    e = e[np.isfinite(e)]
    return {"mre_mm": float(e.mean()), "median_mm": float(np.median(e)), "p90_mm": float(np.percentile(e, 90)),
            "rms_mm": float(np.sqrt(np.mean(e ** 2))), "n": int(e.size),
            "radius_mm": search_radius_mm(e, floor_mm)}


def raw_case_images(raw_dataset, case: str, dataset_json: Optional[dict] = None) -> List[str]:
    """A training case's image files (all channels) in a raw dataset, listed by nnU-Net's own rule
    (imagesTr or the dataset.json `dataset` block); a clear error when the case has none."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    files = get_filenames_of_train_images_and_targets(str(raw_dataset), dataset_json).get(case, {}).get("images", [])
    missing = [f for f in files if not Path(f).is_file()]
    if not files or missing:
        raise FileNotFoundError(f"{raw_dataset}: no image files of case {case!r} in imagesTr ({missing or 'none listed'})")
    return files


# --------------------------------------------------------------------------- the kinds
class AtlasGlobalStage:
    """Atlas registration (affine; `nonlinear`: then demons, the deformable kind); atlases are (name,
    SimpleITK image, LandmarkSet)."""

    def __init__(self, atlases: Sequence, registration_spacing_mm: float = 4.0, nonlinear: bool = False):
        if not atlases:
            raise ValueError("the atlas global stage needs at least one atlas")
        self.atlases = list(atlases)
        self.names = list(self.atlases[0].landmarks.names)
        self.spacing = float(registration_spacing_mm)
        self.nonlinear = bool(nonlinear)

    @property
    def kind(self) -> str:
        return "deformable" if self.nonlinear else "atlas"

    @classmethod
    def from_raw(cls, raw_dataset: Path, cases: Sequence[str], registration_spacing_mm: float = 4.0,
                 nonlinear: bool = False):
        """Atlases from the raw dataset's imagesTr (first channel) and landmarks.json."""
        import SimpleITK as sitk
        from nnlandmark_h3de.landmarks.dataset_file import load_dataset_landmarks
        from nnlandmark_h3de.inference.atlas import Atlas
        raw_dataset = Path(raw_dataset)
        landmarks = load_dataset_landmarks(raw_dataset)
        atlases = []
        for case in cases:
            if case not in landmarks:
                raise FileNotFoundError(f"atlas case {case!r}: no landmarks in {raw_dataset / 'landmarks.json'}")
            image_file = raw_case_images(raw_dataset, case)[0]
            atlases.append(Atlas(case, sitk.ReadImage(image_file, sitk.sitkFloat32), landmarks[case]))
        return cls(atlases, registration_spacing_mm, nonlinear)

    def save(self, folder) -> Path:
        """Atlas images on the registration grid + their landmarks, written to a temporary folder and
        renamed, so the model folder never holds half a set."""
        import SimpleITK as sitk
        from nnlandmark_h3de.landmarks.dataset_file import landmarks_json_dict
        from nnlandmark_h3de.inference.atlas import coarse_image
        folder = Path(folder)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            for a in self.atlases:
                sitk.WriteImage(coarse_image(a.image, self.spacing), str(tmp / f"{a.name}.nii.gz"))
            doc = landmarks_json_dict({a.name: a.landmarks for a in self.atlases}, self.names)
            (tmp / "landmarks.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
            if folder.exists():
                shutil.rmtree(folder)
            tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder

    @classmethod
    def load(cls, folder, names: Sequence[str], registration_spacing_mm: float = 4.0, nonlinear: bool = False):
        import SimpleITK as sitk
        from nnlandmark_h3de.landmarks.dataset_file import load_dataset_landmarks
        from nnlandmark_h3de.inference.atlas import Atlas
        folder = Path(folder)
        landmarks = load_dataset_landmarks(folder / "landmarks.json")
        atlases = []
        for case, ls in sorted(landmarks.items()):
            image_file = folder / f"{case}.nii.gz"
            if not image_file.is_file():
                raise FileNotFoundError(f"{image_file}: atlas image missing (rerun nnLandmark_calibrate_global)")
            atlases.append(Atlas(case, sitk.ReadImage(str(image_file), sitk.sitkFloat32), ls.reordered(list(names))))
        return cls(atlases, registration_spacing_mm, nonlinear)

    def estimate_image(self, image) -> LandmarkSet:
        from nnlandmark_h3de.inference.atlas import atlas_estimate
        est = atlas_estimate(image, self.atlases, self.spacing, nonlinear=self.nonlinear)
        return LandmarkSet(self.names, est.points_lps, uncertainty_mm=est.spread_mm, source=f"{self.kind} global stage")

    def estimate(self, files: Sequence[str]) -> LandmarkSet:
        import SimpleITK as sitk
        return self.estimate_image(sitk.ReadImage(str(files[0]), sitk.sitkFloat32))


class LearnedGlobalStage:
    """A coarse whole-image model, predicted (its folds, mirrors, thresholds) with nnLandmarkPredictor."""

    def __init__(self, model_folder, folds: Sequence, device=None):
        import torch
        from nnlandmark_h3de.inference.landmark_predictor import nnLandmarkPredictor
        device = device or torch.device("cpu")
        self.predictor = nnLandmarkPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                             perform_everything_on_device=device.type == "cuda", device=device,
                                             verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        self.predictor.initialize_from_trained_model_folder(str(model_folder), list(folds))
        self.names = self.predictor.names

    def estimate(self, files: Sequence[str]) -> LandmarkSet:
        import torch
        from nnlandmark_h3de.inference.preprocessing_pool import preprocess_case
        p = self.predictor
        item = preprocess_case(list(files), None, None, p.plans_manager, p.configuration_manager, p.dataset_json)
        if "error" in item:
            raise RuntimeError(f"learned global stage: {item['error']}")
        ls, _, _ = p.predict_case(torch.as_tensor(np.asarray(item["data"])).float(), item["data_properties"],
                                  source="learned global stage")
        return ls


def load_global_stage(fold_folder, kind: str = "auto", device=None) -> Tuple[object, GlobalStageChoice, str]:
    """(stage, choice, kind used) from fold_X/global_stage.json; `kind` 'auto' = the calibrated choice."""
    fold_folder = Path(fold_folder)
    file = fold_folder / GLOBAL_STAGE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: run nnLandmark_calibrate_global for this fold first")
    choice = GlobalStageChoice.read(file)
    kind = choice.kind if kind == "auto" else kind
    if kind not in choice.validation:
        raise ValueError(f"{file}: the {kind!r} global stage was not calibrated (calibrated: {sorted(choice.validation)})")
    if kind in ATLAS_KINDS:  # both read the same atlas folder
        names = json.loads((fold_folder.parent / "dataset.json").read_text(encoding="utf-8"))
        from nnlandmark_h3de.landmarks import landmark_names
        return (AtlasGlobalStage.load(fold_folder / ATLAS_FOLDER, landmark_names(names), choice.registration_spacing_mm,
                                      nonlinear=kind == "deformable"), choice, kind)
    return LearnedGlobalStage(choice.learned_model, choice.learned_folds, device), choice, kind


def ensemble_local_peak_floors(model_folder, folds: Sequence, kind: str = "auto") -> Tuple[str, Optional[np.ndarray]]:
    """(the global stage kind a fold ensemble predicts with, each fold's own local peak floor (F, L) in the
    order of `folds`, or None where no fold has one yet).

    Why: a fold's floor was fitted in its own two-stage validation on its own peak heights, so the first
    fold's floor says little about another fold's peaks; each fold's is applied to its own peak
    (two_stage_tiles.keep_weak_estimates). The estimate, the radius and the tiles stay the first
    fold's stage's, so the folds' tile logits can be averaged. A clear error, instead of one fold's
    calibration applied to all, when a fold has no global_stage.json, when ('auto') the folds chose
    different kinds or one lacks the kind asked, or when only some folds have a floor for it."""
    model_folder = Path(model_folder)
    choices = {}
    for f in folds:
        file = model_folder / f"fold_{f}" / GLOBAL_STAGE_FILE
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found: fold {f} of the ensemble has no calibrated global stage. "
                                    f"Run nnLandmark_calibrate_global -f {f}, predict with -f of the calibrated folds "
                                    f"only, or with --global none")
        choices[f] = GlobalStageChoice.read(file)
    chosen = {f: c.kind for f, c in choices.items()}
    if kind == "auto" and len(set(chosen.values())) > 1:
        raise ValueError(f"{model_folder}: the folds chose different global stages ("
                         f"{', '.join(f'fold_{f}: {k}' for f, k in chosen.items())}), and each fold's local peak floor "
                         f"was fitted with its own: predict with -f of folds that agree, or calibrate them alike "
                         f"(nnLandmark_calibrate_global --kinds)")
    kind = chosen[folds[0]] if kind == "auto" else kind
    lacking = [f for f, c in choices.items() if kind not in c.validation]
    if lacking:
        raise ValueError(f"{model_folder}: the {kind!r} global stage was not calibrated for fold(s) {lacking}")
    floors = {f: c.local_peak_floor(kind) for f, c in choices.items()}
    without = [f for f, v in floors.items() if v is None]
    if len(without) == len(floors):
        return kind, None
    if without:
        raise ValueError(f"{model_folder}: the local peak floor of the {kind!r} global stage is missing for fold(s) "
                         f"{without}, fitted for {[f for f in floors if f not in without]}: it is fitted when "
                         f"nnLandmark_calibrate_global revalidates a fold (without --no_revalidate) on the kind the "
                         f"fold chose. Calibrate those folds, or predict with -f of folds that have it")
    if len({len(v) for v in floors.values()}) > 1:
        raise ValueError(f"{model_folder}: the folds' local peak floors cover different numbers of landmarks "
                         f"({ {f: len(v) for f, v in floors.items()} })")
    return kind, np.stack([floors[f] for f in folds])


# --------------------------------------------------------------------------- calibration
def _choose_atlas_cases(cases: Sequence[str], landmarks: dict, exact: Optional[Sequence[str]], n: int) -> List[str]:
    """`n` of `cases` as atlases (`choose_atlases`: exact labels first in a one-shot dataset, then coverage)."""
    from nnlandmark_h3de.inference.atlas import choose_atlases
    exact = None if exact is None else set(exact)
    flags = None if exact is None else [c in exact for c in cases]
    return [cases[i] for i in choose_atlases([landmarks[c] for c in cases], n, exact=flags)]


def validation_atlas_cases(raw_dataset: Path, train_cases: Sequence[str], val_cases: Sequence[str],
                           chosen: Sequence[str], landmarks: dict, exact: Optional[Sequence[str]],
                           n_atlases: int) -> Dict[str, List[str]]:
    """The training cases registered to each validation case: the atlases prediction uses (`chosen`), or,
    where landmarks.json names subjects (`load_case_subjects`), `n_atlases` chosen the same way among the
    training cases of subjects other than the validation case's own, so that the validation error (which
    chooses the kind and sizes the search radius) is what a new subject sees. A case whose training cases
    are all of its own subject keeps `chosen`, with a warning."""
    from nnlandmark_h3de.landmarks.dataset_file import load_case_subjects
    subjects = load_case_subjects(raw_dataset)
    if not subjects:
        return {c: list(chosen) for c in val_cases}
    out = {}
    for case in val_cases:
        own = subjects.get(case, case)
        others = [c for c in train_cases if subjects.get(c, c) != own]
        if not others:
            warnings.warn(f"{raw_dataset}: every training case is of subject {own!r}, as validation case {case!r} is; "
                          f"it is validated with atlases of its own subject (an optimistic global stage error)")
        out[case] = _choose_atlas_cases(others, landmarks, exact, n_atlases) if others else list(chosen)
    return out


def registration_validation_errors(raw_dataset: Path, train_cases: Sequence[str], val_cases: Sequence[str],
                                   n_atlases: int = 4, registration_spacing_mm: float = 4.0,
                                   kinds: Sequence[str] = ATLAS_KINDS, record: Optional[dict] = None,
                                   atlases_used: Optional[dict] = None):
    """(the atlas stage built from chosen training cases, {kind: ((V, L) radial errors in mm on the validation
    cases, seconds per case)}) for the registration kinds asked ('atlas', 'deformable'), both from one
    affine registration per atlas and case. In a one-shot dataset the cases with exact labels are
    chosen first (`exact_label_cases`); with subjects in landmarks.json each validation case is registered
    with atlases of other subjects (`validation_atlas_cases`). `record`: filled with {kind: {case: estimate
    LandmarkSet}}; `atlases_used`: with {case: the training cases registered to it}."""
    import SimpleITK as sitk
    from tqdm import tqdm
    from nnlandmark_h3de.landmarks.dataset_file import exact_label_cases, load_dataset_landmarks
    from nnlandmark_h3de.inference.atlas import atlas_estimates
    unknown = [k for k in kinds if k not in ATLAS_KINDS]
    if unknown or not kinds:
        raise ValueError(f"registration kinds must be among {ATLAS_KINDS}, got {list(kinds)}")
    landmarks = load_dataset_landmarks(raw_dataset)
    train_cases = [c for c in train_cases if c in landmarks]
    exact = exact_label_cases(raw_dataset)
    chosen = _choose_atlas_cases(train_cases, landmarks, exact, n_atlases)
    stage = AtlasGlobalStage.from_raw(raw_dataset, chosen, registration_spacing_mm)
    per_case = validation_atlas_cases(raw_dataset, train_cases, val_cases, chosen, landmarks, exact, n_atlases)
    loaded = {a.name: a for a in stage.atlases}
    nonlinear = {kind: kind == "deformable" for kind in kinds}
    errors: Dict[str, list] = {kind: [] for kind in kinds}
    seconds: Dict[str, float] = {kind: 0.0 for kind in kinds}
    for case in tqdm(val_cases, desc=f"{' and '.join(kinds)} global stage on validation cases", unit="case"):
        image = sitk.ReadImage(str(raw_case_images(raw_dataset, case)[0]), sitk.sitkFloat32)
        new = [c for c in per_case[case] if c not in loaded]
        if new:
            loaded.update({a.name: a for a in AtlasGlobalStage.from_raw(raw_dataset, new).atlases})
        estimates = atlas_estimates(image, [loaded[c] for c in per_case[case]], registration_spacing_mm,
                                    tuple(nonlinear.values()))
        truth = landmarks[case].reordered(stage.names).points_lps
        for kind, nl in nonlinear.items():
            errors[kind].append(np.linalg.norm(estimates[nl].points_lps - truth, axis=1))
            seconds[kind] += estimates[nl].seconds
            if record is not None:
                record.setdefault(kind, {})[case] = LandmarkSet(stage.names, estimates[nl].points_lps,
                                                                uncertainty_mm=estimates[nl].spread_mm)
    if atlases_used is not None:
        atlases_used.update(per_case)
    return stage, {kind: (np.asarray(errors[kind]), seconds[kind] / max(1, len(val_cases))) for kind in kinds}


def atlas_validation_errors(raw_dataset: Path, train_cases: Sequence[str], val_cases: Sequence[str],
                            n_atlases: int = 4, registration_spacing_mm: float = 4.0, nonlinear: bool = False):
    """(the atlas stage built from chosen training cases, (V, L) radial errors in mm on the validation
    cases) of one registration kind (affine, or affine + demons where `nonlinear`)."""
    kind = "deformable" if nonlinear else "atlas"
    stage, measured = registration_validation_errors(raw_dataset, train_cases, val_cases, n_atlases,
                                                     registration_spacing_mm, (kind,))
    stage.nonlinear = nonlinear
    return stage, measured[kind][0]


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
                           learned_model: Optional[Path] = None, learned_folds: Sequence = (0,), n_atlases: int = 4,
                           registration_spacing_mm: float = 4.0) -> GlobalStageChoice:
    """Measure each kind on validation, keep the one with the lowest MRE, write fold_X/global_stage.json
    (+ the atlases, shared by the atlas and deformable kinds, and the validation cases' registration
    estimates, global_stage_estimates.json, for the revalidation). The learned kind's seconds per case are
    not measured here (its errors come from its own final validation): None."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown global stage kind(s) {unknown}: choose among {list(KINDS)}")
    local_fold_folder = Path(local_fold_folder)
    floor = 3.0 * float(max(local_spacing))
    validation: Dict[str, dict] = {}
    choice = GlobalStageChoice(kind="", registration_spacing_mm=registration_spacing_mm)
    registration_kinds = [k for k in ATLAS_KINDS if k in kinds]
    recorded: Dict[str, dict] = {}
    if registration_kinds:
        stage, measured = registration_validation_errors(raw_dataset, train_cases, val_cases, n_atlases,
                                                         registration_spacing_mm, registration_kinds, record=recorded,
                                                         atlases_used=choice.validation_atlases)
        for kind, (errors, seconds) in measured.items():
            validation[kind] = dict(_error_stats(errors, floor), seconds_per_case=float(seconds))
        choice.atlases = [a.name for a in stage.atlases]
        stage.save(local_fold_folder / ATLAS_FOLDER)
    if "learned" in kinds and learned_model is None:
        print("learned global stage not measured: no model folder of a whole-image configuration given")
    if "learned" in kinds and learned_model is not None:
        errors = np.concatenate([learned_validation_errors(Path(learned_model) / f"fold_{f}") for f in learned_folds])
        validation["learned"] = dict(_error_stats(errors, floor), seconds_per_case=None)
        choice.learned_model, choice.learned_folds = str(Path(learned_model).resolve()), list(learned_folds)
    if not validation:
        raise ValueError(f"no global stage to calibrate among {list(kinds)} (a learned one needs its model folder)")
    choice.kind = min(validation, key=lambda k: validation[k]["mre_mm"])
    choice.validation = validation
    write_recorded_estimates(local_fold_folder / ESTIMATES_FILE, stage.names if registration_kinds else [],
                             recorded)  # the revalidation reuses them
    choice.write(local_fold_folder / GLOBAL_STAGE_FILE)
    return choice
