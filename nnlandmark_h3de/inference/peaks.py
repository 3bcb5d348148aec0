"""Sub-voxel peak of every heatmap channel, without touching more than a small window per channel.

Why a log-quadratic fit: a heatmap peak is (close to) a Gaussian, whose logarithm is exactly a
quadratic. A weighted least-squares fit of a full 3D quadratic (with cross terms, so rotated or
anisotropic blobs are exact too) to log(h) over a (2r+1)^3 window around the argmax therefore has
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

    heatmaps: (L, z, y, x) numpy array or torch tensor (any device, any float dtype).
    logits: the values are logits; the sigmoid is applied only to the gathered windows (argmax is
        unchanged by the monotone sigmoid), so no full-size sigmoid copy is made.
    Returns idx (L, 3) continuous (z, y, x) array index in the heatmap's own grid, peak_value (L,)
    (the heatmap value at the argmax voxel, after the sigmoid if `logits`), spread_vox (L, 3)
    (standard deviation of the fitted Gaussian along z, y, x in voxels; NaN when the peak has no
    usable curvature, e.g. a single-voxel spike or a flat map). The refinement is clamped to
    +-max_shift voxels around the argmax.
    """
    if heatmaps.ndim != 4:
        raise ValueError(f"decode_peaks expects (L, z, y, x) heatmaps, got shape {tuple(heatmaps.shape)}")
    L = int(heatmaps.shape[0])
    shape = np.asarray(heatmaps.shape[1:], dtype=np.int64)
    if L == 0:
        return np.zeros((0, 3)), np.zeros(0), np.zeros((0, 3))
    flat_arg = _argmax_per_channel(heatmaps)  # (L,) int64
    peak_vox = np.stack(np.unravel_index(flat_arg, tuple(shape)), axis=1)  # (L, 3)

    offsets = _window_offsets(radius)  # (W, 3)
    pos = peak_vox[:, None, :] + offsets[None]  # (L, W, 3)
    inside = np.all((pos >= 0) & (pos < shape), axis=2)  # (L, W)
    pos = np.clip(pos, 0, shape - 1)
    values = _gather(heatmaps, pos)  # (L, W) float64
    if logits:
        values = 1.0 / (1.0 + np.exp(-values))
    center = (offsets == 0).all(axis=1).argmax()
    peak_value = values[:, center].copy()

    offset, spread = _fit_log_quadratic(values, inside, offsets, peak_value, min_fraction)
    offset = np.clip(np.nan_to_num(offset, nan=0.0), -max_shift, max_shift)
    return peak_vox.astype(np.float64) + offset, peak_value, spread


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
    """Values at integer positions (L, W, 3) -> (L, W) float64; only these values leave the device."""
    L, W = pos.shape[:2]
    ch = np.broadcast_to(np.arange(L)[:, None], (L, W))
    if _is_torch(heatmaps):
        import torch
        dev = heatmaps.device
        t = [torch.as_tensor(np.ascontiguousarray(a), device=dev) for a in (ch, pos[..., 0], pos[..., 1], pos[..., 2])]
        return heatmaps[t[0], t[1], t[2], t[3]].double().cpu().numpy()
    return np.asarray(heatmaps)[ch, pos[..., 0], pos[..., 1], pos[..., 2]].astype(np.float64)


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def _window_offsets(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return np.stack(np.meshgrid(r, r, r, indexing="ij"), axis=-1).reshape(-1, 3)


def _design(offsets: np.ndarray, full: bool) -> np.ndarray:
    """Columns: 1, z, y, x, z^2, y^2, x^2 [, zy, zx, yx]."""
    z, y, x = (offsets[:, i].astype(np.float64) for i in range(3))
    cols = [np.ones_like(z), z, y, x, z * z, y * y, x * x]
    if full:
        cols += [z * y, z * x, y * x]
    return np.stack(cols, axis=1)


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
    L = values.shape[0]
    usable = inside & (values > np.maximum(peak_value, 0)[:, None] * min_fraction) & (values > 0)
    logv = np.log(np.where(usable, values, 1.0))
    w = np.where(usable, values, 0.0) ** 2
    offset = np.full((L, 3), np.nan)
    spread = np.full((L, 3), np.nan)

    # full quadratic: log h = c + b.x + x^T Q x ; vertex x* = -(2Q)^-1 b ; covariance = (-2Q)^-1
    coef, ok = _weighted_lstsq(_design(offsets, full=True), logv, w)
    b = coef[:, 1:4]
    Q = np.zeros((L, 3, 3))
    Q[:, [0, 1, 2], [0, 1, 2]] = coef[:, 4:7]
    for col, (i, j) in zip((7, 8, 9), ((0, 1), (0, 2), (1, 2))):
        Q[:, i, j] = Q[:, j, i] = coef[:, col] / 2
    H = np.where(ok[:, None, None], 2 * Q, -np.eye(3))
    ok &= np.all(np.linalg.eigvalsh(H) < 0, axis=1)
    if ok.any():
        cov = np.linalg.inv(-H[ok])
        offset[ok] = np.einsum("lij,lj->li", cov, b[ok])
        spread[ok] = np.sqrt(np.diagonal(cov, axis1=1, axis2=2))

    # fallback per axis (no cross terms) where the full fit was ill-posed: too few usable voxels
    todo = ~ok
    if todo.any():
        coef, ok2 = _weighted_lstsq(_design(offsets, full=False), logv[todo], w[todo])
        a, bb = coef[:, 4:7], coef[:, 1:4]
        good = ok2[:, None] & (a < 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            off = np.where(good, -bb / (2 * a), 0.0)
            sp = np.where(good, np.sqrt(-1.0 / (2 * a)), np.nan)
        offset[todo], spread[todo] = off, sp
    return offset, spread
