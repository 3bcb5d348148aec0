"""Landmark export: decode peaks in network space + map L points (ours) vs resample every heatmap to
the original grid then argmax (nnLandmark's public code, and nnU-Net's export path) vs the cheap
alternative "integer argmax in network space, then map the point", same run.

A realistic case: 14 landmarks and the original grid twice as fine in every axis. Heatmaps of four
kinds, because a trained network's output is not a perfect Gaussian: `gaussian` (sigma 2 voxels at
the truth's network index, plus --noise), `noisy` (noise sd 0.05), `asymmetric` (sigma 1.5 on one
side of the peak and 3 on the other, per axis: the true point is still the maximum), `multipeak`
(a second blob of height 0.6, 12 voxels away). The baseline uses nnU-Net's own probability
resampling (`resample_data_or_seg_to_shape`, order 1, the planner's default for probabilities).
Every arm starts from the same in-memory heatmaps and ends with world points, scored against the
known truth in mm.

Reported: warm times (imports done before, best of --repeats for every arm, on the `gaussian` kind),
time ratios (resample / ours; target >= 100; network argmax / ours), peak extra memory ratio
(resample / ours, numpy allocations measured with tracemalloc in a separate pass so timing is not
disturbed), and the mean / max world error of each arm on each kind. `--json`: the last line is
one JSON object (old keys kept; errors of the other kinds under `errors_by_kind`).

    python benchmarks/bench_export.py            # network 96x128x128 -> original 192x256x256
    python benchmarks/bench_export.py --quick    # network 48x64x64   -> original 96x128x128
    python benchmarks/bench_export.py --full     # network 128x256x256 -> original 256x512x512 (~4 GB for the baseline)
"""
from __future__ import annotations

import argparse
import json
import time
import tracemalloc
from types import SimpleNamespace

import numpy as np

from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

from nnlandmark_h3de.inference.index_mapping import network_index_to_world, world_to_network_index
from nnlandmark_h3de.inference.peaks import decode_peaks
from nnlandmark_h3de.landmarks import ImageGeometry

L = 14
SIGMA_VOX = 2.0


KINDS = ("gaussian", "noisy", "asymmetric", "multipeak")


def blob(axes, centre, sigma_lo, sigma_hi):
    """Separable blob with its maximum 1 at `centre`; sigma_lo below the centre, sigma_hi above."""
    g = [np.exp(-0.5 * ((ax - c) / np.where(ax < c, sigma_lo, sigma_hi)) ** 2) for ax, c in zip(axes, centre)]
    return g[0][:, None, None] * g[1][None, :, None] * g[2][None, None, :]


def make_case(net_shape, factor, rng, noise=0.0, kind="gaussian"):
    """Original geometry (rotated, anisotropic), nnU-Net-like properties, truth points and heatmaps."""
    orig_shape = tuple(int(s * factor) for s in net_shape)  # (z, y, x)
    spacing_xyz = (0.4, 0.4, 0.8)
    a = np.deg2rad(10)
    direction = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    geo = ImageGeometry(orig_shape[::-1], spacing_xyz, (-50.0, 20.0, -30.0), tuple(direction.ravel()))
    props = {"sitk_stuff": {"spacing": geo.spacing, "origin": geo.origin, "direction": geo.direction},
             "spacing": list(geo.spacing_zyx), "shape_before_cropping": orig_shape,
             "bbox_used_for_cropping": [[0, s] for s in orig_shape],
             "shape_after_cropping_and_before_resampling": orig_shape}
    plans = SimpleNamespace(transpose_forward=[0, 1, 2], transpose_backward=[0, 1, 2])
    config = SimpleNamespace(spacing=[s * factor for s in geo.spacing_zyx])
    truth_zyx = rng.uniform(np.asarray(orig_shape) * 0.1, np.asarray(orig_shape) * 0.9, size=(L, 3))
    truth = geo.array_index_to_world(truth_zyx)
    centers = world_to_network_index(truth, props, plans, config, network_shape=net_shape)
    heat = np.empty((L, *net_shape), dtype=np.float32)
    axes = [np.arange(n, dtype=np.float32) for n in net_shape]
    noise = 0.05 if kind == "noisy" else noise
    for k, c in enumerate(centers):  # separable blobs: exact and fast to build
        lo, hi = (1.5, 3.0) if kind == "asymmetric" else (SIGMA_VOX, SIGMA_VOX)
        heat[k] = blob(axes, c, lo, hi)
        if kind == "multipeak":
            away = c + rng.choice([-1, 1], 3) * 12 / np.sqrt(3)
            heat[k] = np.maximum(heat[k], 0.6 * blob(axes, away, SIGMA_VOX, SIGMA_VOX))
        if noise:  # a network's output is not an exact Gaussian
            heat[k] += rng.normal(0, noise, size=net_shape).astype(np.float32)
    return heat, props, plans, config, geo, truth


