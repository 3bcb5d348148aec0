"""Accuracy smoke benchmark: a few CPU minutes of nnLandmarkTrainer on an easy generated dataset
(blobs in noise, `nnlandmark_h3de.demo.blob_dataset`) must reach a final-validation MRE below
2 voxels. Runs the real pipeline (plan/preprocess, small configuration, the trainer's
run_training and perform_actual_validation) in a temporary nnU-Net tree.

In-sample caveat: the final validation fits the existence thresholds on the same validation cases
it scores, so its existence F1 (and the MRE over the landmarks it keeps) is optimistic; the JSON
says so (`in_sample: true`). Held-out figures come from predicting test cases (the demo,
bench_absent_landmarks.py, afids_benchmark.py).

    python benchmarks/train_easy_dataset.py [--epochs 20] [--iterations 15] [--trainer nnLandmarkTrainer] [--json]

With --json the LAST line is one JSON object (mre_mm, mre_voxels, passed, train_seconds, ...).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from common import nnunet_folders, plan_small_configuration


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=12)
    ap.add_argument("--shape", type=int, nargs=3, default=(40, 40, 40))
    ap.add_argument("--patch", type=int, nargs=3, default=(32, 32, 32))
    ap.add_argument("--base_features", type=int, default=8)
    ap.add_argument("--max_features", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--iterations", type=int, default=15)
    ap.add_argument("--val_iterations", type=int, default=3)
    ap.add_argument("--trainer", default="nnLandmarkTrainer", help="nnLandmarkTrainer or a variant class name")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", default=None, help="use/keep this folder instead of a temporary one")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    tmp = None
    root = Path(args.keep) if args.keep else Path((tmp := tempfile.TemporaryDirectory(prefix="easy_")).name)
    nnunet_folders(root)
    os.environ["nnUNet_compile"] = "false"
    dataset_id = 988
    from nnlandmark_h3de.demo.blob_dataset import make_blob_dataset
    make_blob_dataset(dataset_id, n_cases=args.cases, shape_zyx=args.shape, seed=1)
    plan_small_configuration(dataset_id, args.patch, args.base_features, args.max_features)
    os.environ["nnUNet_n_proc_DA"] = "0"

    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    import nnlandmark_h3de.training.variants as variants
    from nnlandmark_h3de.evaluation.radial_errors import sdr_key
    from nnlandmark_h3de.training.nnLandmarkTrainer import nnLandmarkTrainer

    torch.set_num_threads(args.threads)
    cls = nnLandmarkTrainer if args.trainer == "nnLandmarkTrainer" else getattr(variants, args.trainer)
    name = maybe_convert_to_dataset_name(dataset_id)
    plans = load_json(os.path.join(nnUNet_preprocessed.get(), name, "nnUNetPlans.json"))
    plans["continue_training"] = False
    dataset_json = load_json(os.path.join(nnUNet_preprocessed.get(), name, "dataset.json"))
    trainer = cls(plans, "3d_fullres_small", 0, dataset_json, device=torch.device("cpu"))
    trainer.num_epochs = args.epochs
    trainer.num_iterations_per_epoch = args.iterations
    trainer.num_val_iterations_per_epoch = args.val_iterations
    t0 = time.perf_counter()
    trainer.run_training()
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    trainer.perform_actual_validation()
    val_s = time.perf_counter() - t0

    summary = json.loads((Path(trainer.output_folder) / "validation" / "summary.json").read_text())
    micro = summary["foreground_mean"]["micro"]
    spacing = min(trainer.configuration_manager.spacing)
    mre = micro["mean_radial_error_mm"]
    result = {"trainer": args.trainer, "mre_mm": mre, "mre_voxels": None if mre is None else mre / spacing,
              "sdr_2mm": micro.get(sdr_key(2.0)), "existence_F1": micro.get("F1"),
              "n_val_cases": summary["n_cases"], "steps": args.epochs * args.iterations,
              "train_seconds": round(train_s, 1), "validation_seconds": round(val_s, 1),
              "patch_size": list(trainer.configuration_manager.patch_size),
              "last_epoch_patch_mre_mm": trainer.logger.get_value("val_mre_mm", -1),
              "in_sample": True}
    result["passed"] = mre is not None and mre / spacing < 2.0
    print(f"final validation (in-sample: thresholds fitted on these cases) MRE {mre} mm ({result['mre_voxels']} voxels) on {summary['n_cases']} cases after "
          f"{result['steps']} steps ({train_s:.0f} s training, {val_s:.0f} s validation): "
          f"{'PASS' if result['passed'] else 'FAIL'} (< 2 voxels)")
    if args.json:
        print(json.dumps(result))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
