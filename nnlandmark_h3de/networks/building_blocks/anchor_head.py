"""H3DE-Net's anchor-based head: per anchor, offsets to every landmark and one existence logit per landmark.

Why: a heatmap peak always exists, so a heatmap network cannot say "this landmark is not in the image"
except through a peak-height threshold. The anchor head learns existence explicitly (BCE against
"this anchor is near landmark k", negative everywhere when k is absent) and gives a second,
regression-based location.

Grid convention (shared by target encoding and decoding): on a feature map of size n at stride
s = patch / n per axis, cell i is the centre of the voxels it covers, voxel (i + 0.5) * s - 0.5.
That grid maps onto itself under nnU-Net's mirroring (augmentation and test-time), unlike the
``s * i`` convention of strided convolutions. A landmark at voxel c is at grid position
g = (c + 0.5) / s - 0.5; anchor a of cell f with radius r_a (grid units) encodes it as
t = (g - f) / r_a and decodes it as g = f + t * r_a.

Shapes: offsets (B, A, L, ndim, *grid) in the array's axis order ((z, y, x) in 3D, (y, x) in 2D; ndim
from `conv_op`), existence logits (B, A, L, *grid).
Decoding is vectorised over landmarks: top-k anchors per landmark by existence, decoded positions
aggregated by probability-weighted mean, medoid (H3DE-Net's public code) or the single best anchor.
"""
from typing import NamedTuple, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU

__all__ = ["AnchorHead", "AnchorOutput", "grid_stride", "voxel_to_grid", "grid_to_voxel", "cell_coordinates",
           "encode_offsets", "decode_offsets", "decode_anchors"]


class AnchorOutput(NamedTuple):
    offsets: torch.Tensor  # (B, A, L, ndim, *grid)
    logits: torch.Tensor  # (B, A, L, *grid)


def grid_stride(patch_shape: Sequence[int], grid_shape: Sequence[int]) -> Tuple[float, ...]:
    """Voxels per grid cell along each axis (exact for nnU-Net's patch sizes, which divide by the strides)."""
    assert len(patch_shape) == len(grid_shape), f"patch {tuple(patch_shape)} vs grid {tuple(grid_shape)}"
    return tuple(float(p) / float(g) for p, g in zip(patch_shape, grid_shape))


def voxel_to_grid(c: torch.Tensor, stride: Sequence[float]) -> torch.Tensor:
    """Continuous voxel index (..., ndim) -> continuous grid position (..., ndim)."""
    s = torch.as_tensor(stride, dtype=c.dtype, device=c.device)
    return (c + 0.5) / s - 0.5


def grid_to_voxel(g: torch.Tensor, stride: Sequence[float]) -> torch.Tensor:
    """Inverse of `voxel_to_grid`."""
    s = torch.as_tensor(stride, dtype=g.dtype, device=g.device)
    return (g + 0.5) * s - 0.5


def cell_coordinates(grid_shape: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """(ndim, *grid) tensor: the grid index of every cell, axes in array order."""
    axes = [torch.arange(n, device=device, dtype=dtype) for n in grid_shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), 0)


def encode_offsets(g: torch.Tensor, f: torch.Tensor, r: Union[float, torch.Tensor]) -> torch.Tensor:
    """t = (g - f) / r, broadcasting; g landmark and f anchor centre in grid units, r anchor radius."""
    return (g - f) / r


def decode_offsets(t: torch.Tensor, f: torch.Tensor, r: Union[float, torch.Tensor]) -> torch.Tensor:
    """g = f + t * r, the inverse of `encode_offsets`."""
    return f + t * r


