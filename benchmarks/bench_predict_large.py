#!/usr/bin/env python
"""Two-stage prediction vs the whole-image sliding window on a CT-sized case, same model, same run.

A model is trained (stock commands, `--train_minutes` of CPU) on head phantoms (demo/phantoms.py)
whose field of view matches the test case; its global stage (atlas, `nnLandmark_calibrate_global`)
is calibrated on its validation case. The test case is a phantom of `--shape` voxels at
`--spacing` mm (default 400 x 512 x 512 at 0.7 mm, a CT-sized volume) that nnU-Net preprocesses to
the model's spacing. Each arm runs `nnLandmark_predict` on it in its own process (-npp 0, so the
process's peak RSS is the whole cost): `--global none` (nnU-Net's preprocessing, then every tile of
the whole image), `--global atlas` (registration, then only the tiles around the estimates, only
their regions resampled: what users get) and the same with `--preprocess_whole_image` (nnU-Net's
whole-image preprocessing before the tiles: what the regional route saves), and the two-stage arm
with nnLandmark_predict's default -npp (preprocessing workers: their memory is sampled with the main
process's). Each arm runs `--repeats` times, the order reversed every round; reported are the medians
of wall time and peak RAM (start-up, reading and preprocessing the volume included, as a user sees
it), the ratios of the two-stage arm to the whole image, each arm's error against the phantom's exact
landmarks, the largest distance between the two two-stage arms' landmarks, and the seconds the
preparation took (training + final validation, calibration).
Test-time mirroring is off in every arm by default (`--tta` turns it on) to keep the run short;
it multiplies every arm's network time by the same factor.

    python benchmarks/bench_predict_large.py --json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

DATASET_ID, CONFIGURATION = 987, "3d_fullres_small"
# arm: (nnLandmark_predict arguments, -npp: 0 = preprocessing in the main process, None = the default)
ARMS = {"whole_image": (["--global", "none"], 0), "two_stage": (["--global", "atlas"], 0),
        "two_stage_whole_preprocessing": (["--global", "atlas", "--preprocess_whole_image"], 0),
        "two_stage_default_npp": (["--global", "atlas"], None)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    p.add_argument("--shape", type=int, nargs=3, default=[400, 512, 512], help="test case z y x voxels")
    p.add_argument("--spacing", type=float, default=0.7, help="test case spacing, mm (isotropic)")
    p.add_argument("--train_factor", type=int, default=2, help="training phantoms: test shape / f at spacing * f")
    p.add_argument("--n_train", type=int, default=4, help="training phantoms (the last one validates)")
    p.add_argument("--train_minutes", type=float, default=3.0)
    p.add_argument("--patch", type=int, default=64)
    p.add_argument("--tta", action="store_true", help="test-time mirroring in both arms")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2, help="runs of each arm, in alternating order (median)")
    p.add_argument("--json", action="store_true", help="print one JSON line with the results")
    p.add_argument("--reuse", action="store_true",
                   help="with --work_dir holding a finished run's model: predict and score again, no training")
    return p.parse_args(argv)


def tree_rss_mib(pid: int) -> float:
    """Memory (MiB) of a process and all its descendants now, from /proc (Linux): the sum of their
    proportional set sizes (Pss: a page shared by n processes counts 1/n in each, so forked workers'
    shared pages are not counted twice); VmRSS where smaps_rollup cannot be read."""
    children: dict = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        for file, key in ((f"/proc/{p}/smaps_rollup", "Pss:"), (f"/proc/{p}/status", "VmRSS:")):
            try:
                total += next(int(line.split()[1]) for line in Path(file).read_text().splitlines()
                              if line.startswith(key))
                break
            except (OSError, StopIteration, ValueError):
                continue
    return total / 1024.0


def run_measured(cmd, env, log: Path):
    """Run a command; (wall seconds, peak RSS in MiB of that process, peak memory of it and its worker
    processes together (sampled every 0.2 s, proportional set sizes: see tree_rss_mib), stdout)."""
    t = time.monotonic()
    peak = [0.0]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample():
            while not done.wait(0.2):
                peak[0] = max(peak[0], tree_rss_mib(proc.pid))
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        sampler.join()
    wall = time.monotonic() - t
    text = log.read_text(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{text[-3000:]}")
    return wall, usage.ru_maxrss / 1024.0, max(peak[0], usage.ru_maxrss / 1024.0), text


def prepare(args, work: Path, env, logs: Path):
    """Phantoms, raw dataset, plans, a trained model and its calibrated atlas stage -> (raw folder, trainer,
    seconds of training + final validation and of the calibration)."""
    from nnlandmark_h3de.conversion import convert_dataset
    from nnlandmark_h3de.demo.budget_trainer import write_budget_trainer
    from nnlandmark_h3de.demo.phantoms import generate_phantom_cases
    from nnlandmark_h3de.demo.commands import environment, find_command, run_command
    f = args.train_factor
    train_shape = tuple(max(32, s // f) for s in args.shape)
    with ProcessPoolExecutor(1) as pool:  # the CT-sized test case beside the training cases (2 cores)
        large = pool.submit(generate_phantom_cases, work / "test", 1, shape=tuple(args.shape),
                            spacing=(args.spacing,) * 3, seed=args.seed + 1000, case_prefix="large", progress=False)
        train = generate_phantom_cases(work / "train", args.n_train, shape=train_shape,
                                       spacing=(args.spacing * f,) * 3, seed=args.seed, case_prefix="train")
        test = large.result()
    names = sorted(train)
    splits = [{"train": names[:-1], "val": names[-1:]}]
    with environment(env):
        raw = Path(convert_dataset({**train, **test}, (DATASET_ID, "LargeCase"), test_cases=sorted(test),
                                   splits=splits))
    run_command("plan_and_preprocess", [find_command("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c",
                                        "3d_fullres", "-np", "1", "-npfp", "1"], {**env, "nnUNet_n_proc_DA": "1"},
                logs / "plan.log")
    run_command("small configuration", [find_command("nnLandmark_add_small_config"), "-d", str(DATASET_ID),
                                        "--patch_size", *[str(args.patch)] * 3, "--base_features", "8",
                                        "--max_features", "64"], env, logs / "small_config.log")
    with environment(env):
        # every arm predicts with --no_absent: one in-sample case is enough for the thresholds nobody reads here
        trainer = write_budget_trainer(work / "trainers", "nnLandmarkTrainer", 60 * args.train_minutes,
                                       iterations_per_epoch=25, val_iterations_per_epoch=2,
                                       attributes={"existence_training_cases": 1})
    t = time.monotonic()
    run_command("train", [find_command("nnUNetv2_train"), str(DATASET_ID), CONFIGURATION, "0", "-tr", trainer,
                          "-device", "cpu"], env, logs / "train.log", progress_pattern=r"Epoch \d+\s*$")
    seconds = {"train_and_final_validation": time.monotonic() - t}
    t = time.monotonic()
    run_command("calibrate global stage", [find_command("nnLandmark_calibrate_global"), "-d", str(DATASET_ID),
                                           "-c", CONFIGURATION, "-tr", trainer, "-f", "0", "--kinds", "atlas",
                                           "--n_atlases", "3", "-device", "cpu"], env, logs / "calibrate.log")
    seconds["calibrate_global"] = time.monotonic() - t
    print(f"prepared: {json.dumps({k: round(v, 1) for k, v in seconds.items()})}", flush=True)
    return raw, trainer, {k: round(v, 1) for k, v in seconds.items()}


def run_arms(args, work: Path, raw: Path, trainer: str, env, logs: Path) -> dict:
    """Every arm `args.repeats` times, the order reversed each round (machines drift); per arm the
    medians of wall time and peak RAM, every run's figures, and the error of its first run."""
    from nnlandmark_h3de.demo.commands import find_command
    from nnlandmark_h3de.evaluation.evaluate import evaluate_folders
    runs = {arm: [] for arm in ARMS}
    arms = {}
    for r in range(args.repeats):
        for arm in (list(ARMS) if r % 2 == 0 else list(reversed(ARMS))):
            extra, npp = ARMS[arm]
            out = work / f"pred_{arm}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [find_command("nnLandmark_predict"), "-i", str(raw / "imagesTs"), "-o", str(out), "-d",
                   str(DATASET_ID), "-c", CONFIGURATION, "-tr", trainer, "-f", "0", "-device", "cpu",
                   *([] if npp is None else ["-npp", str(npp)]), "--no_absent", "--disable_progress_bar",
                   *extra] + ([] if args.tta else ["--disable_tta"])
            wall, rss, tree, _ = run_measured(cmd, env, logs / f"predict_{arm}_{r}.log")
            runs[arm].append({"wall_s": round(wall, 1), "peak_rss_mib": round(rss), "peak_tree_rss_mib": round(tree)})
            print(f"{arm} (run {r + 1}): {wall:.1f} s, peak RSS {rss:.0f} MiB (with workers {tree:.0f} MiB)", flush=True)
            if arm not in arms:
                summary = evaluate_folders(work / "test" / "landmarks", out, work / f"eval_{arm}" / "summary.json")
                micro = summary["foreground_mean"]["micro"]
                arms[arm] = {"mre_mm": micro["mean_radial_error_mm"], "median_mm": micro["median_radial_error_mm"],
                             "sdr_4mm": micro["SDR_4mm"]}
    for arm, rs in runs.items():
        arms[arm] = {**{k: float(np.median([x[k] for x in rs])) for k in rs[0]}, **arms[arm], "runs": rs}
    return arms


