"""The H3DE-Net encoder block: ``x += DWConv3d(x); x += VBRA(LN(x)); x += MLP(LN(x))``."""
from typing import Optional

import numpy as np
import torch
from torch import nn

from nnlandmark_h3de.networks.building_blocks.vbra import VBRA, IntOr3


class H3DEBlock(nn.Module):
    """Conv positional encoding, routed attention and MLP, each residual (pre-norm, BiFormer style).

    Input/output (B, C, D, H, W); the attention and MLP run channels-last so LayerNorm normalises C.
    """

    def __init__(self, dim: int, num_heads: int = 8, n_regions: Optional[IntOr3] = None,
                 region_size: Optional[IntOr3] = None, topk: int = 4, mlp_ratio: float = 4.0,
                 dwconv_kernel_size: int = 3, lepe_kernel_size: int = 5):
        super().__init__()
        self.dim, self.mlp_ratio = dim, mlp_ratio
        self.pos = nn.Conv3d(dim, dim, dwconv_kernel_size, padding=dwconv_kernel_size // 2, groups=dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = VBRA(dim, num_heads, n_regions=n_regions, region_size=region_size, topk=topk,
                         lepe_kernel_size=lepe_kernel_size)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos(x)
        x = x.permute(0, 2, 3, 4, 1)
        x = x + self.attn.forward_tokens(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x.permute(0, 4, 1, 2, 3).contiguous()

    def compute_conv_feature_map_size(self, input_size):
        """Rough count of stored activations (nnU-Net's VRAM estimate): ~10 C-sized maps + the MLP."""
        return np.int64((10 + 2 * self.mlp_ratio) * self.dim) * np.prod(input_size, dtype=np.int64)
