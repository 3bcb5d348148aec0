"""Small network blocks, one per file (dynamic_network_architectures style)."""
from nnlandmark_h3de.networks.building_blocks.fusion import MultiScaleFusion
from nnlandmark_h3de.networks.building_blocks.h3de_block import H3DEBlock
from nnlandmark_h3de.networks.building_blocks.h3de_decoder import H3DEDecoder
from nnlandmark_h3de.networks.building_blocks.h3de_encoder import H3DEEncoder
from nnlandmark_h3de.networks.building_blocks.refinement import FullResRefinement
from nnlandmark_h3de.networks.building_blocks.upsample import ConvInterpolateUp
from nnlandmark_h3de.networks.building_blocks.vbra import VBRA, region_grid

__all__ = ["ConvInterpolateUp", "FullResRefinement", "H3DEBlock", "H3DEDecoder", "H3DEEncoder", "MultiScaleFusion",
           "VBRA", "region_grid"]
