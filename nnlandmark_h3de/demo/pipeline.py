"""The end-to-end demo: phantoms -> nnU-Net raw dataset -> plan/preprocess -> small configuration
-> budgeted training -> nnLandmark_calibrate_global (atlas) -> two-stage nnLandmark_predict ->
nnLandmark_evaluate (two stages, and the global stage alone) -> report.md.

`two_d` (`nnLandmark_demo --2d`): the same commands on 2D X-ray-like phantoms (phantoms_2d.py) with
nnU-Net's `2d` configuration; the whole image is one patch, so there is no global stage, and the
errors are reported in mm and in pixels.

The phantoms are larger than one network patch, so the network alone cannot tell look-alike
structures apart (left/right eyes, ears, ventricles); the atlas global stage says which is which and
the network refines each landmark on the tiles around it. Some structures are absent in every split
(training, validation, test), so existence is calibrated on absent examples and the report shows
what a user will see.

Every nnU-Net and nnLandmark step runs as the real command a user would type (subprocess), with
nnUNet_raw/preprocessed/results inside OUTPUT_DIR so the demo never reads or writes a user's
datasets. Each command's output goes to OUTPUT_DIR/logs/<stage>.log. A stage that fails, or a
command that is not installed, stops the demo with an error naming the stage: it never reports
figures it did not measure.
"""
from __future__ import annotations

import contextlib
import io
import json
import shlex
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

# the command helpers stay importable from here (benchmarks and tests use them through the pipeline)
from nnlandmark_h3de.demo.commands import (COMMANDS, DemoError, count_epochs, environment, find_command,
                                           missing_commands, nnunet_environment, run_command)
from nnlandmark_h3de.landmarks.atomic import atomic_write_text

STAGES = ("generate", "convert", "plan_and_preprocess", "small_configuration", "train", "calibrate_global",
          "predict", "evaluate", "report")

# Folders and files the demo creates in OUTPUT_DIR (the only things --overwrite deletes).
OWNED = ("phantoms", "nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "trainers", "predictions",
         "evaluation", "logs", "report.md", "demo.json")


@dataclass
class DemoSettings:
    output_dir: Path
    minutes: float = 10.0
    quick: bool = False
    trainer: str = "nnLandmarkTrainer"
    seed: int = 0
    n_train: int = 16
    n_test: int = 6
    n_val: int = 3
    # 48^3 voxels at 2.8 mm, 32^3 patches: the head is 8 patches, a network tile sees a part of it
    shape_zyx: Tuple[int, int, int] = (48, 48, 48)
    spacing_xyz: Tuple[float, float, float] = (2.8, 2.8, 2.8)
    patch_size: Tuple[int, int, int] = (32, 32, 32)
    absent_fraction: float = 0.15
    oblique_deg: float = 10.0
    dataset_id: int = 987
    dataset_name: str = "DemoPhantomHeads"
    configuration: str = "3d_fullres_small"
    # a light U-Net (8..64 features): on 2 CPU cores many cheap steps beat few expensive ones
    base_features: int = 8
    max_features: int = 64
    iterations_per_epoch: int = 50
    val_iterations_per_epoch: int = 4
    n_atlases: int = 4  # training cases registered per case by the atlas global stage
    two_d: bool = False  # 2D X-ray phantoms, nnU-Net's 2d configuration, no global stage
    # RMS (mm) of a smooth random nonlinear deformation per 3D phantom (synthesis.deformation): subjects
    # differ beyond pose, as real ones do, so an affine atlas is not already near the truth; > 0 also
    # calibrates the deformable global stage beside the affine one and predicts with the one validation keeps
    deform_mm: float = 4.0
    overwrite: bool = False

    @classmethod
    def make(cls, output_dir, quick: bool = False, minutes: Optional[float] = None, **kw) -> "DemoSettings":
        """Defaults sized for about 10 minutes on 2 CPU cores, or ~2-3 minutes with `quick`."""
        if kw.get("two_d"):
            # 96 x 80 pixels at 1 mm, the whole image in one 2D patch; 2D steps are cheap, so a wider U-Net
            kw = {"shape_zyx": (96, 80), "spacing_xyz": (1.0, 1.0), "patch_size": (96, 80), "oblique_deg": 0.0,
                  "dataset_id": 988, "dataset_name": "DemoXrays", "configuration": "2d_small", "max_features": 128,
                  "base_features": 16, **kw}
            if kw.get("deform_mm"):
                raise ValueError("--deform_mm deforms the 3D phantoms only (the 2D X-ray phantoms have none)")
            kw["deform_mm"] = 0.0
            if quick:
                kw = {"n_train": 8, "n_test": 2, "n_val": 2, "iterations_per_epoch": 5, "val_iterations_per_epoch": 1,
                      **kw}
        elif quick:
            kw = {"n_train": 8, "n_test": 2, "n_val": 2, "shape_zyx": (32, 32, 32), "patch_size": (24, 24, 24),
                  "spacing_xyz": (4.0, 4.0, 4.0), "iterations_per_epoch": 5, "val_iterations_per_epoch": 1,
                  "n_atlases": 2, **kw}
        default_minutes = (2.5 if quick else 6.0) if kw.get("two_d") else (2.5 if quick else 10.0)
        s = cls(Path(output_dir).resolve(), minutes=default_minutes if minutes is None else float(minutes),
                quick=quick, **kw)
        if s.minutes <= 0:
            raise ValueError(f"--minutes must be positive, got {s.minutes}")
        if s.n_train - s.n_val < 1 or s.n_val < 1 or s.n_test < 1:
            raise ValueError(f"need >= 1 validation, >= 1 training and >= 1 test case "
                             f"(n_train={s.n_train}, n_val={s.n_val}, n_test={s.n_test})")
        return s

    @property
    def base_configuration(self) -> str:
        return "2d" if self.two_d else "3d_fullres"

    @property
    def dataset_folder_name(self) -> str:
        return f"Dataset{self.dataset_id:03d}_{self.dataset_name}"


