"""Upsampling to an exact target size: 1x1 conv at low resolution, then (bi/tri)linear interpolation.

Interpolating to the skip's size (instead of a transposed conv with a fixed stride) makes the decoder
fit any patch size, and the channel reduction happens where it is cheap.
"""
from typing import Sequence, Type

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd

from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim

INTERPOLATION_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


class ConvInterpolateUp(nn.Module):
    def __init__(self, conv_op: Type[_ConvNd], input_channels: int, output_channels: int, conv_bias: bool = True):
        super().__init__()
        self.conv = conv_op(input_channels, output_channels, 1, 1, 0, bias=conv_bias)
        self.mode = INTERPOLATION_MODES[convert_conv_op_to_dim(conv_op)]

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        x = self.conv(x)
        if tuple(x.shape[2:]) != tuple(size):
            x = F.interpolate(x, size=tuple(size), mode=self.mode, align_corners=False)
        return x
