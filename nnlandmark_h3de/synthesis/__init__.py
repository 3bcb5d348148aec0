"""Synthetic subjects from real ones: images moved with their landmarks carried exactly.

Templates, one-shot pseudo-datasets, benchmarks and the demo all need new cases made from a
labelled image: a random pose (rotation, translation, scale, field-of-view crop, intensity change,
`reposing`) and a random smooth nonlinear deformation (`deformation`), so that subjects differ the
way real ones do. The landmarks follow the anatomy exactly, so the ground truth stays exact. This
is product code (it lived in `demo/` once) and imports nothing from the demo.
"""
from nnlandmark_h3de.synthesis.deformation import (Deformation, deform_case, displacement_summary,
                                                   landmark_displacement_summary, random_deformation)
from nnlandmark_h3de.synthesis.reposing import IntensityChange, Pose, random_pose, repose_case
from nnlandmark_h3de.synthesis.rotations import random_rotation, rotation_about_z

__all__ = ["Deformation", "deform_case", "displacement_summary", "landmark_displacement_summary",
           "random_deformation", "IntensityChange", "Pose", "random_pose", "repose_case", "random_rotation",
           "rotation_about_z"]
