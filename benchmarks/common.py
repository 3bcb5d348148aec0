"""What the benchmark scripts share: AFIDs templates and the one generator of re-posed (optionally
nonlinearly deformed) cases, scoring with the package's evaluator, the results table, and the
budgeted training + whole-image / two-stage prediction rows.

Scripts run as `python benchmarks/<name>.py`, so Python already searches this folder first and
they `import common` as is, with no import-path edits.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

GLOBAL_ESTIMATES_FOLDER = "global_stage"  # nnLandmark_predict --save_global_estimates writes OUT/global_stage/

# the re-posing every benchmark case gets (rotation, translation, isotropic scale, field-of-view crop)
REPOSE_OPTIONS = dict(max_rotation_deg=15, max_translation_mm=10, scale_range=(0.9, 1.1), crop_fraction=(0.8, 1.0),
                      margin_vox=-3)


class BenchmarkError(RuntimeError):
    """Bad benchmark input (a template on both sides, a missing file): the message names it."""


def run_script(main: Callable[[], int], prog: str) -> None:
    """Exit with main()'s status; a BenchmarkError is one line on stderr and status 2, not a traceback."""
    try:
        sys.exit(main())
    except BenchmarkError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)


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


def selected_landmarks(ls, template: str, exclude: Sequence[str], names: Optional[Sequence[str]]):
    """`ls` restricted to `names` (default: all but `exclude`), in that order; names it lacks are an error."""
    from nnlandmark_h3de.landmarks import LandmarkSet
    keep = [n for n in ls.names if n not in set(exclude)]
    if names is not None:
        missing = [n for n in names if n not in keep]
        if missing:
            raise BenchmarkError(f"{template}: landmarks {missing} missing (other templates have them)")
        keep = list(names)
    idx = [ls.names.index(n) for n in keep]
    return LandmarkSet(keep, ls.points_lps[idx], source=ls.source,
                       descriptions=None if ls.descriptions is None else [ls.descriptions[i] for i in idx])


# ---------------------------------------------------------------------------- generated cases
def case_rng(seed: int, template: str, k: int) -> np.random.Generator:
    """The random stream of case k of a template: the same case for the same seed on every run."""
    return np.random.default_rng([seed, zlib.crc32(template.encode()), k])


def build_cases(folder: Path, templates: Sequence[str], out: Path, n_per_template: int, seed: int,
                exclude: Sequence[str], names: Optional[List[str]] = None,
                deform_mm: float = 0.0) -> Tuple[Dict[str, tuple], Dict[str, dict]]:
    """Write n re-posed cases per template into out/images, out/landmarks, each deformed by a smooth
    random nonlinear field of `deform_mm` RMS displacement when > 0 (0: rigid + scale re-posing only).
    Returns ({case: (image file, landmark file)}, {case: landmarks' mean/max nonlinear displacement})."""
    import SimpleITK as sitk
    from tqdm import tqdm
    from nnlandmark_h3de.landmarks import atomic_path, write_landmarks
    from nnlandmark_h3de.synthesis.deformation import displacement_summary
    from nnlandmark_h3de.synthesis.reposing import IntensityChange, repose_case

    cases, displacement = {}, {}
    with tqdm(total=len(templates) * n_per_template, desc=f"re-posing {out.name}", unit="case") as bar:
        for t in templates:
            image, ls = load_template(folder, t)
            ls = selected_landmarks(ls, t, exclude, names)
            for k in range(n_per_template):
                new_image, new_ls, moved = repose_case(image, ls, case_rng(seed, t, k), intensity=IntensityChange(),
                                                       deform_mm=deform_mm, return_displacement=True, **REPOSE_OPTIONS)
                case = f"{t}_r{k:02d}"
                img_path, lm_path = out / "images" / f"{case}.nii.gz", out / "landmarks" / f"{case}.mrk.json"
                with atomic_path(img_path) as tmp:
                    sitk.WriteImage(new_image, str(tmp), True)
                write_landmarks(new_ls, lm_path)
                cases[case], displacement[case] = (img_path, lm_path), displacement_summary(moved)
                bar.update(1)
    return cases, displacement


def format_displacement(displacement: Dict[str, dict]) -> str:
    """One line per case: the landmarks' mean and max displacement by the nonlinear part."""
    return "\n".join(f"  {case}: nonlinear displacement of the landmarks mean {d['mean_mm']:.2f} mm, "
                     f"max {d['max_mm']:.2f} mm ({d['n']} landmarks)" for case, d in sorted(displacement.items()))


# -------------------------------------------------------------------------------- metrics
def evaluate(reference: Path, predictions: Path, out: Path) -> dict:
    from nnlandmark_h3de.evaluation.evaluate import evaluate_folders
    return evaluate_folders(reference, predictions, out / "summary.json")


