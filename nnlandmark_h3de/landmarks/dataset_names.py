"""Landmark names in channel order from a dataset.json: the one reader trainer, predictor and export share."""
from __future__ import annotations

from typing import List

__all__ = ["landmark_names"]


def landmark_names(dataset_json: dict) -> List[str]:
    """The `landmarks.names` block (written by nnLandmark_convert), else the label names by value
    without background (a hand-made dataset: label k is channel k)."""
    block = dataset_json.get("landmarks") or {}
    if block.get("names"):
        return [str(n) for n in block["names"]]
    labels = sorted((int(v), str(k)) for k, v in dataset_json.get("labels", {}).items()
                    if not isinstance(v, (list, tuple)) and int(v) != 0)
    return [k for _, k in labels]
