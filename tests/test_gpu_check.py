"""benchmarks/gpu_check.py: its CPU dry run goes through the whole GPU path (re-posed AFIDs cases, stock
planning, both trainers with timed steps, prediction, scoring) and writes the JSON a GPU run writes;
its step statistics and its set-up errors."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
TRAINERS = ("nnLandmarkTrainer", "nnH3DETrainer")


def run_gpu_check(args, timeout=280, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, **kw)


def finite_positive(v):
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def test_dry_run_writes_the_gpu_report(afids_dir, tmp_path):
    out = tmp_path / "report.json"
    proc = run_gpu_check(["--dry_run", "--out", out, "--templates", afids_dir, "--work_dir", tmp_path / "work"])
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    doc = json.loads(out.read_text())
    assert doc["mode"] == "dry_run" and doc["failures"] == []
    assert {"python", "torch", "nnunetv2", "cuda", "gpu"} <= set(doc["versions"])
    assert doc["dataset"]["landmarks"] == 32 and len(doc["dataset"]["test_cases"]) == 1
    assert len(doc["dataset"]["val_cases"]) == 2 and len(doc["dataset"]["train_cases"]) == 2
    assert doc["plan"]["configuration"] == "3d_fullres_small" and doc["plan"]["patch_size"] == [32, 32, 32]
    for stage in ("imports_s", "cases_and_convert_s", "plan_preprocess_s", *TRAINERS):
        assert finite_positive(doc["stages_s"][stage]), stage
    assert finite_positive(doc["total_s"])
    for name in TRAINERS:
        r = doc["trainers"][name]
        t = r["train"]
        assert t["steps"] == 2 and t["epochs"] == 1  # one epoch of two iterations
        assert finite_positive(t["steps_per_s"]) and finite_positive(t["step_s"])
        assert t["loader_wait_s_per_step"] >= 0 and math.isfinite(t["loader_wait_s_per_step"])
        assert t["steady_steps"] == 0 and t["steady_steps_per_s"] is None  # both are warm-up steps
        assert t["device"] == "cpu" and t["compiled"] is False and t["amp"] is False  # nnU-Net's CPU rules
        assert t["peak_memory_allocated_mib"] is None and t["patch_size"] == [32, 32, 32]
        assert finite_positive(r["mre_mm"]) and r["FN"] == 0 and r["TP"] == 32  # --no_absent: all scored
        for stage in ("train_total_s", "train_s", "predict_s", "evaluate_s"):
            assert finite_positive(r["stages_s"][stage]), (name, stage)
        assert r["stages_s"]["train_s"] < r["stages_s"]["train_total_s"]
    assert (tmp_path / "work" / "logs" / "train_nnH3DETrainer.log").is_file()  # --work_dir is kept


def test_step_summary_leaves_the_warm_up_steps_out_of_the_steady_figures():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from gpu_check import step_summary
    finally:
        sys.path.remove(str(SCRIPT.parent))
    # (epoch, loader wait s, step s): the first step holds a 10 s compile
    s = step_summary([(0, 0.5, 10.0), (0, 0.1, 0.4), (1, 0.2, 0.3), (1, 0.0, 0.5)], warmup_steps=2)
    assert s["steps"] == 4 and s["epochs"] == 2 and s["first_step_s"] == 10.0
    assert s["steps_per_s"] == pytest.approx(4 / 12.0)
    assert s["loader_wait_s_per_step"] == pytest.approx(0.8 / 4)
    assert s["steady_steps"] == 2 and s["steady_steps_per_s"] == pytest.approx(2 / 1.0)
    assert s["steady_loader_wait_s_per_step"] == pytest.approx(0.1) and s["steady_step_s"] == pytest.approx(0.4)
    empty = step_summary([])
    assert empty["steps"] == 0 and empty["steps_per_s"] is None and empty["steady_steps_per_s"] is None


def test_missing_templates_are_named(tmp_path):
    proc = run_gpu_check(["--dry_run", "--out", tmp_path / "r.json", "--templates", tmp_path / "nowhere"], timeout=120)
    assert proc.returncode == 2
    assert "AFIDs templates not found" in proc.stderr and str(tmp_path / "nowhere") in proc.stderr
    assert not (tmp_path / "r.json").exists()


def test_missing_nnunet_names_the_package_and_the_wheels_script(afids_dir, tmp_path):
    code = ("import runpy, sys; sys.modules['nnunetv2'] = None; "  # import nnunetv2 now raises ImportError
            f"sys.argv = ['gpu_check.py', '--dry_run', '--out', {str(tmp_path / 'r.json')!r}, "
            f"'--templates', {str(afids_dir)!r}]; runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=SCRIPT.parent, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "cannot import nnunetv2" in proc.stderr and "scripts/gpu_wheels.sh" in proc.stderr
