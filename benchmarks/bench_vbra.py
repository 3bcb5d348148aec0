"""V-BRA speed and memory against a public-code-style naive V-BRA and dense global SDPA, same run.

For 4k..32k tokens (tokens per region held fixed) and two settings
  A: C=64, 8 heads, top-k 1, regions of 8x8x8 tokens  (H3DE's first attention stage: 32x32x16, 4x4x2 regions)
  B: C=128, 8 heads, top-k 4, regions of 4x4x4 tokens (H3DE's second stage geometry)
each case runs forward+backward in its own subprocess (1 torch thread by default). Peak memory = peak RSS (VmHWM, reset through
/proc/self/clear_refs) minus RSS just before the run, with glibc's mmap threshold fixed at 64 KiB so
freed tensors really leave the process (torch's CPU allocator does not cache). Time = median over the
repeats after that first run of the process CPU time (user + sys of all threads, which other jobs on a
shared machine barely disturb); the wall time is reported too. Also: parameters and forward FLOPs (FlopCounterMode, meta tensors) of
H3DEUNet vs nnU-Net's PlainConvUNet for the same plans.

    python benchmarks/bench_vbra.py [--quick] [--json] [--repeats 3] [--threads 1] [--dense-32k]

With --json the LAST line is one JSON object. Headline ratios are the worse of settings A and B.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnlandmark_h3de.networks.building_blocks.vbra import VBRA, _from_regions, _to_regions

SETTINGS = {
    "A": dict(dim=64, num_heads=8, topk=1, region_size=(8, 8, 8)),
    "B": dict(dim=128, num_heads=8, topk=4, region_size=(4, 4, 4)),
}
SHAPES = {4096: (16, 16, 16), 8192: (32, 16, 16), 16384: (32, 32, 16), 32768: (32, 32, 32)}


class NaiveVBRA(VBRA):
    """The public code's formulation: gather K/V for every query region (k copies, shape (B, R, k, T, 2C))
    and materialise the (T x kT) attention matrix per region and head. Same parameters as VBRA; sizes
    must divide the region grid (the public code's padding does not work otherwise)."""

    def forward_tokens(self, x):
        b, *spatial, c = x.shape
        rsize = tuple(self.region_size)
        grid = tuple(s // r for s, r in zip(spatial, rsize))
        assert all(g * r == s for g, r, s in zip(grid, rsize, spatial)), "naive V-BRA needs divisible sizes"
        n_reg, k_top, h, hd = int(np.prod(grid)), min(self.topk, int(np.prod(grid))), self.num_heads, self.head_dim
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        lepe = self.lepe(v.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)
        q, k, v = (_to_regions(t, grid, rsize) for t in (q, k, v))
        t = q.shape[2]
        idx = torch.topk(q.mean(2).detach() @ k.mean(2).detach().transpose(1, 2), k_top, dim=-1).indices
        kv = torch.cat((k, v), -1)  # (B, R, T, 2C)
        kv_sel = torch.gather(kv[:, None].expand(-1, n_reg, -1, -1, -1), 2,
                              idx[..., None, None].expand(-1, -1, -1, t, 2 * c))  # (B, R, k, T, 2C)
        k_sel, v_sel = kv_sel.reshape(b * n_reg, k_top * t, 2 * c).chunk(2, dim=-1)
        q = q.reshape(b * n_reg, t, h, hd).transpose(1, 2)
        k_sel = k_sel.reshape(b * n_reg, k_top * t, h, hd).transpose(1, 2)
        v_sel = v_sel.reshape(b * n_reg, k_top * t, h, hd).transpose(1, 2)
        attn = ((q * self.scale) @ k_sel.transpose(-1, -2)).softmax(-1)  # (B*R, h, T, kT) materialised
        out = (attn @ v_sel).transpose(1, 2).reshape(b, n_reg, t, c)
        return self.proj(_from_regions(out, grid, rsize) + lepe)


class DenseAttention(nn.Module):
    """Global multi-head attention over all tokens through scaled_dot_product_attention (fused kernel)."""

    def __init__(self, dim, num_heads=8, **_):
        super().__init__()
        self.num_heads = num_heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, c, *spatial = x.shape
        tok = x.flatten(2).transpose(1, 2)
        q, k, v = (t.view(b, -1, self.num_heads, c // self.num_heads).transpose(1, 2)
                   for t in self.qkv(tok).chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, c)
        return self.proj(out).transpose(1, 2).reshape(b, c, *spatial)


METHODS = {"vbra": VBRA, "naive": NaiveVBRA, "dense": DenseAttention}


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def run_case(method, setting, n_tokens, repeats, threads):
    """In a fresh process: peak RSS delta of one forward+backward, then the median times of `repeats`."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    m = METHODS[method](**SETTINGS[setting])

    def step(shape):
        x = torch.randn(1, SETTINGS[setting]["dim"], *shape, requires_grad=True)
        m(x).sum().backward()
        m.zero_grad(set_to_none=True)

    step((8, 8, 8))  # load kernels, thread pools
    x = torch.randn(1, SETTINGS[setting]["dim"], *SHAPES[n_tokens], requires_grad=True)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    rss0 = _status("VmRSS")
    m(x).sum().backward()
    peak = _status("VmHWM") - rss0
    cpu, wall = [], []
    for _ in range(repeats):
        m.zero_grad(set_to_none=True)
        x.grad = None
        c0, t0 = time.process_time(), time.perf_counter()
        m(x).sum().backward()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - t0)
    return {"peak_mb": peak / 2 ** 20, "cpu_s": statistics.median(cpu), "wall_s": statistics.median(wall)}


def measure(method, setting, n_tokens, repeats, threads):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, os.path.abspath(__file__), "--_case",
           json.dumps([method, setting, n_tokens, repeats, threads])]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def check_naive_equals_vbra():
    """The naive baseline computes the same function (otherwise the comparison means nothing)."""
    torch.manual_seed(0)
    ours = VBRA(32, 4, region_size=(4, 4, 4), topk=2).double()
    naive = NaiveVBRA(32, 4, region_size=(4, 4, 4), topk=2).double()
    naive.load_state_dict(ours.state_dict())
    x = torch.randn(1, 32, 8, 8, 12, dtype=torch.float64)
    return (ours(x) - naive(x)).abs().max().item()


def network_cost():
    """Params and forward GFLOPs of H3DEUNet vs PlainConvUNet for a typical 3d_fullres plan (128^3 patch)."""
    from torch.utils.flop_counter import FlopCounterMode
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from nnlandmark_h3de.networks.h3de_unet import H3DEUNet
    patch = (128, 128, 128)
    kw = dict(input_channels=1, n_stages=6, features_per_stage=[32, 64, 128, 256, 320, 320], conv_op=nn.Conv3d,
              kernel_sizes=[[3, 3, 3]] * 6, strides=[[1, 1, 1]] + [[2, 2, 2]] * 5, n_conv_per_stage=[2] * 6,
              num_classes=11, n_conv_per_stage_decoder=[2] * 5, conv_bias=True, norm_op=nn.InstanceNorm3d,
              norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True},
              deep_supervision=True)
    out = {"plan": f"patch {patch}, 6 stages 32..320, 10 landmarks + zero channel"}
    for name, cls, extra in (("plain", PlainConvUNet, {}), ("h3de", H3DEUNet, {"patch_size": patch})):
        with torch.device("meta"):
            net = cls(**kw, **extra)
            x = torch.empty(1, 1, *patch)
            with FlopCounterMode(display=False) as fc:
                net(x)
        out[f"params_{name}_M"] = sum(p.numel() for p in net.parameters()) / 1e6
        out[f"gflops_fwd_{name}"] = fc.get_total_flops() / 1e9
        if name == "h3de":
            out["h3de_vbra_stages"] = net.vbra_stages
    out["params_ratio_h3de_vs_plain"] = out["params_h3de_M"] / out["params_plain_M"]
    out["flops_ratio_h3de_vs_plain"] = out["gflops_fwd_h3de"] / out["gflops_fwd_plain"]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4k/8k/16k only, baselines at 16k only, 1 repeat")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch threads per case (CPU time counts all)")
    p.add_argument("--dense-32k", action="store_true", help="also run the baselines at 32k tokens (slow)")
    p.add_argument("--_case", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._case:
        print(json.dumps(run_case(*json.loads(a._case))))
        return

    repeats = a.repeats or (1 if a.quick else 3)
    vbra_sizes = [4096, 8192, 16384] if a.quick else [4096, 8192, 16384, 32768]
    base_sizes = [16384] if a.quick else ([4096, 8192, 16384, 32768] if a.dense_32k else [4096, 8192, 16384])
    diff = check_naive_equals_vbra()
    print(f"naive vs ours, same weights, float64: max |diff| = {diff:.2e}")

    res = {}
    for setting in SETTINGS:
        for n in vbra_sizes:
            for method in ("vbra", "naive", "dense"):
                if method != "vbra" and n not in base_sizes:
                    continue
                r = measure(method, setting, n, repeats, a.threads)
                res[(setting, method, n)] = r
                print(f"{setting}  {method:6s} {n:6d} tokens  cpu {r['cpu_s'] * 1e3:9.1f} ms  "
                      f"(wall {r['wall_s'] * 1e3:9.1f} ms)  peak {r['peak_mb']:8.1f} MB", flush=True)

    summary = {"naive_equals_vbra_maxdiff": diff, "repeats": repeats, "threads": a.threads, "settings": {k: {**v, "region_size": list(
        v["region_size"])} for k, v in SETTINGS.items()}}
    print("\nsetting | time vbra/dense | mem vbra/naive | mem vbra/dense | time vbra/naive | exponent (vbra time ~ N^p)")
    for s in SETTINGS:
        v, nv, d = (res[(s, m, 16384)] for m in ("vbra", "naive", "dense"))
        ns = np.array(vbra_sizes, float)
        ts = np.array([res[(s, "vbra", n)]["cpu_s"] for n in vbra_sizes])
        expo = float(np.polyfit(np.log(ns), np.log(ts), 1)[0])
        summary[s] = {"time_ratio_vbra_vs_dense_16k": v["cpu_s"] / d["cpu_s"],
                      "time_ratio_vbra_vs_naive_16k": v["cpu_s"] / nv["cpu_s"],
                      "mem_ratio_vbra_vs_naive_16k": v["peak_mb"] / nv["peak_mb"],
                      "mem_ratio_vbra_vs_dense_16k": v["peak_mb"] / d["peak_mb"],
                      "time_exponent_vbra": expo,
                      "cases": {f"{m}_{n}": res[(s, m, n)] for (ss, m, n) in res if ss == s}}
        r = summary[s]
        print(f"   {s}    | {r['time_ratio_vbra_vs_dense_16k']:15.3f} | {r['mem_ratio_vbra_vs_naive_16k']:14.3f} | "
              f"{r['mem_ratio_vbra_vs_dense_16k']:14.3f} | {r['time_ratio_vbra_vs_naive_16k']:15.3f} | {expo:.2f}")
    for key in ("time_ratio_vbra_vs_dense_16k", "mem_ratio_vbra_vs_naive_16k", "mem_ratio_vbra_vs_dense_16k",
                "time_exponent_vbra", "time_ratio_vbra_vs_naive_16k"):
        summary[key] = max(summary[s][key] for s in SETTINGS)  # the worse setting
    targets = {"mem_ratio_vbra_vs_naive_16k": 0.25, "mem_ratio_vbra_vs_dense_16k": 2.0,
               "time_ratio_vbra_vs_dense_16k": 0.1, "time_exponent_vbra": 1.5}
    summary["targets_met"] = {k: summary[k] <= t for k, t in targets.items()}
    print("\nworst of A/B vs target: " + ", ".join(f"{k} = {summary[k]:.3f} (<= {t}: {summary[k] <= t})"
                                                  for k, t in targets.items()))

    net = network_cost()
    summary["network"] = net
    print(f"\nnetwork ({net['plan']}): params plain {net['params_plain_M']:.2f} M, H3DE {net['params_h3de_M']:.2f} M "
          f"(x{net['params_ratio_h3de_vs_plain']:.2f}); forward GFLOPs plain {net['gflops_fwd_plain']:.1f}, "
          f"H3DE {net['gflops_fwd_h3de']:.1f} (x{net['flops_ratio_h3de_vs_plain']:.2f}); "
          f"V-BRA stages {net['h3de_vbra_stages']}")
    if a.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
