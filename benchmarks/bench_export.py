"""Landmark export: decode peaks in network space + map L points (ours) vs resample every heatmap to
the original grid then argmax (nnLandmark's public code, and nnU-Net's export path), same run.

A realistic case: 14 landmarks, network-space heatmaps (ideal network output: a Gaussian of sigma
2 voxels at the truth's network index) and the original grid twice as fine in every axis. The
baseline uses nnU-Net's own probability resampling (`resample_data_or_seg_to_shape`, order 1, the
planner's default for probabilities). Both sides start from the same in-memory heatmaps and end
with world points, scored against the known truth in mm.

Reported: time ratio (resample / ours; target >= 100), peak extra memory ratio (resample / ours,
numpy allocations measured with tracemalloc in a separate pass so timing is not disturbed), and
the mean / max world error of each. `--json`: the last line is one JSON object.

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

from nnlandmark_h3de.inference.index_mapping import network_index_to_world, world_to_network_index
from nnlandmark_h3de.inference.peaks import decode_peaks
from nnlandmark_h3de.landmarks import ImageGeometry

L = 14
SIGMA_VOX = 2.0


def make_case(net_shape, factor, rng, noise=0.0):
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
    for k, c in enumerate(centers):  # separable Gaussian: exact and fast to build
        g = [np.exp(-0.5 * ((ax - ci) / SIGMA_VOX) ** 2) for ax, ci in zip(axes, c)]
        heat[k] = g[0][:, None, None] * g[1][None, :, None] * g[2][None, None, :]
        if noise:  # a network's output is not an exact Gaussian
            heat[k] += rng.normal(0, noise, size=net_shape).astype(np.float32)
    return heat, props, plans, config, geo, truth


def ours(heat, props, plans, config):
    idx, _, _ = decode_peaks(heat)
    return network_index_to_world(idx, props, plans, config, network_shape=heat.shape[1:])


def resample_then_argmax(heat, props, plans, config, geo):
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape
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
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats for ours (best of); baseline runs once")
    ap.add_argument("--noise", type=float, default=0.01, help="additive Gaussian noise on the heatmaps (peak 1)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args(argv)
    net_shape = (48, 64, 64) if args.quick else (128, 256, 256) if args.full else (96, 128, 128)
    heat, props, plans, config, geo, truth = make_case(net_shape, 2, np.random.default_rng(0), args.noise)
    print(f"{L} landmarks, network {net_shape} -> original {props['shape_before_cropping']} "
          f"(heatmaps {heat.nbytes / 2**20:.0f} MiB float32, noise sd {args.noise})")

    t_ours, p_ours = timed(lambda: ours(heat, props, plans, config), args.repeats)
    t_res, p_res = timed(lambda: resample_then_argmax(heat, props, plans, config, geo), 1)
    m_ours = peak_alloc(lambda: ours(heat, props, plans, config))
    m_res = peak_alloc(lambda: resample_then_argmax(heat, props, plans, config, geo))
    e_ours = np.linalg.norm(p_ours - truth, axis=1)
    e_res = np.linalg.norm(p_res - truth, axis=1)

    print(f"ours (decode in network space + map): {t_ours * 1e3:9.1f} ms, peak extra {m_ours / 2**20:9.3f} MiB, "
          f"error mean {e_ours.mean():.3f} max {e_ours.max():.3f} mm")
    print(f"resample all heatmaps + argmax:      {t_res * 1e3:9.1f} ms, peak extra {m_res / 2**20:9.3f} MiB, "
          f"error mean {e_res.mean():.3f} max {e_res.max():.3f} mm")
    result = {"noise": args.noise, "net_shape": list(net_shape), "orig_shape": list(props["shape_before_cropping"]), "landmarks": L,
              "t_ours_s": t_ours, "t_resample_s": t_res, "speedup_vs_resample": t_res / t_ours,
              "mem_ours_bytes": m_ours, "mem_resample_bytes": m_res, "mem_ratio_vs_resample": m_res / max(m_ours, 1),
              "err_ours_mm": float(e_ours.mean()), "err_resample_mm": float(e_res.mean()),
              "err_ours_max_mm": float(e_ours.max()), "err_resample_max_mm": float(e_res.max())}
    print(f"speedup x{result['speedup_vs_resample']:.0f} (target >= 100), memory x{result['mem_ratio_vs_resample']:.0f} "
          f"less, error ours {result['err_ours_mm']:.3f} vs resample {result['err_resample_mm']:.3f} mm "
          f"({'ours no worse' if result['err_ours_mm'] <= result['err_resample_mm'] else 'OURS WORSE'})")
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