class AnchorHead(nn.Module):
    """conv-norm-nonlin (kernel `kernel_size`) + 1x1 conv to A * L * (ndim offsets + 1 existence logit).

    anchor_radii: one radius per anchor, in grid units (a cell has len(anchor_radii) anchors).
    The existence bias starts at logit(prior) so that training begins with "absent nearly everywhere",
    the actual class balance (RetinaNet's prior trick), instead of a flood of false positives.
    """

    def __init__(self, conv_op: Type[_ConvNd], input_channels: int, num_landmarks: int,
                 anchor_radii: Sequence[float] = (1.0, 2.0), hidden_channels: Optional[int] = None,
                 kernel_size: int = 3, conv_bias: bool = False, norm_op: Optional[Type[nn.Module]] = None,
                 norm_op_kwargs: Optional[dict] = None, nonlin: Optional[Type[nn.Module]] = None,
                 nonlin_kwargs: Optional[dict] = None, prior: float = 0.01):
        super().__init__()
        assert num_landmarks >= 1 and len(anchor_radii) >= 1 and min(anchor_radii) > 0
        self.num_landmarks, self.ndim = int(num_landmarks), convert_conv_op_to_dim(conv_op)
        self.register_buffer("radii", torch.tensor([float(r) for r in anchor_radii]), persistent=False)
        self.num_anchors = len(anchor_radii)
        hidden = int(hidden_channels or input_channels)
        self.conv = ConvDropoutNormReLU(conv_op, input_channels, hidden, kernel_size, 1, conv_bias,
                                        norm_op, norm_op_kwargs, None, None, nonlin, nonlin_kwargs)
        self.out = conv_op(hidden, self.num_anchors * self.num_landmarks * (self.ndim + 1), 1, 1, 0, bias=True)
        nn.init.normal_(self.out.weight, std=0.01)
        with torch.no_grad():
            bias = self.out.bias.view(self.num_anchors, self.num_landmarks, self.ndim + 1)
            bias.zero_()
            bias[..., -1] = float(torch.logit(torch.tensor(prior)))

    def forward(self, x: torch.Tensor) -> AnchorOutput:
        """Offsets and logits always float32: under fp16 autocast the 1x1 output conv (cheap, on the coarse
        grid) runs in float32 so the existence logits fed to the BCE, the recorded existence and its
        calibrated threshold, and the sub-voxel offsets do not depend on half-precision rounding."""
        h = self.conv(x)
        with torch.autocast(h.device.type, enabled=False):
            y = self.out(h.float())
        y = y.view(y.shape[0], self.num_anchors, self.num_landmarks, self.ndim + 1, *y.shape[2:])
        return AnchorOutput(y[:, :, :, :-1], y[:, :, :, -1])


def decode_anchors(offsets: torch.Tensor, logits: torch.Tensor, radii: Union[Sequence[float], torch.Tensor],
                   patch_shape: Sequence[int], top_k: int = 15, location: str = "medoid",
                   existence: str = "max") -> Tuple[torch.Tensor, torch.Tensor]:
    """Landmark positions (B, L, ndim) in continuous voxel index of the patch and existence probability (B, L).

    location: 'medoid' (of the top-k decoded positions, the one with the least summed distance to the
    others; H3DE-Net's code, k = 15: robust to a high-scoring anchor whose offsets were never
    trained, i.e. a near-miss negative), 'weighted' (top-k, weights = existence probability) or
    'best' (top-1).
    existence: 'max' (max probability over all anchors) or 'topk_mean' (mean of the top-k
    probabilities: one stray anchor cannot fake a landmark).
    """
    b, a, n_l, _ = offsets.shape[:4]
    grid = tuple(offsets.shape[4:])
    nd = len(grid)
    assert offsets.shape[3] == nd, f"{offsets.shape[3]} offsets per anchor on a {nd}D grid"
    stride = grid_stride(patch_shape, grid)
    off = offsets.float().permute(0, 2, 1, *range(4, 4 + nd), 3).reshape(b, n_l, -1, nd)  # (B, L, A*N, nd)
    lg = logits.float().transpose(1, 2).reshape(b, n_l, -1)  # (B, L, A*N), anchor-major like `off`
    k = min(int(top_k), lg.shape[-1])
    top, idx = lg.topk(k, dim=-1)  # (B, L, k)
    n_cells = lg.shape[-1] // a
    r = torch.as_tensor(radii, dtype=off.dtype, device=off.device)[idx // n_cells]  # (B, L, k)
    f = cell_coordinates(grid, off.device, off.dtype).reshape(nd, -1).t()[idx % n_cells]  # (B, L, k, nd)
    t = off.gather(2, idx[..., None].expand(-1, -1, -1, nd))
    g = grid_to_voxel(decode_offsets(t, f, r[..., None]), stride)  # (B, L, k, nd) voxels
    p = top.sigmoid()
    if location == "weighted":
        pos = (g * p[..., None]).sum(2) / p.sum(2, keepdim=True).clamp_min(1e-12)
    elif location == "medoid":
        cost = torch.cdist(g, g).sum(-1)  # (B, L, k)
        pos = g.gather(2, cost.argmin(-1)[..., None, None].expand(-1, -1, 1, nd))[:, :, 0]
    elif location == "best":
        pos = g[:, :, 0]
    else:
        raise ValueError(f"unknown location mode {location!r}")
    if existence == "max":
        prob = p[..., 0]
    elif existence == "topk_mean":
        prob = p.mean(-1)
    else:
        raise ValueError(f"unknown existence mode {existence!r}")
    return pos, prob
