"""Evaluation stage: radial errors (mm), SDR, existence scores, summary.json, CSV and plots."""
from nnlandmark_h3de.evaluation.summary import DEFAULT_SDR_RADII, evaluate_landmarks
