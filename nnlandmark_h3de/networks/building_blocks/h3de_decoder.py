"""H3DE decoder: per stage interpolate-up + skip + convs, then multi-scale fusion, full-resolution
refinement and the heatmap head.

Outputs follow nnU-Net's UNetDecoder: with `deep_supervision` a list, highest resolution first, one
entry per encoder stage but the bottleneck; the first entry is the refined head (at the input size),
the others the per-stage heads. nnU-Net's `set_deep_supervision_enabled` flips `self.deep_supervision`.
"""
from typing import List, Sequence, Union

import numpy as np
import torch
from torch import nn

from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks
from nnlandmark_h3de.networks.building_blocks.fusion import MultiScaleFusion
from nnlandmark_h3de.networks.building_blocks.refinement import FullResRefinement
from nnlandmark_h3de.networks.building_blocks.upsample import ConvInterpolateUp


class H3DEDecoder(nn.Module):
    def __init__(self, encoder: PlainConvEncoder, input_channels: int, num_classes: int,
                 n_conv_per_stage: Union[int, Sequence[int]], deep_supervision: bool,
                 n_conv_refinement: int = 2, nonlin_first: bool = False):
        """encoder: only read for channels, kernels and norm/nonlin settings (not registered here)."""
        super().__init__()
        self.deep_supervision = deep_supervision
        self.num_classes = num_classes
        chans = list(encoder.output_channels)
        n = len(chans)
        if isinstance(n_conv_per_stage, int):
            n_conv_per_stage = [n_conv_per_stage] * (n - 1)
        assert len(n_conv_per_stage) == n - 1, f"n_conv_per_stage_decoder needs {n - 1} entries"
        conv = dict(conv_bias=encoder.conv_bias, norm_op=encoder.norm_op, norm_op_kwargs=encoder.norm_op_kwargs,
                    dropout_op=encoder.dropout_op, dropout_op_kwargs=encoder.dropout_op_kwargs,
                    nonlin=encoder.nonlin, nonlin_kwargs=encoder.nonlin_kwargs, nonlin_first=nonlin_first)
        self.ups, self.stages = nn.ModuleList(), nn.ModuleList()
        for s in range(1, n):  # bottleneck upwards, like UNetDecoder
            below, skip = chans[-s], chans[-(s + 1)]
            self.ups.append(ConvInterpolateUp(encoder.conv_op, below, skip, conv_bias=True))
            self.stages.append(StackedConvBlocks(n_conv_per_stage[s - 1], encoder.conv_op, 2 * skip, skip,
                                                 encoder.kernel_sizes[-(s + 1)], 1, **conv))
        # decoder outputs finest first have channels chans[0], ..., chans[n-2]
        self.fusion = MultiScaleFusion(encoder.conv_op, chans[:-1], chans[0], encoder.norm_op,
                                       encoder.norm_op_kwargs, encoder.nonlin, encoder.nonlin_kwargs)
        self.refinement = FullResRefinement(encoder.conv_op, chans[0], input_channels, n_conv_refinement,
                                            encoder.kernel_sizes[0], **conv)
        self.head = encoder.conv_op(chans[0], num_classes, 1, 1, 0, bias=True)
        # always built (like nnU-Net) so weights load with deep supervision on or off
        self.seg_layers = nn.ModuleList([encoder.conv_op(c, num_classes, 1, 1, 0, bias=True) for c in chans[1:-1]])

    def forward(self, skips: List[torch.Tensor], image: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        x, feats = skips[-1], []
        for s, (up, stage) in enumerate(zip(self.ups, self.stages)):
            skip = skips[-(s + 2)]
            x = stage(torch.cat((up(x, skip.shape[2:]), skip), 1))
            feats.append(x)
        feats = feats[::-1]  # finest first
        out = self.head(self.refinement(self.fusion(feats), image))
        if not self.deep_supervision:
            return out
        return [out] + [seg(f) for seg, f in zip(self.seg_layers, feats[1:])]

    def compute_conv_feature_map_size(self, input_size, encoder: PlainConvEncoder) -> np.int64:
        """Rough count of stored activations (nnU-Net's VRAM estimate)."""
        sizes, size = [], list(input_size)
        for stride in encoder.strides:
            size = [i // j for i, j in zip(size, stride)]
            sizes.append(size)
        out = np.int64(0)
        for s in range(len(self.stages)):
            skip_size, c = sizes[-(s + 2)], encoder.output_channels[-(s + 2)]
            out += self.stages[s].compute_conv_feature_map_size(skip_size) + 2 * np.prod([c, *skip_size], dtype=np.int64)
        c0 = encoder.output_channels[0]
        out += self.refinement.convs.compute_conv_feature_map_size(input_size)
        out += np.prod([3 * c0 + self.num_classes, *input_size], dtype=np.int64)
        return out