@dataclass
class StageRecord:
    name: str
    seconds: float = 0.0
    status: str = "not run"  # ok | failed | skipped | not run
    command: Optional[str] = None
    log: Optional[str] = None
    note: str = ""


@dataclass
class DemoResult:
    settings: DemoSettings
    stages: List[StageRecord] = field(default_factory=list)
    cases: Dict[str, List[str]] = field(default_factory=dict)  # train / val / test case ids
    trainer_name: Optional[str] = None
    train_budget_seconds: Optional[float] = None
    epochs_done: Optional[int] = None
    dataset_folder: Optional[str] = None
    predictions_folder: Optional[str] = None
    summary_file: Optional[str] = None
    summary: Optional[dict] = None
    global_summary_file: Optional[str] = None  # the global stage alone, on the same test cases
    global_summary: Optional[dict] = None
    model_folder: Optional[str] = None
    report_file: Optional[str] = None
    error: Optional[str] = None

    def to_json(self) -> dict:
        d = asdict(self)
        d["settings"]["output_dir"] = str(self.settings.output_dir)
        d.pop("summary")
        d.pop("global_summary")
        return d


def demo_environment(s: DemoSettings) -> Dict[str, str]:
    return nnunet_environment(s.output_dir)


# ---------------------------------------------------------------------------------- stages
def _split_cases(s: DemoSettings, case_ids: List[str], has_absent: Dict[str, bool]) -> Dict[str, List[str]]:
    """Test, validation and training cases, each set holding its share of the cases with an absent
    landmark (at least one where there are enough), so existence is trained, calibrated and tested."""
    with_absent = [c for c in case_ids if has_absent[c]]
    complete = [c for c in case_ids if not has_absent[c]]
    sizes = {"test": s.n_test, "val": s.n_val, "train": s.n_train - s.n_val}
    split = {}
    for name, size in sizes.items():
        share = min(len(with_absent), size, max(1, round(size * len(with_absent) / len(case_ids))))
        if name == "train" or len(complete) < size - share:  # the rest: whatever is left
            share = max(share, size - len(complete))
        take = with_absent[:share] + complete[:size - share]
        with_absent, complete = with_absent[share:], complete[size - share:]
        split[name] = sorted(take)
    return {k: split[k] for k in ("train", "val", "test")}


def stage_generate(s: DemoSettings, result: DemoResult, show_progress: bool):
    from nnlandmark_h3de.landmarks import read_landmarks
    if s.two_d:
        from nnlandmark_h3de.demo.phantoms_2d import generate_phantom_cases_2d
        cases = generate_phantom_cases_2d(s.output_dir / "phantoms", s.n_train + s.n_test, shape=s.shape_zyx,
                                          spacing=s.spacing_xyz, seed=s.seed, absent_fraction=s.absent_fraction,
                                          progress=show_progress)
    else:
        from nnlandmark_h3de.demo.phantoms import generate_phantom_cases
        cases = generate_phantom_cases(s.output_dir / "phantoms", s.n_train + s.n_test, shape=s.shape_zyx,
                                       spacing=s.spacing_xyz, seed=s.seed, absent_fraction=s.absent_fraction,
                                       oblique_deg=s.oblique_deg, progress=show_progress, deform_mm=s.deform_mm)
    has_absent = {c: not read_landmarks(lm).present.all() for c, (_, lm) in cases.items()}
    result.cases = _split_cases(s, sorted(cases), has_absent)
    return cases


