"""Small network blocks, one per file (dynamic_network_architectures style)."""
from nnlandmark_h3de.networks.building_blocks.vbra import VBRA, region_grid

__all__ = ["VBRA", "region_grid"]
