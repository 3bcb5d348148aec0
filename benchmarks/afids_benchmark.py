#!/usr/bin/env python
"""AFIDs benchmark on real anatomy: nnLandmarkTrainer vs nnH3DETrainer, each predicted over the whole
image and in two stages (global stage + local refinement), vs atlas registration alone, affine and
deformable (what a user would pick instead), and a trivial baseline, with the inter-rater distance for scale.

The AFIDs templates all live in one MNI-like space, so in their native pose a model could score
well by memorising world coordinates. Here every template is randomly re-posed (rotation,
translation, isotropic scale, field-of-view crop, intensity change; landmarks moved exactly with
the image) into several cases, and train and test never share a template (a template named on
both sides is refused). Re-posing alone is an affine problem that affine registration undoes;
real subjects differ nonlinearly, so `--deform_mm R` also deforms every case by a smooth random
diffeomorphic field of R mm RMS displacement over the foreground (landmarks moved exactly; 0, the
default, is the rigid re-posing alone). The landmarks' mean and max displacement by the nonlinear
part is reported per case. Each trainer gets the same CPU wall-clock budget on the small
configuration; the test cases are predicted with `nnLandmark_predict` and scored by the package's
one evaluator. The baseline predicts "image centre + mean landmark offset from the image centre
over the training cases"; a model that does not beat it has learned nothing about anatomy.
Atlas registration alone is the global stage by itself: the same atlases (chosen among the fold's
training cases) registered to each test case (affine; and affine + nonlinear for the deformable
row), their landmarks carried over and combined. Two-stage rows calibrate the global stage on the
validation cases (`nnLandmark_calibrate_global`) and predict with `nnLandmark_predict --global
atlas|deformable|learned`, each with a per-landmark line: where the local network
moved its global estimate closer, where worse); the whole-image row of the same model is predicted before that calibration (its
thresholds come from the whole-image validation). With `--learned_global_minutes M` a whole-image
configuration (`--whole_image`) is trained for M minutes more as the learned global stage. Seconds
per case include each command's start-up. The rater floor is computed from
`<template>.second-raters.fcsv` when present (not hard-coded).

    python benchmarks/afids_benchmark.py --templates ../shared/data/afids-templates \\
        --train human_MNI152NLin2009cAsym_T1w_2mm human_MNI305_T1w_2mm \\
        --test human_MNI152NLin6Asym_T1w_2mm --seed 0 --cpu_minutes 5 --cases_per_template 6 \\
        --deform_mm 4 --json out.json
"""
from __future__ import annotations

import argparse
import inspect
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from common import (BenchmarkError, build_cases, evaluate, format_displacement, format_per_landmark_change,
                    format_table, load_template,
                    named_landmarks, needs_global_stage, predict_images, row_from_summary, run_script,
                    train_with_budget, trainer_rows)

__all__ = ["BenchmarkError", "rater_floor", "centre_offset_baseline", "atlas_predictions", "atlas_rows", "main"]

DATASET_ID, DATASET_NAME, CONFIGURATION = 988, "AFIDsReposedBenchmark", "3d_fullres_small"
LOCAL_CONFIGURATION = "3d_local"  # trainers that need a global stage (nnLandmarkTrainerPrior): small patches
GLOBAL_CONFIGURATION = "3d_global"


