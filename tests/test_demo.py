"""Demo pipeline: missing stages fail loudly, the training budget really stops training, the report
shows the evaluator's numbers. The full `nnLandmark_demo --quick` run is opt-in (NNLANDMARK_SLOW=1):
it takes minutes on a 2-core machine."""
import json
import os
import sys
import time

import numpy as np
import pytest

from nnlandmark_h3de.demo import pipeline
from nnlandmark_h3de.demo.budget_trainer import TrainingBudget, write_budget_trainer
from nnlandmark_h3de.demo.pipeline import DemoError, DemoResult, DemoSettings, StageRecord, run_command, run_demo
from nnlandmark_h3de.landmarks import LandmarkSet

slow = pytest.mark.skipif(os.environ.get("NNLANDMARK_SLOW") != "1",
                          reason="full demo run takes minutes; set NNLANDMARK_SLOW=1")


# ------------------------------------------------------------------ failing early and clearly
def test_missing_stage_is_named_and_nothing_runs(tmp_path, monkeypatch):
    monkeypatch.setitem(pipeline.COMMANDS, "predict", ("nnLandmark_predict", "nnlandmark_h3de.cli.no_such_module"))
    with pytest.raises(DemoError) as e:
        run_demo(DemoSettings.make(tmp_path / "out", quick=True), show_progress=False, log=lambda *_: None)
    assert "predict" in str(e.value) and "nnlandmark_h3de.cli.no_such_module" in str(e.value)
    assert not (tmp_path / "out").exists()  # refused before creating anything


def test_previous_run_is_not_overwritten_silently(tmp_path):
    out = tmp_path / "out"
    (out / "phantoms").mkdir(parents=True)
    (out / "user_file.txt").write_text("keep me")
    with pytest.raises(DemoError, match="--overwrite"):
        run_demo(DemoSettings.make(out, quick=True), show_progress=False, log=lambda *_: None)
    pipeline._prepare_output(DemoSettings.make(out, quick=True, overwrite=True))
    assert not (out / "phantoms").exists() and (out / "user_file.txt").read_text() == "keep me"


def test_failed_command_reports_stage_exit_status_and_log_tail(tmp_path):
    cmd = [sys.executable, "-c", "import sys; print('step one'); print('boom: bad plans'); sys.exit(3)"]
    with pytest.raises(DemoError) as e:
        run_command("train", cmd, dict(os.environ), tmp_path / "logs" / "train.log", show_progress=False)
    msg = str(e.value)
    assert "demo stage 'train'" in msg and "status 3" in msg and "boom: bad plans" in msg
    assert "boom: bad plans" in (tmp_path / "logs" / "train.log").read_text()


def test_settings_refuse_impossible_splits(tmp_path):
    with pytest.raises(ValueError, match="validation"):
        DemoSettings.make(tmp_path, n_train=2, n_val=2)
    with pytest.raises(ValueError, match="minutes"):
        DemoSettings.make(tmp_path, minutes=0)


# ------------------------------------------------------------------------ the training budget
class _FakeTrainer:
    """nnU-Net's loop shape: run_training -> epochs -> on_epoch_end increments current_epoch."""

    def __init__(self, plans, configuration, fold, dataset_json, device=None):
        self.num_epochs, self.current_epoch, self.log, self.ended = 1000, 0, [], False

    def on_train_start(self):
        pass

    def on_epoch_end(self):
        self.current_epoch += 1

    def print_to_log_file(self, *args):
        self.log.append(" ".join(map(str, args)))

    def on_train_end(self):
        self.ended = True

    def run_training(self):
        self.on_train_start()
        for _ in range(self.current_epoch, self.num_epochs):
            time.sleep(0.02)
            self.on_epoch_end()
        self.on_train_end()


class _Budgeted(TrainingBudget, _FakeTrainer):
    budget_seconds = 0.2
    budget_max_epochs = 500
    budget_iterations_per_epoch = 3
    budget_val_iterations_per_epoch = 1


