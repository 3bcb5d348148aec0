"""Heatmap targets: exact points (or label balls) of the augmented patch -> the points the loader
carries (batchgeneratorsv2 transform) -> heatmaps drawn on the training device; and the
keypoint-aware transforms that carry the points there."""
from nnlandmark_h3de.heatmaps.gaussian_heatmap import (GaussianTargets, HeatmapTargets, ball_centres,
                                                       expected_ball_voxels, gaussian_heatmaps, keypoint_centres)
from nnlandmark_h3de.heatmaps.keypoint_transforms import (Convert2DTo3DWithKeypoints, Convert3DTo2DWithKeypoints,
                                                          LabelsToPaddingMaskTransform, SpatialTransformWithKeypoints,
                                                          as_keypoints, make_landmark_aware)
from nnlandmark_h3de.heatmaps.mirror_pairs import (MirrorWithPairSwapTransform, dataset_left_right_axes,
                                                   left_right_axis, pair_permutation)
from nnlandmark_h3de.heatmaps.target_transforms import LandmarkHeatmapTransform, LandmarkPointsTransform