# ----------------------------------------------------------------------------- rater floor
def rater_floor(folder: Path, evaluated: Sequence[str]) -> Optional[dict]:
    """Distances between the main and second-rater points of every template that has both files
    (over the evaluated landmarks, and over all for reference)."""
    from nnlandmark_h3de.landmarks import read_landmarks
    out = {}
    for second in sorted((folder / "landmarks").glob("*.second-raters.fcsv")):
        template = second.name[:-len(".second-raters.fcsv")]
        first = folder / "landmarks" / f"{template}.fcsv"
        if not first.is_file():
            continue
        a, b = named_landmarks(read_landmarks(first)), named_landmarks(read_landmarks(second))
        common = [n for n in a.names if n in b.names]
        d = np.linalg.norm(a.reordered(common).points_lps - b.reordered(common).points_lps, axis=1)
        sub = np.array([d[common.index(n)] for n in evaluated if n in common])
        out[template] = {"file": str(second), "n_all": len(common), "mean_all_mm": float(np.nanmean(d)),
                         "median_all_mm": float(np.nanmedian(d)), "max_all_mm": float(np.nanmax(d)),
                         "n_evaluated": int(sub.size), "mean_mm": float(np.nanmean(sub)),
                         "median_mm": float(np.nanmedian(sub)),
                         "SDR_2mm": float(np.mean(sub <= 2)), "SDR_4mm": float(np.mean(sub <= 4))}
    return out or None


def rater_floor_rows(floor: Optional[dict]) -> List[dict]:
    return [{"method": "rater floor (2nd raters)", "mre_mm": fl["mean_mm"], "std_mm": None,
             "median_mm": fl["median_mm"], "sdr_2mm": fl["SDR_2mm"], "sdr_4mm": fl["SDR_4mm"],
             "note": f"{template}; {fl['n_evaluated']} evaluated landmarks (all {fl['n_all']}: "
                     f"mean {fl['mean_all_mm']:.2f} mm)"} for template, fl in (floor or {}).items()]


# ------------------------------------------------------------------------------ baseline
def centre_offset_baseline(train_cases: Dict[str, tuple], test_cases: Dict[str, tuple], out: Path) -> Path:
    """Predict image centre + mean (over training cases) offset of each landmark from the centre."""
    from nnlandmark_h3de.synthesis.reposing import image_centre
    from nnlandmark_h3de.landmarks import ImageGeometry, LandmarkSet, read_landmarks, write_landmarks
    offsets, names = [], None
    for img, lm in train_cases.values():
        ls = read_landmarks(lm)
        names = names or ls.names
        offsets.append(ls.reordered(names).points_lps - image_centre(ImageGeometry.from_file(img)))
    mean = np.nanmean(np.stack(offsets), axis=0)
    for case, (img, _) in test_cases.items():
        pts = image_centre(ImageGeometry.from_file(img)) + mean
        write_landmarks(LandmarkSet(names, pts, source=case), out / f"{case}.mrk.json")
    return out


# --------------------------------------------------------------------- registration alone
def nonlinear_atlas_available() -> bool:
    from nnlandmark_h3de.inference.atlas import atlas_estimate
    return "nonlinear" in inspect.signature(atlas_estimate).parameters


def atlas_predictions(raw: Path, train_cases: Sequence[str], test_cases: Dict[str, tuple], out: Path, n_atlases: int,
                      spacing_mm: float, nonlinear: bool = False) -> Tuple[float, List[str]]:
    """Atlas registration by itself on the test cases (atlases chosen as the calibration chooses them;
    affine, or affine + nonlinear); writes out/<case>.mrk.json, returns (seconds per case, atlases)."""
    import SimpleITK as sitk
    from tqdm import tqdm
    from nnlandmark_h3de.inference.atlas import atlas_estimate, choose_atlases
    from nnlandmark_h3de.inference.global_stage import AtlasGlobalStage
    from nnlandmark_h3de.landmarks import LandmarkSet, write_landmarks
    from nnlandmark_h3de.landmarks.dataset_file import load_dataset_landmarks
    landmarks = load_dataset_landmarks(raw)
    train_cases = [c for c in train_cases if c in landmarks]
    chosen = [train_cases[i] for i in choose_atlases([landmarks[c] for c in train_cases], n_atlases)]
    stage = AtlasGlobalStage.from_raw(raw, chosen, spacing_mm)
    options = {"nonlinear": True} if nonlinear else {}
    t0 = time.monotonic()
    desc = f"{'deformable' if nonlinear else 'affine'} atlas alone"
    for case, (img, _) in tqdm(sorted(test_cases.items()), desc=desc, unit="case"):
        est = atlas_estimate(sitk.ReadImage(str(img), sitk.sitkFloat32), stage.atlases, spacing_mm, **options)
        write_landmarks(LandmarkSet(stage.names, est.points_lps, uncertainty_mm=est.spread_mm, source=case),
                        out / f"{case}.mrk.json")
    return (time.monotonic() - t0) / max(1, len(test_cases)), chosen


