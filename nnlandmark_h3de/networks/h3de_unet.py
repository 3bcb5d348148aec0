"""H3DE-Net as an nnU-Net network: the planned conv U-Net with V-BRA blocks in the coarse encoder stages,
an interpolating decoder (any patch size), multi-scale fusion and a full-resolution refinement branch.

2D or 3D from the plans' `conv_op`, like dynamic_network_architectures: with nn.Conv2d (nnU-Net's `2d`
configuration) the blocks are BiFormer's 2D BRA (HYATT-Net's attention), with nn.Conv3d H3DE-Net's V-BRA.

It accepts PlainConvUNet's keyword arguments, so a plans file can name it by dotted path
(``"network_class_name": "nnlandmark_h3de.networks.h3de_unet.H3DEUNet"``) and nnU-Net's
``get_network_from_plans`` builds it; the extra ``vbra_*`` keyword arguments are optional.
"""
from typing import List, Optional, Sequence, Tuple, Type, Union

import numpy as np
import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.dropout import _DropoutNd

from dynamic_network_architectures.architectures.abstract_arch import AbstractDynamicNetworkArchitectures
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim, maybe_convert_scalar_to_list
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from nnlandmark_h3de.networks.building_blocks.h3de_decoder import H3DEDecoder
from nnlandmark_h3de.networks.building_blocks.h3de_encoder import H3DEEncoder

IntOrList = Union[int, List[int], Tuple[int, ...]]


def _per_stage(value, stages: Sequence[int], name: str, per_axis: bool = False) -> dict:
    """One value for every V-BRA stage, or a list with one entry per V-BRA stage. With `per_axis` a value
    is an int or one int per spatial axis, so only a list of lists is per stage."""
    is_list = isinstance(value, (list, tuple))
    if is_list and (not per_axis or isinstance(value[0], (list, tuple))):
        if len(value) != len(stages):
            raise ValueError(f"{name}: {len(value)} entries for V-BRA stages {list(stages)}")
        return dict(zip(stages, value))
    return {s: value for s in stages}


