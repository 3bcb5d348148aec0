"""The real commands, end to end, on a tiny generated dataset (CPU, a few minutes at most):
nnUNetv2_plan_and_preprocess -> nnLandmark_add_small_config -> nnUNetv2_train -tr
nnLandmarkTrainer_2epochs_3iters -device cpu -> nnUNetv2_predict with the same trainer."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BIN = Path(sys.executable).parent
DATASET_ID = 961
TRAINER = "nnLandmarkTrainer_2epochs_3iters"


def run(args, env, cwd):
    proc = subprocess.run([str(BIN / args[0]), *args[1:]], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def plan_and_train_tiny(dataset_id: int, trainer: str, env: dict, cwd) -> None:
    """Plan, add a 32^3 small configuration (4..16 features) and train fold 0 on the CPU."""
    # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA), which refuses 0
    run(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", "3d_fullres", "-np", "1", "-npfp", "1"],
        {**env, "nnUNet_n_proc_DA": "1"}, cwd)
    run(["nnLandmark_add_small_config", "-d", str(dataset_id), "--patch_size", "32", "32", "32",
         "--base_features", "4", "--max_features", "16"], env, cwd)
    run(["nnUNetv2_train", str(dataset_id), "3d_fullres_small", "0", "-tr", trainer, "-device", "cpu"], env, cwd)


def test_train_validate_and_predict_with_the_stock_commands(nnunet_env, tmp_path):
    import torch
    from nnlandmark_h3de.demo.blob_dataset import make_blob_dataset

    raw = make_blob_dataset(DATASET_ID, n_cases=5, shape_zyx=(32, 32, 32), absent_every=5)
    env = dict(os.environ)
    plan_and_train_tiny(DATASET_ID, TRAINER, env, tmp_path)

    model = nnunet_env["nnUNet_results"] / raw.name / f"{TRAINER}__nnUNetPlans__3d_fullres_small"
    fold = model / "fold_0"
    for f in ("checkpoint_final.pth", "checkpoint_best.pth", "progress.png", "landmark_thresholds.json"):
        assert (fold / f).is_file(), f
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    logged = ckpt["logging"]
    assert len(logged["val_mre_mm"]) == len(logged["ema_val_mre_mm"]) == 2
    assert all(math.isfinite(v) and v > 0 for v in logged["ema_val_mre_mm"])
    # the best-checkpoint criterion is -EMA(MRE)
    assert logged["ema_fg_dice"][-1] == pytest.approx(-logged["ema_val_mre_mm"][-1])
    # the trainer's learning_rate is the rate Adam was built with
    from nnlandmark_h3de.training.nnLandmarkTrainer import nnLandmarkTrainer
    assert ckpt["optimizer_state"]["param_groups"][0]["initial_lr"] == pytest.approx(nnLandmarkTrainer.learning_rate)
    # the stock predictor must not mirror the left/right axis (array axis 2 here: identity direction)
    assert ckpt["inference_allowed_mirroring_axes"] is None or 2 not in ckpt["inference_allowed_mirroring_axes"]

    summary = json.loads((fold / "validation" / "summary.json").read_text())
    micro = summary["foreground_mean"]["micro"]
    assert "fitted on these same validation cases" in summary["in_sample"]  # in-sample figures say so
    val_cases = [c["case"] for c in summary["metric_per_case"]]
    assert val_cases and all((fold / "validation" / f"{c}.mrk.json").is_file() for c in val_cases)
    errors = [m["radial_error_mm"] for c in summary["metric_per_case"] for m in c["metrics"].values()
              if m["radial_error_mm"] is not None]
    assert all(math.isfinite(e) for e in errors)
    if micro["mean_radial_error_mm"] is not None:
        assert math.isfinite(micro["mean_radial_error_mm"])
    thresholds = json.loads((fold / "landmark_thresholds.json").read_text())
    assert thresholds["names"] == ["L0", "R0", "M"] and len(thresholds["threshold"]) == 3
    # landmarks whose validation peaks all stayed flat are listed (after 6 steps some may be)
    scores = json.loads((fold / "validation" / "existence_scores.json").read_text())
    flat = [n for i, n in enumerate(thresholds["names"])
            if all(c["peak"][i] < 0.05 for c in scores["cases"].values() if c["set"] == "validation")]
    assert summary["unlearned_landmarks"] == flat
    # existence was also taught by the fold's training cases, predicted in-sample and stored as such
    scores = json.loads((fold / "validation" / "existence_scores.json").read_text())
    sets = [c["set"] for c in scores["cases"].values()]
    assert sets.count("validation") == len(val_cases) and sets.count("training_in_sample") == 5 - len(val_cases)
    assert thresholds["calibration"]["n_training_cases_in_sample"] == 5 - len(val_cases)
    # each pass's time in the summary and the log; the in-sample pass runs without test-time mirrors
    timings = summary["final_validation_seconds"]
    assert set(timings) == {"validation", "training (in-sample, existence only)", "calibration"}
    assert all(v >= 0 for v in timings.values())
    log = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert f"final validation, validation: {len(val_cases)} case(s)" in log
    assert (f"final validation, training (in-sample, existence only): {5 - len(val_cases)} case(s)" in log
            and "no test-time mirrors, whole image" in log)
    uncertainty = json.loads((fold / "landmark_uncertainty.json").read_text())
    assert uncertainty["names"] == ["L0", "R0", "M"] and 0 <= uncertainty["alpha"] <= 3
    assert all(math.isfinite(v) and v > 0 for v in uncertainty["rms_error_mm"] + uncertainty["median_present_peak"])

    # the stock predictor builds the network through the trainer and exports a segmentation
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    case = val_cases[0]
    shutil.copy(raw / "imagesTr" / f"{case}_0000.nii.gz", inp)
    run(["nnUNetv2_predict", "-i", str(inp), "-o", str(out), "-d", str(DATASET_ID), "-c", "3d_fullres_small",
         "-tr", TRAINER, "-f", "0", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"], env, tmp_path)
    assert (out / f"{case}.nii.gz").is_file()

    # H3DE-Net through the same stock commands: train + final validation, then both predictors
    h3de = "nnH3DETrainer_2epochs_3iters"
    run(["nnUNetv2_train", str(DATASET_ID), "3d_fullres_small", "0", "-tr", h3de, "-device", "cpu"], env, tmp_path)
    h3de_fold = nnunet_env["nnUNet_results"] / raw.name / f"{h3de}__nnUNetPlans__3d_fullres_small" / "fold_0"
    h3de_summary = json.loads((h3de_fold / "validation" / "summary.json").read_text())
    assert [c["case"] for c in h3de_summary["metric_per_case"]] == val_cases
    state = torch.load(h3de_fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    assert any(k.endswith("attn.qkv.weight") for k in state), "the H3DE checkpoint must carry V-BRA weights"

    out_h3de, out_lm = tmp_path / "out_h3de", tmp_path / "out_landmarks"
    run(["nnUNetv2_predict", "-i", str(inp), "-o", str(out_h3de), "-d", str(DATASET_ID), "-c", "3d_fullres_small",
         "-tr", h3de, "-f", "0", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"], env, tmp_path)
    assert (out_h3de / f"{case}.nii.gz").is_file()
    run(["nnLandmark_predict", "-i", str(inp), "-o", str(out_lm), "-d", str(DATASET_ID), "-c", "3d_fullres_small",
         "-tr", h3de, "-f", "0", "-device", "cpu", "-npp", "0", "--no_lr_check"], env, tmp_path)
    markups = json.loads((out_lm / f"{case}.mrk.json").read_text())
    points = markups["markups"][0]["controlPoints"]
    assert [p["label"] for p in points] == ["L0", "R0", "M"]
    assert markups["markups"][0]["coordinateSystem"] == "LPS"
    # the uncertainty written is the calibrated model's, evaluated at each landmark's peak (= confidence;
    # no left/right check, which would move a swapped pair's values to its partner)
    from nnlandmark_h3de.inference.uncertainty import UncertaintyModel
    from nnlandmark_h3de.landmarks import read_landmarks
    ls = read_landmarks(out_lm / f"{case}.mrk.json")
    model_u = UncertaintyModel.read(h3de_fold / "landmark_uncertainty.json")
    assert ls.present.any()
    np.testing.assert_allclose(ls.uncertainty_mm[ls.present], model_u(ls.confidence)[ls.present], rtol=1e-4)

    # the anchor-head variant: its final validation calibrates the anchor existence score and the peak
    # height and keeps the one with the better validation F1 (anchor on ties), which
    # nnLandmark_predict then applies (peak height stays as the calibrated alternative)
    anchor = "nnLandmarkTrainerAnchor_2epochs_3iters"
    run(["nnUNetv2_train", str(DATASET_ID), "3d_fullres_small", "0", "-tr", anchor, "-device", "cpu"], env, tmp_path)
    anchor_fold = nnunet_env["nnUNet_results"] / raw.name / f"{anchor}__nnUNetPlans__3d_fullres_small" / "fold_0"
    anchor_thresholds = json.loads((anchor_fold / "landmark_thresholds.json").read_text())
    assert len(anchor_thresholds["threshold"]) == 3
    anchor_summary = json.loads((anchor_fold / "validation" / "summary.json").read_text())
    chosen = anchor_summary["existence_threshold"]
    assert chosen["score"] == anchor_thresholds["score"] and chosen["score"] in ("anchor", "peak")
    other = "peak" if chosen["score"] == "anchor" else "anchor"
    assert other in chosen["alternatives"]
    assert chosen.get("f1", 0) >= chosen["alternatives"][other].get("f1", 0)
    out_anchor = tmp_path / "out_anchor"
    proc = run(["nnLandmark_predict", "-i", str(inp), "-o", str(out_anchor), "-d", str(DATASET_ID), "-c",
                "3d_fullres_small", "-tr", anchor, "-f", "0", "-device", "cpu", "-npp", "0"], env, tmp_path)
    assert "absent-landmark detection is off" not in proc.stdout + proc.stderr
    assert (out_anchor / f"{case}.mrk.json").is_file()
