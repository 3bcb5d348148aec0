"""Two-stage prediction's local stage: the tiles around the global estimates and each landmark's peak in them.

Why: a sliding window over a whole CT runs the network on hundreds of tiles and lets every tile
propose a peak for every landmark, so a look-alike far away can win. Given one estimate per
landmark (from a global stage), only tiles around the estimates are predicted, and each
landmark's peak is searched within `radius` of its estimate (the global stage's validated error).
Estimates close to each other share a tile: a tile is centred on the first unassigned estimate
and takes every other estimate whose search ball lies inside its central part (away from the
tile border, where a network sees less context).

`plan_tiles` plans a preprocessed case's tiles in its padded array, `plan_regional_tiles` those of a
case not yet resampled (each tile from its own region, regional_preprocessing.py); the predictor runs
the network on them and `tile_peaks` reads each landmark's peak back in the case's network space.
`TileSum` sums the tiles' logits over the test-time mirrors as they come and reads each mirror's own
peaks at once, so memory does not grow with the number of mirrors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image

from nnlandmark_h3de.inference.index_mapping import world_to_network_index
from nnlandmark_h3de.inference.peaks import decode_peaks
from nnlandmark_h3de.inference.postprocessing import existence_ratio
from nnlandmark_h3de.inference.regional_preprocessing import NormalizedCase, Region, region_box
from nnlandmark_h3de.landmarks import LandmarkSet

__all__ = ["tile_groups", "peaks_in_tiles", "TilePlan", "LocalSearch", "plan_tiles", "plan_regional_tiles",
           "tile_peaks", "TileSum", "keep_weak_estimates", "global_fallback_uncertainty"]


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


# ------------------------------------------------------------------ planning one case's tiles
@dataclass
class TilePlan:
    """Two-stage prediction of one case: the tiles to predict and where to search (padded array indices)."""
    groups: list  # [(tile origin, landmark indices)] from tile_groups
    centres: np.ndarray  # (L, 3) global estimates, NaN = absent
    radius: np.ndarray  # (3,) search radius per axis in voxels
    offset: np.ndarray  # (3,) padding before the array: padded index = index + offset
    whole_image: bool = False  # search balls so large that tiles would cost more: one sliding window
    n_tiles: int = 0  # network tiles per fold and mirror
    regions: Optional[list] = None  # regional preprocessing: one Region per group, whose padded space its
    # tile origin and its landmarks' centres are in; the tiles' inputs are then stacked (G, C, *patch)

    def tile_input(self, padded: torch.Tensor, g: int, patch: Sequence[int]) -> torch.Tensor:
        """Group g's network input (C, *patch): its slice of the padded case, or its own region's tile."""
        if self.regions is not None:
            return padded[g]
        lo = self.groups[g][0]
        return padded[(slice(None),) + tuple(slice(int(o), int(o) + p) for o, p in zip(lo, patch))]

    def tile_estimates(self, g: int) -> np.ndarray:
        """Every landmark's global estimate (L, 3) in group g's tile voxels (NaN where none): what a local
        network that takes the estimates as input channels sees in that tile."""
        if self.regions is None:
            return self.centres - self.groups[g][0]
        return self.regions[g].from_case_index(self.to_case_index(self.centres)) - self.groups[g][0]

    def to_case_index(self, idx: np.ndarray) -> np.ndarray:
        """Indices in tile space (padded array or, per group, its region) -> the case's network indices."""
        if self.regions is None:
            return idx - self.offset
        out = np.full_like(np.asarray(idx, dtype=np.float64), np.nan)
        for (_, members), region in zip(self.groups, self.regions):
            out[members] = region.to_case_index(idx[members])
        return out


@dataclass(frozen=True)
class LocalSearch:
    """What planning needs from the model: its plans and configuration, the calibrated search radius,
    and how many tiles nnU-Net's sliding window puts on a shape (tiles beyond that cost more than it)."""
    plans_manager: object
    configuration_manager: object
    radius_mm: float
    count_windows: Callable[[Sequence[int]], int]

    @property
    def patch(self) -> List[int]:
        return list(self.configuration_manager.patch_size)

    def radius_voxels(self) -> np.ndarray:
        return self.radius_mm / np.asarray(self.configuration_manager.spacing, dtype=np.float64)

    def estimate_centres(self, estimate: LandmarkSet, properties: dict, network_shape) -> np.ndarray:
        """Global estimates as network indices of the case; one outside the image (cut off by the field of
        view) is absent (NaN)."""
        shape = np.asarray(network_shape, dtype=np.float64)
        centres = world_to_network_index(estimate.points_lps, properties, self.plans_manager,
                                         self.configuration_manager, network_shape=tuple(network_shape))
        centres[np.any((centres < -0.5) | (centres > shape - 0.5), axis=1)] = np.nan
        return centres


