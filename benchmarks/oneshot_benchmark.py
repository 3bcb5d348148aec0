#!/usr/bin/env python
"""One-shot benchmark on the AFIDs templates: pseudo-labels from ONE labelled template, by atlas
registration (the baseline a user would pick) and by CC2D self-supervised feature matching.

One template is the labelled image (native pose). Another template, re-posed into several cases, is
the folder of unlabelled images; a third template, re-posed, is the test set (never seen, not even
unlabelled). Rows, all scored by the package's evaluator against the expert landmarks:
- pseudo-label error on the unlabelled cases, per method (what training would learn from);
- each method applied directly to the held-out test cases (registration alone; matching alone);
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
        --ssl_minutes 8 --train_minutes 6 --json oneshot.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Dict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from afids_benchmark import (BenchmarkError, build_cases, evaluate, format_table, load_template,  # noqa: E402
                             row_from_summary, trainer_rows)

if TYPE_CHECKING:
    from nnlandmark_h3de.landmarks import LandmarkSet

REG_ID, CC2D_ID, CONFIGURATION = 701, 702, "3d_fullres_small"


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


def main(argv=None) -> int:
    args = parse_args(argv)
    from nnlandmark_h3de.demo.budget_trainer import write_budget_trainer
    from nnlandmark_h3de.demo.pipeline import environment, find_command, nnunet_environment, run_command
    from nnlandmark_h3de.landmarks import write_landmarks
    from nnlandmark_h3de.oneshot.feature_matching import cc2d_pseudo_labels
    from nnlandmark_h3de.oneshot.registration_labels import registration_pseudo_labels

    if len({args.template, args.unlabelled, args.test}) != 3:
        raise BenchmarkError("--template, --unlabelled and --test must be three different templates")
    work = args.work_dir.resolve()
    if work.exists():
        if not args.overwrite:
            raise BenchmarkError(f"{work} exists; pass --overwrite or another --work_dir")
        shutil.rmtree(work)
    (work / "template").mkdir(parents=True)
    env = nnunet_environment(work)
    logs = work / "logs"
    rows, timings = [], {}

    image, template_ls = load_template(args.templates, args.template)
    import SimpleITK as sitk
    template_image, template_lm = work / "template" / f"{args.template}.nii.gz", work / "template" / "template.mrk.json"
    sitk.WriteImage(image, str(template_image), True)
    write_landmarks(template_ls, template_lm)
    names = list(template_ls.names)
    unlabelled = build_cases(args.templates, [args.unlabelled], work / "cases_unlabelled", args.n_unlabelled,
                             args.seed, (), names)
    test = build_cases(args.templates, [args.test], work / "cases_test", args.n_test, args.seed, (), names)
    unl_truth, test_truth = work / "cases_unlabelled" / "landmarks", work / "cases_test" / "landmarks"
    test_images = {c: img for c, (img, _) in test.items()}
    oneshot = [find_command("nnLandmark_oneshot"), "-t", str(template_image), "-l", str(template_lm),
               "-u", str(work / "cases_unlabelled" / "images"), "--template_copies", str(args.template_copies),
               "--seed", str(args.seed)]

    # registration: pseudo-labels of the unlabelled cases, and the method applied to the test cases
    t = time.monotonic()
    run_command("oneshot registration", [*oneshot, "-d", str(REG_ID), "-n", "OneShotReg", "--method", "registration"],
                env, logs / "oneshot_registration.log")
    timings["registration_pseudo_labels_s_per_case"] = (time.monotonic() - t) / len(unlabelled)
    reg_raw = work / "nnUNet_raw" / f"Dataset{REG_ID:03d}_OneShotReg"
    pts = write_points(pseudo_label_points(reg_raw, unlabelled), work / "pseudo_registration")
    rows.append(row_from_summary("registration pseudo-labels (unlabelled cases)", evaluate(unl_truth, pts, pts)))
    t = time.monotonic()
    reg_test = registration_pseudo_labels(template_image, template_lm, test_images, seed=args.seed)
    s_case = (time.monotonic() - t) / len(test)
    pts = write_points({c: p.landmarks for c, p in reg_test.items()}, work / "test_registration")
    rows.append(row_from_summary("registration alone (test cases)", evaluate(test_truth, pts, pts),
                                 note=f"{s_case:.1f} s/case"))

    # CC2D: self-supervised features trained on the registration dataset's images (labels ignored)
    t = time.monotonic()
    run_command("plan_and_preprocess", [find_command("nnUNetv2_plan_and_preprocess"), "-d", str(REG_ID),
                                        "-c", "3d_fullres", "-np", "1"], {**env, "nnUNet_n_proc_DA": "1"},
                logs / "plan_and_preprocess.log")
    run_command("small_configuration", [find_command("nnLandmark_add_small_config"), "-d", str(REG_ID)], env,
                logs / "small_configuration.log")
    with environment(env):
        trainer = write_budget_trainer(work / "trainers", "nnLandmarkSelfSupervisedTrainer", 60 * args.ssl_minutes,
                                       iterations_per_epoch=25, val_iterations_per_epoch=4)
    run_command("train ssl", [find_command("nnUNetv2_train"), str(REG_ID), CONFIGURATION, "0", "-tr", trainer,
                              "-device", "cpu"], {**env, "nnUNet_extTrainer": str(work / "trainers")},
                logs / "train_ssl.log")
    timings["ssl_training_s"] = time.monotonic() - t
    model = work / "nnUNet_results" / reg_raw.name / f"{trainer}__nnUNetPlans__{CONFIGURATION}"
    t = time.monotonic()
    run_command("oneshot cc2d", [*oneshot, "-d", str(CC2D_ID), "-n", "OneShotCC2D", "--method", "cc2d",
                                 "--ssl_model", str(model)], {**env, "nnUNet_extTrainer": str(work / "trainers")},
                logs / "oneshot_cc2d.log")
    timings["cc2d_pseudo_labels_s_per_case"] = (time.monotonic() - t) / len(unlabelled)
    cc2d_raw = work / "nnUNet_raw" / f"Dataset{CC2D_ID:03d}_OneShotCC2D"
    pts = write_points(pseudo_label_points(cc2d_raw, unlabelled), work / "pseudo_cc2d")
    rows.append(row_from_summary("CC2D matching pseudo-labels (unlabelled cases)", evaluate(unl_truth, pts, pts)))
    t = time.monotonic()
    with environment({**env, "nnUNet_extTrainer": str(work / "trainers")}):
        cc2d_test = cc2d_pseudo_labels(model, template_image, template_ls, test_images)
    s_case = (time.monotonic() - t) / len(test)
    pts = write_points({c: ls for c, (ls, _) in cc2d_test.items()}, work / "test_cc2d")
    rows.append(row_from_summary("CC2D matching alone (test cases)", evaluate(test_truth, pts, pts),
                                 note=f"{s_case:.1f} s/case, {args.ssl_minutes:g} CPU min of self-supervised training"))

    # each method + training: the landmark trainers on its pseudo-label dataset, scored on the test cases
    test_folder = test_image_folder(test_images, work / "test_images")
    datasets = {"registration": (REG_ID, reg_raw), "cc2d": (CC2D_ID, cc2d_raw)}
    for source in args.train_on if args.train_minutes > 0 else []:
        dataset_id, raw = datasets[source]
        if source != "registration":  # the registration dataset was planned for the feature network
            run_command(f"plan_and_preprocess {source}", [find_command("nnUNetv2_plan_and_preprocess"), "-d",
                                                          str(dataset_id), "-c", "3d_fullres", "-np", "1"],
                        {**env, "nnUNet_n_proc_DA": "1"}, logs / f"plan_and_preprocess_{source}.log")
            run_command(f"small_configuration {source}", [find_command("nnLandmark_add_small_config"), "-d",
                                                          str(dataset_id)], env, logs / f"small_{source}.log")
        for trainer in args.trainers:
            t = time.monotonic()
            for row in trainer_rows(trainer, raw=raw, dataset_id=dataset_id, configuration=CONFIGURATION,
                                    minutes=args.train_minutes, iterations_per_epoch=args.iterations_per_epoch,
                                    images=test_folder, truth=test_truth, work=work, env=env,
                                    n_atlases=args.n_atlases, registration_spacing=args.registration_spacing,
                                    tag=f"{source}_", title=f"{source} pseudo-labels + {trainer}",
                                    predict_args=["--no_absent"]):
                rows.append(row)
            timings[f"{source}_{trainer}_s"] = time.monotonic() - t
            print(format_table(rows), flush=True)

    print(format_table(rows))
    result = {"rows": rows, "timings": timings, "settings": {k: str(v) for k, v in vars(args).items()}}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(json.dumps(result, default=float))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchmarkError as e:
        print(f"oneshot_benchmark: error: {e}", file=sys.stderr)
        sys.exit(1)