def stage_convert(s: DemoSettings, result: DemoResult, cases, env, show_progress: bool) -> Path:
    from nnlandmark_h3de.conversion import convert_dataset
    splits = [{"train": result.cases["train"], "val": result.cases["val"]}]
    target = s.output_dir / "nnUNet_raw" / s.dataset_folder_name
    with environment(env):  # splits_final.json goes to OUR nnUNet_preprocessed
        folder = convert_dataset(cases, target, test_cases=result.cases["test"], splits=splits,
                                 progress=show_progress)
    result.dataset_folder = str(folder)
    return Path(folder)


def _training_budget(s: DemoSettings, elapsed: float) -> float:
    """Seconds of training left in the budget after `elapsed`, keeping time for the trainer's
    start-up and final validation (validation and training cases), the global-stage calibration (which
    validates again, in two stages), prediction and evaluation. Measured on 2 cores in a 10-minute run
    (2026-12-05, before the in-sample pass lost its mirrors and the revalidation reused the calibration's
    registrations): ~50 s trainer start-up and final validation, ~70 s calibration, ~25 s prediction, ~5 s
    evaluation; the reserve keeps about a minute more than they take now."""
    total = 60.0 * s.minutes
    # 2D: no global-stage calibration, and validation / prediction of a 96 x 80 image take a second or two
    reserve = (60.0 + 0.15 * total) if s.two_d else (90.0 + 0.1 * total)
    return max(20.0, total - elapsed - reserve)


class _Stages:
    """Bookkeeping of one demo run: each stage's record (status, time, command, log) and progress lines."""

    def __init__(self, s: DemoSettings, result: DemoResult, env: Dict[str, str], show_progress: bool, log):
        self.s, self.result, self.env, self.show_progress, self.log = s, result, env, show_progress, log
        self.records = {r.name: r for r in result.stages}
        self.logs = s.output_dir / "logs"

    @contextlib.contextmanager
    def stage(self, name: str, what: str):
        """Announce the stage; it is 'failed' unless the block finishes, then 'ok' with its time."""
        self.log(f"[{STAGES.index(name) + 1}/{len(STAGES)}] {name}: {what}")
        rec = self.records[name]
        rec.status = "failed"
        t0 = time.monotonic()
        yield rec
        rec.seconds, rec.status = time.monotonic() - t0, "ok"
        self.log(f"      {name} done in {rec.seconds:.1f} s")

    def command(self, name: str, cmd: List[str], pattern: Optional[str] = None, **extra_env) -> List[str]:
        rec = self.records[name]
        rec.command, rec.log = shlex.join(cmd), str(self.logs / f"{name}.log")
        return run_command(name, cmd, {**self.env, **extra_env}, self.logs / f"{name}.log", pattern,
                           self.show_progress)


def stage_plan_and_preprocess(st: _Stages) -> None:
    base = st.s.base_configuration
    with st.stage("plan_and_preprocess", f"nnUNetv2_plan_and_preprocess ({base})"):
        st.command("plan_and_preprocess", [find_command("nnUNetv2_plan_and_preprocess"), "-d", str(st.s.dataset_id),
                                           "-c", base, "-np", "1", "--verify_dataset_integrity"],
                   nnUNet_n_proc_DA=str(max(1, int(st.env["nnUNet_n_proc_DA"]))))


def stage_small_configuration(st: _Stages) -> None:
    s = st.s
    with st.stage("small_configuration", f"nnLandmark_add_small_config -> {s.configuration}"):
        st.command("small_configuration", [find_command("nnLandmark_add_small_config"), "-d", str(s.dataset_id),
                                           "--name", s.configuration, "--base", s.base_configuration,
                                           "--base_features", str(s.base_features),
                                           "--max_features", str(s.max_features),
                                           "--patch_size", *(str(v) for v in s.patch_size)])


