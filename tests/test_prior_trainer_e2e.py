"""The local stage that takes the global estimate as input (nnLandmarkTrainerPrior), end to end with the
stock commands on phantoms larger than one patch: nnUNetv2_train (its final validation waits for a global
stage) -> nnLandmark_predict over the whole image refused with a clear error -> nnLandmark_calibrate_global
(atlas; the final validation in two stages) -> nnLandmark_predict --global atlas."""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import torch

from test_trainer_e2e import BIN, plan_and_train_tiny, run

DATASET_ID = 964
TRAINER = "nnLandmarkTrainerPrior_2epochs_3iters"


def test_prior_trainer_trains_calibrates_and_predicts_in_two_stages(nnunet_env, tmp_path):
    from nnlandmark_h3de.conversion import convert_dataset
    from nnlandmark_h3de.demo.phantoms import generate_phantom_cases
    from nnlandmark_h3de.landmarks import load_dataset_landmarks, read_landmarks

    cases = generate_phantom_cases(tmp_path / "phantoms", 6, shape=(40, 56, 56), spacing=(2.0, 2.0, 2.0), seed=5,
                                   progress=False)
    names = sorted(cases)
    test = names[-1]
    raw = Path(convert_dataset(cases, (DATASET_ID, "PriorStage"), test_cases=[test],
                               splits=[{"train": names[:3], "val": names[3:5]}], progress=False))
    env = dict(os.environ)
    plan_and_train_tiny(DATASET_ID, TRAINER, env, tmp_path)
    fold = nnunet_env["nnUNet_results"] / raw.name / f"{TRAINER}__nnUNetPlans__3d_fullres_small" / "fold_0"
    n_landmarks = len(json.loads((raw / "dataset.json").read_text())["landmarks"]["names"])
    weights = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    first_conv = next(v for k, v in weights.items() if k.endswith("weight") and v.ndim == 5)
    assert first_conv.shape[1] == 1 + n_landmarks  # the image and one estimate channel per landmark
    log = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert "final validation skipped" in log and not (fold / "validation" / "summary.json").exists()

    inp = tmp_path / "in"
    inp.mkdir()
    (inp / f"{test}_0000.nii.gz").symlink_to(raw / "imagesTs" / f"{test}_0000.nii.gz")
    base = ["nnLandmark_predict", "-i", str(inp), "-d", str(DATASET_ID), "-c", "3d_fullres_small", "-tr", TRAINER,
            "-f", "0", "-device", "cpu", "-npp", "0", "--no_absent", "--format", "json"]
    refused = subprocess.run([str(BIN / base[0]), *base[1:], "-o", str(tmp_path / "out_none"), "--global", "none"],
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert "takes the global stage's estimates as input" in refused.stdout + refused.stderr
    assert not list((tmp_path / "out_none").glob(f"{test}.*"))

    run(["nnLandmark_calibrate_global", "-d", str(DATASET_ID), "-c", "3d_fullres_small", "-tr", TRAINER, "-f", "0",
         "--kinds", "atlas", "--n_atlases", "2", "-device", "cpu"], env, tmp_path)
    log = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert "two-stage validation: atlas global stage" in log
    assert (fold / "validation" / "summary.json").is_file() and (fold / "landmark_thresholds.json").is_file()
    atlas = json.loads((fold / "global_stage.json").read_text())["validation"]["atlas"]

    out = tmp_path / "out_atlas"
    run([*base, "-o", str(out), "--global", "atlas", "--save_global_estimates"], env, tmp_path)
    truth = load_dataset_landmarks(raw)[test]
    two = read_landmarks(out / f"{test}.json").reordered(truth.names)
    estimate = read_landmarks(out / "global_stage" / f"{test}.json").reordered(truth.names)
    moved = np.linalg.norm(two.points_lps - estimate.points_lps, axis=1)
    assert np.all(np.isfinite(moved[truth.present]))
    assert np.all(moved[truth.present] <= atlas["radius_mm"] + 2.0), moved  # + one voxel: sub-voxel peak