def plan_tiles(search: LocalSearch, data: torch.Tensor, properties: dict,
               estimate: LandmarkSet) -> Tuple[torch.Tensor, TilePlan]:
    """Preprocessed case + global estimate -> (padded data, TilePlan)."""
    centres = search.estimate_centres(estimate, properties, data.shape[1:])
    patch = search.patch
    padded, slicer = pad_nd_image(data, patch, "constant", {"value": 0}, True, None)
    offset = np.asarray([s.start for s in slicer[1:]], dtype=np.float64)
    radius = search.radius_voxels()
    groups = tile_groups(centres + offset, padded.shape[1:], patch, radius)
    n_window = search.count_windows(padded.shape[1:])
    if len(groups) < n_window:
        return padded, TilePlan(groups, centres + offset, radius, offset, False, len(groups))
    # the search balls need as many tiles as the whole image: one sliding window, the balls masked in it
    present = [k for k in range(len(centres)) if np.all(np.isfinite(centres[k]))]
    return padded, TilePlan([(np.zeros(len(patch), dtype=int), present)], centres + offset, radius, offset, True,
                            n_window)


def plan_regional_tiles(search: LocalSearch, case: NormalizedCase,
                        estimate: LandmarkSet) -> Optional[Tuple[torch.Tensor, TilePlan]]:
    """Normalised, not yet resampled case + global estimate -> (the tiles' inputs (G, C, *patch), TilePlan),
    each tile resampled from its own region (regional_preprocessing.py); None where the image is smaller
    than a patch or the tiles would cost as much as the whole image (then it is resampled whole)."""
    shape, patch = np.asarray(case.network_shape), np.asarray(search.configuration_manager.patch_size)
    if np.any(shape < patch):
        return None
    centres = search.estimate_centres(estimate, case.properties, case.network_shape)
    radius = search.radius_voxels()
    groups = tile_groups(centres, shape, patch, radius)
    if len(groups) >= search.count_windows(tuple(shape)):
        return None
    inputs, local_groups, regions = [], [], []
    local_centres = np.full_like(centres, np.nan)
    for lo, members in groups:
        data, props = case.resample(region_box(lo, patch, case), search.configuration_manager)
        padded, slicer = pad_nd_image(torch.from_numpy(data), list(patch), "constant", {"value": 0}, True, None)
        region = Region(props, tuple(data.shape[1:]), np.asarray([s.start for s in slicer[1:]], dtype=np.float64),
                        case, search.plans_manager, search.configuration_manager)
        origin = np.round(region.from_case_index(np.asarray(lo, dtype=np.float64)[None])[0])
        origin = np.clip(origin, 0, np.asarray(padded.shape[1:]) - patch).astype(int)
        inputs.append(padded[(slice(None),) + tuple(slice(o, o + p) for o, p in zip(origin, patch))])
        local_centres[members] = region.from_case_index(centres[members])
        local_groups.append((origin, members))
        regions.append(region)
    return torch.stack(inputs), TilePlan(local_groups, local_centres, radius, np.zeros(3), False, len(groups),
                                         regions)


# ------------------------------------------------------------------ the peaks of predicted tiles
def tile_peaks(tile_logits: torch.Tensor, tiles: TilePlan):
    """(idx (L, 3) network indices, peak, width, fallback): each landmark's peak in its search ball;
    `fallback` marks landmarks whose maximum lies on the ball's surface, whose idx is the global estimate.
    tile_logits: (G, C, *patch), channel 0 the constant-zero one."""
    patch = tuple(tile_logits.shape[2:])
    idx, peak, width, on_border = peaks_in_tiles(tile_logits[:, 1:], tiles.groups, tiles.centres, tiles.radius,
                                                 patch)
    idx, fallback = _estimates_where_on_border(idx, on_border, tiles)
    return idx, peak, width, fallback


def _estimates_where_on_border(idx: np.ndarray, on_border: np.ndarray, tiles: TilePlan):
    """(case network indices with the global estimate where the maximum lies on the ball's surface, fallback)."""
    fallback = on_border & np.all(np.isfinite(tiles.centres), axis=1)
    idx = idx.copy()
    idx[fallback] = tiles.centres[fallback]
    return tiles.to_case_index(idx), fallback


