"""Time per training step: nnLandmarkTrainer (and nnH3DETrainer when importable) vs the stock
nnUNetTrainer, in one process, on the same plans (a small configuration) and the same input
batches, steps alternated after a warm-up so machine load hits all trainers alike. Also times the
heatmap transform (per batch, all deep-supervision scales) against the stock step, and reports every
row's parameters and forward FLOPs.

nnH3DETrainer is measured exactly as users get it: the trainer class itself, built from the same plans
and configuration as the other rows (asserted: same conv stages), so its network is H3DEUNet with the
trainer's `h3de_kwargs` (today one full-resolution refinement conv, `n_conv_refinement=1`; H3DEUNet's own
default is 2). An informational row `nnH3DETrainer_refine2` (the same trainer with H3DEUNet's default 2
refinement convs) shows what that choice saves; it is not the user configuration (`--no-refine2` skips it).

FLOPs: torch.utils.flop_counter.FlopCounterMode over one forward pass of each trainer's network (deep
supervision on, as trained) on a batch of the configuration's batch size and patch, run on a meta-device
copy: there scaled_dot_product_attention takes the math path, whose matmuls the counter sees (the CPU
fused kernel has no entry in torch's flop registry, so a CPU count would miss V-BRA's attention). Counted:
convolutions and matmuls (2 FLOPs per multiply-add), as fvcore/ptflops do; norms, activations and
interpolation are not.

    python benchmarks/bench_train_step.py [--steps 8] [--warmup 2] [--patch 48 64 64] [--json]

Without -d it generates a blob dataset, plans and preprocesses it in a temporary nnU-Net tree.
With --json the LAST line is one JSON object: ratio_nnLandmarkTrainer (median step time / stock's),
ratio_nnH3DETrainer (if that trainer exists): the median over rounds of (step time / stock step
time of the same round), heatmap_transform_ratio, params_M / gflops_fwd_batch per row, the
nnH3DETrainer configuration (refinement convs, V-BRA stages), and the raw times.

Targets drawn where the network runs (target_transport.py): today's path (dense heatmaps drawn per
sample in the loader, LandmarkHeatmapTransform last, composed here) vs the product path (the loader
carries the points, the trainer draws on its device), measured in the same run, for the small
configuration (the landmark trainer's own loader) and for 32 landmarks at a 128^3 patch (AFIDs at
1 mm: nnU-Net's 3D augmentation, 5 deep-supervision scales). JSON keys, each {"small": .., "afids_128": ..}:
loader_bytes_per_batch_ratio (everything a batch carries out of the loader, image included, old/new),
loader_time_per_batch_ratio (worker CPU seconds per batch incl. the shared-memory copy, old/new),
step_time_ratio_device_targets (new whole CPU training step, drawing included / today's step on the
dense targets, paired median). A whole 128^3 step takes tens of seconds on 2 cores, so the 128^3
case is measured on the loader pipeline plus the drawing alone (its step ratio is null; the drawing's
seconds are in device_targets.afids_128.device_drawing_s_per_batch). `--no-large` skips it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from copy import deepcopy
from pathlib import Path

from common import nnunet_folders, plan_small_configuration
from target_transport import afids_like_loader, compare_loader_paths


def prepare_dataset(root: Path, dataset_id: int, shape, patch, base_features, max_features) -> None:
    nnunet_folders(root)
    os.environ.setdefault("nnUNet_compile", "false")
    from nnlandmark_h3de.demo.blob_dataset import make_blob_dataset
    make_blob_dataset(dataset_id, n_cases=5, shape_zyx=shape)
    plan_small_configuration(dataset_id, patch, base_features, max_features)


def network_cost(network, batch_size, in_channels, patch):
    """(parameters in M, forward GFLOPs for one batch) of a trainer's network, counted on a meta copy."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    params = sum(p.numel() for p in network.parameters()) / 1e6
    net = deepcopy(network).to("meta")
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        net(torch.empty(batch_size, in_channels, *patch, device="meta"))
    return params, fc.get_total_flops() / 1e9


def h3de_configuration(trainer, stock):
    """What nnH3DETrainer built: refinement depth, V-BRA stages; asserts the conv stages are the stock plan's."""
    import inspect
    from nnlandmark_h3de.networks.h3de_unet import H3DEUNet
    body = trainer.network.body
    assert isinstance(body, H3DEUNet), type(body)
    enc, ref = body.encoder, stock.network.encoder
    for attr in ("output_channels", "strides", "kernel_sizes"):
        assert str(getattr(enc, attr)) == str(getattr(ref, attr)), (attr, getattr(enc, attr), getattr(ref, attr))
    return {"n_conv_refinement": len(body.decoder.refinement.convs.convs),
            "h3de_kwargs": dict(type(trainer).h3de_kwargs),
            "h3deunet_default_n_conv_refinement":
                inspect.signature(H3DEUNet.__init__).parameters["n_conv_refinement"].default,
            "vbra_stages": list(body.vbra_stages),
            "features_per_stage": [int(c) for c in enc.output_channels]}


