#!/usr/bin/env python
"""AFIDs benchmark on real anatomy: nnLandmarkTrainer vs nnH3DETrainer, each predicted over the whole
image and in two stages (global stage + local refinement), vs atlas registration alone (what a user
would pick instead) and a trivial baseline, with the inter-rater distance for scale.

The AFIDs templates all live in one MNI-like space, so in their native pose a model could score
well by memorising world coordinates. Here every template is randomly re-posed (rotation,
translation, isotropic scale, field-of-view crop, intensity change; landmarks moved exactly with
the image) into several cases, and train and test never share a template (a template named on
both sides is refused). Each trainer gets the same CPU wall-clock budget on the small
configuration; the test cases are predicted with `nnLandmark_predict` and scored by the package's
one evaluator. The baseline predicts "image centre + mean landmark offset from the image centre
over the training cases"; a model that does not beat it has learned nothing about anatomy.
Atlas registration alone is the global stage by itself: the same atlases (chosen among the fold's
training cases) registered to each test case, their landmarks carried over and combined. Two-stage
rows calibrate the global stage on the validation cases (`nnLandmark_calibrate_global`) and predict
with `nnLandmark_predict --global atlas|learned`; the whole-image row of the same model is predicted
before that calibration (its thresholds come from the whole-image validation). With
`--learned_global_minutes M` a whole-image configuration (`--whole_image`) is trained for M minutes
more as the learned global stage. Times per case include each command's start-up.
The rater floor is computed from `<template>.second-raters.fcsv` when present (not hard-coded).

    python benchmarks/afids_benchmark.py --templates ../shared/data/afids-templates \\
        --train human_MNI152NLin2009cAsym_T1w_2mm human_MNI305_T1w_2mm \\
        --test human_MNI152NLin6Asym_T1w_2mm --seed 0 --cpu_minutes 5 --cases_per_template 6 --json out.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

DATASET_ID, DATASET_NAME, CONFIGURATION = 988, "AFIDsReposedBenchmark", "3d_fullres_small"
GLOBAL_ESTIMATES_FOLDER = "global_stage"  # nnLandmark_predict --save_global_estimates writes OUT/global_stage/
GLOBAL_CONFIGURATION = "3d_global"


class BenchmarkError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- templates
def named_landmarks(ls):
    """AFIDs .fcsv `label` is the AFID number; name landmarks by their `desc` ("AC", "L MB", ...)
    when those are unique, so left/right pairs are found."""
    from nnlandmark_h3de.landmarks import LandmarkSet
    desc = [d.strip() for d in (ls.descriptions or [])]
    if len(desc) == len(ls) and all(desc) and len(set(desc)) == len(desc):
        return LandmarkSet(desc, ls.points_lps, descriptions=list(ls.names), source=ls.source)
    return ls


def load_template(folder: Path, name: str):
    """(sitk image, LandmarkSet) of images/<name>.nii[.gz] + landmarks/<name>.fcsv (or .mrk.json)."""
    from nnlandmark_h3de.landmarks import read_image, read_landmarks
    image = next((folder / "images" / f"{name}{ext}" for ext in (".nii.gz", ".nii", ".nrrd", ".mha")
                  if (folder / "images" / f"{name}{ext}").is_file()), None)
    marks = next((folder / "landmarks" / f"{name}{ext}" for ext in (".fcsv", ".mrk.json")
                  if (folder / "landmarks" / f"{name}{ext}").is_file()), None)
    if image is None:
        raise BenchmarkError(f"{folder / 'images'}: no image {name}.nii.gz (or .nii/.nrrd/.mha)")
    if marks is None:
        raise BenchmarkError(f"{folder / 'landmarks'}: no landmark file {name}.fcsv (or .mrk.json)")
    return read_image(image), named_landmarks(read_landmarks(marks))


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


# ---------------------------------------------------------------------------- re-posed cases
def build_cases(folder: Path, templates: Sequence[str], out: Path, n_per_template: int, seed: int,
                exclude: Sequence[str], names: Optional[List[str]] = None) -> Dict[str, tuple]:
    """Write n re-posed cases per template into out/images, out/landmarks; {case: (image, landmarks)}."""
    import SimpleITK as sitk
    from tqdm import tqdm
    from nnlandmark_h3de.demo.reposing import IntensityChange, repose_case
    from nnlandmark_h3de.landmarks import LandmarkSet, atomic_path, write_landmarks

    cases = {}
    with tqdm(total=len(templates) * n_per_template, desc=f"re-posing {out.name}", unit="case") as bar:
        for t in templates:
            image, ls = load_template(folder, t)
            keep = [n for n in ls.names if n not in set(exclude)]
            if names is not None:
                missing = [n for n in names if n not in keep]
                if missing:
                    raise BenchmarkError(f"{t}: landmarks {missing} missing (other templates have them)")
                keep = list(names)
            idx = [ls.names.index(n) for n in keep]
            ls = LandmarkSet(keep, ls.points_lps[idx], source=ls.source,
                             descriptions=None if ls.descriptions is None else [ls.descriptions[i] for i in idx])
            for k in range(n_per_template):
                rng = np.random.default_rng([seed, zlib.crc32(t.encode()), k])
                new_image, new_ls = repose_case(image, ls, rng, max_rotation_deg=15, max_translation_mm=10,
                                                scale_range=(0.9, 1.1), crop_fraction=(0.8, 1.0),
                                                intensity=IntensityChange(), margin_vox=-3)
                case = f"{t}_r{k:02d}"
                img_path, lm_path = out / "images" / f"{case}.nii.gz", out / "landmarks" / f"{case}.mrk.json"
                with atomic_path(img_path) as tmp:
                    sitk.WriteImage(new_image, str(tmp), True)
                write_landmarks(new_ls, lm_path)
                cases[case] = (img_path, lm_path)
                bar.update(1)
    return cases


# ------------------------------------------------------------------------------ baseline
def centre_offset_baseline(train_cases: Dict[str, tuple], test_cases: Dict[str, tuple], out: Path) -> Path:
    """Predict image centre + mean (over training cases) offset of each landmark from the centre."""
    from nnlandmark_h3de.demo.reposing import image_centre
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


def atlas_alone(raw: Path, train_cases: Sequence[str], test_cases: Dict[str, tuple], out: Path, n_atlases: int,
                spacing_mm: float) -> float:
    """The atlas global stage by itself on the test cases (atlases chosen as the calibration chooses
    them); returns seconds per case."""
    from tqdm import tqdm
    from nnlandmark_h3de.conversion import load_dataset_landmarks
    from nnlandmark_h3de.inference.atlas import choose_atlases
    from nnlandmark_h3de.inference.global_stage import AtlasGlobalStage
    from nnlandmark_h3de.landmarks import write_landmarks
    landmarks = load_dataset_landmarks(raw)
    train_cases = [c for c in train_cases if c in landmarks]
    chosen = [train_cases[i] for i in choose_atlases([landmarks[c] for c in train_cases], n_atlases)]
    stage = AtlasGlobalStage.from_raw(raw, chosen, spacing_mm)
    t0 = time.monotonic()
    for case, (img, _) in tqdm(sorted(test_cases.items()), desc="atlas registration alone", unit="case"):
        write_landmarks(stage.estimate([img]), out / f"{case}.mrk.json")
    return (time.monotonic() - t0) / max(1, len(test_cases))


# -------------------------------------------------------------------------------- metrics
def evaluate(reference: Path, predictions: Path, out: Path) -> dict:
    from nnlandmark_h3de.evaluation.evaluate import evaluate_folders
    return evaluate_folders(reference, predictions, out / "summary.json")


def row_from_summary(label: str, summary: dict, **extra) -> dict:
    m = summary["foreground_mean"]["micro"]
    return {"method": label, "mre_mm": m["mean_radial_error_mm"], "std_mm": m["std_radial_error_mm"],
            "median_mm": m["median_radial_error_mm"], "sdr_2mm": m["SDR_2mm"], "sdr_4mm": m["SDR_4mm"],
            "TP": m["TP"], "FN": m["FN"], "FP": m["FP"], "TN": m["TN"], **extra}


def format_table(rows: List[dict]) -> str:
    def f(v, spec):
        return "-" if v is None else format(v, spec)
    w = max(len(r["method"]) for r in rows)
    head = f"{'method':<{w}}  {'MRE mm':>15} {'median':>7} {'SDR@2mm':>8} {'SDR@4mm':>8} {'TP':>4} {'FN':>4} {'FP':>4}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        mre = "-" if r.get("mre_mm") is None else f"{r['mre_mm']:.2f}" + (
            "" if r.get("std_mm") is None else f" +- {r['std_mm']:.2f}")
        sdr = lambda k: "-" if r.get(k) is None else f"{100 * r[k]:.1f}%"
        lines.append(f"{r['method']:<{w}}  {mre:>15} {f(r.get('median_mm'), '7.2f'):>7} {sdr('sdr_2mm'):>8} "
                     f"{sdr('sdr_4mm'):>8} {f(r.get('TP'), 'd'):>4} {f(r.get('FN'), 'd'):>4} {f(r.get('FP'), 'd'):>4}  "
                     f"{r.get('note', '')}")
    return "\n".join(lines)


# -------------------------------------------------------------------------------- main
# ------------------------------------------------------------------------------- trainers
def predict_images(label: str, images: Path, dataset_id: int, model_args: Sequence[str], out: Path, env: dict,
                   logs: Path) -> float:
    """nnLandmark_predict (fold 0, CPU) on a folder of case_0000 images; seconds per case (start-up included)."""
    from nnlandmark_h3de.demo.pipeline import find_command, run_command
    n = len(list(images.glob("*_0000.*")))
    t = time.monotonic()
    run_command(f"predict {label}", [find_command("nnLandmark_predict"), "-i", str(images), "-o", str(out), "-d",
                                     str(dataset_id), *model_args, "-f", "0", "-device", "cpu", "-npp", "1"], env,
                logs / f"predict_{label}.log")
    return (time.monotonic() - t) / max(1, n)


def trainer_rows(trainer: str, *, raw: Path, dataset_id: int, configuration: str, minutes: float,
                 iterations_per_epoch: int, images: Path, truth: Path, work: Path, env: dict, n_atlases: int,
                 registration_spacing: float, learned_model: Optional[Path] = None, tag: str = "",
                 title: Optional[str] = None, predict_args: Sequence[str] = ()) -> List[dict]:
    """Train `trainer` on fold 0 for a CPU budget, predict `images` over the whole image, calibrate the
    global stage(s) on the validation cases and predict in two stages; one row per prediction, scored
    against `truth`. `tag` prefixes work folders and logs (several datasets in one work dir); rows are
    labelled `title` (default: the trainer). `predict_args` go to every nnLandmark_predict."""
    import contextlib
    import io
    from nnlandmark_h3de.demo.budget_trainer import write_budget_trainer
    from nnlandmark_h3de.demo.pipeline import _count_epochs, environment, find_command, run_command
    logs, label, title = work / "logs", f"{tag}{trainer}", title or trainer
    t2 = time.monotonic()
    with environment(env), contextlib.redirect_stdout(io.StringIO()):
        name = write_budget_trainer(work / "trainers", trainer, 60.0 * minutes,
                                    iterations_per_epoch=iterations_per_epoch, val_iterations_per_epoch=max(1, iterations_per_epoch // 10))
    lines = run_command(f"train {label}", [find_command("nnUNetv2_train"), str(dataset_id), configuration, "0",
                                           "-tr", name, "-device", "cpu"], env, logs / f"train_{label}.log",
                        progress_pattern=r"Epoch \d+\s*$")
    train_s, epochs = time.monotonic() - t2, _count_epochs(lines)
    model_args = ["-c", configuration, "-tr", name]
    pred = work / f"predictions_{label}"
    per_case = predict_images(label, images, dataset_id, [*model_args, "--global", "none", *predict_args], pred, env,
                              logs)
    rows = [row_from_summary(f"{title} (whole image)", evaluate(truth, pred, work / f"evaluation_{label}"),
                             train_wall_s=round(train_s, 1), epochs=epochs, s_per_case=round(per_case, 1),
                             note=f"{epochs} epochs, {train_s:.0f} s train+final val; {per_case:.1f} s/case")]
    kinds = ["atlas"] + (["learned"] if learned_model is not None else [])
    t4 = time.monotonic()
    run_command(f"calibrate global {label}", [
        find_command("nnLandmark_calibrate_global"), "-d", str(dataset_id), "-c", configuration, "-tr", name,
        "-f", "0", "--kinds", *kinds, "--n_atlases", str(n_atlases), "--registration_spacing",
        str(registration_spacing), "-device", "cpu"]
        + (["--learned_model", str(learned_model)] if learned_model is not None else []),
        env, logs / f"calibrate_{label}.log")
    calibrate_s = time.monotonic() - t4
    choice = json.loads((work / "nnUNet_results" / raw.name / f"{name}__nnUNetPlans__{configuration}" / "fold_0" /
                         "global_stage.json").read_text())
    for kind in kinds:
        pred = work / f"predictions_{label}_two_stage_{kind}"
        per_case = predict_images(f"{label}_{kind}", images, dataset_id,
                                  [*model_args, "--global", kind, "--save_global_estimates", *predict_args], pred,
                                  env, logs)
        v = choice["validation"][kind]
        rows.append(row_from_summary(
            f"{title} two-stage ({kind} global)", evaluate(truth, pred, work / f"evaluation_{label}_{kind}"),
            s_per_case=round(per_case, 1), radius_mm=round(v["radius_mm"], 2), calibrate_s=round(calibrate_s, 1),
            note=f"same model; search radius {v['radius_mm']:.1f} mm (validation p90 {v['p90_mm']:.1f} mm)"
                 f"{', kept by calibration' if choice['kind'] == kind else ''}; {per_case:.1f} s/case"))
        rows.append(row_from_summary(  # what the local network adds: the estimates it started from
            f"{title}: its {kind} global stage alone", evaluate(truth, pred / GLOBAL_ESTIMATES_FOLDER,
                                                                work / f"evaluation_{label}_{kind}_global"),
            note=f"the two-stage run's own global estimates ({', '.join(choice.get('atlases', [])) or kind})"))
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--templates", required=True, type=Path, help="folder with images/<name>.nii.gz + landmarks/<name>.fcsv")
    p.add_argument("--train", nargs="+", required=True, help="template names for training")
    p.add_argument("--test", nargs="+", required=True, help="template names for testing (never trained on)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu_minutes", type=float, required=True, help="training wall-clock budget per trainer")
    p.add_argument("--cases_per_template", type=int, default=6, help="re-posed cases per template (default 6)")
    p.add_argument("--trainers", nargs="+", default=["nnLandmarkTrainer", "nnH3DETrainer"])
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
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from nnlandmark_h3de.conversion import convert_dataset
    from nnlandmark_h3de.demo.budget_trainer import write_budget_trainer
    from nnlandmark_h3de.demo.pipeline import (DemoError, _count_epochs, environment, find_command,
                                               missing_commands, nnunet_environment, run_command)
    from nnlandmark_h3de.landmarks.atomic import atomic_write_text

    both = sorted(set(args.train) & set(args.test))
    if both:
        raise BenchmarkError(f"templates {both} are on both the --train and the --test side; a test template "
                             f"must never be trained on")
    if args.cases_per_template < 2:
        raise BenchmarkError("--cases_per_template must be >= 2 (one training case per template is held out for validation)")
    for t in list(args.train) + list(args.test):
        load_template(args.templates, t)  # fail before any work, naming the file
    missing = {k: v for k, v in missing_commands(["plan_and_preprocess", "small_configuration", "train",
                                                  "predict"]).items()}
    if missing:
        raise BenchmarkError("cannot run: " + "; ".join(f"{k}: {v}" for k, v in missing.items()))

    work = args.work_dir.resolve()
    if work.exists():
        if not args.overwrite:
            raise BenchmarkError(f"{work} exists; pass --overwrite or another --work_dir")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    env = nnunet_environment(work)
    timings = {}
    t0 = time.monotonic()

    # 1. re-posed cases; landmark names fixed by the first training template
    _, first = load_template(args.templates, args.train[0])
    names = [n for n in first.names if n not in set(args.exclude_names)]
    train = build_cases(args.templates, args.train, work / "cases_train", args.cases_per_template, args.seed,
                        args.exclude_names, names)
    test = build_cases(args.templates, args.test, work / "cases_test", args.cases_per_template, args.seed,
                       args.exclude_names, names)
    val = [c for c in sorted(train) if c.endswith(f"_r{args.cases_per_template - 1:02d}")]
    splits = [{"train": [c for c in sorted(train) if c not in val], "val": val}]
    with environment(env):
        raw = convert_dataset({**train, **test}, work / "nnUNet_raw" / f"Dataset{DATASET_ID}_{DATASET_NAME}",
                              names=names, test_cases=sorted(test), splits=splits, ball_radius_mm=args.ball_radius_mm)
    timings["cases_and_convert_s"] = time.monotonic() - t0

    # 2. nnU-Net planning + the small configuration (shared by both trainers)
    t1 = time.monotonic()
    logs = work / "logs"
    run_command("plan_and_preprocess", [find_command("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID),
                                        "-c", "3d_fullres", "-np", "1"], {**env, "nnUNet_n_proc_DA": "1"},
                logs / "plan_and_preprocess.log")
    run_command("small_configuration", [find_command("nnLandmark_add_small_config"), "-d", str(DATASET_ID),
                                        "--name", CONFIGURATION, "--base_features", str(args.base_features),
                                        "--max_features", str(args.max_features)], env, logs / "small_configuration.log")
    timings["plan_preprocess_s"] = time.monotonic() - t1

    rows, failures = [], []

    learned_model = None
    if args.learned_global_minutes > 0:
        t3 = time.monotonic()
        try:
            import contextlib
            import io
            run_command("whole-image configuration", [
                find_command("nnLandmark_add_small_config"), "-d", str(DATASET_ID), "--name", GLOBAL_CONFIGURATION,
                "--whole_image", "--patch_size", *[str(args.global_patch)] * 3, "--base_features",
                str(args.base_features), "--max_features", str(args.max_features)], env, logs / "global_config.log")
            run_command("preprocess whole-image", [find_command("nnUNetv2_preprocess"), "-d", str(DATASET_ID), "-c",
                                                   GLOBAL_CONFIGURATION, "-np", "1"], env, logs / "global_preprocess.log")
            with environment(env), contextlib.redirect_stdout(io.StringIO()):
                gname = write_budget_trainer(work / "trainers", "nnLandmarkTrainer", 60.0 * args.learned_global_minutes,
                                             iterations_per_epoch=args.iterations_per_epoch,
                                             val_iterations_per_epoch=max(1, args.iterations_per_epoch // 10))
            lines = run_command("train learned global stage", [find_command("nnUNetv2_train"), str(DATASET_ID),
                                                               GLOBAL_CONFIGURATION, "0", "-tr", gname, "-device", "cpu"],
                                env, logs / "train_global.log", progress_pattern=r"Epoch \d+\s*$")
            train_s = time.monotonic() - t3
            learned_model = work / "nnUNet_results" / raw.name / f"{gname}__nnUNetPlans__{GLOBAL_CONFIGURATION}"
            pred = work / "predictions_learned_global"
            per_case = predict_images("learned_global", raw / "imagesTs", DATASET_ID,
                                      ["-c", GLOBAL_CONFIGURATION, "-tr", gname, "--global", "none"], pred, env, logs)
            summary = evaluate(work / "cases_test" / "landmarks", pred, work / "evaluation_learned_global")
            rows.append(row_from_summary(f"learned global stage alone ({GLOBAL_CONFIGURATION})", summary,
                                         s_per_case=round(per_case, 1), train_wall_s=round(train_s, 1),
                                         epochs=_count_epochs(lines),
                                         note=f"{_count_epochs(lines)} epochs, {train_s:.0f} s train+final val; "
                                              f"{per_case:.1f} s/case"))
        except (DemoError, RuntimeError) as e:
            failures.append(f"learned global stage: {e}")
            rows.append({"method": "learned global stage", "note": f"FAILED: {str(e).splitlines()[0]}"})
            learned_model = None
        timings["learned_global_s"] = time.monotonic() - t3

    per_case = atlas_alone(raw, splits[0]["train"], test, work / "predictions_atlas", args.n_atlases,
                           args.registration_spacing)
    rows.append(row_from_summary("atlas registration alone", evaluate(work / "cases_test" / "landmarks",
                                                                      work / "predictions_atlas",
                                                                      work / "evaluation_atlas"),
                                 s_per_case=round(per_case, 1),
                                 note=f"{args.n_atlases} atlases, affine, {args.registration_spacing:g} mm grid; "
                                      f"no training; {per_case:.1f} s/case"))
    for trainer in args.trainers:
        try:
            rows += trainer_rows(trainer, raw=raw, dataset_id=DATASET_ID, configuration=CONFIGURATION,
                                 minutes=args.cpu_minutes, iterations_per_epoch=args.iterations_per_epoch,
                                 images=raw / "imagesTs", truth=work / "cases_test" / "landmarks", work=work, env=env,
                                 n_atlases=args.n_atlases, registration_spacing=args.registration_spacing,
                                 learned_model=learned_model)
        except (DemoError, RuntimeError) as e:
            failures.append(f"{trainer}: {e}")
            rows.append({"method": trainer, "note": f"FAILED: {str(e).splitlines()[0]}"})

    base = centre_offset_baseline(train, test, work / "predictions_baseline")
    rows.append(row_from_summary("baseline: centre + mean offset", evaluate(work / "cases_test" / "landmarks", base,
                                                                         work / "evaluation_baseline"),
                                 note="no learning; image centres aligned"))
    floor = rater_floor(args.templates, names)
    for template, fl in (floor or {}).items():
        rows.append({"method": "rater floor (2nd raters)", "mre_mm": fl["mean_mm"], "std_mm": None,
                     "median_mm": fl["median_mm"], "sdr_2mm": fl["SDR_2mm"], "sdr_4mm": fl["SDR_4mm"],
                     "note": f"{template}; {fl['n_evaluated']} evaluated landmarks (all {fl['n_all']}: "
                             f"mean {fl['mean_all_mm']:.2f} mm)"})
    timings["total_s"] = time.monotonic() - t0

    print()
    print(f"AFIDs benchmark: train {args.train} x {args.cases_per_template} re-posed, test {args.test} x "
          f"{args.cases_per_template} re-posed, {len(names)} landmarks, seed {args.seed}, "
          f"{args.cpu_minutes:g} CPU-min training per trainer")
    print(format_table(rows))
    print(f"errors over true positives (mm, world); SDR: error <= r; total {timings['total_s']:.0f} s; work dir {work}")
    if args.json:
        doc = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "landmarks": names, "excluded": list(args.exclude_names), "cases": {"train": sorted(train),
                                                                                  "val": val, "test": sorted(test)},
               "rows": rows, "rater_floor": floor, "timings": timings, "failures": failures}
        atomic_write_text(args.json, json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")
    for f_ in failures:
        print(f"FAILED {f_}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchmarkError as e:
        print(f"afids_benchmark: error: {e}", file=sys.stderr)
        sys.exit(2)
