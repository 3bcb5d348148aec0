"""Sub-voxel peak of every heatmap channel, without touching more than a small window per channel.

Why a log-quadratic fit: a heatmap peak is (close to) a Gaussian, whose logarithm is exactly a
quadratic. A weighted least-squares fit of a full 3D (or 2D) quadratic (with cross terms, so rotated or
anisotropic blobs are exact too) to log(h) over a (2r+1)^3 (or ^2) window around the argmax therefore has
no bias for a Gaussian, averages noise over many voxels (unlike a 3-point fit per axis) and gives
the blob's covariance for free (the spread, our uncertainty cue). Weights h^2 follow from
var(log h) ~ var(h) / h^2. Voxels outside the array get weight 0, so peaks at the border work.

Only the argmax (one reduction over the array) and (2r+1)^3 values per channel are read; the full
heatmaps are never copied, neither to the CPU nor through a sigmoid (`logits=True`).
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

__all__ = ["decode_peaks"]


def decode_peaks(heatmaps, radius: int = 2, min_fraction: float = 0.05, logits: bool = False,
                 max_shift: float = 1.0) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per channel: argmax refined to sub-voxel.

    heatmaps: (L, z, y, x) or (L, y, x) numpy array or torch tensor (any device, any float dtype).
        An axis of size 1 (a 2D image in nnU-Net's (1, y, x) form) is not fitted: its index is 0 and
        its spread 0, and the quadratic is fitted over the other axes.
    logits: the values are logits; the sigmoid is applied only to the gathered windows (argmax is
        unchanged by the monotone sigmoid), so no full-size sigmoid copy is made.
    Returns idx (L, ndim) continuous array index in the heatmap's own grid, peak_value (L,)
    (the heatmap value at the argmax voxel, after the sigmoid if `logits`), spread_vox (L, ndim)
    (standard deviation of the fitted Gaussian along each axis in voxels; NaN when the peak has no
    usable curvature, e.g. a single-voxel spike or a flat map). The refinement is clamped to
    +-max_shift voxels around the argmax.
    """
    ndim = heatmaps.ndim - 1
    if ndim not in (2, 3):
        raise ValueError(f"decode_peaks expects (L, z, y, x) or (L, y, x) heatmaps, got shape {tuple(heatmaps.shape)}")
    L = int(heatmaps.shape[0])
    shape = np.asarray(heatmaps.shape[1:], dtype=np.int64)
    if L == 0:
        return np.zeros((0, ndim)), np.zeros(0), np.zeros((0, ndim))
    active = shape > 1
    flat_arg = _argmax_per_channel(heatmaps)  # (L,) int64
    peak_vox = np.stack(np.unravel_index(flat_arg, tuple(shape)), axis=1)  # (L, ndim)

    offsets = _window_offsets(radius, active)  # (W, ndim), zero along singleton axes
    pos = peak_vox[:, None, :] + offsets[None]  # (L, W, ndim)
    inside = np.all((pos >= 0) & (pos < shape), axis=2)  # (L, W)
    pos = np.clip(pos, 0, shape - 1)
    values = _gather(heatmaps, pos)  # (L, W) float64
    if logits:
        values = 1.0 / (1.0 + np.exp(-values))
    center = (offsets == 0).all(axis=1).argmax()
    peak_value = values[:, center].copy()

    offset = np.zeros((L, ndim))
    spread = np.zeros((L, ndim))
    if active.any():
        offset[:, active], spread[:, active] = _fit_log_quadratic(values, inside, offsets[:, active], peak_value,
                                                                  min_fraction)
    else:  # a single voxel: nothing to fit
        spread[:] = np.nan
    offset = np.clip(np.nan_to_num(offset, nan=0.0), -max_shift, max_shift)
    # a peak lies inside the grid it was found in: at most half a voxel beyond the outermost voxel centres
    # (a border argmax whose fit leans outwards would otherwise place the landmark outside the image)
    idx = np.clip(peak_vox.astype(np.float64) + offset, -0.5, shape - 0.5)
    return idx, peak_value, spread


# --------------------------------------------------------------------------- helpers
def _argmax_per_channel(heatmaps) -> np.ndarray:
    """Flat argmax per channel; a view-reshape, no copy of a contiguous array."""
    L = heatmaps.shape[0]
    if _is_torch(heatmaps):
        flat = heatmaps.reshape(L, -1)
        if not flat.dtype.is_floating_point:
            flat = flat.float()
        return flat.argmax(dim=1).cpu().numpy().astype(np.int64)
    return np.asarray(heatmaps).reshape(L, -1).argmax(axis=1).astype(np.int64)


