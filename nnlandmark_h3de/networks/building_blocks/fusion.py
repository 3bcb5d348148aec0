"""Multi-scale feature fusion: every decoder scale, projected (1x1) and interpolated to the finest
scale, is summed, so the head sees coarse context and fine detail at once (HYATT/H3DE-style fusion)."""
from typing import List, Sequence, Type

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from nnlandmark_h3de.networks.building_blocks.upsample import ConvInterpolateUp


class MultiScaleFusion(nn.Module):
    def __init__(self, conv_op: Type[_ConvNd], input_channels: Sequence[int], output_channels: int,
                 norm_op=None, norm_op_kwargs: dict = None, nonlin=None, nonlin_kwargs: dict = None):
        """input_channels: channels per scale, finest first (the fused map has the finest size)."""
        super().__init__()
        self.projs = nn.ModuleList([ConvInterpolateUp(conv_op, c, output_channels) for c in input_channels])
        self.norm = norm_op(output_channels, **(norm_op_kwargs or {})) if norm_op is not None else nn.Identity()
        self.nonlin = nonlin(**(nonlin_kwargs or {})) if nonlin is not None else nn.Identity()

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[2:]
        fused = sum(p(f, size) for p, f in zip(self.projs, features))
        return self.nonlin(self.norm(fused))
