"""Local stage: refine global estimates with the full-resolution network on a few tiles only.

Why: a sliding window over a whole CT runs the network on hundreds of tiles and lets every tile
propose a peak for every landmark, so a look-alike far away can win. Given one estimate per
landmark (from a global stage), only tiles around the estimates are predicted, and each
landmark's peak is searched within `radius` of its estimate (the global stage's validated error).
Estimates close to each other share a tile: a tile is centred on the first unassigned estimate
and takes every other estimate whose search ball lies inside its central part (away from the
tile border, where a network sees less context).
"""
from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import numpy as np
import torch

from nnlandmark_h3de.inference.peaks import decode_peaks

__all__ = ["tile_groups", "peaks_in_tiles", "refine_in_tiles"]


def _tile_origin(centre: np.ndarray, shape: np.ndarray, patch: np.ndarray) -> np.ndarray:
    lo = np.round(centre - (patch - 1) / 2).astype(int)
    return np.clip(lo, 0, np.maximum(shape - patch, 0))


def tile_groups(centres: np.ndarray, shape: Sequence[int], patch: Sequence[int], radius: Sequence[float],
                border_fraction: float = 0.125) -> List[Tuple[np.ndarray, List[int]]]:
    """[(tile origin (3,), landmark indices)], covering every finite centre exactly once.

    centres: (L, 3) network-space indices (NaN rows skipped); shape: the (padded) array shape, at
    least `patch` on every axis; radius: search radius per axis in voxels.
    """
    shape, patch, radius = (np.asarray(v, dtype=np.float64) for v in (shape, patch, radius))
    margin = np.floor(patch * border_fraction)
    todo = [k for k in range(len(centres)) if np.all(np.isfinite(centres[k]))]
    groups: List[Tuple[np.ndarray, List[int]]] = []
    while todo:
        first = todo.pop(0)
        lo = _tile_origin(centres[first], shape, patch)
        members = [first]
        inner_lo = lo + np.where(lo > 0, margin, 0)  # the image border is no tile border
        inner_hi = lo + patch - 1 - np.where(lo + patch < shape, margin, 0)
        for k in list(todo):
            if np.all(centres[k] - radius >= inner_lo) and np.all(centres[k] + radius <= inner_hi):
                members.append(k)
                todo.remove(k)
        groups.append((lo.astype(int), members))
    return groups


def _ball_mask(shape: Sequence[int], centre: np.ndarray, radius: np.ndarray) -> torch.Tensor:
    axes = [((torch.arange(n, dtype=torch.float64) - c) / r) ** 2 for n, c, r in zip(shape, centre, radius)]
    return (axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :]) <= 1.0


def peaks_in_tiles(tiles: torch.Tensor, groups, centres: np.ndarray, radius: Sequence[float],
                   patch: Sequence[int]) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each landmark's peak within `radius` of its centre, in the tile of its group.

    tiles: (G, L, *patch) heatmap logits, one per group of `tile_groups`. Returns idx (L, 3) in
    array coordinates, peak (L,) sigmoid heights, width (L, 3) heatmap widths (decode_peaks; all NaN
    where no centre) and `on_border` (L,):
    the maximum lies within 1.5 voxels of the search ball's surface, so the local peak is not inside
    the ball (the network's true maximum is further away, or there is none).
    """
    centres = np.asarray(centres, dtype=np.float64)
    radius = np.maximum(np.asarray(radius, dtype=np.float64), 1.0)
    idx = np.full_like(centres, np.nan)
    peak = np.full(len(centres), np.nan)
    width = np.full_like(centres, np.nan)
    on_border = np.zeros(len(centres), dtype=bool)
    for g, (lo, members) in enumerate(groups):
        for k in members:
            local = centres[k] - lo
            masked = tiles[g, k].float().masked_fill(~_ball_mask(patch, local, radius).to(tiles.device),
                                                     float("-inf"))
            i, p, w = decode_peaks(masked[None], logits=True)
            idx[k], peak[k], width[k] = i[0] + lo, p[0], w[0]
            reach = np.linalg.norm((i[0] - local) / radius) * radius.min()
            on_border[k] = reach > radius.min() - 1.5
    return idx, peak, width, on_border


def refine_in_tiles(tile_logits: Callable[[np.ndarray], torch.Tensor], shape: Sequence[int], centres: np.ndarray,
                    patch: Sequence[int], radius: Sequence[float]) -> Tuple[np.ndarray, np.ndarray, int]:
    """Peaks of each landmark's channel within `radius` of its centre, from as few tiles as needed.

    tile_logits(origin) -> (L, *patch) heatmap logits of the tile at `origin` (network space).
    Returns idx (L, 3) (NaN where no centre), peak (L,) sigmoid heights (NaN where no centre), and
    the number of tiles predicted.
    """
    radius = np.maximum(np.asarray(radius, dtype=np.float64), 1.0)
    groups = tile_groups(np.asarray(centres, dtype=np.float64), shape, patch, radius)
    if not groups:
        return np.full((len(centres), 3), np.nan), np.full(len(centres), np.nan), 0
    tiles = torch.stack([tile_logits(lo) for lo, _ in groups])
    idx, peak, _, _ = peaks_in_tiles(tiles, groups, centres, radius, patch)
    return idx, peak, len(groups)
