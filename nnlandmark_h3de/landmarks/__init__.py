"""Landmark model, image geometry and landmark file formats."""
from nnlandmark_h3de.landmarks.landmark_set import LandmarkError, LandmarkSet, lps_to_ras, ras_to_lps
from nnlandmark_h3de.landmarks.geometry import ImageGeometry, read_image
