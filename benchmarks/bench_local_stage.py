#!/usr/bin/env python
"""The local stage per CPU minute: validation error after the same training budget, and steps per
minute, of local-stage designs on the same AFIDs data in the same run.

Arms (`--arms TRAINER:PATCH:BATCH[:BASE_FEATURES] ...`; the first stage's features, default
`--base_features`: the network's last stage has that many features for all the landmark channels), by
default: today's default local stage, nnLandmarkTrainer on the
64^3 small configuration (batch 2); nnLandmarkTrainerLocal (patches centred near landmarks) on the same;
nnLandmarkTrainerLocal on 32^3 patches (batch 4: about as many voxels per step, fewer per patch); and
nnLandmarkTrainerPrior (the global estimate as input channels) on 32^3 patches (batch 4). Each arm trains on fold 0 for `--cpu_minutes` of wall clock, then
`nnLandmark_calibrate_global --kinds deformable` measures the deformable registration on the validation
cases and runs the two-stage final validation. Reported per arm, from its global_stage.json:
- the local network's own peaks inside the search radius (validation MRE; nothing is fitted on them),
- the deformable global stage alone on the same cases,
- their combination with the local weight and peak floor fitted on these same cases (in-sample),
- training steps per minute (epochs x iterations / budget).

Cases: the training templates re-posed and deformed (`--deform_mm`, default 4 mm RMS) as in
afids_benchmark.py; the last case of each template is validation. No test template is needed.

    python benchmarks/bench_local_stage.py --templates ../shared/data/afids-templates \\
        --train human_MNI152NLin2009cAsym_T1w_2mm human_MNI305_T1w_2mm --cpu_minutes 10 --json out.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

from common import BenchmarkError, run_script, train_with_budget

DEFAULT_ARMS = ["nnLandmarkTrainer:64:2", "nnLandmarkTrainerLocal:64:2", "nnLandmarkTrainerLocal:32:4",
                "nnLandmarkTrainerPrior:32:4"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--templates", required=True, type=Path)
    p.add_argument("--train", nargs="+", required=True, help="template names (their cases: fit and validation)")
    p.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, help="TRAINER:PATCH_EDGE:BATCH[:BASE_FEATURES] per arm")
    p.add_argument("--cpu_minutes", type=float, default=10.0, help="training budget per arm (wall clock)")
    p.add_argument("--cases_per_template", type=int, default=6)
    p.add_argument("--deform_mm", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iterations_per_epoch", type=int, default=50)
    p.add_argument("--base_features", type=int, default=8)
    p.add_argument("--max_features", type=int, default=64)
    p.add_argument("--work_dir", type=Path, default=Path("bench_local_stage_work"))
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def parse_arm(text: str, base_features: int):
    """-> trainer, patch edge, batch, first-stage features."""
    try:
        trainer, *numbers = text.split(":")
        patch, batch, base = (list(map(int, numbers)) + [base_features])[:3]
        if len(numbers) not in (2, 3) or min(patch, batch, base) < 1:
            raise ValueError
        return trainer, patch, batch, base
    except ValueError:
        raise BenchmarkError(f"--arms: {text!r} is not TRAINER:PATCH_EDGE:BATCH[:BASE_FEATURES] "
                             "(e.g. nnLandmarkTrainerLocal:32:4 or nnLandmarkTrainerLocal:32:4:16)")


def run_arm(arm: str, args, raw: Path, work: Path, env: dict) -> dict:
    """Train one arm for the budget, calibrate the deformable stage with its two-stage validation."""
    from nnlandmark_h3de.demo.commands import find_command, run_command
    from afids_benchmark import DATASET_ID, add_configuration
    from common import local_stage_validation
    trainer, patch, batch, base = parse_arm(arm, args.base_features)
    configuration = f"3d_bench_{patch}_b{batch}_f{base}"
    add_configuration(env, work / "logs", configuration, base, args.max_features, patch, batch)
    name, seconds, epochs = train_with_budget(f"{trainer}_{patch}_f{base}", trainer, DATASET_ID, configuration,
                                              args.cpu_minutes, work, env, args.iterations_per_epoch)
    t = time.monotonic()
    run_command(f"calibrate {arm}", [find_command("nnLandmark_calibrate_global"), "-d", str(DATASET_ID), "-c",
                                     configuration, "-tr", name, "-f", "0", "--kinds", "deformable", "-device", "cpu"],
                env, work / "logs" / f"calibrate_{trainer}_{patch}_f{base}.log")
    fold = work / "nnUNet_results" / raw.name / f"{name}__nnUNetPlans__{configuration}" / "fold_0"
    v = json.loads((fold / "global_stage.json").read_text())["validation"]["deformable"]
    steps = epochs * args.iterations_per_epoch
    return {"arm": arm, "trainer": trainer, "patch": patch, "batch": batch, "base_features": base, "epochs": epochs,
            "steps": steps,
            "steps_per_minute": round(steps / args.cpu_minutes, 1), "train_and_final_s": round(seconds, 1),
            "calibrate_s": round(time.monotonic() - t, 1), "radius_mm": v["radius_mm"], **local_stage_validation(v)}


def report(rows, args) -> str:
    head = (f"{'arm':<34} {'steps/min':>9} {'local mm':>9} {'global mm':>9} {'local/global':>12} "
            f"{'combined*':>9} {'weight':>6}")
    lines = [f"local stage after {args.cpu_minutes:g} CPU minutes, AFIDs {args.train} x {args.cases_per_template}, "
             f"deform_mm {args.deform_mm:g}, seed {args.seed}; validation cases, deformable global stage", head,
             "-" * len(head)]
    for r in rows:
        ratio = r["mre_local_mm"] / r["mre_global_mm"] if r.get("mre_global_mm") else float("nan")
        lines.append(f"{r['arm']:<34} {r['steps_per_minute']:>9.1f} {r['mre_local_mm']:>9.2f} "
                     f"{r['mre_global_mm']:>9.2f} {ratio:>12.3f} {r['mre_combined_mm_in_sample']:>9.2f} "
                     f"{r['local_weight']:>6.2f}")
    lines.append("local: the network's own peaks inside the search radius; *combined: weight and peak floor fitted "
                 "on these same validation cases (in-sample)")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    import afids_benchmark
    from nnlandmark_h3de.demo.commands import nnunet_environment
    from nnlandmark_h3de.landmarks.atomic import atomic_write_text
    for arm in args.arms:
        parse_arm(arm, args.base_features)
    work = afids_benchmark.fresh_work_dir(args.work_dir, args.overwrite)
    env = nnunet_environment(work)
    data_args = SimpleNamespace(templates=args.templates, train=args.train, test=[], seed=args.seed,
                                cases_per_template=args.cases_per_template, exclude_names=[], deform_mm=args.deform_mm,
                                ball_radius_mm=None)
    data = afids_benchmark.make_dataset(data_args, work, env)
    afids_benchmark.plan_and_preprocess(env, work / "logs")  # each arm adds its own configuration
    rows = [run_arm(arm, args, data["raw"], work, env) for arm in args.arms]
    print(report(rows, args))
    if args.json:
        atomic_write_text(args.json, json.dumps({"settings": {k: str(v) if isinstance(v, Path) else v
                                                              for k, v in vars(args).items()}, "rows": rows},
                                                indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    run_script(main, "bench_local_stage")
