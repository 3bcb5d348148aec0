"""Two views of a patch with known correspondences, and the multi-scale InfoNCE loss on them (CC2D).

View 1 is the patch nnU-Net's loader and augmentation produced. View 2 is view 1 resampled through
a random affine (rotation, isotropic scale, translation; in millimetres, so anisotropic spacings are
rotated correctly) plus an intensity jitter, so every point of view 2 has an analytically known
partner in view 1. Points are sampled inside view 2's field whose partners lie inside view 1's field.

Coordinates are torch's normalised coordinates in ARRAY axis order ((z, y, x) / (y, x)), with
`align_corners=False`: voxel i of an axis of size S sits at (2 i + 1) / S - 1, the same value at every
resolution of a U-Net whose scales are strided by the patch's divisors, so one point list serves all
the deep-supervision outputs (torch's grids are (x, y, z): flipped only where torch is called).

The loss: per scale, each point's (L2-normalised) feature in view 1 is the query, its partner's
feature in view 2 the positive, and the other sampled points of view 2 the negatives (InfoNCE,
temperature 0.1, both directions). At a coarse scale two sampled points may fall in the same cell
and then SHOULD have the same feature: such pairs are not used as negatives (`same_cell_mask`).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["random_view_transforms", "warp_views", "jitter_intensities", "sample_corresponding_points",
           "sample_features", "same_cell_mask", "info_nce_loss", "matching_accuracy", "MultiScaleInfoNCE",
           "pack_points", "unpack_points"]


def _random_rotations(n: int, ndim: int, max_deg: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """(n, ndim, ndim) rotations by a uniform angle in [-max_deg, max_deg] (3D: about a random axis)."""
    angle = (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * math.radians(max_deg)
    c, s = torch.cos(angle), torch.sin(angle)
    if ndim == 2:
        return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    axis = torch.randn(n, 3, generator=generator, dtype=torch.float64)
    axis = axis / axis.norm(dim=1, keepdim=True).clamp_min(1e-12)
    k = torch.zeros(n, 3, 3, dtype=torch.float64)
    k[:, 0, 1], k[:, 0, 2], k[:, 1, 2] = -axis[:, 2], axis[:, 1], -axis[:, 0]
    k = k - k.transpose(1, 2)
    eye = torch.eye(3, dtype=torch.float64).expand(n, 3, 3)
    return eye + s[:, None, None] * k + (1 - c)[:, None, None] * (k @ k)  # Rodrigues


def random_view_transforms(batch_size: int, patch_size: Sequence[int], spacing: Sequence[float],
                           max_rotation_deg: float = 15.0, scale_range: Tuple[float, float] = (0.85, 1.15),
                           max_translation_fraction: float = 0.1, generator: Optional[torch.Generator] = None,
                           device: Optional[torch.device] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(A (B, nd, nd), t (B, nd)) in normalised array-order coordinates: view-2 point p sees view-1 point A p + t.

    The rotation and scale act in millimetres (spacing per patch axis) about the patch centre; the
    translation is up to `max_translation_fraction` of the half extent per axis.
    """
    nd = len(patch_size)
    if nd not in (2, 3) or len(spacing) != nd:
        raise ValueError(f"2D or 3D patches with one spacing per axis, got patch {patch_size}, spacing {spacing}")
    half_mm = torch.tensor([s * sp / 2 for s, sp in zip(patch_size, spacing)], dtype=torch.float64)
    rot = _random_rotations(batch_size, nd, max_rotation_deg, generator)
    lo, hi = scale_range
    scale = lo + (hi - lo) * torch.rand(batch_size, generator=generator, dtype=torch.float64)
    m_mm = rot * scale[:, None, None]
    # normalised n = P^-1 x (mm from the centre), P = diag(half_mm): A = P^-1 (s R) P, A[i, j] = M[i, j] P[j] / P[i]
    a = m_mm * half_mm[None, None, :] / half_mm[None, :, None]
    t = (torch.rand(batch_size, nd, generator=generator, dtype=torch.float64) * 2 - 1) * max_translation_fraction
    return a.to(device=device, dtype=torch.float32), t.to(device=device, dtype=torch.float32)