def row_from_summary(label: str, summary: dict, **extra) -> dict:
    """A table row from an evaluator summary: micro-averaged errors, SDR@2/4 mm, detection counts."""
    m = summary["foreground_mean"]["micro"]
    return {"method": label, "mre_mm": m["mean_radial_error_mm"], "std_mm": m["std_radial_error_mm"],
            "median_mm": m["median_radial_error_mm"], "sdr_2mm": m["SDR_2mm"], "sdr_4mm": m["SDR_4mm"],
            "TP": m["TP"], "FN": m["FN"], "FP": m["FP"], "TN": m["TN"], **extra}


def per_landmark_change(global_summary: dict, two_stage_summary: dict, tolerance_mm: float = 0.1) -> dict:
    """Where the local network moved the global estimate closer to the truth and where it made it worse:
    each landmark's mean radial error, two stages vs the same run's global stage alone (changes within
    `tolerance_mm` count as unchanged)."""
    closer, worse, same = {}, {}, []
    for name, g in global_summary["mean"].items():
        a, b = g.get("mean_radial_error_mm"), two_stage_summary["mean"].get(name, {}).get("mean_radial_error_mm")
        if a is None or b is None or abs(b - a) <= tolerance_mm:
            same.append(name)
        else:
            (closer if b < a else worse)[name] = round(b - a, 2)
    return {"closer": closer, "worse": worse, "unchanged": same}


def format_per_landmark_change(change: dict) -> str:
    """One line: counts, then each landmark with its change in mm (negative = closer)."""
    items = sorted({**change["closer"], **change["worse"]}.items(), key=lambda kv: kv[1])
    return (f"{len(change['closer'])} landmarks closer, {len(change['worse'])} worse, {len(change['unchanged'])} "
            f"unchanged: " + ", ".join(f"{k} {v:+.2f}" for k, v in items))


def format_table(rows: List[dict]) -> str:
    def f(v, spec):
        return "-" if v is None else format(v, spec)

    def sdr(r, k):
        return "-" if r.get(k) is None else f"{100 * r[k]:.1f}%"
    w = max(len(r["method"]) for r in rows)
    head = (f"{'method':<{w}}  {'MRE mm':>15} {'median':>7} {'SDR@2mm':>8} {'SDR@4mm':>8} {'s/case':>7} "
            f"{'TP':>4} {'FN':>4} {'FP':>4}  note")
    lines = [head, "-" * len(head)]
    for r in rows:
        mre = "-" if r.get("mre_mm") is None else f"{r['mre_mm']:.2f}" + (
            "" if r.get("std_mm") is None else f" +- {r['std_mm']:.2f}")
        lines.append(f"{r['method']:<{w}}  {mre:>15} {f(r.get('median_mm'), '7.2f'):>7} {sdr(r, 'sdr_2mm'):>8} "
                     f"{sdr(r, 'sdr_4mm'):>8} {f(r.get('s_per_case'), '7.2f'):>7} {f(r.get('TP'), 'd'):>4} "
                     f"{f(r.get('FN'), 'd'):>4} {f(r.get('FP'), 'd'):>4}  {r.get('note', '')}")
    return "\n".join(lines)


# -------------------------------------------------------------------- training and prediction
def nnunet_folders(root: Path) -> Path:
    """nnUNet_raw/preprocessed/results made under `root` and set in this process's environment, for
    benchmarks that build, plan and train in process."""
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (root / name).mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(root / name)
    return root