def max_distance_mm(folder_a: Path, folder_b: Path) -> float:
    """The largest distance between the same landmark in two prediction folders (every case)."""
    from nnlandmark_h3de.landmarks import read_landmarks
    worst = 0.0
    for file_a in sorted(folder_a.glob("*.mrk.json")):
        a = read_landmarks(file_a)
        b = read_landmarks(folder_b / file_a.name).reordered(a.names)
        worst = max(worst, float(np.nanmax(np.linalg.norm(a.points_lps - b.points_lps, axis=1))))
    return round(worst, 4)


def main(argv=None) -> int:
    args = parse_args(argv)
    from nnlandmark_h3de.demo.commands import nnunet_environment

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_predict_large_"))
    prepared = work / "prepared.json"
    if args.reuse and not prepared.is_file():
        raise SystemExit(f"--reuse: {prepared} missing (run once with --work_dir {work} first)")
    if args.work_dir is not None and work.exists() and not args.reuse:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    env = nnunet_environment(work)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    try:
        if args.reuse:
            done = json.loads(prepared.read_text())
            raw, trainer, seconds = Path(done["raw"]), done["trainer"], done.get("seconds", {})
        else:
            raw, trainer, seconds = prepare(args, work, env, logs)
            prepared.write_text(json.dumps({"raw": str(raw), "trainer": trainer, "seconds": seconds}))
        arms = run_arms(args, work, raw, trainer, env, logs)
        plans = json.loads((work / "nnUNet_preprocessed" / raw.name / "nnUNetPlans.json").read_text())
        spacing = plans["configurations"]["3d_fullres"]["spacing"]
        result = {
            "benchmark": "bench_predict_large", "case_shape_zyx": list(args.shape), "case_spacing_mm": args.spacing,
            "model_spacing_mm": spacing, "patch": args.patch, "tta": args.tta, "train_minutes": args.train_minutes,
            "landmarks": len(json.loads((raw / "dataset.json").read_text())["landmarks"]["names"]),
            "global_stage": json.loads(next((work / "nnUNet_results").rglob("global_stage.json")).read_text())["validation"],
            "prepare_seconds": seconds,
            **arms,
            "speedup_two_stage": round(arms["whole_image"]["wall_s"] / arms["two_stage"]["wall_s"], 2),
            "ram_ratio_two_stage": round(arms["two_stage"]["peak_rss_mib"] / arms["whole_image"]["peak_rss_mib"], 3),
            "err_two_stage_mm": arms["two_stage"]["mre_mm"], "err_full_mm": arms["whole_image"]["mre_mm"],
            "ram_default_npp_mib": arms["two_stage_default_npp"]["peak_tree_rss_mib"],
            "ram_ratio_default_npp_vs_npp0": round(arms["two_stage_default_npp"]["peak_tree_rss_mib"]
                                                   / arms["two_stage"]["peak_tree_rss_mib"], 3),
            "speedup_regional_vs_whole_preprocessing": round(
                arms["two_stage_whole_preprocessing"]["wall_s"] / arms["two_stage"]["wall_s"], 2),
            "max_distance_regional_vs_whole_preprocessing_mm": max_distance_mm(
                work / "pred_two_stage", work / "pred_two_stage_whole_preprocessing"),
        }
        print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