def _gather(heatmaps, pos: np.ndarray) -> np.ndarray:
    """Values at integer positions (L, W, ndim) -> (L, W) float64; only these values leave the device."""
    L, W = pos.shape[:2]
    ch = np.broadcast_to(np.arange(L)[:, None], (L, W))
    index = [ch] + [pos[..., a] for a in range(pos.shape[2])]
    if _is_torch(heatmaps):
        import torch
        dev = heatmaps.device
        t = tuple(torch.as_tensor(np.ascontiguousarray(a), device=dev) for a in index)
        return heatmaps[t].double().cpu().numpy()
    return np.asarray(heatmaps)[tuple(index)].astype(np.float64)


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def _window_offsets(radius: int, active: np.ndarray) -> np.ndarray:
    """(W, ndim) offsets of the fit window: -radius..radius along active axes, 0 along the others."""
    r = np.arange(-radius, radius + 1)
    axes = [r if a else np.zeros(1, dtype=r.dtype) for a in active]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(active))


def _design(offsets: np.ndarray, full: bool) -> np.ndarray:
    """Columns: 1, x_a per axis, x_a^2 per axis [, x_a x_b for a < b] (k = offsets.shape[1] axes)."""
    x = offsets.astype(np.float64)
    k = x.shape[1]
    cols = [np.ones(len(x))] + [x[:, a] for a in range(k)] + [x[:, a] ** 2 for a in range(k)]
    if full:
        cols += [x[:, a] * x[:, b] for a, b in _pairs(k)]
    return np.stack(cols, axis=1)


def _pairs(k: int):
    return [(a, b) for a in range(k) for b in range(a + 1, k)]


def _weighted_lstsq(A: np.ndarray, logv: np.ndarray, w: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per-channel weighted least squares, batched: returns coefficients (L, P) and a usable mask (L,)."""
    AtWA = np.einsum("wp,lw,wq->lpq", A, w, A)
    AtWy = np.einsum("wp,lw->lp", A, w * logv)
    P = A.shape[1]
    # scale-aware conditioning check instead of raising on singular systems
    scale = np.trace(AtWA, axis1=1, axis2=2)[:, None, None] / P
    ok = scale[:, 0, 0] > 0
    safe = np.where(ok[:, None, None], AtWA, np.eye(P))
    cond = np.linalg.cond(safe)
    ok &= np.isfinite(cond) & (cond < 1e10)
    safe = np.where(ok[:, None, None], safe, np.eye(P))
    coef = np.linalg.solve(safe, np.where(ok[:, None], AtWy, 0.0)[..., None])[..., 0]
    return coef, ok


def _fit_log_quadratic(values, inside, offsets, peak_value, min_fraction):
    """Vertex and spread (L, k) of the weighted log-quadratic fit over the k axes of `offsets`."""
    L, k = values.shape[0], offsets.shape[1]
    usable = inside & (values > np.maximum(peak_value, 0)[:, None] * min_fraction) & (values > 0)
    logv = np.log(np.where(usable, values, 1.0))
    w = np.where(usable, values, 0.0) ** 2
    offset = np.full((L, k), np.nan)
    spread = np.full((L, k), np.nan)

    # full quadratic: log h = c + b.x + x^T Q x ; vertex x* = -(2Q)^-1 b ; covariance = (-2Q)^-1
    coef, ok = _weighted_lstsq(_design(offsets, full=True), logv, w)
    b = coef[:, 1:1 + k]
    Q = np.zeros((L, k, k))
    Q[:, range(k), range(k)] = coef[:, 1 + k:1 + 2 * k]
    for col, (i, j) in enumerate(_pairs(k), start=1 + 2 * k):
        Q[:, i, j] = Q[:, j, i] = coef[:, col] / 2
    H = np.where(ok[:, None, None], 2 * Q, -np.eye(k))
    ok &= np.all(np.linalg.eigvalsh(H) < 0, axis=1)
    if ok.any():
        cov = np.linalg.inv(-H[ok])
        offset[ok] = np.einsum("lij,lj->li", cov, b[ok])
        spread[ok] = np.sqrt(np.diagonal(cov, axis1=1, axis2=2))

    # fallback per axis (no cross terms) where the full fit was ill-posed: too few usable voxels
    todo = ~ok
    if todo.any():
        coef, ok2 = _weighted_lstsq(_design(offsets, full=False), logv[todo], w[todo])
        a, bb = coef[:, 1 + k:1 + 2 * k], coef[:, 1:1 + k]
        good = ok2[:, None] & (a < 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            off = np.where(good, -bb / (2 * a), 0.0)
            sp = np.where(good, np.sqrt(-1.0 / (2 * a)), np.nan)
        offset[todo], spread[todo] = off, sp
    return offset, spread