def test_budget_stops_training_and_finishes_normally():
    t = _Budgeted({}, "3d", 0, {})
    assert (t.num_epochs, t.num_iterations_per_epoch, t.num_val_iterations_per_epoch) == (500, 3, 1)
    t0 = time.monotonic()
    t.run_training()
    took = time.monotonic() - t0
    assert t.ended, "on_train_end (final checkpoint) must run when the budget stops training"
    assert 0.2 <= took < 2.0 and 2 <= t.current_epoch < 100, (took, t.current_epoch)
    assert any("budget" in line for line in t.log)


def test_budget_never_cuts_a_run_that_fits():
    class Short(_Budgeted):
        budget_seconds = 60.0
        budget_max_epochs = 3
    t = Short({}, "3d", 0, {})
    t.run_training()
    assert t.ended and t.current_epoch == 3 and not t.log


class _FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _scheduled_trainer(make_scheduler, seconds_per_epoch, budget_seconds=100.0, max_epochs=1000):
    """A trainer in nnU-Net's loop shape whose scheduler is stepped at every epoch start, on a fake
    clock advancing `seconds_per_epoch` per epoch; returns the budgeted class and the clock."""
    import torch
    clock = _FakeClock()

    class Scheduled(_FakeTrainer):
        def configure_optimizers(self):
            optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
            return optimizer, make_scheduler(optimizer, self.num_epochs)

        def on_train_start(self):
            self.optimizer, self.lr_scheduler = self.configure_optimizers()
            self.lrs = []

        def run_training(self):
            self.on_train_start()
            for _ in range(self.current_epoch, self.num_epochs):
                self.lr_scheduler.step(self.current_epoch)  # nnUNetTrainer.on_train_epoch_start
                self.lrs.append(self.optimizer.param_groups[0]["lr"])
                clock.now += seconds_per_epoch
                self.on_epoch_end()
            self.on_train_end()

    class Budgeted(TrainingBudget, Scheduled):
        budget_max_epochs = max_epochs
    Budgeted.budget_seconds = budget_seconds
    Budgeted.clock = staticmethod(clock)
    return Budgeted({}, "3d", 0, {}), clock


def test_budget_decays_the_step_schedule_at_80_percent_of_the_time():
    """nnLandmarkTrainer's StepLR (x0.1 at 80 % of num_epochs = 800 of 1000) would never decay in a
    100-epoch budgeted run; on the budget it decays when 80 % of the time is spent."""
    from nnlandmark_h3de.training.step_lr import StepLRScheduler
    t, clock = _scheduled_trainer(lambda opt, n: StepLRScheduler(opt, 1.0, round(0.8 * n), 0.1), seconds_per_epoch=1.0)
    t.run_training()
    assert t.ended and t.current_epoch == 100 and clock.now == 100.0
    # epoch k starts at k s = k % of the budget: epochs 0..79 at full rate, from 80 (80 % spent) x0.1
    np.testing.assert_allclose(t.lrs, [1.0] * 80 + [0.1] * 20)


def test_budget_makes_nnunets_poly_schedule_poly_in_elapsed_time():
    from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
    t, _ = _scheduled_trainer(lambda opt, n: PolyLRScheduler(opt, 1.0, n), seconds_per_epoch=2.0, budget_seconds=50.0)
    t.run_training()
    assert t.current_epoch == 25
    elapsed = 2.0 * np.arange(25) / 50.0  # fraction of the budget at each epoch start
    np.testing.assert_allclose(t.lrs, (1 - np.floor(elapsed * 1000) / 1000) ** 0.9, rtol=1e-9)
    assert t.lrs[-1] < 0.1


def test_budget_schedule_follows_the_epoch_cap_when_it_comes_first():
    from nnlandmark_h3de.training.step_lr import StepLRScheduler
    t, clock = _scheduled_trainer(lambda opt, n: StepLRScheduler(opt, 1.0, round(0.8 * n), 0.1),
                                  seconds_per_epoch=0.01, max_epochs=10)
    t.run_training()
    assert t.current_epoch == 10 and clock.now < 1.0
    np.testing.assert_allclose(t.lrs, [1.0] * 8 + [0.1] * 2)


