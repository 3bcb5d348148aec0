"""Two-stage prediction for a local network that takes the global estimates as input channels
(nnLandmarkTrainerPrior): the channels drawn in each tile and kept consistent under test-time mirrors.

A mirror flips the tile, estimate channels included; where it flips the case's left/right axis, the
network's outputs are pair-swapped back (case_mirroring), so its estimate inputs are pair-swapped on
the way in: in the flipped tile, landmark k's estimate sits on its partner's structure.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from nnlandmark_h3de.heatmaps.estimate_channels import estimate_channels
from nnlandmark_h3de.inference.two_stage_tiles import TilePlan

__all__ = ["estimate_sigma", "check_whole_image_allowed", "with_estimate_channels", "mirrored_input"]


def estimate_sigma(network) -> Optional[float]:
    """The width (voxels) of the estimate channels the network takes, or None (image only)."""
    return getattr(getattr(network, "_orig_mod", network), "estimate_sigma", None)


def check_whole_image_allowed(network) -> None:
    """A network that refines global estimates has nothing to refine over the whole image: a clear error."""
    if estimate_sigma(network) is not None:
        raise ValueError("this model takes the global stage's estimates as input (nnLandmarkTrainerPrior): predict "
                         "in two stages, with --global atlas|deformable|auto after nnLandmark_calibrate_global "
                         "(no whole-image prediction)")


def with_estimate_channels(x: torch.Tensor, tiles: TilePlan, g: int, sigma: Optional[float]) -> torch.Tensor:
    """Tile g's input (1, C, *patch) with every landmark's estimate channel after the image's (sigma None: x)."""
    if sigma is None:
        return x
    est = torch.from_numpy(tiles.tile_estimates(g)).to(x.device)[None]
    return torch.cat((x, estimate_channels(est, x.shape[2:], sigma, dtype=x.dtype)), 1)


def mirrored_input(x: torch.Tensor, dims: Sequence[int], pair_channels: Optional[Sequence[int]],
                   n_estimates: int) -> torch.Tensor:
    """x (1, C, *patch) flipped along dims; with `pair_channels` (the output's 1 + L channel permutation,
    given where the mirror flips left/right) the last n_estimates channels are pair-swapped the same way."""
    out = torch.flip(x, list(dims)) if dims else x
    if pair_channels is None or not n_estimates:
        return out
    first = out.shape[1] - n_estimates
    perm = [c - 1 + first for c in list(pair_channels)[1:]]
    return torch.cat((out[:, :first], out[:, perm]), 1)
