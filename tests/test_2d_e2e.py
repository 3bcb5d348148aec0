"""2D X-ray landmarks with the stock commands, end to end (CPU, tiny budgets): 2D phantoms ->
nnLandmark_convert -> nnUNetv2_plan_and_preprocess -c 2d -> nnLandmark_add_small_config --base 2d ->
nnUNetv2_train ... 2d_small -tr nnLandmarkTrainer / nnH3DETrainer -> nnLandmark_predict ->
nnLandmark_evaluate (mm and pixels)."""
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
DATASET_ID = 962
TRAINERS = ("nnLandmarkTrainer_2epochs_3iters", "nnH3DETrainer_2epochs_3iters")


def run(args, env, cwd):
    proc = subprocess.run([str(BIN / args[0]), *map(str, args[1:])], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(map(str, args))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def split_phantoms(cases: dict, root: Path, n_test: int) -> dict:
    """Copy the generated 2D phantoms into train/test image and landmark folders."""
    folders = {k: root / k for k in ("images", "landmarks", "test_images", "test_landmarks")}
    for f in folders.values():
        f.mkdir(parents=True)
    for i, (case, (image, landmarks)) in enumerate(sorted(cases.items())):
        test = i < n_test
        shutil.copy(image, folders["test_images" if test else "images"] / image.name)
        shutil.copy(landmarks, folders["test_landmarks" if test else "landmarks"] / landmarks.name)
    return folders


def test_2d_training_prediction_and_evaluation_with_the_stock_commands(nnunet_env, tmp_path):
    import SimpleITK as sitk
    import torch
    from nnlandmark_h3de.demo.phantoms_2d import LANDMARK_NAMES_2D, generate_phantom_cases_2d

    cases = generate_phantom_cases_2d(tmp_path / "phantoms", 8, spacing=(0.5, 0.5), seed=3, absent_fraction=0.1,
                                      progress=False)
    folders = split_phantoms(cases, tmp_path / "split", n_test=2)
    env = dict(os.environ)
    run(["nnLandmark_convert", "-i", folders["images"], "-l", folders["landmarks"], "-d", DATASET_ID, "-n", "Xray2D",
         "--test_images", folders["test_images"], "--test_landmarks", folders["test_landmarks"]], env, tmp_path)
    raw = next(nnunet_env["nnUNet_raw"].glob(f"Dataset{DATASET_ID}_*"))
    image = sitk.ReadImage(str(next((raw / "imagesTr").iterdir())))
    assert image.GetDimension() == 2 and image.GetSpacing() == pytest.approx((0.5, 0.5))

    run(["nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", "2d", "-np", "1", "-npfp", "1"],
        {**env, "nnUNet_n_proc_DA": "1"}, tmp_path)
    run(["nnLandmark_add_small_config", "-d", DATASET_ID, "--base", "2d", "--name", "2d_small", "--patch_size", 64, 64,
         "--base_features", 4, "--max_features", 16], env, tmp_path)
    plans = json.loads((nnunet_env["nnUNet_preprocessed"] / raw.name / "nnUNetPlans.json").read_text())
    assert plans["configurations"]["2d"]["architecture"]["arch_kwargs"]["conv_op"].endswith("Conv2d")

    reference = json.loads((raw / "landmarks.json").read_text())
    test_cases = sorted(reference["test_cases"])
    assert len(test_cases) == 2
    for trainer in TRAINERS:
        run(["nnUNetv2_train", DATASET_ID, "2d_small", "0", "-tr", trainer, "-device", "cpu"], env, tmp_path)
        fold = nnunet_env["nnUNet_results"] / raw.name / f"{trainer}__nnUNetPlans__2d_small" / "fold_0"
        for f in ("checkpoint_final.pth", "landmark_thresholds.json", "validation/summary.json"):
            assert (fold / f).is_file(), f
        weights = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
        convs = [v for k, v in weights.items() if k.endswith("weight") and v.ndim >= 4]
        assert convs and all(v.ndim == 4 for v in convs), "a 2D configuration trains a 2D network"
        val = json.loads((fold / "validation" / "summary.json").read_text())
        assert val["landmark_names"] == list(LANDMARK_NAMES_2D)

        pred = tmp_path / f"pred_{trainer}"
        run(["nnLandmark_predict", "-i", raw / "imagesTs", "-o", pred, "-d", DATASET_ID, "-c", "2d_small", "-tr",
             trainer, "-f", "0", "-device", "cpu", "-npp", "0"], env, tmp_path)
        for case in test_cases:
            markup = json.loads((pred / f"{case}.mrk.json").read_text())["markups"][0]
            sign = -1.0 if markup["coordinateSystem"] == "RAS" else 1.0  # ITK geometry is LPS
            points = markup["controlPoints"]
            assert [p["label"] for p in points] == list(LANDMARK_NAMES_2D)
            placed = [p["position"] for p in points if p.get("positionStatus") != "undefined"]
            assert all(p[2] == 0.0 for p in placed), "2D landmarks lie on the image plane (z = 0)"
            geometry_image = sitk.ReadImage(str(raw / "imagesTs" / f"{case}_0000.nii.gz"))
            for p in placed:  # inside the image
                idx = geometry_image.TransformPhysicalPointToContinuousIndex((sign * p[0], sign * p[1]))
                assert all(-0.5 <= i <= n - 0.5 for i, n in zip(idx, geometry_image.GetSize())), (case, p)
        summary_file = tmp_path / f"eval_{trainer}" / "summary.json"
        run(["nnLandmark_evaluate", "-ref", raw / "landmarks.json", "-pred", pred, "-o", summary_file], env, tmp_path)
        summary = json.loads(summary_file.read_text())
        px = summary["pixel_errors"]
        assert px["n_cases_with_image"] == 2 and px["image_spacing_mm"]["min_xyz"][:2] == [0.5, 0.5]
        mre_mm = summary["foreground_mean"]["micro"]["mean_radial_error_mm"]
        if mre_mm is not None:  # a 2-epoch model may call everything absent; if not, pixels = mm / 0.5
            assert math.isclose(px["mean_radial_error_px"], mre_mm / 0.5, rel_tol=1e-6)
            assert np.isfinite(px["mean_radial_error_px"])