def test_budget_trainer_shim_is_an_importable_subclass(tmp_path):
    name = write_budget_trainer(tmp_path, "nnUNetTrainer", 42.4, iterations_per_epoch=7)
    assert name == "nnUNetTrainer_budget42s" and "__" not in name
    namespace = {}
    exec((tmp_path / f"{name}.py").read_text(), namespace)
    cls = namespace[name]
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    assert issubclass(cls, nnUNetTrainer) and cls.__mro__[1] is TrainingBudget
    assert cls.budget_seconds == 42.4 and cls.budget_iterations_per_epoch == 7
    with pytest.raises(RuntimeError, match="NoSuchTrainer"):
        write_budget_trainer(tmp_path, "NoSuchTrainer", 10)


# ----------------------------------------------------------------------------------- report
def test_report_shows_the_evaluator_numbers_and_links(tmp_path):
    from nnlandmark_h3de.demo.report import write_report
    from nnlandmark_h3de.evaluation.summary import evaluate_landmarks

    names = ["L_eye", "R_eye"]
    ref = {"c1": LandmarkSet(names, [[0, 0, 0], [10, 0, 0]]), "c2": LandmarkSet(names, [[0, 0, 0], [np.nan] * 3])}
    pred = {"c1": LandmarkSet(names, [[1, 0, 0], [10, 3, 0]]), "c2": LandmarkSet(names, [[0, 0, 2], [5, 5, 5]])}
    summary = evaluate_landmarks(ref, pred)
    s = DemoSettings.make(tmp_path, quick=True)
    (tmp_path / "predictions").mkdir()
    (tmp_path / "predictions" / "c1.mrk.json").write_text("{}")
    result = DemoResult(settings=s, stages=[StageRecord("train", 12.3, "ok", "nnUNetv2_train ...",
                                                        str(tmp_path / "logs" / "train.log"))],
                        cases={"train": ["a"], "val": ["b"], "test": ["c1", "c2"]}, trainer_name="T_budget9s",
                        train_budget_seconds=9.0, epochs_done=4, dataset_folder=str(tmp_path / "raw"),
                        predictions_folder=str(tmp_path / "predictions"),
                        summary_file=str(tmp_path / "evaluation" / "summary.json"), summary=summary)
    text = write_report(result, tmp_path / "report.md", total_seconds=99.0).read_text()
    # micro: errors 1, 3, 2 mm over 3 TP -> mean 2.00, median 2.00; SDR<=2: 2/3; one FP (c2 R_eye)
    assert "| **all points (micro)** | 2.00 +- 0.82 | 2.00 | 66.7 % |" in text
    assert "| 3 | 1 | 0 | 0 |" in text
    assert "[log](logs/train.log)" in text and "(predictions/c1.mrk.json)" in text
    assert "4 epochs" in text and "99 s" in text


def test_2d_settings_and_report(tmp_path):
    """--2d: nnU-Net's 2d configuration under the small one, no global stage, errors in pixels reported."""
    from nnlandmark_h3de.demo.report import write_report
    from nnlandmark_h3de.evaluation.summary import evaluate_landmarks

    s = DemoSettings.make(tmp_path, two_d=True)
    assert (s.base_configuration, s.configuration, len(s.shape_zyx), s.minutes) == ("2d", "2d_small", 2, 6.0)
    assert DemoSettings.make(tmp_path).base_configuration == "3d_fullres"
    assert (s.deform_mm, DemoSettings.make(tmp_path).deform_mm) == (0.0, 4.0)  # 3D phantoms deform by default
    with pytest.raises(ValueError, match="3D phantoms only"):
        DemoSettings.make(tmp_path, two_d=True, deform_mm=2.0)
    names = ["sella", "nasion"]
    summary = evaluate_landmarks({"x": LandmarkSet(names, [[0, 0, 0], [10, 0, 0]])},
                                 {"x": LandmarkSet(names, [[1, 0, 0], [10, 2, 0]])})
    summary["pixel_errors"] = {"n_cases_with_image": 1, "n_cases": 1, "mean_radial_error_px": 1.5,
                               "std_radial_error_px": 0.5, "median_radial_error_px": 1.5, "max_radial_error_px": 2.0}
    result = DemoResult(settings=s, stages=[StageRecord("calibrate_global", 0.0, "skipped", note="2D")],
                        cases={"train": ["a"], "val": ["b"], "test": ["x"]}, summary=summary,
                        summary_file=str(tmp_path / "evaluation" / "summary.json"))
    text = write_report(result, tmp_path / "report.md", total_seconds=10.0).read_text()
    assert "2D X-ray-like phantoms" in text and "(96, 80) pixels (y, x)" in text
    assert "In pixels (voxels) of each image (1 of 1 cases): MRE 1.50 +- 0.50" in text
    assert "| calibrate_global | skipped |" in text and "## Two stages" not in text