def stage_train(st: _Stages, elapsed: float) -> str:
    """A budget trainer for what is left of the time, trained with nnUNetv2_train; returns its name."""
    from nnlandmark_h3de.demo.budget_trainer import write_budget_trainer
    s, result = st.s, st.result
    budget = _training_budget(s, elapsed)
    with st.stage("train", f"nnUNetv2_train {s.configuration} fold 0 with {s.trainer} for {budget:.0f} s on CPU") as rec:
        with environment(st.env), contextlib.redirect_stdout(io.StringIO()):  # nnU-Net's trainer search chatter
            try:
                name = write_budget_trainer(s.output_dir / "trainers", s.trainer, budget,
                                            iterations_per_epoch=s.iterations_per_epoch,
                                            val_iterations_per_epoch=s.val_iterations_per_epoch)
            except RuntimeError as e:
                raise DemoError("train", str(e)) from None
        result.trainer_name, result.train_budget_seconds = name, budget
        result.model_folder = str(s.output_dir / "nnUNet_results" / s.dataset_folder_name /
                                  f"{name}__nnUNetPlans__{s.configuration}")
        lines = st.command("train", [find_command("nnUNetv2_train"), str(s.dataset_id), s.configuration, "0",
                                     "-tr", name, "-device", "cpu"], pattern=r"Epoch \d+\s*$")
        result.epochs_done = count_epochs(lines)
        rec.note = f"{result.epochs_done} epochs of {s.iterations_per_epoch} iterations"
    return name


def global_kinds(s: DemoSettings) -> list:
    """The global stages the demo calibrates: the affine atlas; with nonlinear phantoms also the deformable
    one (the validation cases choose between them, as a user's calibration would)."""
    return ["atlas", "deformable"] if s.deform_mm > 0 else ["atlas"]


def stage_calibrate_global(st: _Stages, trainer_name: str) -> None:
    """The atlas global stage, measured on the validation cases; the fold is re-validated in two stages."""
    s = st.s
    if s.two_d:
        with st.stage("calibrate_global", "skipped: a 2D image is one patch, the network sees every landmark at once") \
                as rec:
            rec.note = "2D: the whole image is one patch"
        rec.status = "skipped"
        return
    with st.stage("calibrate_global", f"nnLandmark_calibrate_global: atlas global stage ({s.n_atlases} training "
                                      f"images registered per case), re-validation in two stages") as rec:
        lines = st.command("calibrate_global", [find_command("nnLandmark_calibrate_global"), "-d", str(s.dataset_id),
                                                "-c", s.configuration, "-tr", trainer_name, "-f", "0", "--kinds",
                                                *global_kinds(s), "--n_atlases", str(s.n_atlases), "-device", "cpu"])
        rec.note = next((l.strip() for l in lines if "local peak floor" in l), "")


def stage_predict(st: _Stages, folder: Path, trainer_name: str) -> Path:
    from nnlandmark_h3de.inference.landmark_predictor import GLOBAL_ESTIMATES_FOLDER
    s, result = st.s, st.result
    how = "on the whole image" if s.two_d else "in two stages"
    with st.stage("predict", f"nnLandmark_predict {how} on {len(result.cases['test'])} held-out test cases"):
        pred = s.output_dir / "predictions"
        kind = "atlas" if global_kinds(s) == ["atlas"] else "auto"
        stages = ["--global", "none"] if s.two_d else ["--global", kind, "--save_global_estimates"]
        st.command("predict", [find_command("nnLandmark_predict"), "-i", str(folder / "imagesTs"), "-o", str(pred),
                               "-d", str(s.dataset_id), "-c", s.configuration, "-tr", trainer_name, "-f", "0",
                               "-device", "cpu", "-npp", "1", *stages])
        for where in (pred,) if s.two_d else (pred, pred / GLOBAL_ESTIMATES_FOLDER):
            missing_pred = [c for c in result.cases["test"] if not any(where.glob(f"{c}.*"))]
            if missing_pred:
                raise DemoError("predict", f"no landmark file in {where} for test cases {missing_pred}")
        result.predictions_folder = str(pred)
    return pred


def stage_evaluate(st: _Stages, folder: Path, pred: Path) -> None:
    """Both stages together (with plots) and the global stage alone, against the exact landmarks."""
    from nnlandmark_h3de.inference.landmark_predictor import GLOBAL_ESTIMATES_FOLDER
    s, result = st.s, st.result
    what = "in mm and pixels, with plots" if s.two_d else "two stages, with plots; the global stage alone"
    with st.stage("evaluate", f"nnLandmark_evaluate against the exact phantom landmarks ({what})"):
        first = result.cases["test"][0]
        result.summary_file, result.summary = _evaluate(
            st, "evaluate", folder, pred, s.output_dir / "evaluation",
            ["--plots", "--case", first, "--image", str(folder / "imagesTs" / f"{first}_0000.nii.gz")])
        if s.two_d:
            return
        result.global_summary_file, result.global_summary = _evaluate(
            st, "evaluate_global_stage", folder, pred / GLOBAL_ESTIMATES_FOLDER,
            s.output_dir / "evaluation" / GLOBAL_ESTIMATES_FOLDER, [])


