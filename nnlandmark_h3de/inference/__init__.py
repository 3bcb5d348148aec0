"""Inference stage: heatmap peaks, index mapping to world, the landmark predictor and export.

Light names are imported eagerly; the ones that pull in nnU-Net's predictor load on first use.
"""
from nnlandmark_h3de.inference.peaks import decode_peaks

_LAZY = {
    "network_index_to_world": "nnlandmark_h3de.inference.index_mapping",
    "world_to_network_index": "nnlandmark_h3de.inference.index_mapping",
    "nnLandmarkPredictor": "nnlandmark_h3de.inference.landmark_predictor",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
