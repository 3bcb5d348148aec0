"""Converted datasets through the real `nnUNetv2_plan_and_preprocess`: the exact points mapped by
`world_to_network_index` agree with where nnU-Net's own transpose, crop and resampling put each
isolated landmark's ball (centre of mass within half a target voxel): the mapping the exact
training targets rely on, checked against nnU-Net itself."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnlandmark_h3de.conversion import convert_dataset
from nnlandmark_h3de.landmarks import ImageGeometry, LandmarkSet, load_dataset_landmarks
from rotations import rotation


def plan_and_preprocess(dataset_id: int) -> None:
    exe = Path(sys.executable).with_name("nnUNetv2_plan_and_preprocess")
    # the planner calls torch.set_num_threads(nnUNet_n_proc_DA), which must be >= 1 (the fixture sets 0)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", nnUNet_n_proc_DA="1")
    r = subprocess.run([str(exe), "-d", str(dataset_id), "-c", "3d_fullres", "--verify_dataset_integrity",
                        "-np", "1", "-npfp", "1"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def isolated(ls: LandmarkSet, min_distance_mm: float) -> np.ndarray:
    d = np.linalg.norm(ls.points_lps[:, None] - ls.points_lps[None], axis=2) + np.eye(len(ls)) * 1e9
    return d.min(1) >= min_distance_mm


def ball_com_errors(pre_dataset: Path, landmarks: dict, min_distance_mm: float = 0.0) -> dict:
    """case -> (L,) max-abs per-axis error (target voxels) between ball COM and the mapped exact point,
    NaN for landmarks closer than `min_distance_mm` to another (their balls share voxels)."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnlandmark_h3de.inference.index_mapping import world_to_network_index

    pm = PlansManager(str(pre_dataset / "nnUNetPlans.json"))
    cm = pm.get_configuration("3d_fullres")
    folder = pre_dataset / cm.data_identifier
    ds = infer_dataset_class(str(folder))(str(folder))
    out = {}
    for case in ds.identifiers:
        _, seg, _, props = ds.load_case(case)
        seg = np.asarray(seg[0])
        ls = landmarks[case]
        expected = world_to_network_index(ls.points_lps, props, pm, cm)
        errs = []
        inside = np.all((expected >= -0.5) & (expected <= np.asarray(seg.shape) - 0.5), 1)
        assert inside.all(), f"{case}: exact points outside the preprocessed array"
        for k, alone in enumerate(isolated(ls, min_distance_mm)):
            if not alone:
                errs.append(np.nan)
                continue
            vox = np.argwhere(seg == k + 1)
            assert len(vox), f"{case}: ball of {ls.names[k]} vanished in preprocessing"
            errs.append(np.abs(vox.mean(0) - expected[k]).max())
        out[case] = np.array(errs)
    return out


def test_afids_templates_all_32_through_nnunet_preprocessing(afids_dir, nnunet_env):
    cases = {p.name[: -len(".nii.gz")]: (p, afids_dir / "landmarks" / p.name.replace(".nii.gz", ".fcsv"))
             for p in sorted((afids_dir / "images").glob("*.nii.gz"))}
    assert len(cases) == 3
    # At 2 mm the intermammillary sulcus (11) and the mammillary bodies (12, 13) lie 2.1-5 mm apart:
    # their balls share voxels (nearest landmark wins), their exact points stay apart in landmarks.json.
    out = convert_dataset(cases, dataset_id=301, dataset_name="Afids", progress=False)
    radius = json.loads((out / "dataset.json").read_text())["landmarks"]["ball_radius_mm"]
    landmarks = load_dataset_landmarks(out)
    assert all(len(ls) == 32 and ls.present.all() for ls in landmarks.values())
    plan_and_preprocess(301)
    errs = ball_com_errors(nnunet_env["nnUNet_preprocessed"] / out.name, landmarks, 2 * radius + 1.0)
    assert sorted(errs) == sorted(cases)
    checked = np.concatenate(list(errs.values()))
    checked = checked[np.isfinite(checked)]
    print(f"AFIDs isolated-ball COM error (target voxels): max {checked.max():.3f}, mean {checked.mean():.3f} "
          f"over {checked.size} landmarks")
    assert checked.size >= 60
    assert checked.max() < 0.5


def test_anisotropic_rotated_dataset_resampled(nnunet_env):
    """Spacings differ per case (so nnU-Net really resamples, separately along the coarse axis) and
    directions are rotated; zero borders make nnU-Net crop."""
    rng = np.random.default_rng(7)
    specs = [((0.8, 0.8, 2.5), (56, 60, 14)), ((0.9, 0.95, 3.0), (50, 52, 12)),
             ((0.7, 0.75, 2.0), (64, 60, 18)), ((1.0, 0.8, 2.6), (46, 58, 14))]
    names = ["L_a", "R_a", "b", "c"]
    cases = {}
    for i, (spacing, size) in enumerate(specs):
        arr = (50 + 10 * rng.standard_normal(size[::-1])).astype(np.float32)
        arr[:, :, :3] = 0  # zero border: nnU-Net crops it
        arr[:2] = 0
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(spacing)
        img.SetOrigin(tuple(rng.uniform(-50, 50, 3)))
        img.SetDirection(rotation(*rng.uniform(-0.6, 0.6, 3)))
        g = ImageGeometry.from_sitk(img)
        centre = (np.asarray(g.shape_ijk) - 1) / 2
        offs_mm = np.array([[-12, 0, 0], [12, 0, 0], [0, 12, 1], [3, -11, -4]], float)  # in image-axis mm
        ijk = centre + offs_mm / np.asarray(spacing) + rng.uniform(-0.5, 0.5, (4, 3))
        cases[f"case{i}"] = (img, LandmarkSet(names, g.itk_index_to_world(ijk), source=f"case{i}"))
    out = convert_dataset(cases, dataset_id=302, dataset_name="Aniso", progress=False)
    dj = json.loads((out / "dataset.json").read_text())
    assert dj["landmarks"]["ball_radius_mm"] == pytest.approx(4.5)  # 1.5 x coarsest spacing (3.0)
    plan_and_preprocess(302)
    pre = nnunet_env["nnUNet_preprocessed"] / out.name
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    target = plans["configurations"]["3d_fullres"]["spacing"]
    assert not all(np.allclose(target, s[::-1]) for s, _ in specs), "no case is resampled"
    errs = ball_com_errors(pre, load_dataset_landmarks(out))
    allerr = np.concatenate(list(errs.values()))
    print(f"anisotropic: target spacing {target}, ball COM error max {allerr.max():.3f}, mean {allerr.mean():.3f}")
    assert sorted(errs) == sorted(cases)
    assert max(e.max() for e in errs.values()) < 0.5, ({c: np.round(e, 3).tolist() for c, e in errs.items()}, target)
