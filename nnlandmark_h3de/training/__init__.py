"""Training stage: nnU-Net trainers for heatmap regression (import the trainer modules directly;
importing this package does not pull in nnU-Net)."""