def atlas_rows(raw: Path, train_cases: Sequence[str], test_cases: Dict[str, tuple], truth: Path, work: Path,
               n_atlases: int, spacing_mm: float) -> List[dict]:
    """The registrations a user would run instead of a network: affine atlas, then deformable atlas."""
    rows = []
    for nonlinear, label, tag in ((False, "atlas (affine) alone", "atlas"),
                                  (True, "deformable atlas alone", "atlas_deformable")):
        if nonlinear and not nonlinear_atlas_available():
            rows.append({"method": label, "note": "not run: atlas_estimate has no nonlinear option in this version"})
            continue
        per_case, chosen = atlas_predictions(raw, train_cases, test_cases, work / f"predictions_{tag}", n_atlases,
                                             spacing_mm, nonlinear)
        rows.append(row_from_summary(label, evaluate(truth, work / f"predictions_{tag}", work / f"evaluation_{tag}"),
                                     s_per_case=round(per_case, 2),
                                     note=f"{len(chosen)} atlases, {'affine + nonlinear' if nonlinear else 'affine'}, "
                                          f"{spacing_mm:g} mm grid; no training"))
    return rows


# ------------------------------------------------------------------------------- the run
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--templates", required=True, type=Path, help="folder with images/<name>.nii.gz + landmarks/<name>.fcsv")
    p.add_argument("--train", nargs="+", required=True, help="template names for training")
    p.add_argument("--test", nargs="+", required=True, help="template names for testing (never trained on)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu_minutes", type=float, required=True, help="training wall-clock budget per trainer")
    p.add_argument("--cases_per_template", type=int, default=6, help="re-posed cases per template (default 6)")
    p.add_argument("--deform_mm", type=float, default=0.0,
                   help="RMS displacement (mm, over the foreground) of a smooth random nonlinear deformation of "
                        "every case (default 0: rigid + scale re-posing only)")
    p.add_argument("--trainers", nargs="*", default=["nnLandmarkTrainer", "nnH3DETrainer"],
                   help="trainers to train and predict with (none: registration and baseline rows only)")
    p.add_argument("--exclude_names", nargs="*", default=[],
                   help="landmarks left out (default: none, all 32 are evaluated: targets are the exact points)")
    p.add_argument("--ball_radius_mm", type=float, default=None,
                   help="label ball radius for nnU-Net's patch sampling (default: the converter's rule)")
    p.add_argument("--work_dir", type=Path, default=Path("afids_benchmark_work"),
                   help="where cases, nnU-Net folders and predictions go (default ./afids_benchmark_work)")
    p.add_argument("--overwrite", action="store_true", help="delete an existing --work_dir first")
    p.add_argument("--base_features", type=int, default=8, help="small configuration: first-stage features")
    p.add_argument("--max_features", type=int, default=64, help="small configuration: feature cap")
    p.add_argument("--iterations_per_epoch", type=int, default=50)
    p.add_argument("--json", type=Path, default=None, help="also write the table (and settings) as JSON")
    p.add_argument("--n_atlases", type=int, default=4, help="atlases of the atlas global stage (default 4)")
    p.add_argument("--registration_spacing", type=float, default=4.0, help="atlas registration grid, mm (default 4)")
    p.add_argument("--learned_global_minutes", type=float, default=0.0,
                   help="also train a whole-image configuration for this many CPU minutes as the learned global "
                        "stage (default 0: atlas global stage only)")
    p.add_argument("--global_patch", type=int, default=64, help="patch edge of the whole-image configuration")
    p.add_argument("--local_patch", type=int, default=32,
                   help=f"patch edge of {LOCAL_CONFIGURATION}, the configuration of trainers that need a global stage")
    p.add_argument("--local_batch", type=int, default=4, help=f"batch size of {LOCAL_CONFIGURATION}")
    p.add_argument("--local_base_features", type=int, default=16,
                   help=f"first-stage features of {LOCAL_CONFIGURATION} (default 16: after 10 CPU minutes on the "
                        "validation cases, 2.27 mm against 2.59 mm with 8, at 0.67x the steps; bench_local_stage.py)")
    p.add_argument("--local_trainers", nargs="*", default=[],
                   help=f"trainers also trained on {LOCAL_CONFIGURATION} (those that need a global stage always are), "
                        "e.g. nnLandmarkTrainerLocal, the best local stage per CPU minute in bench_local_stage.py")
    return p.parse_args(argv)