def make_trainer(cls, plans, configuration, dataset_json):
    import torch
    p = deepcopy(plans)
    p["continue_training"] = False
    t = cls(p, configuration, 0, dataset_json, device=torch.device("cpu"))
    t.initialize()
    t.set_deep_supervision_enabled(True)
    return t


def dense_transform(trainer, ds_scales, from_keypoints):
    """Today's last transform for this trainer's settings: dense heatmaps at every scale, per sample."""
    from nnlandmark_h3de.heatmaps import LandmarkHeatmapTransform
    points = trainer.build_points_transform()
    return LandmarkHeatmapTransform(points.num_landmarks, trainer.heatmap_sigma, ds_scales, points.expected_voxels,
                                    points.min_visible_fraction, from_keypoints=from_keypoints)


def landmark_points(seg_full, num_landmarks):
    """Per sample ball centres (B, L, 3), NaN = absent: the batch target of the product path."""
    import torch
    from nnlandmark_h3de.heatmaps import LandmarkPointsTransform
    t = LandmarkPointsTransform(num_landmarks)
    return torch.stack([t(segmentation=seg_full[b])["segmentation"] for b in range(seg_full.shape[0])])


def device_target_rows(trainer, args) -> dict:
    """Today's loader path vs the product path: the small configuration's own loader, and the AFIDs-like
    32 landmarks at 128^3 (see the module doc)."""
    import numpy as np
    from nnlandmark_h3de.heatmaps import GaussianTargets, LandmarkHeatmapTransform, LandmarkPointsTransform
    out = {}
    dl_train, dl_val = trainer.get_dataloaders()
    loader = dl_train.data_loader
    compose = loader.transforms.transforms
    new = compose.transforms[-1]
    ds_scales = trainer._get_deep_supervision_scales()
    out["small"] = compare_loader_paths(loader, compose, dense_transform(trainer, ds_scales, new.from_keypoints), new,
                                        trainer.targets_from_points, n_batches=max(3, args.steps // 2))
    for gen in (dl_train, dl_val):
        getattr(gen, "_finish", lambda: None)()
    if not args.no_large:
        np.random.seed(0)
        loader, compose, ds = afids_like_loader((128, 128, 128), 32, trainer.batch_size)
        out["afids_128"] = compare_loader_paths(
            loader, compose, LandmarkHeatmapTransform(32, trainer.heatmap_sigma, ds, from_keypoints=True),
            LandmarkPointsTransform(32, from_keypoints=True), GaussianTargets(trainer.heatmap_sigma, ds),
            n_batches=args.large_batches)
        out["afids_128"]["note"] = ("loader pipeline plus the drawing alone: a whole 128^3 training step is too slow "
                                    "on 2 CPU cores; the drawing's seconds are what it adds to a step")
    return out


def landmark_targets(transform, seg_full):
    """Per sample heatmaps at every scale (what the landmark pipeline's last transform makes), stacked."""
    per_sample = [transform(segmentation=seg_full[b])["segmentation"] for b in range(seg_full.shape[0])]
    import torch
    return [torch.stack([s[k] for s in per_sample]) for k in range(len(per_sample[0]))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-d", type=int, default=None, help="existing dataset id (with the configuration planned)")
    ap.add_argument("-c", default="3d_fullres_small", help="configuration (default 3d_fullres_small)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--shape", type=int, nargs=3, default=(56, 72, 72), help="generated image shape (z y x)")
    ap.add_argument("--patch", type=int, nargs=3, default=(48, 64, 64))
    ap.add_argument("--base_features", type=int, default=16)
    ap.add_argument("--max_features", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-refine2", action="store_true",
                    help="skip the informational nnH3DETrainer row with H3DEUNet's default 2 refinement convs")
    ap.add_argument("--no-large", action="store_true", help="skip the 32-landmark 128^3 loader comparison")
    ap.add_argument("--large_batches", type=int, default=3, help="measured batches of the 128^3 comparison")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    tmp = None
    dataset_id = args.d
    if dataset_id is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_train_step_")
        dataset_id = 987
        prepare_dataset(Path(tmp.name), dataset_id, args.shape, args.patch, args.base_features, args.max_features)
    os.environ["nnUNet_n_proc_DA"] = "0"

    import numpy as np
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
    from threadpoolctl import threadpool_limits
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnlandmark_h3de.training.nnLandmarkTrainer import nnLandmarkTrainer

    torch.set_num_threads(args.threads)
    name = maybe_convert_to_dataset_name(dataset_id)
    plans = load_json(os.path.join(nnUNet_preprocessed.get(), name, "nnUNetPlans.json"))
    dataset_json = load_json(os.path.join(nnUNet_preprocessed.get(), name, "dataset.json"))

    trainers = {"nnUNetTrainer": nnUNetTrainer, "nnLandmarkTrainer": nnLandmarkTrainer}
    try:
        from nnlandmark_h3de.training.nnH3DETrainer import nnH3DETrainer
        trainers["nnH3DETrainer"] = nnH3DETrainer
        if not args.no_refine2:
            trainers["nnH3DETrainer_refine2"] = type("nnH3DETrainer_refine2", (nnH3DETrainer,), {
                "h3de_kwargs": {**nnH3DETrainer.h3de_kwargs, "n_conv_refinement": 2}})
    except ImportError as e:
        print(f"nnH3DETrainer not importable ({e}); skipped")
    built = {k: make_trainer(cls, plans, args.c, dataset_json) for k, cls in trainers.items()}

    stock = built["nnUNetTrainer"]
    patch = list(stock.configuration_manager.patch_size)
    dl_train, _ = stock.get_dataloaders()
    torch.manual_seed(0)
    np.random.seed(0)
    batches = [next(dl_train) for _ in range(args.steps + args.warmup)]
    n_in = batches[0]["data"].shape[1]
    cost = {k: network_cost(t.network, stock.batch_size, n_in, patch) for k, t in built.items()}
    ds_scales = built["nnLandmarkTrainer"]._get_deep_supervision_scales()
    lm = built["nnLandmarkTrainer"]
    heat = dense_transform(lm, ds_scales, from_keypoints=False)
    downsample = DownsampleSegForDSTransform(ds_scales)  # the stock transform the heatmaps replace
    full_segs = [b["target"][0] if isinstance(b["target"], list) else b["target"] for b in batches]
    lm_batches = [{"data": b["data"], "target": landmark_points(s, lm.num_landmarks)} for b, s in zip(batches, full_segs)]
    dense_batches = [{"data": b["data"], "target": landmark_targets(heat, s)} for b, s in zip(batches, full_segs)]

    times = {k: [] for k in built}
    today_times = []  # the landmark trainer's step as it was: nnU-Net's train step on dense targets
    transform_times, downsample_times = [], []
    for i in range(args.warmup + args.steps):
        # per-sample transforms timed as nnU-Net's data loader runs them: inside threadpool_limits(1)
        with threadpool_limits(limits=1, user_api=None):
            t0 = time.perf_counter()
            landmark_targets(heat, full_segs[i])
            t1 = time.perf_counter()
            for b in range(full_segs[i].shape[0]):
                downsample(segmentation=full_segs[i][b])
            t2 = time.perf_counter()
        if i >= args.warmup:
            transform_times.append(t1 - t0)
            downsample_times.append(t2 - t1)
        order = list(built.items())
        for k, t in (order if i % 2 == 0 else order[::-1]):  # alternate who goes first
            batch = batches[i] if k == "nnUNetTrainer" else lm_batches[i]
            t.network.train()
            t0 = time.perf_counter()
            t.train_step(batch)
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                times[k].append(dt)
        t0 = time.perf_counter()
        nnUNetTrainer.train_step(lm, dense_batches[i])
        if i >= args.warmup:
            today_times.append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    device = device_target_rows(lm, args)
    step_ratio = statistics.median(a / b for a, b in zip(times["nnLandmarkTrainer"], today_times))
    device_ratios = {key: {case: row[key] for case, row in device.items()}
                     for key in ("loader_bytes_per_batch_ratio", "loader_time_per_batch_ratio")}
    device_ratios["step_time_ratio_device_targets"] = {"small": step_ratio, "afids_128": None}
    # paired: each step's time over the stock step of the same round (neighbours in time share the load)
    result = {f"ratio_{k}": statistics.median(a / b for a, b in zip(times[k], times["nnUNetTrainer"]))
              for k in med if k != "nnUNetTrainer"}
    result["median_ratios_unpaired"] = {k: med[k] / med["nnUNetTrainer"] for k in med if k != "nnUNetTrainer"}
    result["heatmap_transform_ratio"] = statistics.median(transform_times) / med["nnUNetTrainer"]
    result.update(device_ratios)
    result["device_targets"] = device
    result["median_step_s_dense_targets_today"] = statistics.median(today_times)
    result["median_step_s"] = med
    result["heatmap_transform_s"] = statistics.median(transform_times)
    result["stock_downsample_seg_s"] = statistics.median(downsample_times)
    result["params_M"] = {k: c[0] for k, c in cost.items()}
    result["gflops_fwd_batch"] = {k: c[1] for k, c in cost.items()}
    result["params_ratio"] = {k: cost[k][0] / cost["nnUNetTrainer"][0] for k in cost if k != "nnUNetTrainer"}
    result["flops_ratio"] = {k: cost[k][1] / cost["nnUNetTrainer"][1] for k in cost if k != "nnUNetTrainer"}
    for k in built:
        if k.startswith("nnH3DETrainer"):
            result[f"config_{k}"] = h3de_configuration(built[k], stock)
    result.update({"configuration": args.c, "patch_size": patch, "batch_size": stock.batch_size,
                   "steps": args.steps, "warmup": args.warmup, "threads": args.threads})
    print(f"configuration {args.c}: patch {patch}, batch {stock.batch_size}, features "
          f"{[int(c) for c in stock.network.encoder.output_channels]} (the same plans for every row)")
    for k in built:
        if k.startswith("nnH3DETrainer"):
            c = result[f"config_{k}"]
            print(f"{k}: H3DEUNet with {c['n_conv_refinement']} full-resolution refinement conv(s) "
                  f"(H3DEUNet default {c['h3deunet_default_n_conv_refinement']}; trainer h3de_kwargs {c['h3de_kwargs']}), "
                  f"V-BRA stages {c['vbra_stages']}")
    print(f"{'':>22s}  {'s/step':>7s}  {'x stock':>7s}  {'params M':>8s}  {'x stock':>7s}  {'GFLOPs fwd':>10s}  {'x stock':>7s}")
    for k, v in med.items():
        r = 1.0 if k == "nnUNetTrainer" else result[f"ratio_{k}"]
        pr = 1.0 if k == "nnUNetTrainer" else result["params_ratio"][k]
        fr = 1.0 if k == "nnUNetTrainer" else result["flops_ratio"][k]
        print(f"{k:>22s}  {v:7.3f}  {r:7.3f}  {cost[k][0]:8.3f}  {pr:7.3f}  {cost[k][1]:10.2f}  {fr:7.3f}")
    for k, v in med.items():
        print(f"{k:>22s}: median {v:.3f} s/step over {args.steps} steps (all: {np.round(times[k], 3).tolist()})")
    print(f"heatmap transform: {result['heatmap_transform_s'] * 1e3:.1f} ms per batch, one thread "
          f"({100 * result['heatmap_transform_ratio']:.1f} % of a stock step; it replaces nnU-Net's "
          f"DownsampleSegForDSTransform: {result['stock_downsample_seg_s'] * 1e3:.1f} ms)")
    for case, row in device.items():
        print(f"targets on the device, {case}: loader bytes {row['loader_bytes_per_batch']['old'] / 1e6:.1f} -> "
              f"{row['loader_bytes_per_batch']['new'] / 1e6:.1f} MB per batch (x{row['loader_bytes_per_batch_ratio']:.1f}), "
              f"worker CPU {row['loader_cpu_s_per_batch']['old']:.3f} -> {row['loader_cpu_s_per_batch']['new']:.3f} s "
              f"(x{row['loader_time_per_batch_ratio']:.2f}), drawing {row['device_drawing_s_per_batch']:.3f} s, "
              f"max |dense - device| {row['max_abs_diff_dense_vs_device']:.2g}")
    print(f"step with device targets / today's step on dense targets (small): {step_ratio:.3f} (target <= 1.05: "
          f"{'met' if step_ratio <= 1.05 else 'NOT met'}); 128^3: {device.get('afids_128', {}).get('note', 'skipped')}")
    targets = {"ratio_nnLandmarkTrainer": 1.15, "ratio_nnH3DETrainer": 2.0}
    for k in result:
        if k.startswith("ratio_"):
            verdict = "" if k not in targets else \
                f" (target <= {targets[k]}: {'met' if result[k] <= targets[k] else 'NOT met'})"
            print(f"{k} = {result[k]:.3f}{verdict}")
    if args.json:
        print(json.dumps(result))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
