"""One-shot in 2D (X-rays): registration pseudo-labels of 2D phantoms within a pixel, a known in-plane
similarity recovered sub-pixel, and the whole path with the stock commands: one labelled 2D image +
unlabelled ones -> nnLandmark_oneshot -> nnUNetv2_plan_and_preprocess -c 2d -> nnUNetv2_train with
the adapter trainer -> nnLandmark_predict on held-out images; the self-supervised trainer on the same
2D plans -> nnLandmark_oneshot --method cc2d on the 2D images.

Phantoms: 96 x 80 pixels of 1 mm (demo/phantoms_2d.py: 11 landmarks, other cases differ by an
in-plane similarity, intensities, noise and bias field)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnlandmark_h3de.demo.phantoms_2d import LANDMARK_NAMES_2D, generate_phantom_cases_2d
from nnlandmark_h3de.synthesis.reposing import repose_case
from nnlandmark_h3de.landmarks import read_landmarks
from nnlandmark_h3de.oneshot import OneShotError
from nnlandmark_h3de.oneshot.registration_labels import registration_pseudo_labels

BIN = Path(sys.executable).parent
DATASET_ID = 974
TRAINER = "nnLandmarkTrainerAdapter_2epochs_3iters"
SSL_TRAINER = "nnLandmarkSelfSupervisedTrainer_2epochs_3iters"


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return generate_phantom_cases_2d(tmp_path_factory.mktemp("xrays"), 7, seed=0, progress=False)


def _errors(p, truth_file) -> np.ndarray:
    truth = read_landmarks(truth_file).reordered(p.names).points_lps
    return np.linalg.norm(p.landmarks.points_lps - truth, axis=1)


def test_2d_registration_pseudo_labels_within_a_pixel(phantoms):
    template_img, template_lm = phantoms["xray_000"]
    images = {c: phantoms[c][0] for c in ("xray_001", "xray_002", "xray_003")}
    pseudo = registration_pseudo_labels(template_img, template_lm, images, progress=False)
    assert sorted(pseudo) == sorted(images)
    errs = np.concatenate([_errors(p, phantoms[c][1]) for c, p in pseudo.items()])
    # measured: mean 0.19 px with demons on the 1 px grid the 2D default chooses (affine alone 0.05 px;
    # on a 4 mm grid 0.44 px)
    assert np.isfinite(errs).all() and errs.mean() < 0.5 and errs.max() < 1.5, errs
    for p in pseudo.values():
        assert np.all(p.landmarks.points_lps[:, 2] == 0.0), "2D points stay on the image plane"
        assert np.all((p.confidence > 0.5) & (p.confidence <= 1)), p.confidence
    # the cases do differ: the template's own points would miss by several pixels
    far = [np.linalg.norm(read_landmarks(template_lm).points_lps - read_landmarks(phantoms[c][1])
                          .reordered(LANDMARK_NAMES_2D).points_lps, axis=1).mean() for c in images]
    assert min(far) > 3.0, far


def test_known_in_plane_pose_is_recovered_and_dimensions_must_match(phantoms, tmp_path):
    template_img, template_lm = phantoms["xray_000"]
    image, ls = sitk.ReadImage(str(template_img), sitk.sitkFloat32), read_landmarks(template_lm)
    moved, truth = repose_case(image, ls, np.random.default_rng(4), max_rotation_deg=15, max_translation_mm=6,
                               intensity=None)
    assert moved.GetDimension() == 2 and np.linalg.norm(truth.points_lps - ls.points_lps, axis=1).mean() > 3
    p = registration_pseudo_labels(template_img, template_lm, {"moved": moved}, deformable="none",
                                   progress=False)["moved"]
    present = truth.present
    err = np.linalg.norm(p.landmarks.points_lps[present] - truth.points_lps[present], axis=1)
    assert err.mean() < 0.1 and err.max() < 0.2, err  # measured 0.001 px (a 4 mm grid: 0.84 px)

    volume = sitk.Image([8, 8, 8], sitk.sitkFloat32)
    with pytest.raises(OneShotError, match="a 3D image, the template is 2D"):
        registration_pseudo_labels(template_img, template_lm, {"vol": volume}, on_error="raise", progress=False)


def _run(args, env, cwd):
    proc = subprocess.run([str(BIN / args[0]), *map(str, args[1:])], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(map(str, args))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_2d_one_shot_dataset_plans_trains_and_predicts_with_the_stock_commands(phantoms, nnunet_env, tmp_path):
    unlabelled, test = tmp_path / "unlabelled", tmp_path / "test"
    unlabelled.mkdir()
    test.mkdir()
    for c in ("xray_001", "xray_002", "xray_003", "xray_004"):
        shutil.copy(phantoms[c][0], unlabelled / f"{c}.nii.gz")
    for c in ("xray_005", "xray_006"):  # never seen, not even unlabelled
        shutil.copy(phantoms[c][0], test / f"{c}_0000.nii.gz")
    env = dict(os.environ)
    template_img, template_lm = phantoms["xray_000"]
    out = _run(["nnLandmark_oneshot", "-t", template_img, "-l", template_lm, "-u", unlabelled, "-d", DATASET_ID,
                "-n", "OneShot2D", "--method", "registration", "--template_copies", "2"], env, tmp_path).stdout
    raw = nnunet_env["nnUNet_raw"] / f"Dataset{DATASET_ID}_OneShot2D"
    assert f"Wrote {raw}: 7 cases" in out
    images = sorted((raw / "imagesTr").iterdir())
    assert len(images) == 7 and all(sitk.ReadImage(str(f)).GetDimension() == 2 for f in images)
    landmarks = json.loads((raw / "landmarks.json").read_text())
    copies = [c for c in landmarks["cases"] if "_atd" in c]
    assert len(copies) == 2 and all(sum(v is not None for v in landmarks["cases"][c].values()) > 5 for c in copies)

    _run(["nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", "2d", "-np", "1", "-npfp", "1"],
         {**env, "nnUNet_n_proc_DA": "1"}, tmp_path)
    _run(["nnLandmark_add_small_config", "-d", DATASET_ID, "--base", "2d", "--name", "2d_small", "--patch_size",
          64, 64, "--base_features", 4, "--max_features", 16], env, tmp_path)
    _run(["nnUNetv2_train", DATASET_ID, "2d_small", "0", "-tr", TRAINER, "-device", "cpu"], env, tmp_path)
    fold = nnunet_env["nnUNet_results"] / raw.name / f"{TRAINER}__nnUNetPlans__2d_small" / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file() and (fold / "landmark_thresholds.json").is_file()

    pred = tmp_path / "pred"
    _run(["nnLandmark_predict", "-i", test, "-o", pred, "-d", DATASET_ID, "-c", "2d_small", "-tr", TRAINER, "-f", "0",
          "-device", "cpu", "-npp", "0"], env, tmp_path)
    for c in ("xray_005", "xray_006"):
        markups = json.loads((pred / f"{c}.mrk.json").read_text())["markups"][0]["controlPoints"]
        assert [m["label"] for m in markups] == list(LANDMARK_NAMES_2D)
        assert all(m["position"][2] == 0.0 for m in markups if m.get("positionStatus") == "defined")

    # CC2D in 2D: the self-supervised trainer on the same (2D) plans, then --method cc2d on 2D images
    _run(["nnUNetv2_train", DATASET_ID, "2d_small", "0", "-tr", SSL_TRAINER, "-device", "cpu"], env, tmp_path)
    ssl_model = nnunet_env["nnUNet_results"] / raw.name / f"{SSL_TRAINER}__nnUNetPlans__2d_small"
    out = _run(["nnLandmark_oneshot", "-t", template_img, "-l", template_lm, "-u", unlabelled, "-d", DATASET_ID + 1,
                "-n", "OneShot2DCC2D", "--method", "cc2d", "--ssl_model", ssl_model, "--template_copies", "0",
                "--min_confidence", "0"], env, tmp_path).stdout
    assert "cc2d: 4 case(s), landmarks kept 44" in out, out
    cc2d = json.loads((nnunet_env["nnUNet_raw"] / f"Dataset{DATASET_ID + 1}_OneShot2DCC2D" / "landmarks.json")
                      .read_text())["cases"]
    for c in ("xray_001", "xray_002", "xray_003", "xray_004"):
        points = np.array([cc2d[c][n] for n in LANDMARK_NAMES_2D], dtype=float)
        assert np.all(points[:, 2] == 0.0), "CC2D points of a 2D image lie on its plane"
        ijk = sitk.ReadImage(str(phantoms[c][0]))
        inside = [ijk.TransformPhysicalPointToContinuousIndex(tuple(p[:2])) for p in points]
        assert all(-0.5 <= i <= n - 0.5 for idx in inside for i, n in zip(idx, ijk.GetSize())), inside


def test_cli_takes_pictures_with_a_pixel_spacing(phantoms, tmp_path, capsys):
    """PNG pictures (no spacing in the file) with `--spacing`, the template's landmarks as pixel columns;
    without --spacing a clear error naming the picture and nothing written."""
    from nnlandmark_h3de.cli.oneshot import main
    from nnlandmark_h3de.landmarks import ImageGeometry
    from nnlandmark_h3de.oneshot import PSEUDO_LABELS_FILE, read_pseudo_labels_file

    def to_png(case, folder):
        img = sitk.ReadImage(str(phantoms[case][0]), sitk.sitkFloat32)
        arr = sitk.GetArrayFromImage(img)
        arr = np.round(255 * (arr - arr.min()) / (arr.max() - arr.min())).astype(np.uint8)
        folder.mkdir(exist_ok=True)
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(folder / f"{case}.png"))
        ls = read_landmarks(phantoms[case][1])
        return ImageGeometry.from_sitk(img).world_to_array_index(ls.points_lps)[:, [2, 1]], ls.names  # (x, y) px

    xy, names = to_png("xray_000", tmp_path / "template")
    csv = tmp_path / "template.csv"
    csv.write_text("label,x_px,y_px\n" + "".join(f"{n},{x:.4f},{y:.4f}\n" for n, (x, y) in zip(names, xy)))
    truth = {c: to_png(c, tmp_path / "unlabelled")[0] for c in ("xray_001", "xray_002")}
    args = ["-t", str(tmp_path / "template" / "xray_000.png"), "-l", str(csv), "-u", str(tmp_path / "unlabelled"),
            "-d", "975", "-n", "OneShotPNG", "-o", str(tmp_path / "raw"), "--method", "registration",
            "--template_copies", "1"]
    assert main(args) == 1
    assert "xray_000.png" in capsys.readouterr().err and not (tmp_path / "raw").exists()
    assert main([*args, "--spacing", "1.0"]) == 0
    folder = tmp_path / "raw" / "Dataset975_OneShotPNG"
    assert sitk.ReadImage(str(folder / "imagesTr" / "xray_001_0000.nii.gz")).GetSpacing() == (1.0, 1.0)
    _, records = read_pseudo_labels_file(folder / PSEUDO_LABELS_FILE)
    for case, xy_true in truth.items():
        xy_pred = records[case].landmarks.points_lps[:, :2]  # origin 0, identity direction, 1 mm: world = pixel
        err = np.linalg.norm(xy_pred - xy_true, axis=1)
        assert err.mean() < 0.5, err
