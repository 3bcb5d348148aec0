"""V-BRA speed and memory against the public code's gather (with explicit attention, and with the same fused
SDPA kernel as ours) and against dense global SDPA, all measured in the same run.

Region layout: the one H3DEUNet builds (fixed number of regions per axis, `vbra_n_regions=4`, so 64 regions
whatever the feature-map size; heads = channels // 32; top-k 1, 4, 16 from the finest V-BRA stage on). The
two settings are the first two V-BRA stages H3DEUNet picks for a 3d_fullres plan with patch 64x128x128
(features 32..320, the first V-BRA stage is the first with <= 16384 tokens); `network_layout()` builds that
network and the benchmark asserts the settings match it:
  A: stage 2, 16x32x32 = 16384 tokens, C=128, 4 heads, top-k 1, 4x4x4 regions (256 tokens each)
  B: stage 3, 8x16x16 = 2048 tokens, C=256, 8 heads, top-k 4, 4x4x4 regions (32 tokens each)
Both are run at 4k..32k tokens with the region count held at 4 per axis (tokens per region grow with the
patch, as in H3DEUNet), so the time exponent is the one a growing patch sees; B is also run at its real
2048 tokens. In the network B never reaches 16k tokens (the first V-BRA stage has at most 16384), so B at
16k is the chunked-K/V path under load, A at 16k is what the network really runs.

Arms (all but dense compute the same function with the same weights; checked before timing):
  vbra         ours: region-index gather (index_select on (B*R, T, C)), fused SDPA, K/V in top-k chunks
               recomputed in backward when top-k > 1
  naive        public BiFormer/H3DE code: KVGather (torch.gather on K/V expanded to (B, R, R, T, 2C)),
               explicit attention matrix (T x kT per region and head)
  naive_fused  the same public gather + F.scaled_dot_product_attention (the one-line kernel swap)
  vbra_1chunk  ours with kv_chunks=1 (region-index gather, no chunking/recompute; = vbra when top-k 1)
  dense        global multi-head SDPA over all tokens (another function; a scale reference)

Every (setting, size) runs in one fresh subprocess (1 torch thread by default): first each arm's peak
memory of one forward+backward (peak RSS, VmHWM reset through /proc/self/clear_refs, minus RSS just before;
glibc's mmap threshold fixed at 64 KiB so freed tensors really leave the process), then the equality
check, then `repeats` rounds in which every arm runs one forward+backward, the arm order rotating each
round. Time = process CPU time (user + sys); ratios are the median over rounds of the per-round ratio
(arms of one round share the machine's load). Also: parameters and forward FLOPs (FlopCounterMode, meta
tensors) of H3DEUNet vs nnU-Net's PlainConvUNet for a 128^3 plan.

    python benchmarks/bench_vbra.py [--quick] [--json] [--repeats 5] [--threads 1] [--dense-32k]

With --json the LAST line is one JSON object. Headline ratios are the worse (larger) of settings A and B;
per-setting values are under "A" and "B".
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

PLAN_PATCH = (64, 128, 128)
PLAN_FEATURES = [32, 64, 128, 256, 320, 320]
SETTINGS = {  # the V-BRA modules H3DEUNet builds for PLAN_PATCH (asserted in network_layout)
    "A": dict(dim=128, num_heads=4, topk=1, n_regions=4),
    "B": dict(dim=256, num_heads=8, topk=4, n_regions=4),
}
REAL_TOKENS = {"A": 16384, "B": 2048}
SHAPES = {2048: (8, 16, 16), 4096: (16, 16, 16), 8192: (16, 32, 16), 16384: (16, 32, 32), 32768: (32, 32, 32)}
ARMS = ("vbra", "naive", "naive_fused", "vbra_1chunk", "dense")
SAME_FUNCTION = ("naive", "naive_fused", "vbra_1chunk")


class NaiveVBRA(VBRA):
    """The public code's formulation: BiFormer's KVGather (K/V expanded to every query region, then
    torch.gather of k copies: (B, R, k, T, 2C); its backward materialises the expanded (B, R, R, T, 2C)
    gradient) and an explicit (T x kT) attention matrix per region and head. Same parameters as VBRA;
    sizes must divide the region grid (the public code's padding does not work otherwise)."""

    def forward_tokens(self, x):
        b, *spatial, c = x.shape
        grid = (self.n_regions,) * 3 if isinstance(self.n_regions, int) else tuple(self.n_regions)
        rsize = tuple(s // g for s, g in zip(spatial, grid))
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
        out = self.attention(q, k_sel, v_sel).transpose(1, 2).reshape(b, n_reg, t, c)
        return self.proj(_from_regions(out, grid, rsize) + lepe)

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


def build_arm(arm, setting):
    kw = SETTINGS[setting]
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


def run_case(setting, n_tokens, arms, repeats, threads):
    """In a fresh process: each arm's peak RSS delta of one forward+backward, the equality check against
    ours, then `repeats` interleaved rounds of CPU times."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    ours = build_arm("vbra", setting)
    mods = {a: build_arm(a, setting) for a in arms}
    for a in arms:
        if a in SAME_FUNCTION or a == "vbra":
            mods[a].load_state_dict(ours.state_dict())
    dim = SETTINGS[setting]["dim"]

    def step(m, x):
        out = m(x)
        out.backward(w)
        m.zero_grad(set_to_none=True)
        return out.detach()

    for a in arms:  # load kernels, thread pools
        xs = torch.randn(1, dim, 8, 8, 8, requires_grad=True)
        w = torch.ones(1, dim, 8, 8, 8)
        step(mods[a], xs)
    x = torch.randn(1, dim, *SHAPES[n_tokens], requires_grad=True)
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
                raise AssertionError(f"{a} differs from vbra ({setting}, {n_tokens} tokens): {res[a]}")
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


def measure(setting, n_tokens, arms, repeats, threads):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, os.path.abspath(__file__), "--_case",
           json.dumps([setting, n_tokens, list(arms), repeats, threads])]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def check_naive_equals_vbra():
    """The public-gather arms compute the same function as ours (float64, padding-free sizes)."""
    torch.manual_seed(0)
    ours = VBRA(32, 4, n_regions=2, topk=3).double()
    diffs = {}
    for name, cls in (("naive", NaiveVBRA), ("naive_fused", NaiveFusedVBRA)):
        other = cls(32, 4, n_regions=2, topk=3).double()
        other.load_state_dict(ours.state_dict())
        x = torch.randn(2, 32, 8, 8, 12, dtype=torch.float64)
        diffs[name] = (ours(x) - other(x)).abs().max().item()
    return diffs


def _plan_kwargs(n_stages=6, features=PLAN_FEATURES, num_classes=11):
    return dict(input_channels=1, n_stages=n_stages, features_per_stage=features, conv_op=nn.Conv3d,
                kernel_sizes=[[3, 3, 3]] * n_stages, strides=[[1, 1, 1]] + [[2, 2, 2]] * (n_stages - 1),
                n_conv_per_stage=[2] * n_stages, num_classes=num_classes,
                n_conv_per_stage_decoder=[2] * (n_stages - 1), conv_bias=True, norm_op=nn.InstanceNorm3d,
                norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True},
                deep_supervision=True)


def network_layout():
    """The V-BRA modules H3DEUNet (defaults) builds for PLAN_PATCH: stage -> (tokens, settings); settings
    A and B must be its first two V-BRA stages."""
    from nnlandmark_h3de.networks.h3de_unet import H3DEUNet
    with torch.device("meta"):
        net = H3DEUNet(**_plan_kwargs(), patch_size=PLAN_PATCH)
    layout = {}
    for s in net.vbra_stages:
        m = next(mod for mod in net.encoder.stages[s].modules() if isinstance(mod, VBRA))
        tokens = int(np.prod(PLAN_PATCH)) // 8 ** s
        layout[s] = {"tokens": tokens, "dim": m.dim, "num_heads": m.num_heads, "topk": m.topk,
                     "n_regions": m.n_regions, "region_size": m.region_size}
    first, second = (layout[s] for s in net.vbra_stages[:2])
    for name, stage in (("A", first), ("B", second)):
        want = SETTINGS[name]
        got = {k: stage[k] for k in want}
        assert got == want and stage["tokens"] == REAL_TOKENS[name], f"setting {name} {want} != H3DEUNet's {stage}"
    return layout


def network_cost():
    """Params and forward GFLOPs of H3DEUNet vs PlainConvUNet for a typical 3d_fullres plan (128^3 patch)."""
    from torch.utils.flop_counter import FlopCounterMode
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from nnlandmark_h3de.networks.h3de_unet import H3DEUNet
    patch = (128, 128, 128)
    kw = _plan_kwargs()
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


def _exponent(sizes, times):
    return float(np.polyfit(np.log(np.array(sizes, float)), np.log(np.array(times, float)), 1)[0])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4k/8k/16k only, baselines at 16k only, 2 rounds")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--repeats", type=int, default=None, help="interleaved timing rounds per case (default 5)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per case (CPU time counts all)")
    p.add_argument("--dense-32k", action="store_true", help="also run the baselines at 32k tokens (slow, ~10 GB)")
    p.add_argument("--_case", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._case:
        print(json.dumps(run_case(*json.loads(a._case))))
        return

    repeats = a.repeats or (2 if a.quick else 5)
    vbra_sizes = [4096, 8192, 16384] if a.quick else [4096, 8192, 16384, 32768]
    base_sizes = [16384] if a.quick else ([4096, 8192, 16384, 32768] if a.dense_32k else [4096, 8192, 16384])
    layout = network_layout()
    print("H3DEUNet's V-BRA stages for patch %s (4 regions per axis): %s" % (
        "x".join(map(str, PLAN_PATCH)),
        "; ".join(f"stage {s}: {v['tokens']} tokens, C={v['dim']}, {v['num_heads']} heads, top-k {v['topk']}"
                  for s, v in layout.items())))
    diffs = check_naive_equals_vbra()
    print("public-gather arms vs ours, same weights, float64: max |diff| = "
          + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))

    res = {}
    cases = [(s, n) for s in SETTINGS for n in vbra_sizes]
    if not a.quick:
        cases.append(("B", REAL_TOKENS["B"]))  # B at the size it has in the network
    for setting, n in cases:
        arms = [m for m in ARMS if m == "vbra" or n in base_sizes or n == REAL_TOKENS[setting]]
        if SETTINGS[setting]["topk"] == 1 and "vbra_1chunk" in arms:
            arms.remove("vbra_1chunk")  # one chunk already: identical to vbra
        r = measure(setting, n, arms, repeats, a.threads)
        for m, v in r.items():
            res[(setting, m, n)] = v
            extra = "" if m == "vbra" else f"  vbra/this time {v['time_ratio_vbra_vs_this']:.3f}, " \
                                           f"mem {r['vbra']['peak_mb'] / v['peak_mb']:.3f}"
            extra += f"  (rel. diff out {v['max_abs_diff_out']:.1e}, grad {v['max_abs_diff_grad']:.1e})" \
                if "max_abs_diff_out" in v else ""
            print(f"{setting}  {m:11s} {n:6d} tokens  cpu {v['cpu_s'] * 1e3:9.1f} ms  peak {v['peak_mb']:8.1f} MB"
                  + extra, flush=True)

    summary = {"naive_equals_vbra_maxdiff": diffs["naive"], "naive_fused_equals_vbra_maxdiff": diffs["naive_fused"],
               "repeats": repeats, "threads": a.threads, "settings": SETTINGS, "real_tokens": REAL_TOKENS,
               "plan_patch": list(PLAN_PATCH), "h3de_layout": {str(k): v for k, v in layout.items()}}
    print("\nsetting | time vbra/dense | time vbra/naive | time vbra/naive_fused | mem vbra/naive | "
          "mem vbra/naive_fused | mem vbra/dense | exponent vbra (4k..32k) | exponents 4k..16k")
    for s in SETTINGS:
        v = res[(s, "vbra", 16384)]
        d = {m: res[(s, m, 16384)] for m in ARMS if (s, m, 16384) in res}
        out = {"time_ratio_vbra_vs_dense_16k": d["dense"]["time_ratio_vbra_vs_this"],
               "time_ratio_vbra_vs_naive_16k": d["naive"]["time_ratio_vbra_vs_this"],
               "time_ratio_vbra_vs_naive_fused_16k": d["naive_fused"]["time_ratio_vbra_vs_this"],
               "mem_ratio_vbra_vs_naive_16k": v["peak_mb"] / d["naive"]["peak_mb"],
               "mem_ratio_vbra_vs_naive_fused_16k": v["peak_mb"] / d["naive_fused"]["peak_mb"],
               "mem_ratio_vbra_vs_dense_16k": v["peak_mb"] / d["dense"]["peak_mb"],
               "time_exponent_vbra": _exponent(vbra_sizes, [res[(s, "vbra", n)]["cpu_s"] for n in vbra_sizes])}
        if "vbra_1chunk" in d:
            out["time_ratio_vbra_vs_1chunk_16k"] = d["vbra_1chunk"]["time_ratio_vbra_vs_this"]
            out["mem_ratio_vbra_vs_1chunk_16k"] = v["peak_mb"] / d["vbra_1chunk"]["peak_mb"]
        fit = [n for n in base_sizes if n in vbra_sizes]
        if len(fit) > 1:
            out["time_exponents_4k_16k"] = {m: _exponent(fit, [res[(s, m, n)]["cpu_s"] for n in fit])
                                            for m in ARMS if all((s, m, n) in res for n in fit)}
        n_real = REAL_TOKENS[s]
        if n_real != 16384 and (s, "naive_fused", n_real) in res:
            vr = res[(s, "vbra", n_real)]
            out["at_real_size"] = {"tokens": n_real, **{
                f"{kind}_ratio_vbra_vs_{m}": (res[(s, m, n_real)]["time_ratio_vbra_vs_this"] if kind == "time"
                                              else vr["peak_mb"] / res[(s, m, n_real)]["peak_mb"])
                for m in ARMS if m != "vbra" and (s, m, n_real) in res for kind in ("time", "mem")}}
        out["cases"] = {f"{m}_{n}": res[(ss, m, n)] for (ss, m, n) in res if ss == s}
        summary[s] = out
        ex = out.get("time_exponents_4k_16k", {})
        print(f"   {s}    | {out['time_ratio_vbra_vs_dense_16k']:15.3f} | {out['time_ratio_vbra_vs_naive_16k']:15.3f} | "
              f"{out['time_ratio_vbra_vs_naive_fused_16k']:21.3f} | {out['mem_ratio_vbra_vs_naive_16k']:14.3f} | "
              f"{out['mem_ratio_vbra_vs_naive_fused_16k']:20.3f} | {out['mem_ratio_vbra_vs_dense_16k']:14.3f} | "
              f"{out['time_exponent_vbra']:23.2f} | " + ", ".join(f"{m} {e:.2f}" for m, e in ex.items()))
        if "time_ratio_vbra_vs_1chunk_16k" in out:
            print(f"         chunked K/V vs one chunk (same region-index gather) at 16k: time "
                  f"{out['time_ratio_vbra_vs_1chunk_16k']:.3f}, memory {out['mem_ratio_vbra_vs_1chunk_16k']:.3f}")
        if "at_real_size" in out:
            rs = out["at_real_size"]
            print(f"         at its real size in the network ({rs['tokens']} tokens), vbra/arm time | memory: " + ", ".join(
                f"{m} {rs[f'time_ratio_vbra_vs_{m}']:.3f} | {rs[f'mem_ratio_vbra_vs_{m}']:.3f}"
                for m in ARMS if f"time_ratio_vbra_vs_{m}" in rs))
    for key in ("time_ratio_vbra_vs_dense_16k", "mem_ratio_vbra_vs_naive_16k", "mem_ratio_vbra_vs_dense_16k",
                "time_exponent_vbra", "time_ratio_vbra_vs_naive_16k", "time_ratio_vbra_vs_naive_fused_16k",
                "mem_ratio_vbra_vs_naive_fused_16k"):
        summary[key] = max(summary[s][key] for s in SETTINGS)  # the worse setting
    targets = {"mem_ratio_vbra_vs_naive_16k": 0.25, "mem_ratio_vbra_vs_dense_16k": 2.0,
               "time_ratio_vbra_vs_dense_16k": 0.1, "time_exponent_vbra": 1.5}
    summary["targets_met"] = {k: summary[k] <= t for k, t in targets.items()}
    print("\nworst of A/B vs target: " + ", ".join(f"{k} = {summary[k]:.3f} (<= {t}: {summary[k] <= t})"
                                                  for k, t in targets.items()))
    print("worst of A/B vs the public gather + fused SDPA: time "
          f"{summary['time_ratio_vbra_vs_naive_fused_16k']:.3f}, memory {summary['mem_ratio_vbra_vs_naive_fused_16k']:.3f}")

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
