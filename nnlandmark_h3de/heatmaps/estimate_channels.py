"""The global stage's estimates as input channels of the local network (one Gaussian per landmark).

Why: a local network trained from scratch in a CPU budget must learn both *which* landmark a
structure is and *where exactly* it lies. Given the global estimate as a prior heatmap (as nnU-Net's
cascade feeds the low-resolution segmentation to the full-resolution stage), it only has to learn the
second: move a rough point onto the structure next to it. In training the estimates are simulated
(the true points moved by a random offset of the global stage's size, `simulated_estimates`); in
prediction they are the global stage's own (two_stage_tiles.TilePlan.tile_estimates).

The same rule draws both: a channel is a Gaussian of `sigma` voxels at the estimate when the estimate
lies in the patch (-0.5 <= x <= n - 0.5), and zero otherwise (absent landmark, or its estimate
elsewhere).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from nnlandmark_h3de.heatmaps.gaussian_heatmap import gaussian_heatmaps

__all__ = ["estimate_channels", "simulated_estimates"]


def estimate_channels(estimates: torch.Tensor, shape: Sequence[int], sigma: float,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, L, ndim) estimates in patch voxels (NaN rows = none) -> (B, L, *shape) prior heatmaps."""
    if estimates.ndim != 3 or estimates.shape[-1] != len(shape):
        raise ValueError(f"estimates of shape {tuple(estimates.shape)} do not match a {len(shape)}D patch "
                         "(expected (B, L, ndim))")
    e = estimates.to(torch.float32 if estimates.device.type == "mps" else torch.float64)
    upper = e.new_tensor([n - 0.5 for n in shape])
    inside = torch.isfinite(e).all(-1) & ((e >= -0.5) & (e <= upper)).all(-1)
    return gaussian_heatmaps(e, inside, shape, [float(sigma)] * len(shape), dtype=dtype)


def simulated_estimates(points: torch.Tensor, error_sd_voxels: Sequence[float],
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The true points (B, L, ndim) each moved by a normal offset of `error_sd_voxels` per axis: what a
    global stage with that error would give (NaN rows stay NaN)."""
    sd = points.new_tensor(np.asarray(error_sd_voxels, dtype=np.float64))
    noise = torch.randn(points.shape, generator=generator, dtype=points.dtype,
                        device=points.device if generator is None else generator.device)
    return points + noise.to(points.device) * sd