# ------------------------------------------------------------------------------ the real run
@slow
def test_quick_demo_end_to_end(tmp_path):
    from nnlandmark_h3de.cli.demo import main
    out = tmp_path / "demo"
    assert main(["-o", str(out), "--quick"]) == 0
    record = json.loads((out / "demo.json").read_text())
    assert [st["status"] for st in record["stages"]] == ["ok"] * len(pipeline.STAGES)
    summary = json.loads((out / "evaluation" / "summary.json").read_text())
    assert sorted(e["case"] for e in summary["metric_per_case"]) == sorted(record["cases"]["test"])
    report = (out / "report.md").read_text()
    assert "## Results on the test cases" in report and "cumulative_error" in report
    for case in record["cases"]["test"]:
        assert (out / "predictions" / f"{case}.mrk.json").is_file()


# ------------------------------------------------------------------------ the AFIDs benchmark
def _benchmark_module():
    """benchmarks/afids_benchmark.py imported as `python benchmarks/afids_benchmark.py` sees it: its folder
    first on sys.path (it imports the benchmarks' `common`), for the import only."""
    import importlib
    from pathlib import Path
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
        return importlib.import_module("afids_benchmark")


def test_benchmark_refuses_a_template_on_both_sides(tmp_path):
    bench = _benchmark_module()
    with pytest.raises(bench.BenchmarkError, match="tmpl_b"):
        bench.main(["--templates", str(tmp_path), "--train", "tmpl_a", "tmpl_b", "--test", "tmpl_b",
                    "--cpu_minutes", "1", "--work_dir", str(tmp_path / "work")])
    assert not (tmp_path / "work").exists()


def test_benchmark_names_a_missing_template_file(tmp_path):
    bench = _benchmark_module()
    (tmp_path / "images").mkdir()
    with pytest.raises(bench.BenchmarkError, match="nope.nii.gz"):
        bench.main(["--templates", str(tmp_path), "--train", "nope", "--test", "other", "--cpu_minutes", "1",
                    "--work_dir", str(tmp_path / "work")])


def test_rater_floor_is_computed_from_the_second_raters_file(afids_dir):
    bench = _benchmark_module()
    floor = bench.rater_floor(afids_dir, ["AC", "PC"])
    (template, fl), = floor.items()
    assert template == "human_MNI152NLin2009cAsym_T1w_2mm"
    assert fl["n_all"] == 32 and abs(fl["mean_all_mm"] - 0.77) < 0.01  # the README's published figure
    assert fl["n_evaluated"] == 2 and fl["mean_mm"] < 1.0


def test_centre_offset_baseline_is_exact_when_offsets_agree(tmp_path):
    import SimpleITK as sitk
    from nnlandmark_h3de.synthesis.reposing import image_centre
    from nnlandmark_h3de.landmarks import ImageGeometry, read_landmarks, write_landmarks
    bench = _benchmark_module()
    offset = np.array([[5.0, -3.0, 2.0], [-7.0, 1.0, 4.0]])
    cases = {}
    for i, origin in enumerate([(0, 0, 0), (13, -4, 9), (-20, 6, 1)]):
        img = sitk.Image([10 + i, 12, 8], sitk.sitkFloat32)
        img.SetOrigin(origin)
        img.SetSpacing((1.5, 1.0, 2.0))
        sitk.WriteImage(img, str(tmp_path / f"c{i}.nii.gz"))
        centre = image_centre(ImageGeometry.from_sitk(img))
        write_landmarks(LandmarkSet(["a", "b"], centre + offset), tmp_path / f"c{i}.mrk.json")
        cases[f"c{i}"] = (tmp_path / f"c{i}.nii.gz", tmp_path / f"c{i}.mrk.json")
    out = bench.centre_offset_baseline({k: cases[k] for k in ("c0", "c1")}, {"c2": cases["c2"]}, tmp_path / "pred")
    np.testing.assert_allclose(read_landmarks(out / "c2.mrk.json").points_lps,
                               read_landmarks(cases["c2"][1]).points_lps, atol=1e-9)


