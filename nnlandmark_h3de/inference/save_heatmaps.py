"""`--save_heatmaps`: the one place where whole heatmaps are resampled to the original image grid.

Only on request, because it costs what our peak decoding avoids (L full-size resamplings). The
result is one NIfTI per case with L components (a vector image) in the original geometry, which
`nnLandmark_export` can read back and Slicer can show.
"""
from __future__ import annotations

import numpy as np
import torch

from nnlandmark_h3de.inference.index_mapping import original_geometry
from nnlandmark_h3de.landmarks import atomic_path

HEATMAP_SUFFIX = "_heatmaps.nii.gz"  # <case><suffix> next to the landmark file; nnLandmark_export reads it back


def heatmaps_to_original_grid(heatmaps, properties: dict, plans_manager, configuration_manager,
                              logits: bool = False) -> np.ndarray:
    """(L, network z, y, x) -> (L, original z, y, x) float32: nnU-Net's probability resampling,
    un-cropping (zeros outside the bounding box) and transpose_backward, as its own export does."""
    h = torch.as_tensor(heatmaps).float()
    if logits:
        h = torch.sigmoid(h)
    tf = plans_manager.transpose_forward
    spacing_t = [properties["spacing"][i] for i in tf]
    shape_cropped = properties["shape_after_cropping_and_before_resampling"]
    current = list(configuration_manager.spacing)
    if len(current) < len(shape_cropped):
        current = [spacing_t[0]] + current
    h = configuration_manager.resampling_fn_probabilities(h, shape_cropped, current, spacing_t)
    h = np.asarray(h.numpy() if torch.is_tensor(h) else h, dtype=np.float32)
    full = np.zeros((h.shape[0], *properties["shape_before_cropping"]), dtype=np.float32)
    full[(slice(None), *[slice(lo, hi) for lo, hi in properties["bbox_used_for_cropping"]])] = h
    return full.transpose([0] + [i + 1 for i in plans_manager.transpose_backward])


def write_heatmaps_nifti(heatmaps, properties: dict, plans_manager, configuration_manager, path,
                         logits: bool = False):
    """Resample to the original grid and write atomically as an L-component image."""
    import SimpleITK as sitk
    full = heatmaps_to_original_grid(heatmaps, properties, plans_manager, configuration_manager, logits)
    geo = original_geometry(properties)
    if geo.ndim == 2:  # a 2D image's heatmaps: a 2D L-component image on the same grid
        img = sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(full[:, 0], 0, -1)), isVector=True)
        img.SetSpacing(geo.spacing[:2])
        img.SetOrigin(geo.origin[:2])
        img.SetDirection(tuple(geo.direction_matrix[:2, :2].ravel()))
    else:
        img = sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(full, 0, -1)), isVector=True)
        img.SetSpacing(geo.spacing)
        img.SetOrigin(geo.origin)
        img.SetDirection(geo.direction)
    with atomic_path(path) as tmp:
        sitk.WriteImage(img, str(tmp), True)
    return path
