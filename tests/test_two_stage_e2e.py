"""Two-stage prediction end to end with the stock commands on phantoms larger than one patch:
nnUNetv2_plan_and_preprocess -> nnLandmark_add_small_config -> nnUNetv2_train (local stage, tiny budget);
nnLandmark_add_small_config --whole_image -> nnUNetv2_preprocess -> nnUNetv2_train (learned global stage,
tiny budget) -> nnLandmark_calibrate_global (atlas and learned measured, one kept; re-validates in two
stages) -> nnLandmark_predict --global atlas|learned, against the whole-image sliding window."""
import json
import os
from pathlib import Path

import numpy as np

from test_trainer_e2e import plan_and_train_tiny, run

DATASET_ID = 963
TRAINER = "nnLandmarkTrainer_2epochs_3iters"


def choice_names(raw):
    return json.loads((raw / "dataset.json").read_text())["landmarks"]["names"]


def test_two_stage_prediction_with_the_stock_commands(nnunet_env, tmp_path):
    from nnlandmark_h3de.conversion import convert_dataset
    from nnlandmark_h3de.landmarks import load_dataset_landmarks
    from nnlandmark_h3de.demo.phantoms import generate_phantom_cases
    from nnlandmark_h3de.landmarks import read_landmarks

    cases = generate_phantom_cases(tmp_path / "phantoms", 6, shape=(40, 56, 56), spacing=(2.0, 2.0, 2.0), seed=4,
                                   progress=False)
    names = sorted(cases)
    test = names[-1]
    splits = [{"train": names[:3], "val": names[3:5]}]
    raw = Path(convert_dataset(cases, (DATASET_ID, "TwoStage"), test_cases=[test], splits=splits, progress=False))
    env = dict(os.environ)
    plan_and_train_tiny(DATASET_ID, TRAINER, env, tmp_path)
    fold = nnunet_env["nnUNet_results"] / raw.name / f"{TRAINER}__nnUNetPlans__3d_fullres_small" / "fold_0"
    whole_image_thresholds = (fold / "landmark_thresholds.json").read_text()

    # the learned global stage: a whole-image configuration, trained with the stock commands
    run(["nnLandmark_add_small_config", "-d", str(DATASET_ID), "--name", "3d_global", "--whole_image",
         "--patch_size", "24", "24", "24", "--base_features", "4", "--max_features", "16"], env, tmp_path)
    run(["nnUNetv2_preprocess", "-d", str(DATASET_ID), "-c", "3d_global", "-np", "1"], env, tmp_path)
    run(["nnUNetv2_train", str(DATASET_ID), "3d_global", "0", "-tr", TRAINER, "-device", "cpu"], env, tmp_path)
    learned_model = fold.parent.parent / f"{TRAINER}__nnUNetPlans__3d_global"
    assert (learned_model / "fold_0" / "landmark_thresholds.json").is_file()

    proc = run(["nnLandmark_calibrate_global", "-d", str(DATASET_ID), "-c", "3d_fullres_small", "-tr", TRAINER,
                "-f", "0", "--kinds", "atlas", "learned", "--learned_model", str(learned_model), "--n_atlases", "2",
                "-device", "cpu"], env, tmp_path)
    choice = json.loads((fold / "global_stage.json").read_text())
    assert set(choice["validation"]) == {"atlas", "learned"} and f"kept: {choice['kind']}" in proc.stdout
    mre = {k: v["mre_mm"] for k, v in choice["validation"].items()}
    assert choice["kind"] == min(mre, key=mre.get)  # the one that validated better
    # a 2-epoch whole-image model does not beat registration on these phantoms; the rest checks the atlas path
    assert choice["kind"] == "atlas" and sorted(choice["atlases"]) == sorted(set(choice["atlases"]))
    assert set(choice["atlases"]) <= set(names[:3])  # atlases only from the fold's training cases
    atlas = choice["validation"]["atlas"]
    assert atlas["n"] > 0 and atlas["radius_mm"] >= max(6.0, 2 * atlas["p90_mm"]) - 1e-9
    stored = sorted(p.name for p in (fold / "global_atlases").iterdir())
    assert stored == sorted([f"{c}.nii.gz" for c in choice["atlases"]] + ["landmarks.json"])
    # the final validation was re-run in two stages: thresholds refitted, the log says how
    log = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    assert "two-stage validation: atlas global stage" in log
    # the calibration's registrations of the validation cases were recorded and reused, not run again
    recorded = json.loads((fold / "global_stage_estimates.json").read_text())
    assert sorted(recorded["kinds"]["atlas"]) == sorted(names[3:5])
    assert "final validation, validation: 2 case(s)" in log and "2 global estimate(s) reused from the calibration" in log
    assert "no test-time mirrors, two stages" in log  # the in-sample pass: two stages, no mirrors
    assert "calibration took" in proc.stdout and "two-stage final validation" in proc.stdout
    timings = json.loads((fold / "validation" / "summary.json").read_text())["final_validation_seconds"]
    assert set(timings) == {"validation", "training (in-sample, existence only)", "calibration"}
    assert (fold / "landmark_thresholds.json").read_text() != whole_image_thresholds
    assert "local peak floor" in log
    refit = json.loads((fold / "global_stage.json").read_text())["validation"]["atlas"]
    assert len(refit["local_peak_floor"]) == len(choice_names(raw)) and refit["local_peak_floor_fit"]["n"] > 0

    inp = tmp_path / "in"
    inp.mkdir()
    (inp / f"{test}_0000.nii.gz").symlink_to(raw / "imagesTs" / f"{test}_0000.nii.gz")
    outs = {}
    for kind in ("atlas", "learned", "none"):
        outs[kind] = tmp_path / f"out_{kind}"
        proc = run(["nnLandmark_predict", "-i", str(inp), "-o", str(outs[kind]), "-d", str(DATASET_ID), "-c",
                    "3d_fullres_small", "-tr", TRAINER, "-f", "0", "-device", "cpu", "-npp", "0", "--global", kind,
                    "--no_absent", "--format", "json", "--save_global_estimates"], env, tmp_path)
        assert (f"two-stage prediction: {kind} global stage" in proc.stdout) == (kind != "none")
        assert (outs[kind] / "global_stage" / f"{test}.json").is_file() == (kind != "none")
    truth = load_dataset_landmarks(raw)[test]
    two = read_landmarks(outs["atlas"] / f"{test}.json").reordered(truth.names)
    whole = read_landmarks(outs["none"] / f"{test}.json").reordered(truth.names)
    # every two-stage point lies within the search radius of the atlas estimate, which is near the truth
    estimate = read_landmarks(outs["atlas"] / "global_stage" / f"{test}.json").reordered(truth.names)
    moved = np.linalg.norm(two.points_lps - estimate.points_lps, axis=1)
    assert np.all(moved[truth.present] <= atlas["radius_mm"] + 2.0), moved  # + one voxel: sub-voxel peak
    err = np.linalg.norm(two.points_lps - truth.points_lps, axis=1)
    present = truth.present
    assert np.all(np.isfinite(err[present]))
    assert np.all(err[present] <= atlas["radius_mm"] + 3 * atlas["p90_mm"] + 1e-6), err
    assert np.all(np.isfinite(two.uncertainty_mm[present]))
    assert not np.allclose(np.nan_to_num(two.points_lps), np.nan_to_num(whole.points_lps))
