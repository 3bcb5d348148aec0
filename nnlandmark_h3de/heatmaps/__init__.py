"""Heatmap targets: label balls of the augmented patch -> Gaussian heatmaps (batchgeneratorsv2 transforms)."""
from nnlandmark_h3de.heatmaps.gaussian_heatmap import (BallsToHeatmapsTransform, ball_centres, expected_ball_voxels,
                                                       gaussian_heatmaps)
from nnlandmark_h3de.heatmaps.mirror_pairs import (MirrorWithPairSwapTransform, dataset_left_right_axes,
                                                   left_right_axis, pair_permutation)
