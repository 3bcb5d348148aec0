"""Real anatomy, every landmark: the AFIDs templates convert with all 32 landmarks (some 2 mm apart,
which label balls could never hold apart), a configuration at 4 mm spacing is added and
preprocessed with the stock commands, its validation patches carry a heatmap for every landmark
in the patch, peaking at the exact point, and it trains with multi-process augmentation."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from nnlandmark_h3de.inference.peaks import decode_peaks

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
DATASET_ID = 962
CONFIG = "3d_4mm"
CASES = ["human_MNI152NLin2009cAsym_T1w_2mm", "human_MNI305_T1w_2mm", "human_MNI152NLin6Asym_T1w_2mm"]


def run(args, env):
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(map(str, args))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def patch_origin(patch: np.ndarray, data: np.ndarray) -> np.ndarray:
    """Where an un-augmented patch was cut from `data` (C, z, y, x): its index 0 in data's grid."""
    p = np.unravel_index(np.argmax(patch[0]), patch.shape[1:])
    for q in np.argwhere(data[0] == patch[0][p]):
        origin = q - np.asarray(p)
        lo, hi = np.maximum(origin, 0), np.minimum(origin + patch.shape[1:], data.shape[1:])
        sl_d = tuple(slice(a, b) for a, b in zip(lo, hi))
        sl_p = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, origin))
        if np.array_equal(data[(0,) + sl_d], patch[(0,) + sl_p]):
            return origin
    raise AssertionError("patch not found in the preprocessed case")


def test_afids_all_32_landmarks_at_4mm(nnunet_env, afids_dir, monkeypatch):
    env = dict(os.environ)
    run([sys.executable, str(REPO / "dataset_conversion" / "convert_afids.py"), "-i", str(afids_dir),
         "-d", str(DATASET_ID)], env)
    raw = nnunet_env["nnUNet_raw"] / f"Dataset{DATASET_ID:03d}_AFIDs"
    landmarks = json.loads((raw / "landmarks.json").read_text())
    assert len(landmarks["names"]) == 32 and sorted(landmarks["cases"]) == sorted(CASES)
    assert all(None not in c.values() for c in landmarks["cases"].values())

    run([str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "1",
         "-npfp", "1"], {**env, "nnUNet_n_proc_DA": "1"})
    run([str(BIN / "nnLandmark_add_small_config"), "-d", str(DATASET_ID), "--name", CONFIG, "--spacing", "4", "4", "4",
         "--patch_size", "40", "48", "40", "--base_features", "4", "--max_features", "16"], env)
    run([str(BIN / "nnUNetv2_preprocess"), "-d", str(DATASET_ID), "-c", CONFIG, "-np", "1"], env)
    pre = nnunet_env["nnUNet_preprocessed"] / raw.name
    (pre / "splits_final.json").write_text(json.dumps([{"train": CASES[:2], "val": CASES[2:]}]))

    # validation patches (no augmentation): every landmark inside the patch has its heatmap, at the exact point
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnlandmark_h3de.training.nnLandmarkTrainer import nnLandmarkTrainer
    plans = {**json.loads((pre / "nnUNetPlans.json").read_text()), "continue_training": False}  # as run_training passes
    trainer = nnLandmarkTrainer(plans, CONFIG, 0, json.loads((pre / "dataset.json").read_text()), torch.device("cpu"))
    trainer.initialize()
    # nnU-Net's own loss construction, the heatmap loss inside: its deep-supervision weights
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnlandmark_h3de.training.landmark_loss import HeatmapMSELoss
    n_scales = len(trainer._get_deep_supervision_scales())
    expected = np.array([1 / 2 ** i for i in range(n_scales)])
    expected[-1] = 0
    assert isinstance(trainer.loss, DeepSupervisionWrapper) and isinstance(trainer.loss.loss, HeatmapMSELoss)
    np.testing.assert_allclose(trainer.loss.weight_factors, expected / expected.sum())
    dl_tr, dl_val = trainer.get_dataloaders()
    assert trainer.configuration_manager.spacing == [4.0, 4.0, 4.0]
    data = trainer.dataset_class(trainer.preprocessed_dataset_folder, CASES[2:]).load_case(CASES[2])[0]
    points = trainer.exact_points[CASES[2]]
    n_checked, errors = 0, []
    for _ in range(3):
        batch = next(dl_val)
        assert batch["target"].shape == (batch["data"].shape[0], 32, 3)  # the loader carries the points only
        heat = trainer.targets_from_points(batch["target"], batch["data"].shape[2:])[0]  # full resolution
        for b in range(heat.shape[0]):
            expected = points - patch_origin(batch["data"][b].numpy(), np.asarray(data))
            inside = np.all((expected >= -0.5) & (expected <= np.asarray(heat.shape[2:]) - 0.5), 1)
            nonempty = (heat[b].flatten(1).amax(1) > 0).numpy()
            assert np.array_equal(nonempty, inside), (nonempty, inside)
            idx, _, _ = decode_peaks(heat[b][torch.from_numpy(inside)].float())
            errors.append(np.abs(np.asarray(idx) - expected[inside]).max())
            n_checked += int(inside.sum())
    assert n_checked >= 32, n_checked
    assert max(errors) < 0.05, max(errors)
    # training patches: with rotation/scaling most landmarks stay in the patch, each with its heatmap
    batch = next(dl_tr)
    assert torch.isfinite(batch["target"]).all(-1).float().mean() > 0.5
    for gen in (dl_tr, dl_val):
        getattr(gen, "_finish", lambda: None)()

    # the stock training command, with augmentation in worker processes (2 epochs x 3 iterations)
    proc = run([str(BIN / "nnUNetv2_train"), str(DATASET_ID), CONFIG, "0", "-tr", "nnLandmarkTrainer_2epochs_3iters",
                "-device", "cpu"], {**env, "nnUNet_n_proc_DA": "2"})
    fold = nnunet_env["nnUNet_results"] / raw.name / f"nnLandmarkTrainer_2epochs_3iters__nnUNetPlans__{CONFIG}" / "fold_0"
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert "Heatmap targets at the exact landmark points" in log
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert len(summary["metric_per_case"][0]["metrics"]) == 32

    # a dataset without landmarks.json (hand-made labels) falls back to the balls, with a warning
    import pytest
    monkeypatch.setattr(trainer, "reference_landmarks_file", lambda: None)
    with pytest.warns(UserWarning, match="fall back to the centres of the label balls"):
        trainer.exact_points = trainer.load_exact_points()
    assert trainer.exact_points is None
    transform = trainer.build_points_transform()
    assert not transform.from_keypoints
