"""Bi-level routing attention speed and memory, 3D (V-BRA, H3DE-Net) and 2D (BRA, HYATT-Net; the same
module with conv_op Conv2d), against the public code's gather (with explicit attention, and with the same
fused SDPA kernel as ours) and against dense global SDPA, all measured in the same run.

Region layout: the one H3DEUNet builds (default 64 regions: 4 per axis in 3D, 8 in 2D, whatever the
feature-map size; heads = channels // 32; top-k 1, 4, 16 from the finest V-BRA stage on). The two settings
per dimension are the first two V-BRA stages H3DEUNet picks (the first with <= 16384 tokens and the next);
`network_layout()` builds that network and the benchmark asserts the settings match it:
  3D, 3d_fullres plan, patch 64x128x128, features 32..320:
    A: stage 2, 16x32x32 = 16384 tokens, C=128, 4 heads, top-k 1, 4x4x4 regions (256 tokens each)
    B: stage 3, 8x16x16 = 2048 tokens, C=256, 8 heads, top-k 4, 4x4x4 regions (32 tokens each)
  2D, 2d plan, patch 512x512, features 32..512:
    A: stage 2, 128x128 = 16384 tokens, C=128, 4 heads, top-k 1, 8x8 regions (256 tokens each)
    B: stage 3, 64x64 = 4096 tokens, C=256, 8 heads, top-k 4, 8x8 regions (64 tokens each)
With --quick/--full both are run at 4k..32k tokens with the region count held fixed (tokens per region grow
with the patch, as in H3DEUNet), so the time exponent is the one a growing patch sees; with --full B is also
run at its real size. A at 16k is what the network really runs; B at 16k is the chunked-K/V path under load.

Arms (all but dense compute the same function with the same weights; checked before timing):
  vbra         ours: region-index gather (index_select on (B*R, T, C)), fused SDPA, K/V in top-k chunks
               recomputed in backward when top-k > 1
  naive        public BiFormer/H3DE code: KVGather (torch.gather on K/V expanded to (B, R, R, T, 2C)),
               explicit attention matrix (T x kT per region and head)
  naive_fused  the same public gather + F.scaled_dot_product_attention (the one-line kernel swap)
  vbra_1chunk  ours with kv_chunks=1 (region-index gather, no chunking/recompute; = vbra when top-k 1)
  dense        global multi-head SDPA over all tokens (another function; a scale reference)

Every (dimension, setting, size) runs in one fresh subprocess (1 torch thread by default): first each arm's
peak memory of one forward+backward (peak RSS, VmHWM reset through /proc/self/clear_refs, minus RSS just
before; glibc's mmap threshold fixed at 64 KiB so freed tensors really leave the process), then the equality
check, then `repeats` rounds in which every arm runs one forward+backward, the arm order rotating each
round. Time = process CPU time (user + sys); ratios are the median over rounds of the per-round ratio
(arms of one round share the machine's load). Also: parameters and forward FLOPs (FlopCounterMode, meta
tensors) of H3DEUNet vs nnU-Net's PlainConvUNet (3D: 128^3 plan, 2D: 512^2 plan).

Runs: default   every arm at 1024 tokens, 3 rounds (a short check of both dimensions, ~30 s; no exponent,
                and the targets are defined at 16k tokens: at 1k tokens fixed costs dominate the ratios)
      --quick   4k/8k/16k, baselines at 16k only, 2 rounds
      --full    4k..32k, baselines 4k..16k (32k with --dense-32k), 5 rounds, B at its real size
                (the README's 3D row: --full --dims 3)

    python benchmarks/bench_vbra.py [--quick | --full] [--dims 2 3] [--json] [--repeats N] [--threads 1]
                                    [--dense-32k]

With --json the LAST line is one JSON object, one entry per dimension ("3d", "2d"). Headline ratios are the
worse (larger) of settings A and B; per-setting values are under "A" and "B".
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
from einops import rearrange

from nnlandmark_h3de.networks.building_blocks.vbra import VBRA

PLAN_PATCH = {3: (64, 128, 128), 2: (512, 512)}
PLAN_FEATURES = {3: [32, 64, 128, 256, 320, 320], 2: [32, 64, 128, 256, 512, 512, 512]}
COST_PATCH = {3: (128, 128, 128), 2: (512, 512)}  # network_cost's plan
SETTINGS = {  # the V-BRA modules H3DEUNet builds for PLAN_PATCH (asserted in network_layout)
    3: {"A": dict(dim=128, num_heads=4, topk=1, n_regions=4), "B": dict(dim=256, num_heads=8, topk=4, n_regions=4)},
    2: {"A": dict(dim=128, num_heads=4, topk=1, n_regions=8), "B": dict(dim=256, num_heads=8, topk=4, n_regions=8)},
}
REAL_TOKENS = {3: {"A": 16384, "B": 2048}, 2: {"A": 16384, "B": 4096}}
SHAPES = {3: {1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16), 8192: (16, 32, 16), 16384: (16, 32, 32),
              32768: (32, 32, 32)},
          2: {1024: (32, 32), 2048: (32, 64), 4096: (64, 64), 8192: (64, 128), 16384: (128, 128), 32768: (128, 256)}}
CONV = {2: nn.Conv2d, 3: nn.Conv3d}
ARMS = ("vbra", "naive", "naive_fused", "vbra_1chunk", "dense")
SAME_FUNCTION = ("naive", "naive_fused", "vbra_1chunk")
# the public code's window partition (BiFormer's einops rearrange), not the package's: grid axes k j i,
# region axes d h w, (B, *spatial, C) <-> (B, R, T, C) with regions and their tokens in raster order
REGION_PATTERNS = {2: ("n (j h) (i w) c", "n (j i) (h w) c", "ji", "hw"),
                   3: ("n (k d) (j h) (i w) c", "n (k j i) (d h w) c", "kji", "dhw")}


def public_to_regions(t, grid, rsize):
    spatial, regions, grid_axes, region_axes = REGION_PATTERNS[len(grid)]
    return rearrange(t, f"{spatial} -> {regions}", **dict(zip(grid_axes, grid)), **dict(zip(region_axes, rsize)))


def public_from_regions(t, grid, rsize):
    spatial, regions, grid_axes, region_axes = REGION_PATTERNS[len(grid)]
    return rearrange(t, f"{regions} -> {spatial}", **dict(zip(grid_axes, grid)), **dict(zip(region_axes, rsize)))


class NaiveVBRA(VBRA):
    """The public code's formulation: BiFormer's KVGather (K/V expanded to every query region, then
    torch.gather of k copies: (B, R, k, T, 2C); its backward materialises the expanded (B, R, R, T, 2C)
    gradient) and an explicit (T x kT) attention matrix per region and head. Same parameters as VBRA, 2D
    or 3D; sizes must divide the region grid (the public code's padding does not work otherwise)."""

    def forward_tokens(self, x):
        b, *spatial, c = x.shape
        grid = (self.n_regions,) * self.ndim if isinstance(self.n_regions, int) else tuple(self.n_regions)
        rsize = tuple(s // g for s, g in zip(spatial, grid))
        assert all(g * r == s for g, r, s in zip(grid, rsize, spatial)), "naive V-BRA needs divisible sizes"
        n_reg, k_top, h, hd = int(np.prod(grid)), min(self.topk, int(np.prod(grid))), self.num_heads, self.head_dim
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        lepe = self.lepe(v.movedim(-1, 1)).movedim(1, -1)
        q, k, v = (public_to_regions(t, grid, rsize) for t in (q, k, v))
        t = q.shape[2]
        idx = torch.topk(q.mean(2).detach() @ k.mean(2).detach().transpose(1, 2), k_top, dim=-1).indices
        kv = torch.cat((k, v), -1)  # (B, R, T, 2C)
        kv_sel = torch.gather(kv[:, None].expand(-1, n_reg, -1, -1, -1), 2,
                              idx[..., None, None].expand(-1, -1, -1, t, 2 * c))  # (B, R, k, T, 2C)
        k_sel, v_sel = kv_sel.reshape(b * n_reg, k_top * t, 2 * c).chunk(2, dim=-1)
        q = q.reshape(b * n_reg, t, h, hd).transpose(1, 2)
        k_sel = k_sel.reshape(b * n_reg, k_top * t, h, hd).transpose(1, 2)
        v_sel = v_sel.reshape(b * n_reg, k_top * t, h, hd).transpose(1, 2)
        out = self.attention(q, k_sel, v_sel).transpose(1, 2).reshape(b, n_reg, t, c)
        return self.proj(public_from_regions(out, grid, rsize) + lepe)

    def attention(self, q, k, v):
        attn = ((q * self.scale) @ k.transpose(-1, -2)).softmax(-1)  # (B*R, h, T, kT) materialised
        return attn @ v


class NaiveFusedVBRA(NaiveVBRA):
    """The public gather with the explicit attention swapped for the fused kernel ours uses."""

    def attention(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, scale=self.scale)


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


def build_arm(arm, setting, nd=3):
    kw = dict(SETTINGS[nd][setting], conv_op=CONV[nd])
    if arm == "vbra":
        return VBRA(**kw)
    if arm == "vbra_1chunk":
        return VBRA(**kw, kv_chunks=1)
    return {"naive": NaiveVBRA, "naive_fused": NaiveFusedVBRA, "dense": DenseAttention}[arm](**kw)


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def run_case(nd, setting, n_tokens, arms, repeats, threads):
    """In a fresh process: each arm's peak RSS delta of one forward+backward, the equality check against
    ours, then `repeats` interleaved rounds of CPU times."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    ours = build_arm("vbra", setting, nd)
    mods = {a: build_arm(a, setting, nd) for a in arms}
    for a in arms:
        if a in SAME_FUNCTION or a == "vbra":
            mods[a].load_state_dict(ours.state_dict())
    dim = SETTINGS[nd][setting]["dim"]

    def step(m, x):
        out = m(x)
        out.backward(w)
        m.zero_grad(set_to_none=True)
        return out.detach()

    for a in arms:  # load kernels, thread pools
        xs = torch.randn(1, dim, *(8,) * nd, requires_grad=True)
        w = torch.ones(1, dim, *(8,) * nd)
        step(mods[a], xs)
    x = torch.randn(1, dim, *SHAPES[nd][n_tokens], requires_grad=True)
    w = torch.randn_like(x)  # a random output gradient, so the input-gradient check sees every path
    res = {a: {} for a in arms}
    outs, grads = {}, {}
    for a in arms:
        x.grad = None
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        rss0 = _status("VmRSS")
        out = step(mods[a], x)
        res[a]["peak_mb"] = (_status("VmHWM") - rss0) / 2 ** 20
        if a in SAME_FUNCTION or a == "vbra":
            outs[a], grads[a] = out, x.grad.clone()
        del out
    x.grad = None
    for a in SAME_FUNCTION:  # must equal ours before its time means anything
        if a in outs:
            scale_o, scale_g = outs["vbra"].abs().max().item(), grads["vbra"].abs().max().item()
            res[a]["max_abs_diff_out"] = (outs[a] - outs["vbra"]).abs().max().item() / scale_o
            res[a]["max_abs_diff_grad"] = (grads[a] - grads["vbra"]).abs().max().item() / scale_g
            ok = (torch.allclose(outs[a], outs["vbra"], rtol=1e-4, atol=1e-4 * scale_o)
                  and torch.allclose(grads[a], grads["vbra"], rtol=1e-4, atol=1e-4 * scale_g))
            if not ok:
                raise AssertionError(f"{a} differs from vbra ({nd}D {setting}, {n_tokens} tokens): {res[a]}")
    del outs, grads
    cpu = {a: [] for a in arms}
    for r in range(repeats):
        order = list(arms[r % len(arms):]) + list(arms[:r % len(arms)])  # rotate who goes first
        for a in order:
            x.grad = None
            c0 = time.process_time()
            step(mods[a], x)
            cpu[a].append(time.process_time() - c0)
    for a in arms:
        res[a]["cpu_s"] = statistics.median(cpu[a])
        res[a]["cpu_all_s"] = cpu[a]
        res[a]["time_ratio_vbra_vs_this"] = statistics.median(o / t for o, t in zip(cpu["vbra"], cpu[a]))
    return res


def measure(nd, setting, n_tokens, arms, repeats, threads):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, os.path.abspath(__file__), "--_case",
           json.dumps([nd, setting, n_tokens, list(arms), repeats, threads])]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def check_naive_equals_vbra(nd=3):
    """The public-gather arms compute the same function as ours (float64, padding-free sizes)."""
    torch.manual_seed(0)
    ours = VBRA(32, 4, n_regions=2, topk=3, conv_op=CONV[nd]).double()
    diffs = {}
    for name, cls in (("naive", NaiveVBRA), ("naive_fused", NaiveFusedVBRA)):
        other = cls(32, 4, n_regions=2, topk=3, conv_op=CONV[nd]).double()
        other.load_state_dict(ours.state_dict())
        x = torch.randn(2, 32, *(8, 8, 12)[-nd:], dtype=torch.float64)
        diffs[name] = (ours(x) - other(x)).abs().max().item()
    return diffs


def _plan_kwargs(nd=3, num_classes=11):
    """nnU-Net-style plan kwargs: 3d_fullres (6 stages, 32..320) or 2d (7 stages, 32..512)."""
    features = PLAN_FEATURES[nd]
    n_stages = len(features)
    norm = nn.InstanceNorm3d if nd == 3 else nn.InstanceNorm2d
    return dict(input_channels=1, n_stages=n_stages, features_per_stage=features, conv_op=CONV[nd],
                kernel_sizes=[[3] * nd] * n_stages, strides=[[1] * nd] + [[2] * nd] * (n_stages - 1),
                n_conv_per_stage=[2] * n_stages, num_classes=num_classes,
                n_conv_per_stage_decoder=[2] * (n_stages - 1), conv_bias=True, norm_op=norm,
                norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True},
                deep_supervision=True)


def network_layout(nd=3):
    """The V-BRA modules H3DEUNet (defaults) builds for PLAN_PATCH[nd]: stage -> (tokens, settings);
    settings A and B must be its first two V-BRA stages."""
    from nnlandmark_h3de.networks.h3de_unet import H3DEUNet
    with torch.device("meta"):
        net = H3DEUNet(**_plan_kwargs(nd), patch_size=PLAN_PATCH[nd])
    layout = {}
    for s in net.vbra_stages:
        m = next(mod for mod in net.encoder.stages[s].modules() if isinstance(mod, VBRA))
        tokens = int(np.prod(PLAN_PATCH[nd])) // (2 ** nd) ** s
        layout[s] = {"tokens": tokens, "dim": m.dim, "num_heads": m.num_heads, "topk": m.topk,
                     "n_regions": m.n_regions, "region_size": m.region_size}
    first, second = (layout[s] for s in net.vbra_stages[:2])
    for name, stage in (("A", first), ("B", second)):
        want = SETTINGS[nd][name]
        got = {k: stage[k] for k in want}
        assert got == want and stage["tokens"] == REAL_TOKENS[nd][name], \
            f"{nd}D setting {name} {want} != H3DEUNet's {stage}"
    return layout


def network_cost(nd=3):
    """Params and forward GFLOPs of H3DEUNet vs PlainConvUNet for a typical plan (3D 128^3, 2D 512^2 patch)."""
    from torch.utils.flop_counter import FlopCounterMode
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from nnlandmark_h3de.networks.h3de_unet import H3DEUNet
    patch = COST_PATCH[nd]
    kw = _plan_kwargs(nd)
    f = PLAN_FEATURES[nd]
    out = {"plan": f"{nd}D patch {patch}, {len(f)} stages {f[0]}..{f[-1]}, 10 landmarks + zero channel"}
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


def _exponent(sizes, times):
    return float(np.polyfit(np.log(np.array(sizes, float)), np.log(np.array(times, float)), 1)[0])


TARGETS = {"mem_ratio_vbra_vs_naive": 0.25, "mem_ratio_vbra_vs_dense": 2.0, "time_ratio_vbra_vs_dense": 0.1,
           "time_exponent_vbra": 1.5}  # at 16k tokens


def run_dim(nd, vbra_sizes, base_sizes, repeats, threads, real_size_case):
    """Every case of one dimension; prints its lines and returns its summary."""
    settings, real = SETTINGS[nd], REAL_TOKENS[nd]
    layout = network_layout(nd)
    print("\n%dD: H3DEUNet's V-BRA stages for patch %s (%d regions per axis): %s" % (
        nd, "x".join(map(str, PLAN_PATCH[nd])), settings["A"]["n_regions"],
        "; ".join(f"stage {s}: {v['tokens']} tokens, C={v['dim']}, {v['num_heads']} heads, top-k {v['topk']}"
                  for s, v in layout.items())))
    diffs = check_naive_equals_vbra(nd)
    print(f"{nd}D public-gather arms vs ours, same weights, float64: max |diff| = "
          + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))

    res = {}
    cases = [(s, n) for s in settings for n in vbra_sizes]
    if real_size_case:
        cases += [(s, real[s]) for s in settings if real[s] not in vbra_sizes]  # at the size it has in the network
    for setting, n in cases:
        arms = [m for m in ARMS if m == "vbra" or n in base_sizes or n == real[setting]]
        if settings[setting]["topk"] == 1 and "vbra_1chunk" in arms:
            arms.remove("vbra_1chunk")  # one chunk already: identical to vbra
        r = measure(nd, setting, n, arms, repeats, threads)
        for m, v in r.items():
            res[(setting, m, n)] = v
            extra = "" if m == "vbra" else f"  vbra/this time {v['time_ratio_vbra_vs_this']:.3f}, " \
                                           f"mem {r['vbra']['peak_mb'] / v['peak_mb']:.3f}"
            extra += f"  (rel. diff out {v['max_abs_diff_out']:.1e}, grad {v['max_abs_diff_grad']:.1e})" \
                if "max_abs_diff_out" in v else ""
            print(f"{nd}D {setting}  {m:11s} {n:6d} tokens  cpu {v['cpu_s'] * 1e3:9.1f} ms  peak {v['peak_mb']:8.1f} MB"
                  + extra, flush=True)

    head = 16384 if 16384 in base_sizes else max(base_sizes)  # the size of the headline ratios
    summary = {"naive_equals_vbra_maxdiff": diffs["naive"], "naive_fused_equals_vbra_maxdiff": diffs["naive_fused"],
               "headline_tokens": head, "settings": settings, "real_tokens": real,
               "plan_patch": list(PLAN_PATCH[nd]), "h3de_layout": {str(k): v for k, v in layout.items()}}
    print(f"\n{nd}D at {head} tokens: setting | time vbra/dense | time vbra/naive | time vbra/naive_fused | "
          "mem vbra/naive | mem vbra/naive_fused | mem vbra/dense | exponent vbra | exponents over the baseline sizes")
    for s in settings:
        v = res[(s, "vbra", head)]
        d = {m: res[(s, m, head)] for m in ARMS if (s, m, head) in res}
        out = {"time_ratio_vbra_vs_dense": d["dense"]["time_ratio_vbra_vs_this"],
               "time_ratio_vbra_vs_naive": d["naive"]["time_ratio_vbra_vs_this"],
               "time_ratio_vbra_vs_naive_fused": d["naive_fused"]["time_ratio_vbra_vs_this"],
               "mem_ratio_vbra_vs_naive": v["peak_mb"] / d["naive"]["peak_mb"],
               "mem_ratio_vbra_vs_naive_fused": v["peak_mb"] / d["naive_fused"]["peak_mb"],
               "mem_ratio_vbra_vs_dense": v["peak_mb"] / d["dense"]["peak_mb"]}
        if len(vbra_sizes) > 1:
            out["time_exponent_vbra"] = _exponent(vbra_sizes, [res[(s, "vbra", n)]["cpu_s"] for n in vbra_sizes])
        if "vbra_1chunk" in d:
            out["time_ratio_vbra_vs_1chunk"] = d["vbra_1chunk"]["time_ratio_vbra_vs_this"]
            out["mem_ratio_vbra_vs_1chunk"] = v["peak_mb"] / d["vbra_1chunk"]["peak_mb"]
        fit = [n for n in base_sizes if n in vbra_sizes]
        if len(fit) > 1:
            out["time_exponents_baseline_sizes"] = {m: _exponent(fit, [res[(s, m, n)]["cpu_s"] for n in fit])
                                                    for m in ARMS if all((s, m, n) in res for n in fit)}
        n_real = real[s]
        if n_real != head and (s, "naive_fused", n_real) in res:
            vr = res[(s, "vbra", n_real)]
            out["at_real_size"] = {"tokens": n_real, **{
                f"{kind}_ratio_vbra_vs_{m}": (res[(s, m, n_real)]["time_ratio_vbra_vs_this"] if kind == "time"
                                              else vr["peak_mb"] / res[(s, m, n_real)]["peak_mb"])
                for m in ARMS if m != "vbra" and (s, m, n_real) in res for kind in ("time", "mem")}}
        out["cases"] = {f"{m}_{n}": res[(ss, m, n)] for (ss, m, n) in res if ss == s}
        summary[s] = out
        ex = out.get("time_exponents_baseline_sizes", {})
        exp = f"{out['time_exponent_vbra']:13.2f}" if "time_exponent_vbra" in out else f"{'-':>13s}"
        print(f"{nd}D   {s}    | {out['time_ratio_vbra_vs_dense']:15.3f} | {out['time_ratio_vbra_vs_naive']:15.3f} | "
              f"{out['time_ratio_vbra_vs_naive_fused']:21.3f} | {out['mem_ratio_vbra_vs_naive']:14.3f} | "
              f"{out['mem_ratio_vbra_vs_naive_fused']:20.3f} | {out['mem_ratio_vbra_vs_dense']:14.3f} | {exp} | "
              + ", ".join(f"{m} {e:.2f}" for m, e in ex.items()))
        if "time_ratio_vbra_vs_1chunk" in out:
            print(f"         chunked K/V vs one chunk (same region-index gather): time "
                  f"{out['time_ratio_vbra_vs_1chunk']:.3f}, memory {out['mem_ratio_vbra_vs_1chunk']:.3f}")
        if "at_real_size" in out:
            rs = out["at_real_size"]
            print(f"         at its real size in the network ({rs['tokens']} tokens), vbra/arm time | memory: "
                  + ", ".join(f"{m} {rs[f'time_ratio_vbra_vs_{m}']:.3f} | {rs[f'mem_ratio_vbra_vs_{m}']:.3f}"
                              for m in ARMS if f"time_ratio_vbra_vs_{m}" in rs))
    for key in [k for k in summary["A"] if k.startswith(("time_ratio", "mem_ratio", "time_exponent_vbra"))]:
        summary[key] = max(summary[s][key] for s in settings if key in summary[s])  # the worse setting
    if head == 16384:
        summary["targets_met"] = {k: summary[k] <= t for k, t in TARGETS.items() if k in summary}
        print(f"{nd}D worst of A/B vs target: " + ", ".join(f"{k} = {summary[k]:.3f} (<= {t}: {summary[k] <= t})"
                                                           for k, t in TARGETS.items() if k in summary))
    print(f"{nd}D worst of A/B vs the public gather + fused SDPA at {head} tokens: time "
          f"{summary['time_ratio_vbra_vs_naive_fused']:.3f}, memory {summary['mem_ratio_vbra_vs_naive_fused']:.3f}")

    net = network_cost(nd)
    summary["network"] = net
    print(f"{nd}D network ({net['plan']}): params plain {net['params_plain_M']:.2f} M, "
          f"H3DE {net['params_h3de_M']:.2f} M "
          f"(x{net['params_ratio_h3de_vs_plain']:.2f}); forward GFLOPs plain {net['gflops_fwd_plain']:.1f}, "
          f"H3DE {net['gflops_fwd_h3de']:.1f} (x{net['flops_ratio_h3de_vs_plain']:.2f}); "
          f"V-BRA stages {net['h3de_vbra_stages']}")
    return summary


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="4k/8k/16k, baselines at 16k only, 2 rounds")
    mode.add_argument("--full", action="store_true", help="4k..32k, baselines 4k..16k, 5 rounds, B at its real size")
    p.add_argument("--dims", type=int, nargs="+", choices=(2, 3), default=[3, 2], help="spatial dimensions to run")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--repeats", type=int, default=None, help="interleaved timing rounds per case")
    p.add_argument("--threads", type=int, default=1, help="torch threads per case (CPU time counts all)")
    p.add_argument("--dense-32k", action="store_true", help="--full: baselines at 32k tokens too (slow, ~10 GB)")
    p.add_argument("--_case", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._case:
        print(json.dumps(run_case(*json.loads(a._case))))
        return

    if a.full:
        repeats, vbra_sizes = 5, [4096, 8192, 16384, 32768]
        base_sizes = [4096, 8192, 16384, 32768] if a.dense_32k else [4096, 8192, 16384]
    elif a.quick:
        repeats, vbra_sizes, base_sizes = 2, [4096, 8192, 16384], [16384]
    else:
        repeats, vbra_sizes, base_sizes = 3, [1024], [1024]
    repeats = a.repeats or repeats
    summary = {"repeats": repeats, "threads": a.threads}
    for nd in a.dims:
        summary[f"{nd}d"] = run_dim(nd, vbra_sizes, base_sizes, repeats, a.threads, real_size_case=a.full)
    if a.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
