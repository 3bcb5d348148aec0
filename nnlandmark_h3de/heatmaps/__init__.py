"""heatmaps stage."""
