"""Bi-level routing attention on an N-d feature map: V-BRA (volumetric, H3DE-Net) with a 3D conv op,
BiFormer's / HYATT-Net's BRA with a 2D one. One code path; the dimension comes from `conv_op`.

1. the feature map is split into a grid of regions (derived from its size, any size works);
2. region-level queries/keys are the means of each region's valid (non-padded) tokens;
3. every query region keeps its top-k regions by affinity ``q_r @ k_r^T`` (non-differentiable routing,
   always float32 with autocast off, see `VBRA.route`);
4. every token attends to all tokens of its k routed regions (multi-head, scale ``head_dim ** -0.5``,
   padded keys masked);
5. LePE (depthwise conv of the feature map's dimension on V) is added, then the output projection.

Mixed precision: under autocast only the routing is forced to float32; the attention runs in the autocast
dtype through ``scaled_dot_product_attention``, whose kernels form the scores and the softmax in float32
for fp16/bf16 inputs (flash / memory-efficient / CPU kernels accumulate in float32, the math fallback
upcasts unless ``allow_fp16_bf16_reduction_math_sdp``), so ``q @ k^T`` cannot overflow fp16 there.

Unlike the public code, no attention matrix is materialised (``scaled_dot_product_attention``'s fused
kernels keep memory linear in the number of tokens) and K/V are gathered by region index chunk by chunk
(about one copy of K/V alive at a time for any top-k; chunks are recomputed in backward).
"""
import math
from typing import Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.utils.checkpoint import checkpoint

from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim

IntOrSeq = Union[int, Sequence[int]]

# 64 regions in both dimensionalities (4^3, 8^2): the same tokens per region and the same routed fraction
# for a given top-k and token count (BiFormer's 2D default is 7^2 = 49)
DEFAULT_REGIONS = {2: 8, 3: 4}


def _per_axis(v: IntOrSeq, ndim: int) -> Tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * ndim
    v = tuple(int(i) for i in v)
    assert len(v) == ndim, f"expected {ndim} values (one per spatial axis), got {v}"
    return v