class TileSum:
    """The planned tiles' logits summed over the test-time mirrors as each tile of each mirror comes, and
    every mirror's own peaks read from it at once (what `tile_peaks` reads from that mirror's tiles).

    Why: keeping every mirror's tiles to average them at the end holds 8 x G x (L + 1) x patch floats
    (~22 GB for 32 landmarks, 128^3 patches, 10 tiles); the running sum holds one set whatever the
    number of mirrors. The sum is exact in the same order, so the mean equals the stacked mean."""

    def __init__(self, tiles: TilePlan, n_mirrors: int):
        self.tiles, self.n_mirrors = tiles, int(n_mirrors)
        self.total: Optional[torch.Tensor] = None  # (G, C, *patch) fp32, on the device of the first tile
        n_landmarks = len(tiles.centres)
        self._idx = np.full((self.n_mirrors, n_landmarks, 3), np.nan)  # each mirror's peaks, tile space
        self._on_border = np.zeros((self.n_mirrors, n_landmarks), dtype=bool)

    def add(self, g: int, mirror: int, out: torch.Tensor) -> None:
        """Tile g's logits (C, *patch) in one mirror, flipped back (pair channels swapped where needed)."""
        if self.total is None:
            self.total = torch.zeros((len(self.tiles.groups),) + tuple(out.shape), dtype=torch.float32,
                                     device=out.device)
        self.total[g].add_(out.to(self.total.device))
        if self.n_mirrors > 1:
            lo, members = self.tiles.groups[g]
            idx, _, _, on_border = peaks_in_tiles(out[None, 1:], [(lo, members)], self.tiles.centres,
                                                  self.tiles.radius, tuple(out.shape[1:]))
            self._idx[mirror, members], self._on_border[mirror, members] = idx[members], on_border[members]

    def mean(self) -> torch.Tensor:
        """The mirrors' mean logits (G, C, *patch), in place of the sum."""
        return self.total.div_(self.n_mirrors)

    def member_peaks(self) -> List[np.ndarray]:
        """Each mirror's own peaks (L, 3) in case network indices; none with a single mirror."""
        if self.n_mirrors < 2:
            return []
        return [_estimates_where_on_border(idx, on_border, self.tiles)[0]
                for idx, on_border in zip(self._idx, self._on_border)]


def blend_points(global_pts: np.ndarray, local_pts: np.ndarray, weight) -> np.ndarray:
    """global + weight * (local - global), row-wise (weight: one number, or one per landmark row (L,) of
    points (..., L, 3)); where either point is missing, the other one. The one blend of two-stage prediction
    (`blend_with_estimates`) and of its calibration (`fit_local_weight(s)`)."""
    g, l = np.asarray(global_pts, dtype=np.float64), np.asarray(local_pts, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    out = g + (w[:, None] if w.ndim else w) * (l - g)
    out = np.where(np.isfinite(g).all(-1, keepdims=True), out, l)
    return np.where(np.isfinite(l).all(-1, keepdims=True), out, g)


def blend_with_estimates(idx: np.ndarray, tiles: TilePlan, weight) -> np.ndarray:
    """The local peaks moved back towards the global estimates by `blend_points` (weight: one number or one
    per landmark), in case indices (an affine map of world points, so the same blend as in world mm); where
    a landmark has no estimate or no peak, its peak."""
    weight = np.asarray(weight, dtype=np.float64)
    if np.all(weight == 1.0):
        return idx
    centres = tiles.to_case_index(tiles.centres)
    has = np.all(np.isfinite(centres), axis=1) & np.all(np.isfinite(idx), axis=1)
    out = np.array(idx, dtype=np.float64, copy=True)
    out[has] = blend_points(centres[has], out[has], weight[has] if weight.ndim else weight)
    return out


def keep_weak_estimates(idx: np.ndarray, fallback: np.ndarray, fold_peaks: np.ndarray, floor: np.ndarray,
                        tiles: TilePlan) -> Tuple[np.ndarray, np.ndarray]:
    """Where the local peak is too weak, it does not overrule the global estimate: (idx with those set to
    it, widened fallback). fold_peaks: (F, L) each fold's own local peak (or (L,)); floor: (L,), or (F, L)
    each fold's own floor (fitted in its two-stage validation on its own peaks). Each fold's peak is
    judged against its floor and the folds' peak/floor ratios are averaged (the soft vote of
    `existence_ratio`): weak where the mean ratio is under 1. One floor for all folds is the same as
    the folds' mean peak under it."""
    weak = (existence_ratio(fold_peaks, floor) < 1.0) & np.all(np.isfinite(tiles.centres), axis=1)
    idx = idx.copy()
    idx[weak] = tiles.to_case_index(tiles.centres)[weak]
    return idx, fallback | weak


def global_fallback_uncertainty(uncertainty: np.ndarray, two_stage: dict, fallback_mm: float) -> np.ndarray:
    """Where the global estimate stands (`two_stage["fallback"]`), its uncertainty is at least the global
    stage's validated RMS error `fallback_mm` (and its own spread, for the atlas: the estimate's
    uncertainty_mm)."""
    own = two_stage["estimate"].uncertainty_mm
    own = np.full(len(uncertainty), np.nan) if own is None else np.asarray(own, dtype=np.float64)
    floor = np.fmax(np.nan_to_num(own, nan=0.0), fallback_mm)
    return np.where(two_stage["fallback"], np.fmax(uncertainty, floor), uncertainty)
