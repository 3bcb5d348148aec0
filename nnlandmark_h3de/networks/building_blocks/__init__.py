"""networks/building_blocks stage."""
