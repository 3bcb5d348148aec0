"""Targets and loss of the anchor head, built on the device inside the training step.

From the batch's landmark points (B, L, ndim) in the patch, NaN rows = absent: the loader's target,
the same points the trainer draws the heatmaps from, so the anchor targets follow the heatmaps'
presence rule. `centres_from_heatmaps` recovers those points from drawn Gaussian heatmaps instead
(the log of a Gaussian is a parabola along every axis, so three samples around the peak give the
centre back exactly, to float32 rounding), for callers that only have the heatmaps.

Positives (anchor a of cell f, landmark k): k present in the patch and |g_k - f| <= r_a (grid units),
plus every anchor of the cell nearest to g_k, so each present landmark has positives whatever the
radii. Everything else is a negative, in particular every anchor of an absent landmark.

Loss = w_offset * smooth-L1(t, only positives)
     + w_exist * (mean BCE over positives + mean BCE over negatives)  (balanced: positives are ~1e-3)
     + w_case * BCE(max logit over all anchors of (b, k), k present)   (trains the decision statistic).
"""
from typing import Dict, NamedTuple, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from nnlandmark_h3de.networks.building_blocks.anchor_head import (cell_coordinates, encode_offsets, grid_stride,
                                                                  voxel_to_grid)

__all__ = ["centres_from_heatmaps", "anchor_positives", "AnchorTargets", "build_anchor_targets", "AnchorLoss"]


def centres_from_heatmaps(heatmaps: torch.Tensor, eps: float = 1e-30) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B, L, *S) separable Gaussian heatmaps -> centres (B, L, ndim) in voxels (NaN if absent), present (B, L).

    Per axis, a parabola through log h at three consecutive voxels around the argmax (shifted inward
    at the patch border); its vertex is the Gaussian's centre, exact for any sigma.
    """
    b, n_l = heatmaps.shape[:2]
    shape = heatmaps.shape[2:]
    assert min(shape) >= 3, f"need >= 3 voxels per axis, got {tuple(shape)}"
    h = heatmaps.detach().float().reshape(b, n_l, -1)
    peak, flat = h.max(-1)
    present = peak > 0
    idx = torch.stack(torch.unravel_index(flat, tuple(shape)), -1)  # (B, L, ndim)
    strides = torch.tensor([int(torch.tensor(shape[d + 1:]).prod()) for d in range(len(shape))], device=h.device)
    centres = []
    for d, n in enumerate(shape):  # loop over the spatial axes, not over landmarks
        start = (idx[..., d] - 1).clamp(0, n - 3)
        base = flat - idx[..., d] * strides[d] + start * strides[d]
        samples = torch.stack([h.gather(-1, (base + j * strides[d])[..., None])[..., 0] for j in range(3)], -1)
        lm, l0, lp = samples.clamp_min(eps).log().unbind(-1)
        curv = lm - 2 * l0 + lp
        vertex = 0.5 * (lm - lp) / torch.where(curv < 0, curv, torch.full_like(curv, -1.0))
        centres.append(torch.where(curv < 0, start + 1 + vertex, idx[..., d].float()))
    centres = torch.stack(centres, -1)
    centres[~present] = float("nan")
    return centres, present


def anchor_positives(g: torch.Tensor, present: torch.Tensor, grid_shape: Sequence[int],
                     radii: torch.Tensor) -> torch.Tensor:
    """(B, A, L, *grid) bool: g (B, L, ndim) landmark positions in grid units, radii (A,) grid units."""
    cells = cell_coordinates(grid_shape, g.device, g.dtype)  # (ndim, *grid)
    nd = len(grid_shape)
    gg = torch.nan_to_num(g, nan=-1e6).view(*g.shape, *([1] * nd))  # (B, L, ndim, 1, ..., 1)
    dist = (gg - cells).square().sum(2).sqrt()  # (B, L, *grid)
    near = torch.nan_to_num(g, nan=0.0).round()
    hi = torch.tensor(grid_shape, device=g.device, dtype=g.dtype) - 1
    near = torch.minimum(near.clamp_min(0), hi).view(*g.shape, *([1] * nd))
    nearest = (cells == near).all(2)  # (B, L, *grid)
    pos = (dist[:, None] <= radii.view(1, -1, *([1] * (nd + 1)))) | nearest[:, None]
    return pos & present.view(*present.shape[:1], 1, present.shape[1], *([1] * nd))


class AnchorTargets(NamedTuple):
    positive: torch.Tensor  # (B, A, L, *grid) bool
    offsets: torch.Tensor  # (P, ndim) offset targets of the positives, in `positive.nonzero()` order
    present: torch.Tensor  # (B, L) bool


def build_anchor_targets(centres_vox: torch.Tensor, present: torch.Tensor, patch_shape: Sequence[int],
                         grid_shape: Sequence[int], radii: torch.Tensor) -> AnchorTargets:
    """Targets from landmark centres (B, L, ndim) in voxels of the patch; offsets only where positive."""
    radii = radii.to(device=centres_vox.device, dtype=torch.float32)
    g = voxel_to_grid(centres_vox.float(), grid_stride(patch_shape, grid_shape))
    pos = anchor_positives(g, present, grid_shape, radii)
    bi, ai, li, *cell = pos.nonzero(as_tuple=True)
    f = torch.stack(cell, -1).float()
    t = encode_offsets(g[bi, li], f, radii[ai][:, None])
    return AnchorTargets(pos, t, present)


class AnchorLoss(nn.Module):
    """Offset smooth-L1 on positives + balanced existence BCE + case-level BCE on the max logit (module doc)."""

    def __init__(self, radii: Sequence[float], w_offset: float = 1.0, w_exist: float = 1.0, w_case: float = 1.0,
                 smooth_l1_beta: float = 0.1):
        super().__init__()
        self.register_buffer("radii", torch.tensor([float(r) for r in radii]), persistent=False)
        self.w_offset, self.w_exist, self.w_case = float(w_offset), float(w_exist), float(w_case)
        self.beta = float(smooth_l1_beta)

    def forward(self, offsets: torch.Tensor, logits: torch.Tensor, centres_vox: torch.Tensor, present: torch.Tensor,
                patch_shape: Sequence[int]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        tg = build_anchor_targets(centres_vox, present, patch_shape, logits.shape[3:], self.radii)
        logits = logits.float()
        pos = tg.positive
        if tg.offsets.shape[0]:
            pred = offsets.movedim(3, -1)[pos].float()  # (P, ndim), same row-major order as pos.nonzero()
            l_off = F.smooth_l1_loss(pred, tg.offsets, beta=self.beta)
        else:
            l_off = offsets.sum() * 0.0  # keeps every parameter in the graph (DDP)
        bce = F.binary_cross_entropy_with_logits(logits, pos.float(), reduction="none")
        n_pos = pos.sum()
        l_pos = (bce * pos).sum() / n_pos.clamp_min(1)
        l_neg = (bce * ~pos).sum() / (pos.numel() - n_pos).clamp_min(1)
        case_logit = logits.transpose(1, 2).flatten(2).amax(-1)  # (B, L)
        l_case = F.binary_cross_entropy_with_logits(case_logit, present.float())
        total = self.w_offset * l_off + self.w_exist * (l_pos + l_neg) + self.w_case * l_case
        return total, {"offset": l_off.detach(), "exist_pos": l_pos.detach(), "exist_neg": l_neg.detach(),
                       "case": l_case.detach()}