# ------------------------------------------------------------------ absent landmarks in every split
@pytest.mark.parametrize("n_with_absent", [1, 3, 5, 12, 22])
def test_every_split_gets_its_share_of_cases_with_absent_landmarks(tmp_path, n_with_absent):
    s = DemoSettings.make(tmp_path)  # 16 train (3 of them validation) + 6 test
    ids = [f"c{i:02d}" for i in range(s.n_train + s.n_test)]
    has_absent = {c: i < n_with_absent for i, c in enumerate(ids)}
    split = pipeline._split_cases(s, ids, has_absent)
    assert sorted(sum(split.values(), [])) == ids  # a partition
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (s.n_train - s.n_val, s.n_val, s.n_test)
    counts = {k: sum(has_absent[c] for c in v) for k, v in split.items()}
    if n_with_absent >= 3:  # enough to go round: every split sees absent landmarks
        assert min(counts.values()) >= 1, counts
    assert counts["test"] >= 1 and sum(counts.values()) == n_with_absent


def test_report_compares_the_global_stage_with_both_stages(tmp_path):
    from nnlandmark_h3de.demo.report import write_report
    from nnlandmark_h3de.evaluation.summary import evaluate_landmarks

    names = ["L_eye", "R_eye"]
    ref = {"c1": LandmarkSet(names, [[0, 0, 0], [10, 0, 0]]), "c2": LandmarkSet(names, [[0, 0, 0], [np.nan] * 3])}
    two = {"c1": LandmarkSet(names, [[1, 0, 0], [10, 1, 0]]), "c2": LandmarkSet(names, [[0, 0, 1], [np.nan] * 3])}
    glob = {"c1": LandmarkSet(names, [[3, 0, 0], [10, 5, 0]]), "c2": LandmarkSet(names, [[0, 0, 4], [5, 5, 5]])}
    fold = tmp_path / "model" / "fold_0"
    fold.mkdir(parents=True)
    (fold / "global_stage.json").write_text(json.dumps({"kind": "atlas", "validation": {"atlas": {
        "mre_mm": 2.5, "radius_mm": 9.0, "local_peak_floor_fit": {"relative_floor": 0.4, "local_used_fraction": 0.75}}}}))
    (fold / "landmark_thresholds.json").write_text(json.dumps({"score": "peak", "calibration": {
        "method": "best_f1_relative_to_median_present", "relative_threshold": 0.31, "n_cases": 3,
        "n_training_cases_in_sample": 13, "held_out_check": {"f1": 0.9, "tp": 9, "fp": 1, "fn": 1, "tn": 2}}}))
    s = DemoSettings.make(tmp_path, quick=True)
    result = DemoResult(settings=s, cases={"train": ["a"], "val": ["b"], "test": ["c1", "c2"]},
                        summary=evaluate_landmarks(ref, two), global_summary=evaluate_landmarks(ref, glob),
                        summary_file=str(tmp_path / "evaluation" / "summary.json"), model_folder=str(fold.parent))
    text = write_report(result, tmp_path / "report.md", total_seconds=10.0).read_text()
    # global alone: errors 3, 5, 4 mm -> 4.00; two stages: 1, 1, 1 -> 1.00, and the absent one caught
    assert "| global stage alone (atlas: affine atlas registration) | 4.00 +- 0.82 | 4.00 |" in text
    assert "| **two stages** (atlas + network) | 1.00 +- 0.00 | 1.00 |" in text
    assert "Two stages / global stage alone: 0.25x the MRE" in text
    assert "each deformed by a smooth random nonlinear field of 4 mm RMS" in text  # the default phantoms
    assert "search radius 9.0 mm" in text and "75.0 %" in text
    assert "TP 3, FP 0, FN 0, TN 1, F1 1.000" in text
    assert "13 training cases predicted in-sample" in text and "F1 0.900" in text
