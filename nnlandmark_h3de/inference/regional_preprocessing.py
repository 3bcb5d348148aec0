"""Two-stage prediction without resampling the whole image: preprocess only the regions the tiles need.

nnU-Net preprocesses a case as transpose -> crop to the non-zero box -> normalise -> resample the
whole image to the model's spacing. On a CT-sized case the resampling is most of the time and the
memory peak, although the local stage looks at a few tiles only. Here nnU-Net's own preprocessor runs
at the case's own spacing (its resampling is then a no-op: same reading, cropping and normalisation,
over the whole image as in nnU-Net), and nnU-Net's resampling function then runs on one region per
tile: the tile plus a margin for the spline's support.

Each region is a case of its own for `index_mapping` (its box inside the cropped case and its own
resampled shape), so its network indices map to the world exactly; they are then expressed in the
whole case's network space (the grid nnU-Net's whole-image resampling would give), where everything
after the peak search (uncertainty, existence, export) works unchanged. A region's grid may sit a
fraction of a voxel off the whole-image grid; the network sees the same image, shifted.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np

from nnlandmark_h3de.inference.index_mapping import network_index_to_world, network_to_cropped_index, \
    world_to_network_index

__all__ = ["NormalizedCase", "Region", "read_normalized_case", "region_box", "REGION_MARGIN_VOXELS"]

REGION_MARGIN_VOXELS = 8  # input voxels beyond a tile: the cubic spline's prefilter decays as 0.27^d


@dataclass
class NormalizedCase:
    """A case read, transposed, cropped and normalised by nnU-Net's preprocessor, at its own spacing."""
    data: np.ndarray  # (C, z, y, x) float32, transposed and cropped to the non-zero box
    properties: dict  # nnU-Net's properties of the case (as whole-image preprocessing records them)
    source_spacing: Tuple[float, ...]  # transposed spacing of `data`
    target_spacing: Tuple[float, ...]  # the configuration's spacing
    network_shape: Tuple[int, ...]  # the shape nnU-Net's whole-image resampling gives

    def resample(self, box: Tuple[np.ndarray, np.ndarray], configuration_manager) -> Tuple[np.ndarray, dict]:
        """nnU-Net's resampling of the part `box` = (lo, hi) (cropped input indices) of the case, and the
        properties that make `index_mapping` exact for it."""
        from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape
        lo, hi = (np.asarray(b, dtype=int) for b in box)
        part = self.data[(slice(None),) + tuple(slice(a, b) for a, b in zip(lo, hi))]
        shape = compute_new_shape(part.shape[1:], self.source_spacing, self.target_spacing)
        data = configuration_manager.resampling_fn_data(part, shape, list(self.source_spacing),
                                                        list(self.target_spacing))
        props = copy.deepcopy(self.properties)
        props["bbox_used_for_cropping"] = [[int(b[0]) + int(a), int(b[0]) + int(c)] for b, a, c in
                                           zip(self.properties["bbox_used_for_cropping"], lo, hi)]
        props["shape_after_cropping_and_before_resampling"] = tuple(int(c - a) for a, c in zip(lo, hi))
        return np.asarray(data, dtype=np.float32), props

    def resample_whole(self, configuration_manager) -> np.ndarray:
        """What nnU-Net's preprocessing would have given (where tiles would cost as much as the image)."""
        shape = np.asarray(self.data.shape[1:])
        return self.resample((np.zeros_like(shape), shape), configuration_manager)[0]


@dataclass
class Region:
    """One preprocessed region: its properties and resampled shape (for index_mapping) and the padding
    before its array (`pad_nd_image`), so its padded indices map to the whole case's network space."""
    properties: dict
    shape: Tuple[int, ...]  # resampled (unpadded) shape
    offset: np.ndarray  # padded index = index + offset
    case: NormalizedCase
    plans_manager: object
    configuration_manager: object

    def _world(self, idx, properties, shape):
        return network_index_to_world(idx, properties, self.plans_manager, self.configuration_manager,
                                      network_shape=shape)

    def _index(self, world, properties, shape):
        return world_to_network_index(world, properties, self.plans_manager, self.configuration_manager,
                                      network_shape=shape)

    def from_case_index(self, idx: np.ndarray) -> np.ndarray:
        """Whole-case network index -> this region's padded index."""
        world = self._world(idx, self.case.properties, self.case.network_shape)
        return self._index(world, self.properties, self.shape) + self.offset

    def to_case_index(self, idx: np.ndarray) -> np.ndarray:
        """This region's padded index -> whole-case network index."""
        world = self._world(np.asarray(idx, dtype=np.float64) - self.offset, self.properties, self.shape)
        return self._index(world, self.case.properties, self.case.network_shape)


def region_box(tile_lo: Sequence[int], patch: Sequence[int], case: NormalizedCase,
               margin: int = REGION_MARGIN_VOXELS) -> Tuple[np.ndarray, np.ndarray]:
    """The cropped-input box (lo, hi) that a network-space tile [tile_lo, tile_lo + patch) samples,
    widened by `margin` input voxels and the input voxels of one network voxel, within the case."""
    lo_net = np.asarray(tile_lo, dtype=np.float64)
    hi_net = lo_net + np.asarray(patch, dtype=np.float64) - 1
    first = network_to_cropped_index(lo_net, case.properties, case.network_shape)
    last = network_to_cropped_index(hi_net, case.properties, case.network_shape)
    step = np.asarray(case.data.shape[1:], dtype=np.float64) / np.asarray(case.network_shape, dtype=np.float64)
    pad = margin + np.ceil(step)
    lo = np.clip(np.floor(first - pad), 0, None).astype(int)
    hi = np.minimum(np.ceil(last + pad).astype(int) + 1, case.data.shape[1:])
    return lo, hi


def read_normalized_case(files: List[str], plans_manager, configuration_manager, dataset_json) -> NormalizedCase:
    """nnU-Net's reader and preprocessor (transpose, crop to non-zero, normalise) at the case's own spacing:
    a configuration identical but for its spacing makes nnU-Net's resampling a no-op."""
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
    data, props = plans_manager.image_reader_writer_class().read_images(files)
    tf = plans_manager.transpose_forward
    source = tuple(float(props["spacing"][i]) for i in tf)
    target = tuple(float(s) for s in configuration_manager.spacing)
    if len(target) != len(source):
        raise ValueError(f"regional preprocessing is for 3D configurations (spacing {list(target)})")
    own = ConfigurationManager({**configuration_manager.configuration, "spacing": list(source)})
    pre = configuration_manager.preprocessor_class(verbose=False)
    data, _, props = pre.run_case_npy(data, None, props, plans_manager, own, dataset_json)
    network_shape = tuple(int(s) for s in compute_new_shape(data.shape[1:], source, target))
    return NormalizedCase(data, props, source, target, network_shape)
