"""The H3DE-Net encoder block: ``x += DWConv(x); x += BRA(LN(x)); x += MLP(LN(x))``, in 2D or 3D (`conv_op`)."""
from typing import Optional, Type

import numpy as np
import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from nnlandmark_h3de.networks.building_blocks.vbra import VBRA, IntOrSeq


class H3DEBlock(nn.Module):
    """Conv positional encoding, routed attention and MLP, each residual (pre-norm, BiFormer style).

    Input/output (B, C, *spatial); the attention and MLP run channels-last so LayerNorm normalises C.
    `conv_op` (nn.Conv3d: H3DE-Net's V-BRA block, nn.Conv2d: HYATT-Net's / BiFormer's BRA block) sets the
    dimension of the depthwise convs.
    """

    def __init__(self, dim: int, num_heads: int = 8, n_regions: Optional[IntOrSeq] = None,
                 region_size: Optional[IntOrSeq] = None, topk: int = 4, mlp_ratio: float = 4.0,
                 dwconv_kernel_size: int = 3, lepe_kernel_size: int = 5, conv_op: Type[_ConvNd] = nn.Conv3d):
        super().__init__()
        self.dim, self.mlp_ratio = dim, mlp_ratio
        self.pos = conv_op(dim, dim, dwconv_kernel_size, padding=dwconv_kernel_size // 2, groups=dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = VBRA(dim, num_heads, n_regions=n_regions, region_size=region_size, topk=topk,
                         lepe_kernel_size=lepe_kernel_size, conv_op=conv_op)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos(x)
        x = x.movedim(1, -1)
        x = x + self.attn.forward_tokens(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x.movedim(-1, 1).contiguous()

    def compute_conv_feature_map_size(self, input_size):
        """Rough count of stored activations (nnU-Net's VRAM estimate): ~10 C-sized maps + the MLP."""
        return np.int64((10 + 2 * self.mlp_ratio) * self.dim) * np.prod(input_size, dtype=np.int64)