def check_inputs(args) -> None:
    """Refuse a leaky split or a missing file before any work, naming the template or file."""
    both = sorted(set(args.train) & set(args.test))
    if both:
        raise BenchmarkError(f"templates {both} are on both the --train and the --test side; a test template "
                             f"must never be trained on")
    if args.cases_per_template < 2:
        raise BenchmarkError("--cases_per_template must be >= 2 (one training case per template is held out for validation)")
    if not (np.isfinite(args.deform_mm) and args.deform_mm >= 0):
        raise BenchmarkError(f"--deform_mm must be a number >= 0, got {args.deform_mm}")
    for t in list(args.train) + list(args.test):
        load_template(args.templates, t)


def fresh_work_dir(path: Path, overwrite: bool) -> Path:
    work = path.resolve()
    if work.exists():
        if not overwrite:
            raise BenchmarkError(f"{work} exists; pass --overwrite or another --work_dir")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return work


def make_dataset(args, work: Path, env: dict) -> dict:
    """Re-posed (and deformed) cases, the raw nnU-Net dataset with its test cases and one split (the last
    case of every training template is validation); landmark names fixed by the first training template.
    Each case's template is its subject in landmarks.json, so that the global stage's calibration
    validates a case with atlases made from the other templates, as a test case will be."""
    from nnlandmark_h3de.conversion import convert_dataset
    from nnlandmark_h3de.demo.commands import environment
    _, first = load_template(args.templates, args.train[0])
    names = [n for n in first.names if n not in set(args.exclude_names)]
    train, moved_train = build_cases(args.templates, args.train, work / "cases_train", args.cases_per_template,
                                     args.seed, args.exclude_names, names, args.deform_mm)
    test, moved_test = build_cases(args.templates, args.test, work / "cases_test", args.cases_per_template, args.seed,
                                   args.exclude_names, names, args.deform_mm)
    val = [c for c in sorted(train) if c.endswith(f"_r{args.cases_per_template - 1:02d}")]
    splits = [{"train": [c for c in sorted(train) if c not in val], "val": val}]
    subjects = {c: c.rsplit("_r", 1)[0] for c in {**train, **test}}  # the template a case was made from
    with environment(env):
        raw = convert_dataset({**train, **test}, work / "nnUNet_raw" / f"Dataset{DATASET_ID}_{DATASET_NAME}",
                              names=names, test_cases=sorted(test), splits=splits, ball_radius_mm=args.ball_radius_mm,
                              subjects=subjects)
    return {"names": names, "train": train, "test": test, "val": val, "fit": splits[0]["train"], "raw": raw,
            "displacement": {**moved_train, **moved_test}}