def _evaluate(st: _Stages, log_name: str, folder: Path, pred: Path, out: Path, extra: List[str]):
    """One nnLandmark_evaluate run (logged to logs/<log_name>.log, command recorded) -> (summary file, summary)."""
    summary_file = out / "summary.json"
    cmd = [find_command("nnLandmark_evaluate"), "-ref", str(folder / "landmarks.json"), "-pred", str(pred),
           "-o", str(summary_file), *extra]
    run_command("evaluate", cmd, st.env, st.logs / f"{log_name}.log", None, st.show_progress)
    rec = st.records["evaluate"]
    rec.command = shlex.join(cmd) if rec.command is None else f"{rec.command}\n{shlex.join(cmd)}"
    rec.log = rec.log or str(st.logs / f"{log_name}.log")
    summary = json.loads(summary_file.read_text())
    evaluated = sorted(e["case"] for e in summary["metric_per_case"])
    if evaluated != sorted(st.result.cases["test"]):
        raise DemoError("evaluate", f"{summary_file}: evaluated cases {evaluated} are not the test cases "
                                    f"{sorted(st.result.cases['test'])}")
    return str(summary_file), summary


def stage_report(st: _Stages, total_seconds: float) -> None:
    from nnlandmark_h3de.demo.report import write_report
    with st.stage("report", "report.md") as rec:
        rec.status, rec.note = "ok", "this file"  # the report shows itself as done
        st.result.report_file = str(st.s.output_dir / "report.md")
        try:
            write_report(st.result, Path(st.result.report_file), total_seconds=total_seconds)
        except BaseException:
            rec.status = "failed"
            raise


def run_demo(s: DemoSettings, show_progress: bool = True, log=print) -> DemoResult:
    """Run every stage; returns the result (also written to demo.json) or raises DemoError."""
    result = DemoResult(settings=s, stages=[StageRecord(n) for n in STAGES])
    missing = missing_commands()
    if missing:
        raise DemoError(", ".join(missing), "cannot run, nothing was done:\n" +
                        "\n".join(f"  - {k}: {v}" for k, v in missing.items()))
    _prepare_output(s)
    env = demo_environment(s)
    st = _Stages(s, result, env, show_progress, log)
    t_start = time.monotonic()
    try:
        kind, axes = ("2D X-ray phantoms", "pixels (y, x)") if s.two_d else ("phantom heads", "voxels (z, y, x)")
        with st.stage("generate", f"{s.n_train + s.n_test} {kind} {s.shape_zyx} {axes} at {s.spacing_xyz} mm, "
                                  f"seed {s.seed}"):
            cases = stage_generate(s, result, show_progress)
        with st.stage("convert", f"nnU-Net raw dataset {s.dataset_folder_name} ({len(result.cases['train'])} train, "
                                 f"{len(result.cases['val'])} val, {len(result.cases['test'])} test)"):
            folder = stage_convert(s, result, cases, env, show_progress)
        stage_plan_and_preprocess(st)
        stage_small_configuration(st)
        trainer_name = stage_train(st, time.monotonic() - t_start)
        stage_calibrate_global(st, trainer_name)
        pred = stage_predict(st, folder, trainer_name)
        stage_evaluate(st, folder, pred)
        stage_report(st, time.monotonic() - t_start)
    except DemoError as e:
        result.error = str(e)
        raise
    except Exception as e:  # a bug or bad input inside an in-process stage: name the stage
        failed = next((r.name for r in result.stages if r.status == "failed"), "?")
        result.error = f"demo stage '{failed}': {type(e).__name__}: {e}"
        raise DemoError(failed, f"{type(e).__name__}: {e}") from e
    finally:
        atomic_write_text(s.output_dir / "demo.json", json.dumps(result.to_json(), indent=2, default=str) + "\n")
    return result


def _prepare_output(s: DemoSettings):
    s.output_dir.mkdir(parents=True, exist_ok=True)
    existing = [n for n in OWNED if (s.output_dir / n).exists()]
    if existing and not s.overwrite:
        raise DemoError("generate", f"{s.output_dir} already holds a demo run ({', '.join(existing)}); "
                                    f"choose another -o or pass --overwrite")
    for n in existing:  # only what a previous demo run created
        p = s.output_dir / n
        shutil.rmtree(p) if p.is_dir() else p.unlink()
