#!/usr/bin/env python
"""Where the time after training goes, on a user's kind of dataset: training, the final validation's
passes and nnLandmark_calibrate_global, with the README's CPU commands.

CT-like head phantoms (default 16 training + 6 test cases of 100 x 130 x 130 voxels at 1.5 mm, each
structure absent with p = 0.15) -> nnLandmark_convert's library call -> nnUNetv2_plan_and_preprocess ->
nnLandmark_add_small_config -> nnUNetv2_train fold 0 with `--trainer` (default
nnLandmarkTrainer_1epoch) -> nnLandmark_calibrate_global (atlas) -> nnLandmark_predict on the test
cases. Printed: each command's wall time, the training log's split of the training command into
training and final validation (the "Training done." line), each final-validation pass where the log
names it, and the ratio of final validation + calibration to training. Run it with two checkouts on one
machine to compare them (PYTHONPATH=OTHER_CHECKOUT selects the other code; the commands follow it).

    python benchmarks/bench_calibration_cost.py --json      # ~10 min on 2 cores
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

DATASET_ID = 975


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    p.add_argument("--n_train", type=int, default=16)
    p.add_argument("--n_test", type=int, default=6)
    p.add_argument("--shape", type=int, nargs=3, default=[100, 130, 130])
    p.add_argument("--spacing", type=float, default=1.5)
    p.add_argument("--trainer", default="nnLandmarkTrainer_1epoch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON line with the results")
    return p.parse_args(argv)


def log_times(fold: Path) -> dict:
    """From the fold's training logs: seconds from the first line to "Training done." and from there to the
    end of the first log; the per-pass lines of the final validations where the code writes them."""
    logs = sorted(fold.glob("training_log_*.txt"))
    stamp = re.compile(r"^(\d{4}-\d+-\d+ \d+:\d+:\d+\.\d+): (.*)$")

    def lines(f):
        for line in f.read_text(errors="replace").splitlines():
            m = stamp.match(line)
            if m:
                yield datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f"), m.group(2)
    first = list(lines(logs[0]))
    done = next(t for t, msg in first if msg.startswith("Training done"))
    out = {"training_s": round((done - first[0][0]).total_seconds(), 1),
           "final_validation_s": round((first[-1][0] - done).total_seconds(), 1)}
    passes = [msg.strip() for f in logs for _, msg in lines(f) if msg.startswith("final validation, ")]
    if passes:
        out["passes"] = passes
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    import nnlandmark_h3de
    from nnlandmark_h3de.conversion import convert_dataset
    from nnlandmark_h3de.demo.commands import environment, find_command, nnunet_environment, run_command
    from nnlandmark_h3de.demo.phantoms import generate_phantom_cases
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_calibration_cost_"))
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    env, logs = nnunet_environment(work), work / "logs"
    logs.mkdir()
    print(f"code: {Path(nnlandmark_h3de.__file__).parent}", flush=True)
    try:
        cases = generate_phantom_cases(work / "phantoms", args.n_train + args.n_test, shape=tuple(args.shape),
                                       spacing=(args.spacing,) * 3, seed=args.seed, absent_fraction=0.15)
        names = sorted(cases)
        with environment(env):
            raw = Path(convert_dataset(cases, (DATASET_ID, "CalibrationCost"), test_cases=names[args.n_train:]))
        seconds = {}

        def timed(name, cmd, extra_env=None, **kw):
            t = time.monotonic()
            run_command(name, cmd, {**env, **(extra_env or {})}, logs / f"{name}.log", **kw)
            seconds[name] = round(time.monotonic() - t, 1)
            print(f"{name}: {seconds[name]} s", flush=True)
        timed("plan_and_preprocess", [find_command("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c",
                                      "3d_fullres", "-np", "1", "-npfp", "1"], {"nnUNet_n_proc_DA": "1"})
        timed("small_config", [find_command("nnLandmark_add_small_config"), "-d", str(DATASET_ID)])
        common = ["-d", str(DATASET_ID), "-c", "3d_fullres_small", "-tr", args.trainer, "-f", "0", "-device", "cpu"]
        timed("train", [find_command("nnUNetv2_train"), str(DATASET_ID), "3d_fullres_small", "0", "-tr", args.trainer,
                        "-device", "cpu"], progress_pattern=r"Epoch \d+\s*$")
        timed("calibrate_global", [find_command("nnLandmark_calibrate_global"), *common, "--kinds", "atlas"])
        timed("predict", [find_command("nnLandmark_predict"), "-i", str(raw / "imagesTs"), "-o", str(work / "pred"),
                          *common])
        fold = next((work / "nnUNet_results").rglob("fold_0"))
        split = log_times(fold)
        result = {"benchmark": "bench_calibration_cost", "code": str(Path(nnlandmark_h3de.__file__).parent),
                  "shape": args.shape, "spacing_mm": args.spacing, "n_train": args.n_train, "trainer": args.trainer,
                  "seconds": seconds, **split,
                  "validation_and_calibration_vs_training": round(
                      (split["final_validation_s"] + seconds["calibrate_global"]) / split["training_s"], 3)}
        print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
