"""Heatmap networks built from nnU-Net plans keyword arguments; blocks live in `building_blocks/`."""
from nnlandmark_h3de.networks.building_blocks.vbra import VBRA
from nnlandmark_h3de.networks.h3de_unet import H3DEUNet

__all__ = ["H3DEUNet", "VBRA"]
