"""Procedural phantom datasets, random re-posing of real cases, and the end-to-end demo pipeline."""
from nnlandmark_h3de.demo.phantoms import LANDMARK_NAMES, generate_phantom_cases
