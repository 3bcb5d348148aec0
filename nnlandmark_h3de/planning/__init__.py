"""Configurations added to nnU-Net plans files (nnU-Net's planners cannot be extended from outside)."""
from nnlandmark_h3de.planning.small_configuration import DEFAULT_NAME, add_small_configuration, small_configuration
