#!/usr/bin/env python
"""Heatmap target error: exact points (keypoints) vs label-ball centres, through nnU-Net's own
preprocessing resampling and training augmentation, on an AFIDs template at several spacings.

Per spacing s: the template's 32 landmarks are drawn as label balls in its native 2 mm grid (radius by
the converter's rule, 1.5 voxels of the coarsest of 2 mm and s; where balls meet the nearest landmark
takes the voxel) and the label map is resampled to s with nnU-Net's segmentation resampling; the exact
points are mapped into the same grid. Each patch is cut around a random landmark (nnU-Net's enlarged
initial patch) and sent through nnU-Net's training pipeline made landmark-aware (rotation within
+-30 degrees and scaling 0.7-1.4 forced on every patch, mirroring as nnU-Net draws it; intensity
transforms left out: they move nothing). Both arms see the same draw. Truth never uses our keypoint
formulas: the image channels are coordinate maps, so the augmented patch says voxel by voxel where it
sampled the input, and an affine fit of that, inverted, gives where each landmark went.
Reported per arm: error of the decoded heatmap peak from that truth (voxels of s), over landmarks
inside the patch, and how many of those got a target at all. Ball errors are over the balls today's
converter would have accepted (isolated: >= 2 r + s/2 from any other landmark); the others are counted.

Time: the exact-target transform per batch of 2 (all deep-supervision scales) against one training
step (forward, backward, Adam) of nnU-Net's 3d_fullres U-Net for this patch (32..320 features), same
run; and nnU-Net's spatial transform of the labels (L + 1 of them) vs of the padding mask we keep.

    python benchmarks/bench_targets.py --templates ../shared/data/afids-templates [--patches 1000] [--json]

--json: the LAST line is one JSON object with err_exact_vox, err_ball_vox, target_time_fraction (+ details).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

TEMPLATE = "human_MNI152NLin2009cAsym_T1w_2mm"


def load_template(folder: Path):
    import SimpleITK as sitk
    from nnlandmark_h3de.landmarks import ImageGeometry, read_landmarks
    img = sitk.ReadImage(str(folder / "images" / f"{TEMPLATE}.nii.gz"))
    ls = read_landmarks(folder / "landmarks" / f"{TEMPLATE}.fcsv")
    return ImageGeometry.from_sitk(img), ls


def grids_at_spacing(geo, ls, spacing: float):
    """Ball labels resampled the nnU-Net way, and the exact points, in the grid at `spacing` mm."""
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape, resample_data_or_seg_to_shape
    from nnlandmark_h3de.conversion import ball_radius_mm, draw_balls
    radius = ball_radius_mm([geo.spacing], target_spacing=[spacing] * 3)
    labels, _ = draw_balls(geo, ls.points_lps, radius)
    old_spacing = list(geo.spacing)[::-1]  # array (z, y, x)
    new_shape = compute_new_shape(labels.shape, old_spacing, [spacing] * 3)
    seg = resample_data_or_seg_to_shape(labels[None].astype(np.int16), new_shape, old_spacing, [spacing] * 3,
                                        is_seg=True, order=1, order_z=0)[0]
    idx = geo.world_to_array_index(ls.points_lps)
    points = (idx + 0.5) * (np.asarray(new_shape) / np.asarray(labels.shape)) - 0.5
    d = np.linalg.norm(ls.points_lps[:, None] - ls.points_lps[None], axis=2) + np.eye(len(ls.points_lps)) * 1e9
    isolated = d.min(1) >= 2 * radius + 0.5 * spacing
    return seg.astype(np.int16), points, isolated, radius


def coordinate_image(shape) -> torch.Tensor:
    grids = list(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij"))
    return torch.stack(grids + [torch.ones(tuple(shape))])


def where_points_went(out: torch.Tensor, points: np.ndarray) -> np.ndarray:
    c = out[:3].reshape(3, -1).T.double().numpy()
    o = np.stack(np.unravel_index(np.arange(c.shape[0]), out.shape[1:]), 1).astype(np.float64)
    ok = np.abs(out[3].reshape(-1).double().numpy() - 1) < 1e-5
    design = np.hstack([o[ok], np.ones((ok.sum(), 1))])
    coef, *_ = np.linalg.lstsq(design, c[ok], rcond=None)
    m, t = coef[:3].T, coef[3]
    return (points - t) @ np.linalg.inv(m).T


def pipelines(patch, n_landmarks):
    """nnU-Net's training pipeline, landmark-aware; rotation and scaling on every patch."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from nnlandmark_h3de.heatmaps import make_landmark_aware
    rotation = (-np.pi / 6, np.pi / 6)
    compose = nnUNetTrainer.get_training_transforms(patch, rotation, None, (0, 1, 2), False)
    compose.transforms = [t for t in compose.transforms if isinstance(t, SpatialTransform)
                          or type(t).__name__ == "MirrorTransform"]
    for t in compose.transforms:
        if isinstance(t, SpatialTransform):
            t.p_rotation = t.p_scaling = 1.0
    return make_landmark_aware(compose, None, list(range(n_landmarks)), exact_points=True)


