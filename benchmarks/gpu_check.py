#!/usr/bin/env python
"""One prepared GPU check (fits 8 minutes on one H200): AFIDs re-posed cases, nnU-Net's own 3d_fullres
plan, nnLandmarkTrainer and nnH3DETrainer trained a few minutes each with nnU-Net's CUDA defaults
(torch.compile and AMP on), the test cases predicted and scored; ONE JSON with steps/s, peak GPU
memory, data-loader wait per step, MRE, per-stage seconds and versions.

Nothing has run this project on a GPU before, and device time is short, so everything a GPU run should
tell is gathered in one command. Steps are timed inside the trainer process by a mixin on top of the
budgeted trainer (`nnlandmark_h3de.demo.budget_trainer`): the wait for each batch (nnU-Net's loader)
and the step itself, plus torch.cuda.max_memory_allocated; `nvidia-smi` is sampled as well when it exists.
Test predictions use `--no_absent`, so the MRE is over all landmarks of every test case.

    scripts/gpu_wheels.sh          # here: wheels + templates into gpu_wheels/ (git-ignored, < 60 MiB)
    # there (PyTorch, no network), with gpu_wheels/ carried; --target, not a venv: python3 is itself a
    # venv's, and a venv made from it does not see that venv's torch
    python3 -m pip install --no-index --no-deps --target /tmp/site gpu_wheels/*.whl
    python3 -m pip install --no-index --no-deps --no-build-isolation --target /tmp/site .
    PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH python3 benchmarks/gpu_check.py --out gpu_check.json
    python benchmarks/gpu_check.py --dry_run --out dry.json   # here: the same path on the CPU

`--dry_run`: 2 cases per template (1 per test template), nnU-Net's 3d_fullres planned but a 32^3 small
configuration at 6 mm trained (nnLandmark_add_small_config), one epoch of two iterations, `-device cpu`
(nnU-Net turns compile off on the CPU by itself).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from common import BenchmarkError, build_cases, evaluate, load_template, row_from_summary, run_script

REPO = Path(__file__).resolve().parents[1]
TEMPLATE_FOLDERS = ("../shared/data/afids-templates", "gpu_wheels/afids-templates")  # relative to the repo
TRAIN_TEMPLATES = ("human_MNI152NLin2009cAsym_T1w_2mm", "human_MNI305_T1w_2mm")
TEST_TEMPLATES = ("human_MNI152NLin6Asym_T1w_2mm",)
DATASET_ID, DATASET_NAME = 987, "AFIDsGpuCheck"
DRY_CONFIGURATION = "3d_fullres_small"
STATS_FILE = "gpu_check_stats.json"  # written by StepStatistics into the fold folder
WARMUP_STEPS = 5  # left out of the steady-state figures: the first step compiles (and cuDNN benchmarks)
# imported by the pipeline; the distributions scripts/gpu_wheels.sh stages for the GPU machine
REQUIRED_MODULES = ("torch", "nnunetv2", "dynamic_network_architectures", "batchgenerators", "batchgeneratorsv2",
                    "acvl_utils", "SimpleITK", "nibabel", "blosc2", "cc3d", "nnlandmark_h3de")
VERSIONED = ("torch", "triton", "numpy", "nnunetv2", "dynamic-network-architectures", "batchgenerators",
             "batchgeneratorsv2", "acvl-utils", "SimpleITK", "nibabel", "blosc2", "nnlandmark_h3de")


# ------------------------------------------------------------------ in the trainer process
class StepStatistics:
    """Trainer mixin: times every training step and the wait for its batch (nnU-Net's loader), and
    writes them with the peak GPU memory to fold_X/gpu_check_stats.json when training ends (before
    the final validation). Placed in front of TrainingBudget and the trainer."""

    def on_train_start(self):
        import torch
        super().on_train_start()
        self._gc_steps: List[tuple] = []  # (epoch, wait for the batch s, step s)
        self._gc_start_unix = time.time()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self._gc_last_end = time.perf_counter()

    def train_step(self, batch: dict) -> dict:
        t0 = time.perf_counter()
        out = super().train_step(batch)  # ends with .cpu() of the loss: the GPU work is done
        t1 = time.perf_counter()
        self._gc_steps.append((self.current_epoch, t0 - self._gc_last_end, t1 - t0))
        self._gc_last_end = t1
        return out

    def on_train_end(self):
        self._write_step_statistics()
        super().on_train_end()

    def _write_step_statistics(self):
        import torch
        from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
        cuda = self.device.type == "cuda"
        stats = step_summary(self._gc_steps)
        stats.update({
            "device": str(self.device), "compiled": bool(self._do_i_compile()),
            "amp": cuda and self.grad_scaler is not None,  # nnU-Net: autocast + GradScaler on CUDA only
            "autocast_dtype": str(torch.get_autocast_dtype("cuda")) if cuda else None,
            "peak_memory_allocated_mib": torch.cuda.max_memory_allocated(self.device) / 2 ** 20 if cuda else None,
            "peak_memory_reserved_mib": torch.cuda.max_memory_reserved(self.device) / 2 ** 20 if cuda else None,
            "batch_size": int(self.configuration_manager.batch_size),
            "patch_size": [int(p) for p in self.configuration_manager.patch_size],
            "n_proc_DA": int(get_allowed_n_proc_DA()), "train_start_unix": self._gc_start_unix,
            "train_end_unix": time.time()})
        Path(self.output_folder, STATS_FILE).write_text(json.dumps(stats, indent=2) + "\n")


def step_summary(steps: Sequence[tuple], warmup_steps: int = WARMUP_STEPS) -> dict:
    """steps/s and loader wait per step from (epoch, wait s, step s) records, over all steps and over
    the steps after the first `warmup_steps` (torch.compile's and cuDNN's warm-up)."""
    def rates(rows):
        if not rows:
            return None, None, None
        wait, step = sum(r[1] for r in rows), sum(r[2] for r in rows)
        return len(rows) / (wait + step), wait / len(rows), step / len(rows)
    steady = list(steps[warmup_steps:])
    all_rate, all_wait, all_step = rates(steps)
    steady_rate, steady_wait, steady_step = rates(steady)
    return {"steps": len(steps), "epochs": len({r[0] for r in steps}), "steps_per_s": all_rate,
            "loader_wait_s_per_step": all_wait, "step_s": all_step,
            "first_step_s": steps[0][2] if steps else None, "warmup_steps": warmup_steps,
            "steady_steps": len(steady), "steady_steps_per_s": steady_rate,
            "steady_loader_wait_s_per_step": steady_wait, "steady_step_s": steady_step}


# -------------------------------------------------------------------------- set-up checks
def check_imports() -> None:
    """Import what the pipeline needs; a missing one is named with how to install it on the GPU machine."""
    import importlib
    missing = []
    for module in REQUIRED_MODULES:
        try:
            importlib.import_module(module)
        except ImportError as e:
            missing.append(f"{module} ({e})")
    if missing:
        raise BenchmarkError(
            f"cannot import {', '.join(missing)}. On a machine without network, stage the wheels here with "
            f"scripts/gpu_wheels.sh, carry gpu_wheels/, and there run: python3 -m venv --system-site-packages "
            f"/tmp/venv && /tmp/venv/bin/pip install --no-index --no-deps gpu_wheels/*.whl && /tmp/venv/bin/pip "
            f"install --no-deps --no-build-isolation -e .")
    from nnlandmark_h3de.demo.commands import missing_commands
    absent = missing_commands(["plan_and_preprocess", "small_configuration", "train", "predict"])
    if absent:
        raise BenchmarkError("cannot run: " + "; ".join(f"{k}: {v}" for k, v in absent.items()))


def find_templates(folder: Optional[Path]) -> Path:
    """--templates, else $NNLANDMARK_AFIDS_DIR, else ../shared or gpu_wheels/ beside the repo (the
    folder only: its files are checked once the imports are)."""
    env = os.environ.get("NNLANDMARK_AFIDS_DIR")
    tried = [folder] if folder is not None else ([Path(env)] if env else []) + [REPO / p for p in TEMPLATE_FOLDERS]
    for path in tried:
        if (path / "images").is_dir():
            return path.resolve()
    raise BenchmarkError(f"AFIDs templates not found (no images/ folder in {', '.join(map(str, tried))}); pass "
                         f"--templates or run scripts/gpu_wheels.sh, which copies them into gpu_wheels/")


def check_templates(folder: Path) -> None:
    for t in TRAIN_TEMPLATES + TEST_TEMPLATES:
        load_template(folder, t)  # a missing image or landmark file is named


def versions() -> dict:
    """Package versions, Python, the GPU and its driver (what the figures were measured with)."""
    import importlib.metadata as md
    import torch
    out = {"python": platform.python_version(), "machine": platform.machine(), "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "driver": nvidia_smi_query("driver_version")}
    for name in VERSIONED:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                       timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["commit"] = None
    return out


# ---------------------------------------------------------------------------- nvidia-smi
def nvidia_smi_query(field: str) -> Optional[str]:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        r = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits", "-i", "0"],
                           capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0:
        return None
    return r.stdout.strip() or None


class NvidiaSmiSampler:
    """Samples the GPU's used memory and utilisation every `period` s while a stage runs (whole
    device: CUDA context and allocator cache included; None without nvidia-smi)."""

    def __init__(self, period: float = 0.5):
        self.period, self.memory, self.utilisation = period, [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.period):
            reading = nvidia_smi_query("memory.used,utilization.gpu")
            if reading is None:
                return
            try:
                mem, util = (float(v) for v in reading.split(","))
            except ValueError:
                return
            self.memory.append(mem)
            self.utilisation.append(util)

    def __enter__(self):
        if shutil.which("nvidia-smi") is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=15)

    def summary(self) -> dict:
        return {"nvidia_smi_peak_memory_used_mib": max(self.memory, default=None),
                "nvidia_smi_mean_utilisation_pct": (sum(self.utilisation) / len(self.utilisation)
                                                    if self.utilisation else None)}


# -------------------------------------------------------------------------------- stages
def make_dataset(args, templates: Path, work: Path, env: dict) -> dict:
    """Re-posed, deformed cases and the raw dataset: the last case of every training template is
    validation; the test templates' cases are imagesTs (never trained on)."""
    from nnlandmark_h3de.conversion import convert_dataset
    from nnlandmark_h3de.demo.commands import environment
    names = load_template(templates, TRAIN_TEMPLATES[0])[1].names
    train, _ = build_cases(templates, TRAIN_TEMPLATES, work / "cases_train", args.cases_per_template, args.seed, (),
                           names, args.deform_mm)
    test, _ = build_cases(templates, TEST_TEMPLATES, work / "cases_test", args.test_cases_per_template, args.seed, (),
                          names, args.deform_mm)
    val = [c for c in sorted(train) if c.endswith(f"_r{args.cases_per_template - 1:02d}")]
    splits = [{"train": [c for c in sorted(train) if c not in val], "val": val}]
    with environment(env):
        raw = convert_dataset({**train, **test}, work / "nnUNet_raw" / f"Dataset{DATASET_ID}_{DATASET_NAME}",
                              names=names, test_cases=sorted(test), splits=splits, progress=False)
    return {"raw": raw, "truth": work / "cases_test" / "landmarks", "landmarks": len(names),
            "train_cases": splits[0]["train"], "val_cases": val, "test_cases": sorted(test)}