def plan_and_preprocess(env: dict, logs: Path) -> None:
    """nnU-Net planning + preprocessing of 3d_fullres (the data every small configuration shares)."""
    from nnlandmark_h3de.demo.commands import find_command, run_command
    run_command("plan_and_preprocess", [find_command("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID),
                                        "-c", "3d_fullres", "-np", "1"], {**env, "nnUNet_n_proc_DA": "1"},
                logs / "plan_and_preprocess.log")


def add_configuration(env: dict, logs: Path, name: str, base_features: int, max_features: int,
                      patch: Optional[int] = None, batch: Optional[int] = None) -> None:
    """A small configuration (nnLandmark_add_small_config) with a cubic patch and batch (default: its own);
    its deepest stage has at least the first stage's features."""
    from nnlandmark_h3de.demo.commands import find_command, run_command
    max_features = max(max_features, base_features)
    shape = [] if patch is None else ["--patch_size", *[str(patch)] * 3]
    run_command(f"configuration {name}", [
        find_command("nnLandmark_add_small_config"), "-d", str(DATASET_ID), "--name", name, *shape,
        *([] if batch is None else ["--batch_size", str(batch)]), "--base_features", str(base_features),
        "--max_features", str(max_features)], env, logs / f"configuration_{name}.log")


def plan_benchmark_configurations(args, env: dict, logs: Path) -> None:
    """nnU-Net planning + preprocessing, the small configuration of the whole-image trainers and the local
    one (smaller patches, same spacing and preprocessed data) of those that need a global stage."""
    plan_and_preprocess(env, logs)
    add_configuration(env, logs, CONFIGURATION, args.base_features, args.max_features)
    add_configuration(env, logs, LOCAL_CONFIGURATION, args.local_base_features, args.max_features, args.local_patch,
                      args.local_batch)


def learned_global_stage(args, raw: Path, work: Path, env: dict):
    """Train the whole-image configuration as the learned global stage; (its row, its model folder)."""
    from nnlandmark_h3de.demo.commands import find_command, run_command
    logs = work / "logs"
    run_command("whole-image configuration", [
        find_command("nnLandmark_add_small_config"), "-d", str(DATASET_ID), "--name", GLOBAL_CONFIGURATION,
        "--whole_image", "--patch_size", *[str(args.global_patch)] * 3, "--base_features",
        str(args.base_features), "--max_features", str(args.max_features)], env, logs / "global_config.log")
    run_command("preprocess whole-image", [find_command("nnUNetv2_preprocess"), "-d", str(DATASET_ID), "-c",
                                           GLOBAL_CONFIGURATION, "-np", "1"], env, logs / "global_preprocess.log")
    name, train_s, epochs = train_with_budget("global", "nnLandmarkTrainer", DATASET_ID, GLOBAL_CONFIGURATION,
                                              args.learned_global_minutes, work, env, args.iterations_per_epoch)
    model = work / "nnUNet_results" / raw.name / f"{name}__nnUNetPlans__{GLOBAL_CONFIGURATION}"
    pred = work / "predictions_learned_global"
    per_case = predict_images("learned_global", raw / "imagesTs", DATASET_ID,
                              ["-c", GLOBAL_CONFIGURATION, "-tr", name, "--global", "none"], pred, env, logs)
    row = row_from_summary(f"learned global stage alone ({GLOBAL_CONFIGURATION})",
                           evaluate(work / "cases_test" / "landmarks", pred, work / "evaluation_learned_global"),
                           s_per_case=round(per_case, 2), train_wall_s=round(train_s, 1), epochs=epochs,
                           note=f"{epochs} epochs, {train_s:.0f} s train+final val")
    return row, model


def failed_row(method: str, error: Exception, failures: List[str]) -> dict:
    failures.append(f"{method}: {error}")
    return {"method": method, "note": f"FAILED: {str(error).splitlines()[0]}"}


def report(args, data: dict, rows: List[dict], floor, timings: dict, failures: List[str], work: Path) -> None:
    """The table on stdout (and the cases' nonlinear displacement), everything in --json."""
    from nnlandmark_h3de.landmarks.atomic import atomic_write_text
    print()
    print(f"AFIDs benchmark: train {args.train} x {args.cases_per_template} re-posed, test {args.test} x "
          f"{args.cases_per_template} re-posed, deform_mm {args.deform_mm:g}, {len(data['names'])} landmarks, "
          f"seed {args.seed}, {args.cpu_minutes:g} CPU-min training per trainer")
    if args.deform_mm > 0:
        print(format_displacement(data["displacement"]))
    print(format_table(rows))
    for row in rows:
        if row.get("per_landmark"):
            print(f"{row['method']} vs its global stage alone: {format_per_landmark_change(row['per_landmark'])}")
    print(f"errors over true positives (mm, world); SDR: error <= r; total {timings['total_s']:.0f} s; work dir {work}")
    if args.json:
        doc = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "landmarks": data["names"], "excluded": list(args.exclude_names),
               "cases": {"train": sorted(data["train"]), "val": data["val"], "test": sorted(data["test"])},
               "nonlinear_displacement": data["displacement"], "rows": rows, "rater_floor": floor,
               "timings": timings, "failures": failures}
        atomic_write_text(args.json, json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")
    for f_ in failures:
        print(f"FAILED {f_}", file=sys.stderr)


def main(argv=None) -> int:
    args = parse_args(argv)
    from nnlandmark_h3de.demo.commands import DemoError, missing_commands, nnunet_environment
    check_inputs(args)
    missing = missing_commands(["plan_and_preprocess", "small_configuration", "train", "predict"])
    if missing:
        raise BenchmarkError("cannot run: " + "; ".join(f"{k}: {v}" for k, v in missing.items()))
    work = fresh_work_dir(args.work_dir, args.overwrite)
    env, timings, t0 = nnunet_environment(work), {}, time.monotonic()
    data = make_dataset(args, work, env)
    raw, truth = data["raw"], work / "cases_test" / "landmarks"
    timings["cases_and_convert_s"] = time.monotonic() - t0
    rows, failures, learned_model = [], [], None
    if args.trainers or args.learned_global_minutes > 0:
        t1 = time.monotonic()
        plan_benchmark_configurations(args, env, work / "logs")
        timings["plan_preprocess_s"] = time.monotonic() - t1
    if args.learned_global_minutes > 0:
        t3 = time.monotonic()
        try:
            row, learned_model = learned_global_stage(args, raw, work, env)
            rows.append(row)
        except (DemoError, RuntimeError) as e:
            rows.append(failed_row("learned global stage", e, failures))
        timings["learned_global_s"] = time.monotonic() - t3
    rows += atlas_rows(raw, data["fit"], data["test"], truth, work, args.n_atlases, args.registration_spacing)
    for trainer in args.trainers:
        try:
            local = trainer in args.local_trainers or needs_global_stage(trainer, env)
            configuration = LOCAL_CONFIGURATION if local else CONFIGURATION
            rows += trainer_rows(trainer, raw=raw, dataset_id=DATASET_ID, configuration=configuration,
                                 minutes=args.cpu_minutes, iterations_per_epoch=args.iterations_per_epoch,
                                 images=raw / "imagesTs", truth=truth, work=work, env=env,
                                 n_atlases=args.n_atlases, registration_spacing=args.registration_spacing,
                                 learned_model=learned_model)
        except (DemoError, RuntimeError) as e:
            rows.append(failed_row(trainer, e, failures))
    base = centre_offset_baseline(data["train"], data["test"], work / "predictions_baseline")
    rows.append(row_from_summary("baseline: centre + mean offset", evaluate(truth, base, work / "evaluation_baseline"),
                                 note="no learning; image centres aligned"))
    floor = rater_floor(args.templates, data["names"])
    rows += rater_floor_rows(floor)
    timings["total_s"] = time.monotonic() - t0
    report(args, data, rows, floor, timings, failures, work)
    return 1 if failures else 0


if __name__ == "__main__":
    run_script(main, "afids_benchmark")