def ours(heat, props, plans, config):
    idx, _, _ = decode_peaks(heat)
    return network_index_to_world(idx, props, plans, config, network_shape=heat.shape[1:])


def network_argmax(heat, props, plans, config):
    flat = heat.reshape(heat.shape[0], -1).argmax(axis=1)
    idx = np.stack(np.unravel_index(flat, heat.shape[1:]), axis=1).astype(np.float64)
    return network_index_to_world(idx, props, plans, config, network_shape=heat.shape[1:])


def resample_then_argmax(heat, props, plans, config, geo):
    full = resample_data_or_seg_to_shape(heat, props["shape_after_cropping_and_before_resampling"], config.spacing,
                                         props["spacing"], is_seg=False, order=1, order_z=0, force_separate_z=None)
    flat = full.reshape(full.shape[0], -1).argmax(axis=1)
    idx = np.stack(np.unravel_index(flat, full.shape[1:]), axis=1)
    return geo.array_index_to_world(idx)


def timed(fn, repeats):
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def peak_alloc(fn):
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    fn()
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return peak


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="network 48x64x64 -> original 96x128x128")
    size.add_argument("--full", action="store_true", help="network 128x256x256 -> original 256x512x512 (several GB)")
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats for every arm (best of)")
    ap.add_argument("--noise", type=float, default=0.01, help="additive Gaussian noise on the `gaussian` heatmaps")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args(argv)
    net_shape = (48, 64, 64) if args.quick else (128, 256, 256) if args.full else (96, 128, 128)
    arms = {"ours": lambda h, c: ours(h, c[0], c[1], c[2]),
            "network_argmax": lambda h, c: network_argmax(h, c[0], c[1], c[2]),
            "resample": lambda h, c: resample_then_argmax(h, c[0], c[1], c[2], c[3])}
    errors, times, mem = {}, {}, {}
    for kind in KINDS:
        heat, props, plans, config, geo, truth = make_case(net_shape, 2, np.random.default_rng(0), args.noise, kind)
        ctx = (props, plans, config, geo)
        errors[kind] = {}
        for name, fn in arms.items():
            if kind == "gaussian":
                fn(heat, ctx)  # warm-up
                times[name], points = timed(lambda: fn(heat, ctx), args.repeats)
                mem[name] = peak_alloc(lambda: fn(heat, ctx))
            else:
                points = fn(heat, ctx)
            e = np.linalg.norm(points - truth, axis=1)
            errors[kind][name] = {"mean_mm": float(e.mean()), "max_mm": float(e.max())}
    print(f"{L} landmarks, network {net_shape} -> original {props['shape_before_cropping']} "
          f"(heatmaps {heat.nbytes / 2**20:.0f} MiB float32)")
    for name in arms:
        print(f"{name:>15}: {times[name] * 1e3:9.1f} ms, peak extra {mem[name] / 2**20:9.3f} MiB; error mean/max mm " +
              ", ".join(f"{k} {errors[k][name]['mean_mm']:.3f}/{errors[k][name]['max_mm']:.3f}" for k in KINDS))
    g = errors["gaussian"]
    result = {"noise": args.noise, "net_shape": list(net_shape), "orig_shape": list(props["shape_before_cropping"]),
              "landmarks": L, "repeats": args.repeats,
              "t_ours_s": times["ours"], "t_resample_s": times["resample"], "t_network_argmax_s": times["network_argmax"],
              "speedup_vs_resample": times["resample"] / times["ours"],
              "speedup_vs_network_argmax": times["network_argmax"] / times["ours"],
              "mem_ours_bytes": mem["ours"], "mem_resample_bytes": mem["resample"],
              "mem_ratio_vs_resample": mem["resample"] / max(mem["ours"], 1),
              "err_ours_mm": g["ours"]["mean_mm"], "err_resample_mm": g["resample"]["mean_mm"],
              "err_network_argmax_mm": g["network_argmax"]["mean_mm"],
              "err_ours_max_mm": g["ours"]["max_mm"], "err_resample_max_mm": g["resample"]["max_mm"],
              "errors_by_kind": errors}
    worse = [k for k in KINDS if errors[k]["ours"]["mean_mm"] > min(errors[k]["resample"]["mean_mm"],
                                                                      errors[k]["network_argmax"]["mean_mm"])]
    print(f"speedup x{result['speedup_vs_resample']:.0f} vs resample (target >= 100), "
          f"x{result['speedup_vs_network_argmax']:.2f} vs network argmax; memory x{result['mem_ratio_vs_resample']:.0f} "
          f"less than resample; ours {'no worse on every kind' if not worse else 'WORSE on ' + ', '.join(worse)}")
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