def initial_patch(patch):
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
    r = (-np.pi / 6, np.pi / 6)
    return [int(v) for v in get_patch_size(patch, r, r, r, (0.85, 1.25))]


def crop(array: np.ndarray, lo, size, fill):
    out = np.full((array.shape[0], *size), fill, dtype=array.dtype)
    src = tuple(slice(max(0, a), min(n, a + s)) for a, s, n in zip(lo, size, array.shape[1:]))
    dst = tuple(slice(sl.start - a, sl.stop - a) for sl, a in zip(src, lo))
    out[(slice(None),) + dst] = array[(slice(None),) + src]
    return out


def measure_spacing(geo, ls, spacing, n_patches, patch, rng):
    from nnlandmark_h3de.heatmaps import LandmarkHeatmapTransform, ball_centres, expected_ball_voxels
    from nnlandmark_h3de.inference.peaks import decode_peaks
    seg, points, isolated, radius = grids_at_spacing(geo, ls, spacing)
    L = len(points)
    coords = coordinate_image(seg.shape).numpy()
    pipe = pipelines(patch, L)
    heat = LandmarkHeatmapTransform(L, sigma=2.0, from_keypoints=True)
    big = initial_patch(patch)
    err_exact, err_ball, n_inside, n_ball_target, n_ball_isolated_inside = [], [], 0, 0, 0
    for _ in range(n_patches):
        centre = points[rng.integers(L)] + rng.uniform(-patch[0] / 3, patch[0] / 3, 3)
        lo = np.round(centre - np.asarray(big) / 2).astype(int)
        data = {"image": torch.from_numpy(crop(coords, lo, big, 0.0)),
                "segmentation": torch.from_numpy(crop(seg[None], lo, big, -1)),
                "keypoints": torch.from_numpy(points - lo)}
        labels_in = data["segmentation"].clone()
        for t in pipe.transforms:  # labels and keypoints through the same draws; the labels the old way
            p = t.get_parameters(**data)
            data = t.apply(data, **p)
            if hasattr(t, "_apply_to_segmentation") and type(t).__name__ != "LabelsToPaddingMaskTransform":
                labels_in = t._apply_to_segmentation(labels_in, **p)
        truth = where_points_went(data["image"], points)  # the coordinate channels hold full-image indices
        inside = np.all((truth >= -0.5) & (truth <= np.asarray(patch) - 0.5), 1)
        n_inside += int(inside.sum())
        hm = heat(segmentation=data["segmentation"], keypoints=data["keypoints"])["segmentation"]
        present = (hm.flatten(1).amax(1) > 0).numpy()
        if present.any():
            idx, _, _ = decode_peaks(hm[torch.from_numpy(present)].float())
            err_exact += list(np.linalg.norm(np.asarray(idx) - truth[present], axis=1))
        labels_in[labels_in < 0] = 0
        centres, ball_present = ball_centres(labels_in[0], L, expected_ball_voxels(radius, [spacing] * 3), 0.5)
        ball_present = ball_present.numpy() & inside
        n_ball_target += int(ball_present.sum())
        n_ball_isolated_inside += int((inside & isolated).sum())
        use = ball_present & isolated
        if use.any():
            err_ball += list(np.linalg.norm(centres.numpy()[use] - truth[use], axis=1))
    return {"spacing_mm": spacing, "ball_radius_mm": float(radius), "patches": n_patches,
            "landmarks_in_patches": n_inside, "exact_targets": len(err_exact),
            "err_exact_vox_mean": float(np.mean(err_exact)), "err_exact_vox_max": float(np.max(err_exact)),
            "ball_targets": n_ball_target, "isolated_landmarks": int(isolated.sum()),
            "isolated_in_patches": n_ball_isolated_inside,
            "err_ball_vox_mean": float(np.mean(err_ball)) if err_ball else None,
            "err_ball_vox_max": float(np.max(err_ball)) if err_ball else None, "_err_exact": err_exact,
            "_err_ball": err_ball}