def warp_views(x: torch.Tensor, a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """View 2 of a batch (B, C, *S): view2(p) = view1(A p + t), (tri)linear, zeros outside."""
    nd = x.ndim - 2
    theta = torch.cat([a.flip(1).flip(2), t.flip(1)[:, :, None]], 2).to(x.dtype)  # torch grids are (x, y, z)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def jitter_intensities(x: torch.Tensor, contrast_range: Tuple[float, float] = (0.8, 1.2), brightness: float = 0.2,
                       noise_std: float = 0.05, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """x * c + b + N(0, noise_std) per sample (x is nnU-Net-normalised, so b and the noise are in its units)."""
    b = x.shape[0]
    shape = (b,) + (1,) * (x.ndim - 1)
    lo, hi = contrast_range
    c = lo + (hi - lo) * torch.rand(shape, generator=generator)
    off = (torch.rand(shape, generator=generator) * 2 - 1) * brightness
    noise_device = x.device if generator is None else torch.device("cpu")  # a seeded generator lives on the CPU
    noise = torch.randn(x.shape, generator=generator, device=noise_device) * noise_std if noise_std > 0 \
        else torch.zeros(())
    return x * c.to(x) + off.to(x) + noise.to(x)


def sample_corresponding_points(a: torch.Tensor, t: torch.Tensor, n_points: int, margin: float = 0.1,
                                generator: Optional[torch.Generator] = None
                                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(p1, p2, valid): (B, N, nd) partners in view 1 and view 2 and (B, N) bool, from 4 N uniform
    candidates in view 2 whose partners A p + t fall inside view 1 (both `margin` inside the border);
    the valid candidates come first, so `valid` is False only when fewer than N were valid."""
    b, nd = t.shape
    lim = 1.0 - margin
    cand = (torch.rand(b, 4 * n_points, nd, generator=generator) * 2 - 1).to(t) * lim
    p1 = cand @ a.transpose(1, 2) + t[:, None, :]
    ok = (p1.abs() <= lim).all(-1)
    key = ok.float() + torch.rand(ok.shape, generator=generator).to(t)
    order = key.topk(n_points, dim=1).indices
    take = lambda v: torch.gather(v, 1, order[..., None].expand(-1, -1, nd))  # noqa: E731
    return take(p1), take(cand), torch.gather(ok, 1, order)


def pack_points(p1: torch.Tensor, p2: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """One (B, N, 2 nd + 1) tensor (what nnU-Net's train_step moves to the device as `target`)."""
    return torch.cat([p1, p2, valid[..., None].to(p1.dtype)], -1)


def unpack_points(packed: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    nd = (packed.shape[-1] - 1) // 2
    return packed[..., :nd], packed[..., nd:2 * nd], packed[..., 2 * nd] > 0.5


def sample_features(features: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """(B, D, *S) features at (B, N, nd) normalised array-order points -> (B, N, D), L2-normalised, float32."""
    b, n, nd = points.shape
    grid = points.flip(-1).to(torch.float32).reshape((b, n) + (1,) * (nd - 1) + (nd,))
    out = F.grid_sample(features.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return F.normalize(out.reshape(b, features.shape[1], n).transpose(1, 2), dim=-1)


def same_cell_mask(points: torch.Tensor, patch_size: Sequence[int], stride: Sequence[float]) -> torch.Tensor:
    """(B, N, N) True where points i != j lie less than one cell apart along every axis at this scale
    (cell = `stride` voxels of the patch): such j are no negatives for i."""
    size = torch.as_tensor(list(patch_size), dtype=points.dtype, device=points.device)
    cells = (points + 1) * size / 2 / torch.as_tensor(list(stride), dtype=points.dtype, device=points.device)
    d = (cells[:, :, None, :] - cells[:, None, :, :]).abs().amax(-1)
    eye = torch.eye(points.shape[1], dtype=torch.bool, device=points.device)
    return (d < 1.0) & ~eye


def _masked_logits(f1, f2, valid, exclude, temperature):
    logits = f1 @ f2.transpose(1, 2) / temperature  # (B, N, N): row i = query i of view 1, column j = view 2's j
    bad = torch.zeros_like(logits, dtype=torch.bool)
    if valid is not None:
        bad = bad | ~valid[:, None, :]
    if exclude is not None:
        bad = bad | exclude
    return logits.masked_fill(bad, -1e4)


def info_nce_loss(f1: torch.Tensor, f2: torch.Tensor, valid: Optional[torch.Tensor] = None,
                  exclude: Optional[torch.Tensor] = None, temperature: float = 0.1,
                  symmetric: bool = True) -> torch.Tensor:
    """InfoNCE between (B, N, D) normalised features: f1[:, i] should pick f2[:, i] among f2[:, j].

    `valid` (B, N) drops points (as queries and as candidates); `exclude` (B, N, N) drops single
    negatives (e.g. `same_cell_mask`). Mean over valid queries; both directions when `symmetric`.
    """
    f1, f2 = f1.float(), f2.float()
    n = f1.shape[1]
    target = torch.arange(n, device=f1.device).expand(f1.shape[0], n)
    rows = torch.ones(f1.shape[:2], dtype=torch.bool, device=f1.device) if valid is None else valid
    if not bool(rows.any()):
        return (f1.sum() + f2.sum()) * 0.0
    terms = []
    logits = _masked_logits(f1, f2, valid, exclude, temperature)
    terms.append(F.cross_entropy(logits[rows], target[rows]))
    if symmetric:
        logits_t = _masked_logits(f2, f1, valid, None if exclude is None else exclude.transpose(1, 2), temperature)
        terms.append(F.cross_entropy(logits_t[rows], target[rows]))
    return sum(terms) / len(terms)


@torch.no_grad()
def matching_accuracy(f1: torch.Tensor, f2: torch.Tensor, valid: Optional[torch.Tensor] = None,
                      exclude: Optional[torch.Tensor] = None) -> Tuple[int, int]:
    """(correct, total): valid points of view 1 whose most similar view-2 point (cosine, among the
    valid candidates not excluded) is their true partner."""
    logits = _masked_logits(f1.float(), f2.float(), valid, exclude, 1.0)
    n = f1.shape[1]
    hit = logits.argmax(-1) == torch.arange(n, device=f1.device)
    rows = torch.ones(f1.shape[:2], dtype=torch.bool, device=f1.device) if valid is None else valid
    return int(hit[rows].sum()), int(rows.sum())


class MultiScaleInfoNCE(nn.Module):
    """The trainer's loss, called as nnU-Net calls its loss: `loss(network_output, target)`.

    `network_output`: the U-Net's deep-supervision list (finest first) for the batch [view 1; view 2]
    (2 B samples); `target`: `pack_points(p1, p2, valid)` (B, N, 2 nd + 1). The first len(strides)
    scales are used (the sum of their InfoNCE terms); the coarser outputs enter with weight 0 so every
    parameter has a gradient (DDP). Computed in float32 outside autocast.
    """

    def __init__(self, patch_size: Sequence[int], strides: List[Sequence[int]], temperature: float = 0.1):
        super().__init__()
        self.patch_size = list(patch_size)
        self.strides = [list(s) for s in strides]
        self.temperature = float(temperature)

    def per_scale(self, output, target) -> List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """[(f1, f2, valid, exclude)] per used scale."""
        outputs = output if isinstance(output, (list, tuple)) else [output]
        p1, p2, valid = unpack_points(target.float())
        b = p1.shape[0]
        res = []
        for k, stride in enumerate(self.strides):
            feats = outputs[k]
            res.append((sample_features(feats[:b], p1), sample_features(feats[b:], p2), valid,
                        same_cell_mask(p1, self.patch_size, stride)))
        return res

    def forward(self, output, target) -> torch.Tensor:
        outputs = output if isinstance(output, (list, tuple)) else [output]
        with torch.autocast(outputs[0].device.type, enabled=False):
            loss = sum(info_nce_loss(f1, f2, v, ex, self.temperature) for f1, f2, v, ex in self.per_scale(output, target))
            for extra in outputs[len(self.strides):]:
                loss = loss + 0.0 * extra.float().mean()
        return loss