def plan_small_configuration(dataset_id: int, patch, base_features: int, max_features: int) -> None:
    """nnU-Net planning + preprocessing (one process) and the small configuration with this patch, by
    the console scripts beside this Python; a failure raises with the command's output."""
    env, bin_dir = {**os.environ, "nnUNet_n_proc_DA": "1"}, Path(sys.executable).parent
    subprocess.run([str(bin_dir / "nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-c", "3d_fullres",
                    "-np", "1", "-npfp", "1"], env=env, check=True, capture_output=True)
    subprocess.run([str(bin_dir / "nnLandmark_add_small_config"), "-d", str(dataset_id), "--patch_size",
                    *map(str, patch), "--base_features", str(base_features), "--max_features", str(max_features)],
                   env=env, check=True, capture_output=True)


def needs_global_stage(trainer: str, env: dict) -> bool:
    """Whether `trainer` is a local stage that cannot predict over the whole image (nnLandmarkTrainerPrior)."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnlandmark_h3de.demo.commands import environment
    with environment(env):
        return bool(getattr(recursive_find_trainer_class_by_name(trainer), "needs_global_stage", False))


def local_stage_validation(kind_validation: dict) -> dict:
    """What the two-stage final validation measured on the validation cases (global_stage.json): the local
    network's own peaks inside the search radius (nothing fitted on them), the global stage, and the
    combination whose weight and floor were fitted on these same cases."""
    w, f = kind_validation.get("local_weight_fit", {}), kind_validation.get("local_peak_floor_fit", {})
    return {"mre_local_mm": w.get("mre_local_mm"), "mre_global_mm": w.get("mre_global_mm"),
            "local_weight": kind_validation.get("local_weight"), "local_weights": kind_validation.get("local_weights"),
            "mre_combined_mm_in_sample": f.get("mre_mm"),
            "local_used_fraction": f.get("local_used_fraction")}


def train_with_budget(label: str, trainer: str, dataset_id: int, configuration: str, minutes: float, work: Path,
                      env: dict, iterations_per_epoch: int, val_iterations_per_epoch: Optional[int] = None):
    """Train `trainer` on fold 0 (CPU) for `minutes` of wall clock with the stock nnUNetv2_train through a
    generated budget subclass; returns (budget trainer name, seconds incl. final validation, epochs)."""
    import contextlib
    import io
    from nnlandmark_h3de.demo.budget_trainer import write_budget_trainer
    from nnlandmark_h3de.demo.commands import count_epochs, environment, find_command, run_command
    t = time.monotonic()
    with environment(env), contextlib.redirect_stdout(io.StringIO()):
        name = write_budget_trainer(work / "trainers", trainer, 60.0 * minutes, iterations_per_epoch=iterations_per_epoch,
                                    val_iterations_per_epoch=val_iterations_per_epoch or max(1, iterations_per_epoch // 10))
    lines = run_command(f"train {label}", [find_command("nnUNetv2_train"), str(dataset_id), configuration, "0",
                                           "-tr", name, "-device", "cpu"], env, work / "logs" / f"train_{label}.log",
                        progress_pattern=r"Epoch \d+\s*$")
    return name, time.monotonic() - t, count_epochs(lines)


def predict_images(label: str, images: Path, dataset_id: int, model_args: Sequence[str], out: Path, env: dict,
                   logs: Path) -> float:
    """nnLandmark_predict (fold 0, CPU) on a folder of case_0000 images; seconds per case (start-up included)."""
    from nnlandmark_h3de.demo.commands import find_command, run_command
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
    """Train `trainer` on fold 0 for a CPU budget, predict `images` over the whole image (unless the trainer
    needs a global stage: `needs_global_stage`), calibrate the global stage(s) on the validation cases and
    predict in two stages; one row per prediction, scored against `truth`. `tag` prefixes work folders and
    logs (several datasets in one work dir); rows are labelled `title` (default: the trainer).
    `predict_args` go to every nnLandmark_predict."""
    from nnlandmark_h3de.demo.commands import find_command, run_command
    logs, label, title = work / "logs", f"{tag}{trainer}", title or trainer
    name, train_s, epochs = train_with_budget(label, trainer, dataset_id, configuration, minutes, work, env,
                                              iterations_per_epoch)
    model_args = ["-c", configuration, "-tr", name]
    trained = dict(train_wall_s=round(train_s, 1), epochs=epochs, note=f"{epochs} epochs, {train_s:.0f} s train+final val")
    rows = []
    if not needs_global_stage(trainer, env):
        pred = work / f"predictions_{label}"
        per_case = predict_images(label, images, dataset_id, [*model_args, "--global", "none", *predict_args], pred,
                                  env, logs)
        rows.append(row_from_summary(f"{title} (whole image)", evaluate(truth, pred, work / f"evaluation_{label}"),
                                     s_per_case=round(per_case, 2), **trained))
    kinds = ["atlas", "deformable"] + (["learned"] if learned_model is not None else [])
    t = time.monotonic()
    run_command(f"calibrate global {label}", [
        find_command("nnLandmark_calibrate_global"), "-d", str(dataset_id), "-c", configuration, "-tr", name,
        "-f", "0", "--kinds", *kinds, "--n_atlases", str(n_atlases), "--registration_spacing",
        str(registration_spacing), "-device", "cpu"]
        + (["--learned_model", str(learned_model)] if learned_model is not None else []),
        env, logs / f"calibrate_{label}.log")
    calibrate_s = time.monotonic() - t
    choice = json.loads((work / "nnUNet_results" / raw.name / f"{name}__nnUNetPlans__{configuration}" / "fold_0" /
                         "global_stage.json").read_text())
    for kind in kinds:
        pred = work / f"predictions_{label}_two_stage_{kind}"
        per_case = predict_images(f"{label}_{kind}", images, dataset_id,
                                  [*model_args, "--global", kind, "--save_global_estimates", *predict_args], pred,
                                  env, logs)
        v = choice["validation"][kind]
        both = evaluate(truth, pred, work / f"evaluation_{label}_{kind}")
        alone = evaluate(truth, pred / GLOBAL_ESTIMATES_FOLDER, work / f"evaluation_{label}_{kind}_global")
        rows.append(row_from_summary(
            f"{title} two-stage ({kind} global)", both, per_landmark=per_landmark_change(alone, both),
            s_per_case=round(per_case, 2), radius_mm=round(v["radius_mm"], 2), calibrate_s=round(calibrate_s, 1),
            validation=local_stage_validation(v), **({} if rows else trained),
            note=f"same model; search radius {v['radius_mm']:.1f} mm (validation p90 {v['p90_mm']:.1f} mm)"
                 f"{', kept by calibration' if choice['kind'] == kind else ''}"))
        rows.append(row_from_summary(  # what the local network adds: the estimates it started from
            f"{title}: its {kind} global stage alone", alone,
            note=f"the two-stage run's own global estimates ({', '.join(choice.get('atlases', [])) or kind})"))
    return rows
