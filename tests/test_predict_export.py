"""End to end through nnU-Net's own planning and inference, with known truth points.

An "oracle" trainer (a network that returns the logits of its input channels) makes the heatmaps
exactly what the test put into the images: one Gaussian blob per landmark at a known WORLD point, in
an image with rotated direction, anisotropic spacing and zero borders (so nnU-Net crops), and a plan
whose target spacing differs from the image's (so nnU-Net resamples). Whatever goes wrong in
preprocessing inverse, peak decoding or export shows up as a world error in mm. No training needed,
so this runs in well under the 2-minute budget; the trained-model variant runs when
nnLandmarkTrainer exists.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

NAMES = ["L0", "R0", "Nose"]
DATASET = "Dataset951_OracleLm"
TRAINER = "OracleLandmarkTrainer"
BIN = Path(sys.executable).parent

ORACLE_TRAINER = '''
import torch
from torch import nn
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class _Oracle(nn.Module):
    """Logits of the input channels behind a constant-zero channel: heatmaps = the input blobs."""
    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        h = x.clamp(1e-4, 1 - 1e-4)
        return torch.cat([torch.zeros_like(x[:, :1]), torch.log(h / (1 - h))], 1) + 0 * self.unused


class OracleLandmarkTrainer(nnUNetTrainer):
    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision=True):
        return _Oracle()
'''

SIZE_XYZ = (44, 40, 18)
SPACING = (0.9, 1.1, 2.2)
ORIGIN = (12.0, -30.0, 5.0)


def direction():
    a = np.deg2rad(20)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    return rot @ np.diag([-1.0, 1.0, 1.0])  # i axis points to patient right, rotated about z


def reference_image():
    img = sitk.Image(SIZE_XYZ, sitk.sitkFloat32)
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    img.SetDirection(tuple(direction().ravel()))
    return img


def truth_points(rng):
    """Three world points well inside the image; L0 at larger LPS x than R0 (correct sides)."""
    img = reference_image()
    ijk = rng.uniform([12, 10, 6], [32, 30, 12], size=(3, 3))
    ijk[0, 0], ijk[1, 0] = 14.3, 30.6  # i grows to patient right: L0 at small i
    return np.array([img.TransformContinuousIndexToPhysicalPoint(tuple(p)) for p in ijk])


def write_case(folder, case, points, present=(True, True, True), corrupt=False):
    img = reference_image()
    zyx = np.stack(np.meshgrid(*[np.arange(n) for n in SIZE_XYZ[::-1]], indexing="ij"), -1).reshape(-1, 3)
    # world coordinates of every voxel, vectorised through the geometry matrix
    m = direction() @ np.diag(SPACING)
    world = zyx[:, ::-1] @ m.T + np.asarray(ORIGIN)
    for k, (p, here) in enumerate(zip(points, present)):
        d2 = np.sum((world - p) ** 2, axis=1)
        blob = (0.9 * np.exp(-d2 / (2 * 3.0 ** 2)) if here else np.zeros(len(d2))) + 0.002
        arr = blob.reshape(SIZE_XYZ[::-1]).astype(np.float32)
        arr[:2] = 0  # zero slab -> nnU-Net crops to the non-zero bounding box
        arr[:, :, -3:] = 0
        out = sitk.GetImageFromArray(arr)
        out.CopyInformation(img)
        path = Path(folder) / f"{case}_{k:04d}.nii.gz"
        sitk.WriteImage(out, str(path))
        if corrupt and k == 1:
            path.write_bytes(b"not a nifti")


def run(cmd, env, check=True):
    r = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=240)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd[0]} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def read_points(path):
    from nnlandmark_h3de.landmarks import read_landmarks
    return read_landmarks(path, NAMES)


@pytest.fixture
def oracle_model(nnunet_env, tmp_path, monkeypatch):
    """Raw dataset + nnU-Net fingerprint/plans + a model folder for the oracle trainer."""
    import torch
    rng = np.random.default_rng(3)
    ext = tmp_path / "ext_trainers"
    ext.mkdir()
    (ext / f"{TRAINER}.py").write_text(ORACLE_TRAINER)
    monkeypatch.setenv("nnUNet_extTrainer", f"{ext}{os.pathsep}{os.environ['nnUNet_extTrainer']}")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")

    raw = nnunet_env["nnUNet_raw"] / DATASET
    for sub in ("imagesTr", "labelsTr", "imagesTs", "imagesTs_clean"):
        (raw / sub).mkdir(parents=True)
    for i in range(2):
        pts = truth_points(rng)
        write_case(raw / "imagesTr", f"tr{i}", pts)
        lab = sitk.Image(SIZE_XYZ, sitk.sitkUInt8)
        lab.CopyInformation(reference_image())
        for k, p in enumerate(pts):
            idx = [int(round(v)) for v in lab.TransformPhysicalPointToContinuousIndex(tuple(p))]
            lab[idx] = k + 1
        sitk.WriteImage(lab, str(raw / "labelsTr" / f"tr{i}.nii.gz"))
    dataset_json = {"channel_names": {str(k): "noNorm" for k in range(len(NAMES))},
                    "labels": {"background": 0, **{n: k + 1 for k, n in enumerate(NAMES)}},
                    "numTraining": 2, "file_ending": ".nii.gz",
                    "landmarks": {"names": NAMES, "pairs": [["L0", "R0"]], "ball_radius_mm": 1.0,
                                  "coordinate_system": "LPS"}}
    (raw / "dataset.json").write_text(json.dumps(dataset_json))
    truth = {}
    for case, present in (("c0", (True, True, True)), ("c1", (True, False, True))):
        truth[case] = (truth_points(rng), present)
        write_case(raw / "imagesTs", case, truth[case][0], present)
        write_case(raw / "imagesTs_clean", case, truth[case][0], present)
    write_case(raw / "imagesTs", "broken", truth_points(rng), corrupt=True)

    # nnU-Net's own fingerprint and planner, in this process (a subprocess costs seconds of imports)
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments
    n_threads = torch.get_num_threads()
    with monkeypatch.context() as m:
        m.setenv("nnUNet_n_proc_DA", "1")  # the planner calls torch.set_num_threads(n_proc_DA)
        extract_fingerprints([951], num_processes=1, check_dataset_integrity=False, verbose=False)
        plan_experiments([951])
    torch.set_num_threads(n_threads)
    plans_path = nnunet_env["nnUNet_preprocessed"] / DATASET / "nnUNetPlans.json"
    plans = json.loads(plans_path.read_text())
    cfg = plans["configurations"]["3d_fullres"]
    cfg["spacing"] = [s * 1.4 for s in cfg["spacing"]]  # network grid != image grid: exercise resampling
    cfg["patch_size"] = [8, 16, 16]  # several sliding-window tiles
    plans_path.write_text(json.dumps(plans))

    model = nnunet_env["nnUNet_results"] / DATASET / f"{TRAINER}__nnUNetPlans__3d_fullres"
    (model / "fold_0").mkdir(parents=True)
    (model / "dataset.json").write_text(json.dumps(dataset_json))
    (model / "plans.json").write_text(json.dumps(plans))
    torch.save({"network_weights": {"unused": torch.zeros(1)}, "trainer_name": TRAINER,
                "init_args": {"configuration": "3d_fullres"}, "inference_allowed_mirroring_axes": None},
               model / "fold_0" / "checkpoint_final.pth")
    (model / "fold_0" / "landmark_thresholds.json").write_text(
        json.dumps({"names": NAMES, "threshold": [0.5, 0.5, 0.5], "score": "peak"}))
    return {"env": env, "raw": raw, "model": model, "truth": truth, "plans": plans}


def assert_matches_truth(ls, truth, tol_mm, what):
    pts, present = truth
    assert ls.names == NAMES
    assert ls.present.tolist() == list(present), f"{what}: presence {ls.present} != {present}"
    err = np.linalg.norm(ls.points_lps[ls.present] - pts[np.asarray(present)], axis=1)
    assert err.max() < tol_mm, f"{what}: errors {err} mm"
    if ls.confidence is not None:  # .mrk.json carries them; .fcsv has no column for them
        assert np.isfinite(ls.confidence).all() and np.isfinite(ls.uncertainty_mm[ls.present]).all()
    return err


def in_process(main, argv, capsys):
    """A console script's main() in this process (same code path, no interpreter start-up)."""
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_predict_and_export_with_oracle_model(oracle_model, tmp_path, capsys):
    from nnlandmark_h3de.cli import export as export_cli, predict as predict_cli

    env, raw, model, truth = (oracle_model[k] for k in ("env", "raw", "model", "truth"))
    out = tmp_path / "pred"
    cmd = [BIN / "nnLandmark_predict", "-i", raw / "imagesTs", "-o", out, "-d", "951", "-tr", TRAINER,
           "-c", "3d_fullres", "-f", "0", "-device", "cpu", "-npp", "0", "--disable_tta", "--save_heatmaps"]
    r = run(cmd, env, check=False)
    # the broken case is reported by name, the others are written, the exit code says something failed
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "FAILED broken" in r.stdout + r.stderr
    assert sorted(p.name for p in out.glob("*.mrk.json")) == ["c0.mrk.json", "c1.mrk.json"]
    assert not list(out.glob(".tmp-*"))
    errs = []
    for case in truth:
        d = json.loads((out / f"{case}.mrk.json").read_text())
        assert d["@schema"].endswith("markups-schema-v1.0.3.json#")
        m = d["markups"][0]
        assert m["coordinateSystem"] == "LPS" and len(m["controlPoints"]) == len(NAMES)
        errs.append(assert_matches_truth(read_points(out / f"{case}.mrk.json"), truth[case], 0.5, f"predict {case}"))
    status = [c.get("positionStatus") for c in json.loads((out / "c1.mrk.json").read_text())["markups"][0]["controlPoints"]]
    assert status[1] == "undefined" and status[0] != "undefined"
    print("nnLandmark_predict errors (mm):", np.round(np.concatenate(errs), 3))

    # --continue_prediction: finished cases are not redone (files untouched), the broken one is retried
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.mrk.json")}
    code, text = in_process(predict_cli.main, cmd[1:] + ["--continue_prediction", "--disable_progress_bar", "-nps", "2"],
                            capsys)
    assert code == 1 and "2 case(s) already done, 1 to predict" in text and "FAILED broken" in text
    assert "WARNING: -nps 2 is ignored" in text  # accepted for nnUNetv2_predict's command lines, but said
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.mrk.json")} == mtimes

    # heatmaps saved in the original geometry -> nnLandmark_export gives the same landmarks
    exp_h = tmp_path / "from_heatmaps"
    assert in_process(export_cli.main, ["-i", out, "-o", exp_h, "-m", model, "--format", "fcsv"], capsys)[0] == 0
    for case in truth:
        assert_matches_truth(read_points(exp_h / f"{case}.fcsv"), truth[case], 0.5, f"export heatmaps {case}")

    # stock nnUNetv2_predict --save_probabilities with the same model -> nnLandmark_export
    # (one test rather than two: planning the dataset is the slow part)
    probs = tmp_path / "stock"
    run([BIN / "nnUNetv2_predict", "-i", raw / "imagesTs_clean", "-o", probs, "-d", "951", "-tr", TRAINER,
         "-c", "3d_fullres", "-f", "0", "-device", "cpu", "-npp", "0", "-nps", "0", "--disable_tta",
         "--save_probabilities"], env)
    out = tmp_path / "exported"
    # without -m: names and pairs come from the dataset.json nnUNetv2_predict copied; no thresholds known
    assert in_process(export_cli.main, ["-i", probs, "-o", out, "--no_lr_check"], capsys)[0] == 0
    ls = read_points(out / "c1.mrk.json")
    assert ls.present.all()  # nothing calibrated -> nothing absent
    assert ls.confidence[1] < 0.05 < 0.5 < ls.confidence[0]  # but the absent landmark's score says so
    # with the model: calibrated thresholds apply
    assert in_process(export_cli.main, ["-i", probs, "-o", out, "-m", model], capsys)[0] == 0
    for case in truth:
        err = assert_matches_truth(read_points(out / f"{case}.mrk.json"), truth[case], 0.5, f"export npz {case}")
        print(f"nnLandmark_export {case} errors (mm):", np.round(err, 3))

    # two folds (identical weights, different calibrated thresholds) through the worker-process preprocessing:
    # the fold-spread uncertainty is ~0 and each fold judges its own peak: present where the mean of
    # peak / 0.5 and peak / 0.9 reaches 1
    import shutil
    shutil.copytree(model / "fold_0", model / "fold_1")
    (model / "fold_1" / "landmark_thresholds.json").write_text(
        json.dumps({"names": NAMES, "threshold": [0.9, 0.9, 0.9], "score": "peak"}))
    two = tmp_path / "two_folds"
    code, text = in_process(predict_cli.main, ["-i", raw / "imagesTs_clean", "-o", two, "-d", "951", "-tr", TRAINER,
                                               "-f", "0", "1", "-device", "cpu", "-npp", "1", "--disable_tta",
                                               "--disable_progress_bar"], capsys)
    assert code == 0, text
    for case in truth:
        ls = read_points(two / f"{case}.mrk.json")
        assert np.nanmax(ls.uncertainty_mm) < 1e-6
        np.testing.assert_array_equal(ls.present, (ls.confidence / 0.5 + ls.confidence / 0.9) / 2 >= 1)

    # calibrated uncertainty (fold_X/landmark_uncertainty.json) replaces the spread: each fold's
    # u_f = rms_f * (reference peak / peak) ** alpha_f, RMS over the folds (identical weights: every
    # fold's peak = the written confidence)
    # (no absent check: c1's absent landmark keeps a point; no left/right check: it would move values)
    for f, (rms, alpha) in enumerate((([1.0, 2.0, 3.0], 1.0), ([3.0, 4.0, 5.0], 0.0))):
        (model / f"fold_{f}" / "landmark_uncertainty.json").write_text(json.dumps(
            {"names": NAMES[::-1], "rms_error_mm": rms[::-1], "median_present_peak": [0.8, 0.8, 0.8], "alpha": alpha}))
    cal = tmp_path / "calibrated"
    code, text = in_process(predict_cli.main, ["-i", raw / "imagesTs_clean", "-o", cal, "-d", "951", "-tr", TRAINER,
                                               "-f", "0", "1", "-device", "cpu", "-npp", "0", "--disable_tta",
                                               "--disable_progress_bar", "--no_absent", "--no_lr_check"], capsys)
    assert code == 0, text
    for case in truth:
        ls = read_points(cal / f"{case}.mrk.json")
        u0 = np.array([1.0, 2.0, 3.0]) * (0.8 / ls.confidence)
        u1 = np.array([3.0, 4.0, 5.0])
        np.testing.assert_allclose(ls.uncertainty_mm, np.sqrt((u0 ** 2 + u1 ** 2) / 2), rtol=1e-4)
    spread = tmp_path / "spread"
    assert in_process(predict_cli.main, ["-i", raw / "imagesTs_clean", "-o", spread, "-d", "951", "-tr", TRAINER,
                                         "-f", "0", "1", "-device", "cpu", "-npp", "0", "--disable_tta",
                                         "--disable_progress_bar", "--no_absent", "--uncertainty", "spread"], capsys)[0] == 0
    assert np.nanmax(read_points(spread / "c0.mrk.json").uncertainty_mm) < 1e-6
    # nnLandmark_export -m sees only the folds' average: it applies the folds' mean model, and says so
    exported = tmp_path / "exported_calibrated"
    code, text = in_process(export_cli.main, ["-i", probs, "-o", exported, "-m", model, "--no_absent", "--no_lr_check"],
                            capsys)
    assert code == 0 and "folds' calibrations are averaged" in text
    for case in truth:
        ls = read_points(exported / f"{case}.mrk.json")
        np.testing.assert_allclose(ls.uncertainty_mm, np.array([2.0, 3.0, 4.0]) * (0.8 / ls.confidence) ** 0.5, rtol=1e-4)


