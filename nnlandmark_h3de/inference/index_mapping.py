"""Map points between nnU-Net's network space and world LPS millimetres, without resampling arrays.

nnU-Net preprocesses a case as transpose -> crop to the non-zero bounding box -> resample to the
target spacing (`DefaultPreprocessor.run_case_npy`). Both of its resampling routes (skimage `resize`
and the separate-z `map_coordinates`) align voxel centres: output index `o` samples input index
`(o + 0.5) * in_shape / out_shape - 0.5`. Inverting these three steps for a handful of points is
exact and costs nothing, unlike resampling every heatmap back to the original grid.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from nnlandmark_h3de.landmarks.geometry import ImageGeometry


def original_geometry(properties: dict, transpose_forward: Optional[Sequence[int]] = None) -> ImageGeometry:
    """World geometry of the original image array (z, y, x) from nnU-Net's reader properties.

    nnU-Net records `shape_before_cropping` after `transpose_forward`; pass it to get the original
    array shape right (coordinates do not depend on the shape).
    """
    if "sitk_stuff" in properties:
        shape_t = properties.get("shape_before_cropping")
        shape_orig = (0, 0, 0)
        if shape_t is not None:
            tf = list(transpose_forward) if transpose_forward is not None else list(range(len(shape_t)))
            shape_orig = [0] * len(shape_t)
            for a, t in enumerate(tf):
                shape_orig[t] = int(shape_t[a])
        return ImageGeometry.from_sitk_stuff(properties["sitk_stuff"], shape_orig)
    if "nibabel_stuff" in properties:
        # NibabelIO(WithReorient) arrays are nib_data.transpose(2, 1, 0): array (z, y, x) = nibabel (k, j, i).
        stuff = properties["nibabel_stuff"]
        affine = np.asarray(stuff.get("reoriented_affine", stuff["original_affine"]), dtype=np.float64)
        ras_to_lps = np.diag([-1.0, -1.0, 1.0])
        m = ras_to_lps @ affine[:3, :3]
        spacing = np.linalg.norm(m, axis=0)
        direction = m / spacing
        origin = ras_to_lps @ affine[:3, 3]
        return ImageGeometry((0, 0, 0), tuple(spacing), tuple(origin), tuple(direction.ravel()))
    raise KeyError("properties carry neither 'sitk_stuff' nor 'nibabel_stuff'; cannot map to world coordinates")


def _network_shape(properties: dict, plans_manager, configuration_manager) -> np.ndarray:
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

    tf = plans_manager.transpose_forward
    spacing_t = [properties["spacing"][i] for i in tf]
    target = list(configuration_manager.spacing)
    shape_cropped = properties["shape_after_cropping_and_before_resampling"]
    if len(target) < len(shape_cropped):
        target = [spacing_t[0]] + target
    return np.asarray(compute_new_shape(shape_cropped, spacing_t, target), dtype=np.float64)


def network_to_cropped_index(idx_zyx: np.ndarray, properties: dict, network_shape: Sequence[int]) -> np.ndarray:
    """Network index -> index into the cropped (not yet resampled) array: the input voxel it samples."""
    net_shape = np.asarray(network_shape, dtype=np.float64)
    cropped_shape = np.asarray(properties["shape_after_cropping_and_before_resampling"], dtype=np.float64)
    return (np.asarray(idx_zyx, dtype=np.float64) + 0.5) * (cropped_shape / net_shape) - 0.5


def network_index_to_world(idx_zyx: np.ndarray, properties: dict, plans_manager, configuration_manager,
                           network_shape: Optional[Sequence[int]] = None) -> np.ndarray:
    """Continuous index into the preprocessed array (axes already transposed) -> world LPS mm.

    `network_shape` is the preprocessed array's spatial shape; computed as nnU-Net does if omitted.
    NaN rows stay NaN.
    """
    idx = np.atleast_2d(np.asarray(idx_zyx, dtype=np.float64))
    net_shape = network_shape if network_shape is not None \
        else _network_shape(properties, plans_manager, configuration_manager)
    bbox_lo = np.asarray([b[0] for b in properties["bbox_used_for_cropping"]], dtype=np.float64)
    transposed = network_to_cropped_index(idx, properties, net_shape) + bbox_lo
    original = np.empty_like(transposed)
    original[:, list(plans_manager.transpose_forward)] = transposed  # transposed axis a = original axis tf[a]
    return original_geometry(properties, plans_manager.transpose_forward).array_index_to_world(original)


def world_to_network_index(points_lps: np.ndarray, properties: dict, plans_manager, configuration_manager,
                           network_shape: Optional[Sequence[int]] = None) -> np.ndarray:
    """World LPS mm -> continuous index into the preprocessed array; the inverse of the above."""
    pts = np.atleast_2d(np.asarray(points_lps, dtype=np.float64))
    net_shape = np.asarray(network_shape if network_shape is not None
                           else _network_shape(properties, plans_manager, configuration_manager), dtype=np.float64)
    cropped_shape = np.asarray(properties["shape_after_cropping_and_before_resampling"], dtype=np.float64)
    bbox_lo = np.asarray([b[0] for b in properties["bbox_used_for_cropping"]], dtype=np.float64)

    original = original_geometry(properties, plans_manager.transpose_forward).world_to_array_index(pts)
    transposed = original[:, list(plans_manager.transpose_forward)]
    cropped = transposed - bbox_lo
    return (cropped + 0.5) * (net_shape / cropped_shape) - 0.5