def plan(args, env: dict, logs: Path) -> dict:
    """nnU-Net's own planning and 3d_fullres preprocessing; the dry run adds a tiny configuration."""
    from nnlandmark_h3de.demo.commands import find_command, run_command
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    n = "1" if args.dry_run else str(min(8, os.cpu_count() or 1))
    run_command("plan_and_preprocess", [find_command("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c",
                                        "3d_fullres", "-np", n, "-npfp", n] + (["--no_pp"] if args.dry_run else []),
                {**env, "nnUNet_n_proc_DA": n}, logs / "plan_and_preprocess.log")  # the planner's torch threads
    configuration = "3d_fullres"
    if args.dry_run:  # 3d_fullres planned only; 32^3 patch at 6 mm (a tile or two per case), 4..16 features
        configuration = DRY_CONFIGURATION
        run_command("small configuration", [find_command("nnLandmark_add_small_config"), "-d", str(DATASET_ID),
                                            "--name", configuration, "--patch_size", "32", "32", "32",
                                            "--spacing", "6", "6", "6", "--base_features", "4", "--max_features",
                                            "16"], env, logs / "small_configuration.log")
        run_command("preprocess small", [find_command("nnUNetv2_preprocess"), "-d", str(DATASET_ID), "-c",
                                         configuration, "-np", "1"], env, logs / "preprocess_small.log")
    preprocessed = Path(env["nnUNet_preprocessed"]) / f"Dataset{DATASET_ID}_{DATASET_NAME}"
    c = PlansManager(str(preprocessed / "nnUNetPlans.json")).get_configuration(configuration)
    return {"configuration": configuration, "patch_size": [int(p) for p in c.patch_size],
            "spacing_mm": [float(s) for s in c.spacing], "batch_size": int(c.batch_size)}


def write_instrumented_trainer(folder: Path, base_name: str, args, env: dict) -> str:
    """`<folder>/<base>_gpucheck.py`: StepStatistics + TrainingBudget + the trainer (nnU-Net finds it
    in nnUNet_extTrainer, for training and for prediction)."""
    import contextlib
    import io
    from nnlandmark_h3de.demo.commands import environment
    from nnlandmark_h3de.landmarks.atomic import atomic_write_text
    with environment(env), contextlib.redirect_stdout(io.StringIO()):
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
        base = recursive_find_trainer_class_by_name(base_name)
    name = f"{base_name}_gpucheck"
    epochs, iters, val_iters = (1, 2, 1) if args.dry_run else (1000, args.iterations_per_epoch, 5)
    atomic_write_text(folder / f"{name}.py", (
        f'"""Generated by benchmarks/gpu_check.py: {base_name}, {args.train_minutes:g} min budget, timed steps."""\n'
        f"import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
        f"from gpu_check import StepStatistics\n"
        f"from nnlandmark_h3de.demo.budget_trainer import TrainingBudget\n"
        f"from {base.__module__} import {base.__name__} as _Base\n\n\n"
        f"class {name}(StepStatistics, TrainingBudget, _Base):\n"
        f"    budget_seconds = {60.0 * args.train_minutes!r}\n"
        f"    budget_max_epochs = {epochs}\n"
        f"    budget_iterations_per_epoch = {iters}\n"
        f"    budget_val_iterations_per_epoch = {val_iters}\n"))
    return name


def train_and_predict(base_name: str, args, data: dict, plan_info: dict, work: Path, env: dict) -> dict:
    """Train fold 0 for the budget (timed steps), predict the test cases, score them; seconds per stage."""
    from nnlandmark_h3de.demo.commands import find_command, run_command
    device, logs, configuration = ("cpu" if args.dry_run else "cuda"), work / "logs", plan_info["configuration"]
    name = write_instrumented_trainer(work / "trainers", base_name, args, env)
    t0 = time.monotonic()
    with NvidiaSmiSampler() as smi:
        run_command(f"train {base_name}", [find_command("nnUNetv2_train"), str(DATASET_ID), configuration, "0",
                                           "-tr", name, "-device", device], env, logs / f"train_{base_name}.log",
                    progress_pattern=r"Epoch \d+\s*$")
    t1 = time.time()
    fold = Path(env["nnUNet_results"]) / data["raw"].name / f"{name}__nnUNetPlans__{configuration}" / "fold_0"
    if not (fold / STATS_FILE).is_file():
        raise RuntimeError(f"{fold / STATS_FILE} missing: the trainer did not reach the end of training")
    stats = {**json.loads((fold / STATS_FILE).read_text()), **smi.summary()}
    stages = {"train_total_s": time.monotonic() - t0,
              "train_s": stats["train_end_unix"] - stats["train_start_unix"],
              "final_validation_and_exit_s": t1 - stats["train_end_unix"]}
    pred, t2 = work / f"predictions_{base_name}", time.monotonic()
    run_command(f"predict {base_name}", [
        find_command("nnLandmark_predict"), "-i", str(data["raw"] / "imagesTs"), "-o", str(pred), "-d",
        str(DATASET_ID), "-c", configuration, "-tr", name, "-f", "0", "-device", device, "--global", "none",
        "--no_absent", "-npp", "0" if args.dry_run else "3", "--disable_progress_bar"], env,
        logs / f"predict_{base_name}.log")
    stages["predict_s"] = time.monotonic() - t2
    t3 = time.monotonic()
    row = row_from_summary(base_name, evaluate(data["truth"], pred, work / f"evaluation_{base_name}"))
    stages["evaluate_s"] = time.monotonic() - t3
    return {"train": stats, "stages_s": {k: round(v, 2) for k, v in stages.items()},
            "predict_s_per_case": round(stages["predict_s"] / max(1, len(data["test_cases"])), 2),
            **{k: row[k] for k in ("mre_mm", "std_mm", "median_mm", "sdr_2mm", "sdr_4mm", "TP", "FN")}}


# --------------------------------------------------------------------------------- the run
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="the JSON to write")
    p.add_argument("--dry_run", action="store_true", help="the same path on the CPU, tiny (about a minute)")
    p.add_argument("--templates", type=Path, default=None,
                   help=f"AFIDs templates (default: $NNLANDMARK_AFIDS_DIR, else {' or '.join(TEMPLATE_FOLDERS)})")
    p.add_argument("--deform_mm", type=float, default=4.0, help="RMS nonlinear deformation of every case (mm)")
    p.add_argument("--cases_per_template", type=int, default=None,
                   help="re-posed cases per training template (default 5; dry run 2)")
    p.add_argument("--test_cases_per_template", type=int, default=None, help="per test template (default 3; dry 1)")
    p.add_argument("--train_minutes", type=float, default=None, help="training budget per trainer (default 1.5)")
    p.add_argument("--iterations_per_epoch", type=int, default=50, help="training steps per epoch (GPU run)")
    p.add_argument("--trainers", nargs="+", default=["nnLandmarkTrainer", "nnH3DETrainer"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work_dir", type=Path, default=None, help="kept when given (default: a temporary folder)")
    p.add_argument("--logs_dir", type=Path, default=None, help="also copy the stages' logs here")
    args = p.parse_args(argv)
    dry = args.dry_run
    args.cases_per_template = args.cases_per_template or (2 if dry else 5)
    args.test_cases_per_template = args.test_cases_per_template or (1 if dry else 3)
    args.train_minutes = args.train_minutes if args.train_minutes is not None else (0.5 if dry else 1.5)
    if args.cases_per_template < 2:
        raise BenchmarkError("--cases_per_template must be >= 2 (the last case of each template is validation)")
    if not (math.isfinite(args.deform_mm) and args.deform_mm >= 0):
        raise BenchmarkError(f"--deform_mm must be a number >= 0, got {args.deform_mm}")
    return args


def gpu_environment(work: Path, dry_run: bool) -> dict:
    """nnU-Net folders inside `work`; compile and loader processes left to nnU-Net's defaults (the
    dry run keeps augmentation in the training process)."""
    from nnlandmark_h3de.demo.commands import nnunet_environment
    env = nnunet_environment(work)
    env.pop("nnUNet_compile", None)  # nnU-Net's default: compile on CUDA (it turns it off on the CPU)
    if os.environ.get("nnUNet_compile"):
        env["nnUNet_compile"] = os.environ["nnUNet_compile"]
    if not dry_run and "nnUNet_n_proc_DA" not in os.environ:
        env.pop("nnUNet_n_proc_DA", None)
    return env


def copy_logs(logs: Path, to: Optional[Path]) -> None:
    """The stages' logs, flat, into `to` (e.g. the device tool's $OUT, which returns 8 files at most)."""
    if to is None or not logs.is_dir():
        return
    to.mkdir(parents=True, exist_ok=True)
    for log in sorted(logs.glob("*.log")):
        shutil.copy2(log, to / log.name)


def write_report(path: Path, doc: dict) -> None:
    from nnlandmark_h3de.landmarks.atomic import atomic_write_text
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(doc, indent=2, default=str) + "\n")


def run_stages(args, templates: Path, work: Path, doc: dict) -> None:
    """Cases, plan, then each trainer (a failing trainer is recorded and the next one still runs)."""
    from nnlandmark_h3de.demo.commands import DemoError
    env, stages = gpu_environment(work, args.dry_run), doc["stages_s"]
    t = time.monotonic()
    data = make_dataset(args, templates, work, env)
    stages["cases_and_convert_s"] = round(time.monotonic() - t, 2)
    doc["dataset"] = {k: v for k, v in data.items() if k not in ("raw", "truth")}
    t = time.monotonic()
    doc["plan"] = plan(args, env, work / "logs")
    stages["plan_preprocess_s"] = round(time.monotonic() - t, 2)
    for trainer in args.trainers:
        t = time.monotonic()
        try:
            doc["trainers"][trainer] = train_and_predict(trainer, args, data, doc["plan"], work, env)
        except (DemoError, RuntimeError, OSError) as e:
            doc["failures"].append(f"{trainer}: {e}")
            print(f"gpu_check: {trainer} FAILED: {e}", file=sys.stderr)
        stages[trainer] = round(time.monotonic() - t, 2)
        write_report(args.out, doc)  # what is done survives a later failure or a timeout


def main(argv=None) -> int:
    t0 = time.monotonic()
    args = parse_args(argv)
    templates = find_templates(args.templates)
    check_imports()
    check_templates(templates)
    import torch
    if not args.dry_run and not torch.cuda.is_available():
        raise BenchmarkError("no CUDA device visible to torch; --dry_run runs the same path on the CPU")
    doc = {"mode": "dry_run" if args.dry_run else "gpu", "settings": dict(vars(args)), "versions": versions(),
           "templates": str(templates), "stages_s": {"imports_s": round(time.monotonic() - t0, 2)},
           "trainers": {}, "failures": []}
    work = args.work_dir.resolve() if args.work_dir else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    if args.work_dir and any(work.iterdir() if work.is_dir() else ()):
        raise BenchmarkError(f"--work_dir {work} is not empty")
    work.mkdir(parents=True, exist_ok=True)
    from nnlandmark_h3de.demo.commands import DemoError
    try:
        run_stages(args, templates, work, doc)
    except DemoError as e:  # cases or planning failed: nothing to train
        doc["failures"].append(str(e))
        print(f"gpu_check: FAILED: {e}", file=sys.stderr)
    finally:
        doc["total_s"] = round(time.monotonic() - t0, 2)
        write_report(args.out, doc)
        copy_logs(work / "logs", args.logs_dir)
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"summary": summary(doc)}, indent=2, default=str))
    print(f"wrote {args.out} ({doc['total_s']:.0f} s)")
    return 1 if doc["failures"] else 0


def summary(doc: dict) -> Dict[str, dict]:
    """The headline figures per trainer (the JSON holds everything)."""
    return {name: {"steps_per_s": r["train"]["steps_per_s"], "steady_steps_per_s": r["train"]["steady_steps_per_s"],
                   "loader_wait_s_per_step": r["train"]["loader_wait_s_per_step"],
                   "peak_memory_allocated_mib": r["train"]["peak_memory_allocated_mib"], "mre_mm": r["mre_mm"],
                   "compiled": r["train"]["compiled"], "amp": r["train"]["amp"]}
            for name, r in doc["trainers"].items()}


if __name__ == "__main__":
    run_script(main, "gpu_check")
