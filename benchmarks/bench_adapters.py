"""Landmark adapters: what they cost, and (with --train) what they change per landmark.

Part 1 (always): the same network (nnU-Net PlainConvUNet and H3DEUNet, small-configuration sizes)
with its final 1x1 heatmap conv vs with a LandmarkAdapterHead (C_A per landmark), for L landmarks:
parameters, forward FLOPs (torch.utils.flop_counter), CPU time of forward + backward; ratios
adapters / plain from the same run. Also the adapter head alone vs a naive per-landmark loop of
separate convs (same maths; the vectorised implementation's reason to exist).

Part 2 (--train): the phantom dataset of bench_absent_landmarks (all landmarks present), the same
number of epochs for nnLandmarkTrainer and nnLandmarkTrainerAdapter, held-out per-landmark MRE
(mm) and its spread over landmarks.

    python benchmarks/bench_adapters.py                  # part 1, ~1 min
    python benchmarks/bench_adapters.py --train --out /tmp/bench_adapters --epochs 30
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn


def build(kind: str, num_landmarks: int, features, patch):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from nnlandmark_h3de.networks.h3de_unet import H3DEUNet
    n = len(features)
    kw = dict(input_channels=1, n_stages=n, features_per_stage=list(features), conv_op=nn.Conv3d, kernel_sizes=3,
              strides=[1] + [2] * (n - 1), n_conv_per_stage=2, num_classes=num_landmarks,
              n_conv_per_stage_decoder=2, conv_bias=True, norm_op=nn.InstanceNorm3d,
              norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True},
              deep_supervision=True)
    if kind == "unet":
        return PlainConvUNet(**kw)
    return H3DEUNet(**kw, patch_size=list(patch))


class NaiveAdapterHead(nn.Module):
    """Reference: one conv stack and one 1x1 per landmark, in a Python loop."""

    def __init__(self, c_in: int, num_landmarks: int, c_a: int):
        super().__init__()
        self.adapters = nn.ModuleList(nn.Sequential(nn.Conv3d(c_in, c_a, 3, 1, 1), nn.InstanceNorm3d(c_a, affine=True),
                                                    nn.LeakyReLU(inplace=True)) for _ in range(num_landmarks))
        self.heads = nn.ModuleList(nn.Conv3d(c_in + c_a, 1, 1) for _ in range(num_landmarks))

    def forward(self, x):
        return torch.cat([h(torch.cat((x, a(x)), 1)) for a, h in zip(self.adapters, self.heads)], 1)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def fwd_flops(m: nn.Module, x) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        m(x)
    return fc.get_total_flops()


def step_time(m: nn.Module, x, reps: int) -> float:
    """Median seconds of forward + backward (sum of all outputs)."""
    def once():
        out = m(x)
        out = out if isinstance(out, (list, tuple)) else [out]
        sum(o.float().sum() for o in out).backward()
    once()  # warm-up
    times = []
    for _ in range(reps):
        m.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def part1(args):
    from nnlandmark_h3de.networks.building_blocks.landmark_adapters import LandmarkAdapterHead, attach_adapter_head
    x = torch.randn(args.batch, 1, *args.patch)
    rows = []
    for kind in args.networks:
        for L, k in [(L, k) for L in args.landmarks for k in args.adapter_kernels]:
            torch.manual_seed(0)
            plain = build(kind, L, args.features, args.patch)
            torch.manual_seed(0)
            adapted = attach_adapter_head(build(kind, L, args.features, args.patch), args.adapter_channels, k)
            r = {"network": kind, "L": L, "adapter_kernel": k, "params_plain": n_params(plain), "params_adapter": n_params(adapted),
                 "gflops_plain": fwd_flops(plain, x) / 1e9, "gflops_adapter": fwd_flops(adapted, x) / 1e9,
                 "s_plain": step_time(plain, x, args.reps), "s_adapter": step_time(adapted, x, args.reps)}
            rows.append(r)
            print(f"{kind:5s} L={L:3d} k={k}  params {r['params_plain'] / 1e6:7.3f} M -> {r['params_adapter'] / 1e6:7.3f} M "
                  f"(x{r['params_adapter'] / r['params_plain']:.3f})  fwd GFLOPs {r['gflops_plain']:7.2f} -> "
                  f"{r['gflops_adapter']:7.2f} (x{r['gflops_adapter'] / r['gflops_plain']:.3f})  fwd+bwd "
                  f"{r['s_plain']:.3f} s -> {r['s_adapter']:.3f} s (x{r['s_adapter'] / r['s_plain']:.3f})", flush=True)
    # the head alone: grouped (ours) vs per-landmark loop, same shapes
    c0 = args.features[0]
    feats = torch.randn(args.batch, c0, *args.patch)
    heads = []
    for L in args.landmarks:
        torch.manual_seed(0)
        ours = LandmarkAdapterHead(nn.Conv3d, c0, L, args.adapter_channels, norm_op=nn.InstanceNorm3d,
                                   norm_op_kwargs={"affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})
        naive = NaiveAdapterHead(c0, L, args.adapter_channels)
        h = {"L": L, "s_grouped": step_time(ours, feats, args.reps), "s_loop": step_time(naive, feats, args.reps),
             "params_grouped": n_params(ours), "params_loop": n_params(naive)}
        heads.append(h)
        print(f"head alone L={L:3d}: vectorised {h['s_grouped']:.3f} s, per-landmark loop {h['s_loop']:.3f} s "
              f"(loop / vectorised x{h['s_loop'] / h['s_grouped']:.2f}); params {h['params_grouped']} vs {h['params_loop']}",
              flush=True)
    return {"networks": rows, "head_alone": heads}


def part2(args):
    import numpy as np
    import bench_absent_landmarks as ba
    out = Path(args.out)
    ba.setup_environment(out)
    from nnlandmark_h3de.landmarks.dataset_file import load_dataset_landmarks
    from nnlandmark_h3de.training.adapter_trainers import nnLandmarkTrainerAdapter
    from nnlandmark_h3de.training.nnLandmarkTrainer import nnLandmarkTrainer
    dargs = ba.parse_args(["--n-train", str(args.n_train), "--n-val", str(args.n_val), "--n-test", str(args.n_test),
                           "--absent-fraction", "0", "--seed", str(args.seed)])
    raw, pre, test = ba.make_dataset(dargs, out, dataset_id=902)
    names = json.loads((raw / "dataset.json").read_text())["landmarks"]["names"]
    ref = {k: v.reordered(names) for k, v in load_dataset_landmarks(raw / "landmarks.json").items()}
    ref_pts = np.array([ref[c].points_lps for c in test])
    res = {}
    for label, cls in (("plain", nnLandmarkTrainer), ("adapters", nnLandmarkTrainerAdapter)):
        torch.manual_seed(args.seed)
        trainer, t_train, *_ = ba.train(cls, pre, 60 * args.minutes, args.epochs, args.iterations)
        pred = ba.predict_test(trainer, raw, test, anchors=False)
        err = np.linalg.norm(np.array([pred[c]["peak_points"] for c in test]) - ref_pts, axis=-1)  # (cases, L)
        per = np.nanmean(err, 0)
        res[label] = {"per_landmark_mre_mm": dict(zip(names, map(float, per))), "mre_mm": float(np.nanmean(err)),
                      "spread_std_mm": float(np.std(per)), "worst_mm": float(per.max()), "train_s": t_train,
                      "epochs": trainer.current_epoch}
        print(f"[{label}] MRE {res[label]['mre_mm']:.2f} mm, per-landmark std {res[label]['spread_std_mm']:.2f} mm, "
              f"worst {res[label]['worst_mm']:.2f} mm, {trainer.current_epoch} epochs, {t_train:.0f} s", flush=True)
    print(f"adapters / plain: MRE x{res['adapters']['mre_mm'] / res['plain']['mre_mm']:.3f}, per-landmark spread "
          f"x{res['adapters']['spread_std_mm'] / res['plain']['spread_std_mm']:.3f}")
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--networks", nargs="+", default=["unet", "h3de"], choices=["unet", "h3de"])
    p.add_argument("--landmarks", nargs="+", type=int, default=[10, 32])
    p.add_argument("--features", nargs="+", type=int, default=[16, 32, 64, 128])
    p.add_argument("--patch", nargs=3, type=int, default=[48, 48, 48])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--adapter-channels", type=int, default=16)
    p.add_argument("--adapter-kernels", nargs="+", type=int, default=[3, 1], help="adapter conv kernel sizes")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--train", action="store_true", help="part 2: per-landmark errors with and without adapters")
    p.add_argument("--out", default="/tmp/bench_adapters")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--n-train", type=int, default=20)
    p.add_argument("--n-val", type=int, default=4)
    p.add_argument("--n-test", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {"args": vars(args), "cost": part1(args)}
    if args.train:
        results["accuracy"] = part2(args)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_adapters.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