def select_vbra_stages(n_stages: int, strides, vbra_stages: Optional[Sequence[int]], patch_size, vbra_max_tokens: int):
    """Explicit stages (negative indices allowed); else, given the patch size, every stage after the first
    whose feature map has at most `vbra_max_tokens` tokens; else the deepest two stages."""
    if vbra_stages is not None:
        return sorted({s % n_stages for s in vbra_stages})
    if patch_size is None:
        return list(range(max(1, n_stages - 2), n_stages))
    size, chosen = list(patch_size), []
    for s, stride in enumerate(strides):
        size = [i // j for i, j in zip(size, stride)]
        if s > 0 and int(np.prod(size)) <= vbra_max_tokens:
            chosen.append(s)
    return chosen


class H3DEUNet(AbstractDynamicNetworkArchitectures):
    def __init__(
        self,
        input_channels: int,
        n_stages: int,
        features_per_stage: IntOrList,
        conv_op: Type[_ConvNd],
        kernel_sizes: IntOrList,
        strides: IntOrList,
        n_conv_per_stage: IntOrList,
        num_classes: int,
        n_conv_per_stage_decoder: IntOrList,
        conv_bias: bool = False,
        norm_op: Union[None, Type[nn.Module]] = None,
        norm_op_kwargs: dict = None,
        dropout_op: Union[None, Type[_DropoutNd]] = None,
        dropout_op_kwargs: dict = None,
        nonlin: Union[None, Type[torch.nn.Module]] = None,
        nonlin_kwargs: dict = None,
        deep_supervision: bool = False,
        nonlin_first: bool = False,
        # --- H3DE (all optional) ---
        vbra_stages: Optional[Sequence[int]] = None,
        patch_size: Optional[Sequence[int]] = None,
        vbra_max_tokens: int = 16384,
        vbra_blocks_per_stage: IntOrList = 2,
        vbra_n_regions=None,
        vbra_region_size=None,
        vbra_topk: Optional[IntOrList] = None,
        vbra_head_dim: int = 32,
        mlp_ratio: float = 4.0,
        n_conv_refinement: int = 2,
    ):
        """Beyond PlainConvUNet's arguments:
        vbra_stages: encoder stages that get H3DE blocks; default: with `patch_size` every stage (but the
            first) with at most `vbra_max_tokens` tokens, without it the deepest two.
            (16384 puts V-BRA at H3DE-Net's stages for its 128x128x64 crop: 32x32x16 tokens and deeper;
            in 2D at 128x128 tokens and deeper, e.g. from stage 2 of a 512x512 patch).
        vbra_blocks_per_stage, vbra_topk, vbra_n_regions | vbra_region_size: a value for all V-BRA stages or
            one per V-BRA stage (regions: int or one per spatial axis; region_size wins when given). Default
            regions: 64 per map (4 per axis in 3D, 8 in 2D). Default top-k is H3DE-Net's 1, 4, 16, 16, ...
            from the finest V-BRA stage on (capped at the region count).
        vbra_head_dim: channels per attention head (heads = features // head_dim, at least 1).
        """
        super().__init__()
        self.key_to_encoder = "encoder.stages"
        self.key_to_stem = "encoder.stages.0"
        self.keys_to_in_proj = ("encoder.stages.0.0.convs.0.conv", "encoder.stages.0.0.convs.0.all_modules.0")

        if isinstance(n_conv_per_stage, int):
            n_conv_per_stage = [n_conv_per_stage] * n_stages
        if isinstance(features_per_stage, int):
            features_per_stage = [features_per_stage] * n_stages
        strides_l = [maybe_convert_scalar_to_list(conv_op, s) for s in
                     (strides if isinstance(strides, (list, tuple)) else [strides] * n_stages)]
        stages = select_vbra_stages(n_stages, strides_l, vbra_stages, patch_size, vbra_max_tokens)
        blocks = _per_stage(vbra_blocks_per_stage, stages, "vbra_blocks_per_stage")
        if vbra_topk is None:
            vbra_topk = [(1, 4, 16)[min(i, 2)] for i in range(len(stages))]
        topk = _per_stage(vbra_topk, stages, "vbra_topk")
        regions = _per_stage(vbra_region_size if vbra_region_size is not None else vbra_n_regions, stages,
                             "vbra_region_size" if vbra_region_size is not None else "vbra_n_regions", True)
        region_key = "region_size" if vbra_region_size is not None else "n_regions"
        stage_kwargs = {
            s: {"n_blocks": blocks[s], "num_heads": max(1, features_per_stage[s] // vbra_head_dim),
                "topk": topk[s], region_key: regions[s], "mlp_ratio": mlp_ratio}
            for s in stages}
        self.vbra_stages = stages

        self.encoder = H3DEEncoder(
            input_channels, n_stages, features_per_stage, conv_op, kernel_sizes, strides, n_conv_per_stage,
            conv_bias, norm_op, norm_op_kwargs, dropout_op, dropout_op_kwargs, nonlin, nonlin_kwargs,
            return_skips=True, nonlin_first=nonlin_first, vbra_stage_kwargs=stage_kwargs)
        self.decoder = H3DEDecoder(self.encoder, input_channels, num_classes, n_conv_per_stage_decoder,
                                   deep_supervision, n_conv_refinement, nonlin_first)

    def forward(self, x: torch.Tensor):
        return self.decoder(self.encoder(x), x)

    def compute_conv_feature_map_size(self, input_size):
        assert len(input_size) == convert_conv_op_to_dim(self.encoder.conv_op), "give the spatial size only"
        return self.encoder.compute_conv_feature_map_size(input_size) + \
            self.decoder.compute_conv_feature_map_size(input_size, self.encoder)

    @staticmethod
    def initialize(module):
        """He init for convs as nnU-Net; transformer linears get truncated normal (std 0.02), as BiFormer."""
        InitWeights_He(1e-2)(module)
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