def training_step_seconds(patch, n_out, repeats=3):
    """One Adam step (forward, backward) of nnU-Net's default U-Net for this patch, batch 2."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
    _, strides, kernels, patch_fit, _ = get_pool_and_conv_props([1, 1, 1], list(patch), 4, 999999)
    n = len(strides)
    net = PlainConvUNet(1, n, [min(32 * 2 ** i, 320) for i in range(n)], torch.nn.Conv3d, kernels, strides, 2,
                        n_out, 2, conv_bias=True, norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5,
                        "affine": True}, nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True},
                        deep_supervision=True)
    opt = torch.optim.Adam(net.parameters(), 1e-4)
    x = torch.randn(2, 1, *patch_fit)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        opt.zero_grad()
        out = net(x)
        loss = sum(torch.sigmoid(o).square().mean() for o in out)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return min(times[1:]), tuple(patch_fit)


def target_seconds(patch, n_landmarks, ds_scales, repeats=20):
    """Exact-point heatmaps for a batch of 2 patches at every deep-supervision scale (best of repeats)."""
    from nnlandmark_h3de.heatmaps import LandmarkHeatmapTransform
    t = LandmarkHeatmapTransform(n_landmarks, sigma=4.0, ds_scales=ds_scales, from_keypoints=True)
    rng = np.random.default_rng(0)
    kp = [torch.from_numpy(rng.uniform(0, min(patch), (n_landmarks, 3))) for _ in range(2)]
    seg = torch.zeros((1, *patch), dtype=torch.int16)
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for k in kp:
            t(segmentation=seg, keypoints=k)
        best = min(best, time.perf_counter() - t0)
    return best


def spatial_label_seconds(patch, labels: np.ndarray, repeats=5):
    """nnU-Net's spatial transform on a label patch with all L + 1 labels vs the 0/-1 padding mask."""
    from nnlandmark_h3de.heatmaps import SpatialTransformWithKeypoints
    t = SpatialTransformWithKeypoints(patch, 0, False, p_rotation=1, rotation=(-0.5, 0.5), p_scaling=1,
                                      scaling=(0.7, 1.4), p_synchronize_scaling_across_axes=1, border_mode_seg="constant",
                                      padding_value_seg=-1)
    seg = torch.from_numpy(labels)
    mask = torch.where(seg < 0, -1, 0).to(seg.dtype)
    params = t.get_parameters(image=seg.float())
    out = {}
    for name, s in (("labels", seg), ("mask", mask)):
        best = np.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            t._apply_to_segmentation(s, **params)
            best = min(best, time.perf_counter() - t0)
        out[name] = best
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--templates", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data" /
                   "afids-templates")
    p.add_argument("--patches", type=int, default=1000, help="augmented patches per spacing (default 1000)")
    p.add_argument("--spacings", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    p.add_argument("--patch", type=int, nargs=3, default=[48, 48, 48])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if not (a.templates / "images" / f"{TEMPLATE}.nii.gz").is_file():
        sys.exit(f"bench_targets: AFIDs template {TEMPLATE} not found under {a.templates}")
    torch.set_num_threads(1)
    from tqdm import tqdm
    rng = np.random.default_rng(a.seed)
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    geo, ls = load_template(a.templates)
    rows = []
    for s in tqdm(a.spacings, desc="spacings"):
        rows.append(measure_spacing(geo, ls, s, a.patches, tuple(a.patch), rng))
    all_exact = [e for r in rows for e in r.pop("_err_exact")]
    all_ball = [e for r in rows for e in r.pop("_err_ball")]
    ds = [[1, 1, 1], [0.5] * 3, [0.25] * 3, [0.125] * 3]
    step, patch_fit = training_step_seconds(tuple(a.patch), len(ls.names) + 1)
    targets = target_seconds(patch_fit, len(ls.names), ds)
    seg, *_ = grids_at_spacing(geo, ls, 2.0)
    spatial = spatial_label_seconds(tuple(a.patch), crop(seg[None], np.asarray(seg.shape) // 2 - 32, [64, 64, 64], -1))
    print(f"{'spacing':>8} {'in patch':>9} {'exact tg':>9} {'exact err (vox) mean/max':>26} {'ball tg':>8} "
          f"{'isolated':>9} {'ball err (vox) mean/max':>25}")
    for r in rows:
        be = "n/a" if r["err_ball_vox_mean"] is None else f"{r['err_ball_vox_mean']:.3f} / {r['err_ball_vox_max']:.3f}"
        print(f"{r['spacing_mm']:>6.1f}mm {r['landmarks_in_patches']:>9} {r['exact_targets']:>9} "
              f"{r['err_exact_vox_mean']:>12.1e} / {r['err_exact_vox_max']:.1e} {r['ball_targets']:>8} "
              f"{r['isolated_landmarks']:>6}/32 {be:>25}")
    result = {"err_exact_vox": float(np.mean(all_exact)), "err_exact_vox_max": float(np.max(all_exact)),
              "err_ball_vox": float(np.mean(all_ball)) if all_ball else None,
              "err_ball_vox_max": float(np.max(all_ball)) if all_ball else None,
              "target_time_fraction": targets / step, "target_seconds_per_batch": targets,
              "train_step_seconds": step, "train_step_patch": [int(v) for v in patch_fit],
              "spatial_labels_vs_mask_time_ratio": spatial["labels"] / spatial["mask"],
              "per_spacing": rows, "patches_per_spacing": a.patches, "seed": a.seed}
    print(f"exact targets: {result['err_exact_vox']:.1e} voxel mean error (max {result['err_exact_vox_max']:.1e}); "
          f"ball centres: {result['err_ball_vox']} voxel mean over isolated balls")
    print(f"target time {targets * 1e3:.1f} ms per batch of 2 = {result['target_time_fraction']:.4f} of a training step "
          f"({step:.2f} s, patch {patch_fit}); spatial transform of all labels {spatial['labels'] * 1e3:.0f} ms vs "
          f"padding mask {spatial['mask'] * 1e3:.0f} ms ({result['spatial_labels_vs_mask_time_ratio']:.1f}x)")
    if a.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
