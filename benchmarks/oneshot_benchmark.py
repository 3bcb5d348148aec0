#!/usr/bin/env python
"""One-shot benchmark on the AFIDs templates: pseudo-labels from ONE labelled template, by atlas
registration (the baseline a user would pick) and by CC2D self-supervised feature matching.

One template is the labelled image (native pose). Another template, re-posed into several cases, is
the folder of unlabelled images; a third template, re-posed, is the test set (never seen, not even
unlabelled). Cases come from the AFIDs benchmark's one generator (`common.build_cases`): with
`--deform_mm R` every case is also deformed by a smooth random nonlinear field of R mm RMS
displacement (landmarks moved exactly; the landmarks' mean and max displacement is reported per
case); 0, the default, is the rigid re-posing alone. Rows, all scored by the package's evaluator
against the expert landmarks:
- pseudo-label error on the unlabelled cases, per method (what training would learn from);
- each method applied directly to the held-out test cases: registration alone as two rows, the
  affine registration (refined) and affine + demons (what `--method registration` pseudo-labels
  with), so each comparison is with the same registration (the two-stage rows' atlas stage is
  affine: compare it with the affine row and with its own "global stage alone" row); matching alone;
- each method + training: landmark trainers (plain nnLandmarkTrainer and the adapter trainer,
  `--trainers`) trained with the stock commands on the pseudo-label dataset (`--train_on`) for the
  same CPU budget (`--train_minutes`), then predicted on the test cases over the whole image and in
  two stages (`nnLandmark_calibrate_global` on the fold's validation cases, whose labels are
  pseudo-labels too, then `nnLandmark_predict --global atlas`), exactly as
  benchmarks/afids_benchmark.py does for fully labelled data, with `--no_absent`: every test case
  has all its landmarks, and registration, the alternative, always gives a point, so every landmark
  is scored in every row (none dropped as a false "absent").
The CC2D feature network (nnLandmarkSelfSupervisedTrainer) is trained with the stock commands on the
dataset `nnLandmark_oneshot --method registration` wrote (its labels are ignored), for a CPU budget.
Nothing but the template's landmarks is used: the expert landmarks of the other templates only score.

    python benchmarks/oneshot_benchmark.py --templates ../shared/data/afids-templates \\
        --template human_MNI152NLin2009cAsym_T1w_2mm --unlabelled human_MNI305_T1w_2mm \\
        --test human_MNI152NLin6Asym_T1w_2mm --n_unlabelled 6 --n_test 4 --template_copies 3 \\
        --ssl_minutes 8 --train_minutes 6 --deform_mm 4 --json oneshot.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List

from common import (BenchmarkError, build_cases, evaluate, format_displacement, format_table, load_template,
                    row_from_summary, run_script, train_with_budget, trainer_rows)

if TYPE_CHECKING:
    from nnlandmark_h3de.landmarks import LandmarkSet

REG_ID, CC2D_ID, CONFIGURATION = 701, 702, "3d_fullres_small"
REGISTRATIONS = (("none", "registration alone, affine (test cases)", "refined affine"),
                 ("demons", "registration alone, affine + demons (test cases)", "refined affine + demons"))


def write_points(points: Dict[str, "LandmarkSet"], folder: Path) -> Path:  # noqa: F821
    from nnlandmark_h3de.landmarks import write_landmarks
    folder.mkdir(parents=True, exist_ok=True)
    for case, ls in points.items():
        write_landmarks(ls, folder / f"{case}.mrk.json")
    return folder


def pseudo_label_points(dataset: Path, cases) -> Dict[str, "LandmarkSet"]:
    """The pseudo-labels before thresholding (pseudo_labels.json), for the unlabelled cases."""
    from nnlandmark_h3de.oneshot.pseudo_labels import PSEUDO_LABELS_FILE, read_pseudo_labels_file
    _, records = read_pseudo_labels_file(dataset / PSEUDO_LABELS_FILE)
    return {c: records[c].landmarks for c in cases if c in records}


def test_image_folder(images: Dict[str, Path], folder: Path) -> Path:
    """The test images as nnU-Net input (case_0000.nii.gz links), for nnLandmark_predict -i."""
    folder.mkdir(parents=True, exist_ok=True)
    for case, img in images.items():
        (folder / f"{case}_0000.nii.gz").symlink_to(Path(img).resolve())
    return folder


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--templates", required=True, type=Path)
    p.add_argument("--template", required=True, help="the labelled template (native pose)")
    p.add_argument("--unlabelled", required=True, help="template re-posed into the unlabelled images")
    p.add_argument("--test", required=True, help="template re-posed into the held-out test cases")
    p.add_argument("--n_unlabelled", type=int, default=8)
    p.add_argument("--n_test", type=int, default=6)
    p.add_argument("--deform_mm", type=float, default=0.0,
                   help="RMS displacement (mm) of a smooth random nonlinear deformation of every unlabelled and "
                        "test case (default 0: rigid + scale re-posing only)")
    p.add_argument("--template_copies", type=int, default=4, help="re-posed template copies in the datasets (ATD)")
    p.add_argument("--ssl_minutes", type=float, default=8.0, help="CPU budget of the self-supervised training")
    p.add_argument("--train_minutes", type=float, default=8.0,
                   help="CPU budget of each landmark training on pseudo-labels (0: no training rows)")
    p.add_argument("--trainers", nargs="+", default=["nnLandmarkTrainer", "nnLandmarkTrainerAdapter"])
    p.add_argument("--train_on", nargs="+", choices=["registration", "cc2d"], default=["registration", "cc2d"],
                   help="pseudo-label datasets to train the --trainers on")
    p.add_argument("--iterations_per_epoch", type=int, default=50)
    p.add_argument("--n_atlases", type=int, default=4, help="atlases of the two-stage prediction's global stage")
    p.add_argument("--registration_spacing", type=float, default=4.0, help="atlas registration grid, mm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work_dir", type=Path, default=Path("oneshot_benchmark_work"))
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def prepare(args, work: Path) -> dict:
    """The template (native pose) written out, the unlabelled and test cases generated."""
    import SimpleITK as sitk
    from nnlandmark_h3de.landmarks import write_landmarks
    (work / "template").mkdir(parents=True)
    image, template_ls = load_template(args.templates, args.template)
    template_image, template_lm = work / "template" / f"{args.template}.nii.gz", work / "template" / "template.mrk.json"
    sitk.WriteImage(image, str(template_image), True)
    write_landmarks(template_ls, template_lm)
    names = list(template_ls.names)
    unlabelled, moved_unl = build_cases(args.templates, [args.unlabelled], work / "cases_unlabelled",
                                        args.n_unlabelled, args.seed, (), names, args.deform_mm)
    test, moved_test = build_cases(args.templates, [args.test], work / "cases_test", args.n_test, args.seed, (), names,
                                   args.deform_mm)
    return {"template_image": template_image, "template_lm": template_lm, "template_ls": template_ls,
            "unlabelled": unlabelled, "test_images": {c: img for c, (img, _) in test.items()},
            "unl_truth": work / "cases_unlabelled" / "landmarks", "test_truth": work / "cases_test" / "landmarks",
            "displacement": {**moved_unl, **moved_test}}


def registration_rows(args, data: dict, work: Path, env: dict, timings: dict) -> List[dict]:
    """Registration pseudo-labels of the unlabelled cases (nnLandmark_oneshot), then both registrations
    alone on the test cases: affine, and affine + demons."""
    from nnlandmark_h3de.demo.commands import run_command
    from nnlandmark_h3de.oneshot.registration_labels import registration_pseudo_labels
    t = time.monotonic()
    run_command("oneshot registration", [*oneshot_command(args, data, work), "-d", str(REG_ID), "-n", "OneShotReg",
                                         "--method", "registration"], env, work / "logs" / "oneshot_registration.log")
    timings["registration_pseudo_labels_s_per_case"] = (time.monotonic() - t) / len(data["unlabelled"])
    reg_raw = work / "nnUNet_raw" / f"Dataset{REG_ID:03d}_OneShotReg"
    pts = write_points(pseudo_label_points(reg_raw, data["unlabelled"]), work / "pseudo_registration")
    rows = [row_from_summary("registration pseudo-labels (unlabelled cases)", evaluate(data["unl_truth"], pts, pts))]
    for deformable, label, what in REGISTRATIONS:
        t = time.monotonic()
        found = registration_pseudo_labels(data["template_image"], data["template_lm"], data["test_images"],
                                           deformable=deformable, seed=args.seed)
        s_case = (time.monotonic() - t) / len(data["test_images"])
        pts = write_points({c: p.landmarks for c, p in found.items()}, work / f"test_registration_{deformable}")
        rows.append(row_from_summary(label, evaluate(data["test_truth"], pts, pts), s_per_case=round(s_case, 2),
                                     note=f"the template alone, {what}"))
    return rows


def oneshot_command(args, data: dict, work: Path) -> List[str]:
    from nnlandmark_h3de.demo.commands import find_command
    return [find_command("nnLandmark_oneshot"), "-t", str(data["template_image"]), "-l", str(data["template_lm"]),
            "-u", str(work / "cases_unlabelled" / "images"), "--template_copies", str(args.template_copies),
            "--seed", str(args.seed)]


def plan_dataset(dataset_id: int, tag: str, env: dict, logs: Path) -> None:
    from nnlandmark_h3de.demo.commands import find_command, run_command
    run_command(f"plan_and_preprocess {tag}", [find_command("nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id),
                                               "-c", "3d_fullres", "-np", "1"], {**env, "nnUNet_n_proc_DA": "1"},
                logs / f"plan_and_preprocess_{tag}.log")
    run_command(f"small_configuration {tag}", [find_command("nnLandmark_add_small_config"), "-d", str(dataset_id)],
                env, logs / f"small_configuration_{tag}.log")


def cc2d_rows(args, data: dict, work: Path, env: dict, timings: dict) -> List[dict]:
    """CC2D: self-supervised features trained on the registration dataset's images (labels ignored),
    pseudo-labels of the unlabelled cases, and matching alone on the test cases."""
    from nnlandmark_h3de.demo.commands import environment, run_command
    from nnlandmark_h3de.oneshot.feature_matching import cc2d_pseudo_labels
    t = time.monotonic()
    reg_raw = work / "nnUNet_raw" / f"Dataset{REG_ID:03d}_OneShotReg"
    plan_dataset(REG_ID, "registration", env, work / "logs")
    trainer, _, _ = train_with_budget("ssl", "nnLandmarkSelfSupervisedTrainer", REG_ID, CONFIGURATION,
                                      args.ssl_minutes, work, env, iterations_per_epoch=25, val_iterations_per_epoch=4)
    timings["ssl_training_s"] = time.monotonic() - t
    model = work / "nnUNet_results" / reg_raw.name / f"{trainer}__nnUNetPlans__{CONFIGURATION}"
    t = time.monotonic()
    run_command("oneshot cc2d", [*oneshot_command(args, data, work), "-d", str(CC2D_ID), "-n", "OneShotCC2D",
                                 "--method", "cc2d", "--ssl_model", str(model)], env, work / "logs" / "oneshot_cc2d.log")
    timings["cc2d_pseudo_labels_s_per_case"] = (time.monotonic() - t) / len(data["unlabelled"])
    cc2d_raw = work / "nnUNet_raw" / f"Dataset{CC2D_ID:03d}_OneShotCC2D"
    pts = write_points(pseudo_label_points(cc2d_raw, data["unlabelled"]), work / "pseudo_cc2d")
    rows = [row_from_summary("CC2D matching pseudo-labels (unlabelled cases)", evaluate(data["unl_truth"], pts, pts))]
    t = time.monotonic()
    with environment(env):
        found = cc2d_pseudo_labels(model, data["template_image"], data["template_ls"], data["test_images"])
    s_case = (time.monotonic() - t) / len(data["test_images"])
    pts = write_points({c: ls for c, (ls, _) in found.items()}, work / "test_cc2d")
    rows.append(row_from_summary("CC2D matching alone (test cases)", evaluate(data["test_truth"], pts, pts),
                                 s_per_case=round(s_case, 2),
                                 note=f"{args.ssl_minutes:g} CPU min of self-supervised training"))
    return rows


def training_rows(args, data: dict, work: Path, env: dict, timings: dict, rows: List[dict]) -> None:
    """Each method + training: the landmark trainers on its pseudo-label dataset, scored on the test cases
    (rows appended to `rows`, the table printed after each trainer)."""
    test_folder = test_image_folder(data["test_images"], work / "test_images")
    datasets = {"registration": (REG_ID, "OneShotReg"), "cc2d": (CC2D_ID, "OneShotCC2D")}
    for source in args.train_on if args.train_minutes > 0 else []:
        dataset_id, name = datasets[source]
        raw = work / "nnUNet_raw" / f"Dataset{dataset_id:03d}_{name}"
        if source != "registration":  # the registration dataset was planned for the feature network
            plan_dataset(dataset_id, source, env, work / "logs")
        for trainer in args.trainers:
            t = time.monotonic()
            rows += trainer_rows(trainer, raw=raw, dataset_id=dataset_id, configuration=CONFIGURATION,
                                 minutes=args.train_minutes, iterations_per_epoch=args.iterations_per_epoch,
                                 images=test_folder, truth=data["test_truth"], work=work, env=env,
                                 n_atlases=args.n_atlases, registration_spacing=args.registration_spacing,
                                 tag=f"{source}_", title=f"{source} pseudo-labels + {trainer}",
                                 predict_args=["--no_absent"])
            timings[f"{source}_{trainer}_s"] = time.monotonic() - t
            print(format_table(rows), flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    from nnlandmark_h3de.demo.commands import nnunet_environment
    from nnlandmark_h3de.landmarks.atomic import atomic_write_text
    if len({args.template, args.unlabelled, args.test}) != 3:
        raise BenchmarkError("--template, --unlabelled and --test must be three different templates")
    work = args.work_dir.resolve()
    if work.exists():
        if not args.overwrite:
            raise BenchmarkError(f"{work} exists; pass --overwrite or another --work_dir")
        shutil.rmtree(work)
    env, timings = nnunet_environment(work), {}
    data = prepare(args, work)
    rows = registration_rows(args, data, work, env, timings)
    rows += cc2d_rows(args, data, work, env, timings)
    training_rows(args, data, work, env, timings, rows)
    if args.deform_mm > 0:
        print(format_displacement(data["displacement"]))
    print(format_table(rows))
    result = {"rows": rows, "timings": timings, "nonlinear_displacement": data["displacement"],
              "settings": {k: str(v) for k, v in vars(args).items()}}
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2, default=float) + "\n")
    print(json.dumps(result, default=float))
    return 0


if __name__ == "__main__":
    run_script(main, "oneshot_benchmark")