def region_grid(spatial: Sequence[int], n_regions: Optional[IntOrSeq] = None,
                region_size: Optional[IntOrSeq] = None) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """(grid, region_size) per axis for a feature map of size `spatial` (2 or 3 axes).

    Give either a target number of regions per axis or the tokens per region per axis. The grid is
    ceil(size / region_size), so no region is made only of padding (its mean would be undefined);
    with `n_regions` the grid can therefore be smaller than asked (e.g. 5 tokens, 4 regions -> 3 x 2).
    """
    assert (n_regions is None) != (region_size is None), "give exactly one of n_regions, region_size"
    nd = len(spatial)
    if region_size is None:
        region_size = [-(-s // max(1, min(n, s))) for s, n in zip(spatial, _per_axis(n_regions, nd))]
    region_size = tuple(max(1, min(r, s)) for r, s in zip(_per_axis(region_size, nd), spatial))
    grid = tuple(-(-s // r) for s, r in zip(spatial, region_size))
    return grid, region_size


def _to_regions(t: torch.Tensor, grid, rsize) -> torch.Tensor:
    """(B, g0*r0, ..., gn*rn, C) -> (B, R, T, C), regions and their tokens in raster order."""
    b, c, nd = t.shape[0], t.shape[-1], len(grid)
    t = t.reshape(b, *(i for g, r in zip(grid, rsize) for i in (g, r)), c)
    perm = (0, *range(1, 2 * nd, 2), *range(2, 2 * nd + 1, 2), 2 * nd + 1)  # grid axes, then region axes
    return t.permute(perm).reshape(b, math.prod(grid), -1, c)


def _region_sums(t: torch.Tensor, grid, rsize) -> torch.Tensor:
    """(B, g0*r0, ..., gn*rn, C) -> (B, R, C): each region's token sum, regions in `_to_regions`' order (no copy
    of t is made: the region axes are summed in place of a permute)."""
    b, c, nd = t.shape[0], t.shape[-1], len(grid)
    t = t.reshape(b, *(i for g, r in zip(grid, rsize) for i in (g, r)), c)
    return t.sum(dim=tuple(range(2, 2 * nd + 1, 2))).reshape(b, math.prod(grid), c)


def _from_regions(t: torch.Tensor, grid, rsize) -> torch.Tensor:
    """Inverse of `_to_regions`."""
    b, c, nd = t.shape[0], t.shape[-1], len(grid)
    t = t.reshape(b, *grid, *rsize, c)
    perm = (0, *(i for a in range(1, nd + 1) for i in (a, a + nd)), 2 * nd + 1)  # interleave grid, region
    return t.permute(perm).reshape(b, *(g * r for g, r in zip(grid, rsize)), c)


class VBRA(nn.Module):
    """Bi-level routing attention on (B, C, *spatial) (or channels-last via `forward_tokens`).

    Args:
        dim: channels C.
        num_heads: attention heads (C must be divisible).
        n_regions / region_size: region grid per axis (exactly one; default `DEFAULT_REGIONS` per axis).
        topk: routed regions per query region (capped at the number of regions).
        qkv_bias: bias of the q/k/v projection.
        lepe_kernel_size: kernel of the depthwise LePE conv on V (0 disables it).
        kv_chunks: query regions are processed in this many chunks (default: topk), so the gathered K/V
            alive at any time is about one copy of K/V however large topk is; with several chunks the
            chunks are recomputed in backward (activation checkpointing) instead of storing the copies.
        conv_op: nn.Conv3d (V-BRA) or nn.Conv2d (BRA); sets the spatial dimension and the LePE conv.
    """

    def __init__(self, dim: int, num_heads: int = 8, n_regions: Optional[IntOrSeq] = None,
                 region_size: Optional[IntOrSeq] = None, topk: int = 4, qkv_bias: bool = True,
                 lepe_kernel_size: int = 5, kv_chunks: Optional[int] = None, conv_op: Type[_ConvNd] = nn.Conv3d):
        super().__init__()
        assert dim % num_heads == 0, f"dim {dim} not divisible by num_heads {num_heads}"
        self.ndim = convert_conv_op_to_dim(conv_op)
        assert self.ndim in DEFAULT_REGIONS, f"routing attention is 2D or 3D, got {conv_op.__name__}"
        if n_regions is None and region_size is None:
            n_regions = DEFAULT_REGIONS[self.ndim]
        for v in (n_regions, region_size):
            if v is not None:
                _per_axis(v, self.ndim)  # fail at construction, not at the first forward
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.n_regions, self.region_size, self.topk, self.kv_chunks = n_regions, region_size, topk, kv_chunks
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.lepe = (conv_op(dim, dim, lepe_kernel_size, padding=lepe_kernel_size // 2, groups=dim)
                     if lepe_kernel_size else None)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(x.movedim(1, -1)).movedim(-1, 1)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, *spatial, C) channels-last; returns the same shape."""
        b, *spatial, c = x.shape
        assert len(spatial) == self.ndim, f"{self.ndim}D attention got spatial shape {tuple(spatial)}"
        grid, rsize = region_grid(spatial, self.n_regions, self.region_size)
        padded = [g * r for g, r in zip(grid, rsize)]
        pad = [p - s for p, s in zip(padded, spatial)]
        inside = tuple(slice(0, s) for s in spatial)
        n_reg = math.prod(grid)
        topk = min(self.topk, n_reg)

        # pad the END of every spatial axis (F.pad lists the last dim first: C, then W, H, ...)
        padding = (0, 0) + tuple(i for p in reversed(pad) for i in (0, p)) if any(pad) else None
        valid = None
        if padding is not None:
            valid = torch.zeros(padded, dtype=torch.bool, device=x.device)
            valid[inside] = True
            valid = _to_regions(valid[None, ..., None], grid, rsize)[0, ..., 0]  # (R, T)
        idx = self.route(x, grid, rsize, padding, valid, topk)  # (B, R, topk)

        q, k, v = self.qkv(x).chunk(3, dim=-1)
        # LePE on the unpadded V: zero padding at the true border, independent of the region padding. V is made
        # channels-first contiguous: on the CPU, bf16 depthwise conv3d on a channels-last input smaller than the
        # kernel (a deep stage of 3x4x5 under a 5^3 LePE) returns a wrong weight gradient (torch 2.14)
        lepe = None if self.lepe is None else self.lepe(v.movedim(-1, 1).contiguous()).movedim(1, -1)
        if padding is not None:
            q, k, v = (F.pad(t, padding) for t in (q, k, v))
        q, k, v = (_to_regions(t, grid, rsize) for t in (q, k, v))  # (B, R, T, C)
        n_tok = q.shape[2]

        # attention of every query region over its routed regions, in chunks of query regions
        flat = (idx + torch.arange(b, device=x.device)[:, None, None] * n_reg).reshape(b * n_reg, topk)
        qf, kf, vf = (t.reshape(b * n_reg, n_tok, c) for t in (q, k, v))
        n_chunks = min(b * n_reg, self.kv_chunks or topk)
        recompute = n_chunks > 1 and torch.is_grad_enabled() and qf.requires_grad
        outs = []
        for q_chunk, idx_chunk in zip(qf.tensor_split(n_chunks), flat.tensor_split(n_chunks)):  # views
            args = (q_chunk, kf, vf, idx_chunk, valid, n_reg)
            outs.append(checkpoint(self._attend, *args, use_reentrant=False) if recompute else self._attend(*args))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, 0)  # (B*R, T, C)
        out = _from_regions(out.view(b, n_reg, n_tok, c), grid, rsize)
        if any(pad):
            out = out[(slice(None), *inside)]
        if lepe is not None:
            out = out + lepe
        return self.proj(out)

    def route(self, x: torch.Tensor, grid, rsize, padding: Optional[tuple], valid: Optional[torch.Tensor],
              topk: int) -> torch.Tensor:
        """(B, R, topk) routed regions of channels-last x: top-k of the region affinities q_r @ k_r^T.

        Kept float32 with autocast off (fp16 affinities overflow for large activations, half-precision
        rounding flips near-ties): q_r, k_r are the q/k projections of the float32 region means of the
        valid tokens (the mean of W x + b is W mean(x) + b), so routing is the same under autocast as in
        float32, and costs one pass over x plus an R-token projection. Not differentiable (as BiFormer).
        """
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            xf = x.float() if padding is None else F.pad(x.float(), padding)
            sums = _region_sums(xf, grid, rsize)  # (B, R, C); padding is zero
            mean = sums / (valid.sum(1)[:, None] if valid is not None else math.prod(rsize))
            weight, bias = self.qkv.weight[:2 * self.dim].float(), self.qkv.bias
            q_r, k_r = F.linear(mean, weight, None if bias is None else bias[:2 * self.dim].float()).chunk(2, -1)
            return torch.topk(q_r @ k_r.transpose(1, 2), topk, dim=-1).indices

    def _attend(self, q, k, v, idx, valid, n_reg):
        """q: (Q, T, C) query regions; k, v: (B*R, T, C) all regions; idx: (Q, topk) flat routed regions;
        valid: (R, T) token mask or None. Gathers only this chunk's routed K/V (one copy per routed region)."""
        nq, n_tok, c = q.shape
        kk = idx.shape[1]
        h, hd = self.num_heads, self.head_dim
        k_sel = k.index_select(0, idx.reshape(-1)).view(nq, kk * n_tok, h, hd).transpose(1, 2)
        v_sel = v.index_select(0, idx.reshape(-1)).view(nq, kk * n_tok, h, hd).transpose(1, 2)
        mask = None if valid is None else valid[idx % n_reg].view(nq, 1, 1, kk * n_tok)
        out = F.scaled_dot_product_attention(q.view(nq, n_tok, h, hd).transpose(1, 2), k_sel, v_sel,
                                             attn_mask=mask, scale=self.scale)  # (Q, h, T, hd)
        return out.transpose(1, 2).reshape(nq, n_tok, c)