def test_predict_gives_inputs_the_orientation_the_model_was_converted_in(oracle_model, tmp_path, capsys):
    """A model whose dataset.json records the conversion's orientation (LPS) gets inputs stored otherwise (here
    rotated, i towards patient right; 2 cases x 3 channels) reoriented on copies; the landmarks still land on the
    world truth."""
    from nnlandmark_h3de.cli import predict as predict_cli
    from nnlandmark_h3de.utilities.orientation import orientation_code

    raw, model, truth = (oracle_model[k] for k in ("raw", "model", "truth"))
    assert orientation_code(sitk.ReadImage(str(raw / "imagesTs_clean" / "c0_0000.nii.gz")).GetDirection()) != "LPS"
    dataset_json = json.loads((model / "dataset.json").read_text())
    dataset_json["landmarks"]["image_orientation"] = "LPS"
    (model / "dataset.json").write_text(json.dumps(dataset_json))
    out = tmp_path / "oriented"
    code, text = in_process(predict_cli.main, ["-i", raw / "imagesTs_clean", "-o", out, "-d", "951", "-tr", TRAINER,
                                               "-c", "3d_fullres", "-f", "0", "-device", "cpu", "-npp", "0",
                                               "--disable_tta", "--disable_progress_bar"], capsys)
    assert code == 0, text
    assert "6 input image(s) stored in another orientation than the model's training images (LPS)" in text
    for case in truth:
        assert_matches_truth(read_points(out / f"{case}.mrk.json"), truth[case], 0.5, f"reoriented {case}")
