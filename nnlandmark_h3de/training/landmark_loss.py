"""Heatmap losses on the 1 + L channel output (channel 0 is the constant zero logit, never scored).

Both compute in float32 with autocast switched off: sigmoid/MSE and BCE of half-precision
heatmaps whose values are mostly ~0 lose the small residuals the peak is made of.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["HeatmapMSELoss", "TopKHeatmapBCELoss"]


def _no_autocast(device: torch.device):
    # torch.autocast(enabled=False) complains on some backends (mps); only CUDA runs under autocast in nnU-Net
    return torch.autocast(device.type, enabled=False) if device.type == "cuda" else nullcontext()


class HeatmapMSELoss(nn.Module):
    """Mean squared error between sigmoid(logits[:, 1:]) and the (B, L, ...) heatmaps (nnLandmark paper)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with _no_autocast(logits.device):
            return F.mse_loss(torch.sigmoid(logits[:, 1:].float()), target.float())


class TopKHeatmapBCELoss(nn.Module):
    """Binary cross-entropy of logits[:, 1:] vs the heatmaps, averaged over the worst k % of voxels
    (the public nnLandmark code's default loss)."""

    def __init__(self, k: float = 20.0):
        super().__init__()
        if not 0 < k <= 100:
            raise ValueError(f"k must be in (0, 100] percent, got {k}")
        self.k = float(k)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with _no_autocast(logits.device):
            if self.k == 100.0:  # every voxel: no top-k selection (it costs a pass over the whole batch)
                return F.binary_cross_entropy_with_logits(logits[:, 1:].float(), target.float())
            bce = F.binary_cross_entropy_with_logits(logits[:, 1:].float(), target.float(), reduction="none")
            n = max(1, int(round(bce.numel() * self.k / 100)))
            return bce.flatten().topk(n, sorted=False).values.mean()
