"""nnU-Net's plain conv encoder with H3DE blocks (DWConv + BRA + MLP) appended to chosen stages.

The conv stages stay exactly as nnU-Net plans them (same module names, so conv weights and the
`encoder.stages` key keep working); each stage named in `vbra_stage_kwargs` gets its `n_blocks` H3DE
blocks after its convs, built with the encoder's conv_op (V-BRA in 3D, BRA in 2D).
"""
from typing import Dict

import numpy as np

from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks
from nnlandmark_h3de.networks.building_blocks.h3de_block import H3DEBlock


class H3DEEncoder(PlainConvEncoder):
    def __init__(self, *args, vbra_stage_kwargs: Dict[int, dict] = None, **kwargs):
        """args/kwargs: PlainConvEncoder's. vbra_stage_kwargs: {stage: dict(n_blocks=..., **H3DEBlock kwargs
        except dim and conv_op)}."""
        super().__init__(*args, **kwargs)
        self.vbra_stage_kwargs = dict(vbra_stage_kwargs or {})
        for s, kw in self.vbra_stage_kwargs.items():
            kw = dict(kw)
            n_blocks = kw.pop("n_blocks")
            for _ in range(n_blocks):
                self.stages[s].append(H3DEBlock(self.output_channels[s], conv_op=self.conv_op, **kw))

    def compute_conv_feature_map_size(self, input_size):
        output = np.int64(0)
        for stage, stride in zip(self.stages, self.strides):
            for m in stage:
                if isinstance(m, StackedConvBlocks):
                    output += m.compute_conv_feature_map_size(input_size)
                    input_size = [i // j for i, j in zip(input_size, stride)]
                elif hasattr(m, "compute_conv_feature_map_size"):
                    output += m.compute_conv_feature_map_size(input_size)
        return output
