"""Full-resolution refinement: fused decoder features (interpolated to the input size if needed) are
concatenated with the raw input and refined by a few convs (residual), so the heatmap head sees the
exact intensities at full resolution (H3DE-Net's refinement branch before the head)."""
from typing import Type

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd

from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks
from nnlandmark_h3de.networks.building_blocks.upsample import INTERPOLATION_MODES


class FullResRefinement(nn.Module):
    def __init__(self, conv_op: Type[_ConvNd], feature_channels: int, image_channels: int, n_convs: int = 2,
                 kernel_size=3, conv_bias: bool = False, norm_op=None, norm_op_kwargs: dict = None,
                 dropout_op=None, dropout_op_kwargs: dict = None, nonlin=None, nonlin_kwargs: dict = None,
                 nonlin_first: bool = False):
        super().__init__()
        self.mode = INTERPOLATION_MODES[convert_conv_op_to_dim(conv_op)]
        self.convs = StackedConvBlocks(n_convs, conv_op, feature_channels + image_channels, feature_channels,
                                       kernel_size, 1, conv_bias, norm_op, norm_op_kwargs, dropout_op,
                                       dropout_op_kwargs, nonlin, nonlin_kwargs, nonlin_first)

    def forward(self, features: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        if features.shape[2:] != image.shape[2:]:
            features = F.interpolate(features, size=image.shape[2:], mode=self.mode, align_corners=False)
        return features + self.convs(torch.cat((features, image), 1))
