"""CC2D pseudo-labels: the template's landmark features matched, coarse to fine, in each unlabelled image.

A model trained with `nnUNetv2_train D CONFIG F -tr nnLandmarkSelfSupervisedTrainer` maps an image to
multi-scale L2-normalised features (its decoder outputs, finest first). `FeatureExtractor` loads that
model folder through nnU-Net's own predictor (plans, network built by the trainer class, weights),
preprocesses an image file with nnU-Net's preprocessor and returns the feature maps of the whole
preprocessed image with nnU-Net's `properties`. `match_points` finds each template landmark in a
target's features; `cc2d_pseudo_labels` runs the whole chain and maps points to world LPS mm.

Feature maps are computed tile by tile (`FeatureExtractor`): tiles of the training patch size, so
the network sees inputs of the size it was trained on (instance norm statistics included), on a grid
whose origins are multiples of the network's total stride, so every scale's tile lands on whole
feature voxels; overlapping tiles (about half a tile, `tile_step_size`) are blended with nnU-Net's
Gaussian weights per scale. An image smaller than a tile is zero-padded at its end (one tile = a
whole-image pass); padding is cropped off again at every scale. A 2D configuration runs slice by slice
(2D images have one slice), so maps are always (D, z, y, x) with stride 1 along z in that case.

Index convention (`align_corners=False`, as the trainer samples features): feature voxel j of a scale
with stride s along an axis covers input voxels s j .. s j + s - 1 and sits at input index
(j + 0.5) s - 0.5. Indices are continuous indices into the preprocessed array (network space).

Matching (`match_points`): a template landmark's feature at every scale is interpolated at its
(continuous) index. At the coarsest scale its cosine similarity with every voxel of the target map
gives the argmax; at each finer scale the argmax is searched only in a window of +-`window` voxels
around the previous match mapped to that scale; a parabola through the final similarity and its
two neighbours along each axis refines the point to sub-voxel (`subvoxel`). Confidence = the cosine
similarity at the final match, clipped to [0, 1] (1 = the template's feature found unchanged); the
coarsest scale's margin over the second-best peak is a possible alternative, not used.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["ImageFeatures", "FeatureExtractor", "match_points", "feature_at", "tile_origins", "cc2d_pseudo_labels"]

PathLike = Union[str, os.PathLike]


@dataclass
class ImageFeatures:
    """Multi-scale features of one preprocessed image."""
    features: List[torch.Tensor]  # per scale, finest first: (D, z, y, x) float32 on the CPU, L2-normalised
    strides: np.ndarray  # (K, 3) input voxels per feature voxel along z, y, x
    properties: dict  # nnU-Net's preprocessing properties (index mapping)
    shape: Tuple[int, ...]  # the preprocessed array's spatial shape (network space)
    source: str = "<memory>"


def tile_origins(size: int, tile: int, step_fraction: float, align: int) -> List[int]:
    """Tile origins along one axis of a padded length `size` (>= tile; size - tile a multiple of
    `align`): evenly spread from 0 to size - tile, about `step_fraction` tiles apart, each a multiple of `align`."""
    if size <= tile:
        return [0]
    n = int(np.ceil((size - tile) / max(1.0, tile * step_fraction))) + 1
    return sorted({int(round(o / align)) * align for o in np.linspace(0, size - tile, n)})


@contextlib.contextmanager
def _our_trainers_visible():
    """nnU-Net finds the trainer named in a checkpoint through `nnUNet_extTrainer`: make sure our
    trainer folder is on it for the duration."""
    from nnlandmark_h3de.training.trainer_folder import trainer_folder
    old = os.environ.get("nnUNet_extTrainer")
    folder = str(trainer_folder())
    paths = [p for p in (old or "").split(os.pathsep) if p]
    if folder not in paths:
        os.environ["nnUNet_extTrainer"] = os.pathsep.join(paths + [folder])
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("nnUNet_extTrainer", None)
        else:
            os.environ["nnUNet_extTrainer"] = old


class FeatureExtractor:
    """A trained self-supervised model folder -> multi-scale features of image files (or arrays).

    `model_folder` is nnU-Net's `<results>/<dataset>/<trainer>__<plans>__<config>`; `fold` one of its
    folds. `tile_step_size` is the tile overlap (nnU-Net's meaning: 0.5 = half a tile).
    """

    def __init__(self, model_folder: PathLike, fold: Union[int, str] = 0, checkpoint_name: str = "checkpoint_final.pth",
                 device: Union[str, torch.device] = "cpu", tile_step_size: float = 0.5):
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

        from nnlandmark_h3de.training.self_supervised_trainer import nnLandmarkSelfSupervisedTrainer

        self.device = torch.device(device)
        self.tile_step_size = float(tile_step_size)
        model_folder = Path(model_folder)
        if not (model_folder / f"fold_{fold}" / checkpoint_name).is_file():
            raise FileNotFoundError(f"{model_folder / f'fold_{fold}' / checkpoint_name}: no such checkpoint")
        predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=False,
                                    perform_everything_on_device=self.device.type == "cuda", device=self.device,
                                    verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        with _our_trainers_visible():
            predictor.initialize_from_trained_model_folder(str(model_folder), (fold,), checkpoint_name)
            trainer_class = recursive_find_trainer_class_by_name(predictor.trainer_name)
        if not issubclass(trainer_class, nnLandmarkSelfSupervisedTrainer):
            raise ValueError(f"{model_folder}: trained with {predictor.trainer_name}, not a self-supervised feature "
                             f"trainer (nnLandmarkSelfSupervisedTrainer or a subclass)")
        self.predictor = predictor
        self.plans_manager = predictor.plans_manager
        self.configuration_manager = predictor.configuration_manager
        self.dataset_json = predictor.dataset_json
        cm = self.configuration_manager
        self.patch_size = [int(p) for p in cm.patch_size]
        self.is_2d = len(self.patch_size) == 2
        # strides of the used scales in the network's own axes, and the total stride the input must divide by
        self.network_strides = np.asarray(trainer_class.feature_strides(cm), dtype=np.int64)
        self.total_stride = np.prod(np.vstack(cm.pool_op_kernel_sizes), axis=0).astype(np.int64)
        if np.any(np.asarray(self.patch_size) % self.total_stride):
            raise ValueError(f"{model_folder}: patch size {self.patch_size} is not divisible by the network's total "
                             f"stride {self.total_stride.tolist()}")
        self.strides = np.concatenate([np.ones((len(self.network_strides), 1), dtype=np.int64), self.network_strides],
                                      1) if self.is_2d else self.network_strides
        network = predictor.network
        network.decoder.deep_supervision = True  # the predictor built it for inference: finest output only
        self.network = network.to(self.device).eval()

    # ------------------------------------------------------------ preprocessing
    def preprocess(self, image: Union[PathLike, Sequence[PathLike]]) -> Tuple[np.ndarray, dict]:
        """nnU-Net's preprocessing of one case (one file per input channel) -> ((C, z, y, x), properties)."""
        files = [str(image)] if isinstance(image, (str, os.PathLike)) else [str(f) for f in image]
        pre = self.configuration_manager.preprocessor_class(verbose=False)
        data, _, properties = pre.run_case(files, None, self.plans_manager, self.configuration_manager,
                                           self.dataset_json)
        return np.asarray(data, dtype=np.float32), properties

    # ----------------------------------------------------------------- features
    @torch.no_grad()
    def _tiled(self, data: torch.Tensor) -> List[torch.Tensor]:
        """(C, *spatial) in the network's own dimensionality -> per scale (D, *spatial / stride), blended tiles."""
        from nnunetv2.inference.sliding_window_prediction import compute_gaussian

        spatial = np.asarray(data.shape[1:], dtype=np.int64)
        patch = np.asarray(self.patch_size, dtype=np.int64)
        padded = np.maximum(patch, -(-spatial // self.total_stride) * self.total_stride)
        x = F.pad(data, [v for a in reversed(range(len(spatial))) for v in (0, int(padded[a] - spatial[a]))])
        origins = [tile_origins(int(s), int(p), self.tile_step_size, int(al))
                   for s, p, al in zip(padded, patch, self.total_stride)]
        sums, weights, gauss = None, None, []
        for origin in np.stack(np.meshgrid(*origins, indexing="ij"), -1).reshape(-1, len(spatial)):
            tile = x[(slice(None),) + tuple(slice(int(o), int(o + p)) for o, p in zip(origin, patch))]
            with torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda" \
                    else contextlib.nullcontext():
                out = self.network(tile[None].to(self.device))
            out = out if isinstance(out, (list, tuple)) else [out]
            if sums is None:
                sums = [torch.zeros((out[k].shape[1], *(padded // s)), dtype=torch.float32)
                        for k, s in enumerate(self.network_strides)]
                weights = [torch.zeros(tuple(padded // s), dtype=torch.float32) for s in self.network_strides]
                gauss = [compute_gaussian(tuple(int(v) for v in patch // s), sigma_scale=1. / 8, value_scaling_factor=1,
                                          dtype=torch.float32, device=torch.device("cpu")) for s in self.network_strides]
            for k, s in enumerate(self.network_strides):
                region = tuple(slice(int(o // st), int((o + p) // st)) for o, p, st in zip(origin, patch, s))
                sums[k][(slice(None),) + region] += out[k][0].float().cpu() * gauss[k]
                weights[k][region] += gauss[k]
        maps = []
        for k, s in enumerate(self.network_strides):
            keep = tuple(slice(0, int(-(-n // st))) for n, st in zip(spatial, s))
            maps.append(sums[k][(slice(None),) + keep] / weights[k][keep])
        return maps

    @torch.no_grad()
    def features_of_array(self, data: np.ndarray) -> List[torch.Tensor]:
        """Preprocessed (C, z, y, x) -> per scale (D, z, y, x) / strides, L2-normalised, CPU float32."""
        t = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
        if t.ndim != 4:
            raise ValueError(f"expected a preprocessed (C, z, y, x) array, got shape {tuple(t.shape)}")
        if self.is_2d:
            per_slice = [self._tiled(t[:, z]) for z in range(t.shape[1])]
            maps = [torch.stack([s[k] for s in per_slice], 1) for k in range(len(self.network_strides))]
        else:
            maps = self._tiled(t)
        return [F.normalize(m, dim=0) for m in maps]

    def __call__(self, image: Union[PathLike, Sequence[PathLike]]) -> ImageFeatures:
        data, properties = self.preprocess(image)
        return ImageFeatures(self.features_of_array(data), self.strides.copy(), properties, tuple(data.shape[1:]),
                             str(image))


# ---------------------------------------------------------------------------------- matching
def _as_maps(features) -> List[torch.Tensor]:
    maps = features.features if isinstance(features, ImageFeatures) else features
    return [F.normalize(torch.as_tensor(np.asarray(m) if not isinstance(m, torch.Tensor) else m).float(), dim=0)
            for m in maps]


def _strides(maps: List[torch.Tensor], strides) -> np.ndarray:
    if strides is not None:
        s = np.asarray(strides, dtype=np.float64)
        if s.shape != (len(maps), maps[0].ndim - 1):
            raise ValueError(f"strides {s.shape} do not match {len(maps)} scales of {maps[0].ndim - 1}-D maps")
        return s
    full = np.asarray(maps[0].shape[1:], dtype=np.float64)
    return np.stack([full / np.asarray(m.shape[1:], dtype=np.float64) for m in maps])


def feature_at(feature_map: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
    """(D, *S) map at (L, nd) continuous indices of that map -> (L, D), (bi/tri)linear, L2-normalised."""
    nd = feature_map.ndim - 1
    size = torch.as_tensor(feature_map.shape[1:], dtype=torch.float64)
    norm = (2 * torch.as_tensor(np.asarray(idx, dtype=np.float64)) + 1) / size - 1
    grid = norm.flip(-1).to(torch.float32).reshape((1, -1) + (1,) * (nd - 1) + (nd,))
    out = F.grid_sample(feature_map[None].float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return F.normalize(out.reshape(feature_map.shape[0], -1).T, dim=1)


def _window_offsets(radius: int, shape: Sequence[int]) -> torch.Tensor:
    """(W, nd) integer offsets -radius..radius, 0 along axes of size 1."""
    ranges = [torch.arange(-radius, radius + 1) if n > 1 else torch.zeros(1, dtype=torch.long) for n in shape]
    return torch.stack(torch.meshgrid(*ranges, indexing="ij"), -1).reshape(-1, len(shape))


def _subvoxel(sim_at, peak: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Parabolic refinement per axis of integer peaks (L, nd) given `sim_at(positions (L, nd)) -> (L,)`."""
    offset = torch.zeros(peak.shape, dtype=torch.float64)
    centre = sim_at(peak)
    for a, n in enumerate(shape):
        if n < 3:
            continue
        step = torch.zeros_like(peak)
        step[:, a] = 1
        lo, hi = peak - step, peak + step
        inside = (lo[:, a] >= 0) & (hi[:, a] < n)
        s_lo, s_hi = sim_at(lo.clamp(min=0)), sim_at(torch.minimum(hi, torch.as_tensor(list(shape)) - 1))
        denom = s_lo - 2 * centre + s_hi
        ok = inside & (denom < -1e-12)
        d = torch.where(ok, 0.5 * (s_lo - s_hi) / torch.where(ok, denom, torch.ones_like(denom)), 0.0)
        offset[:, a] = d.clamp(-0.5, 0.5).double()
    return peak.double() + offset


def match_points(template_features, template_idx: np.ndarray, target_features, strides=None,
                 target_strides=None, window: int = 3, subvoxel: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """Template landmarks -> their matches in a target image, coarse to fine.

    `template_features`, `target_features`: `ImageFeatures` or lists of (D, *S_k) maps (torch or
    numpy), finest first, the same scales for both. `template_idx` (L, nd): continuous indices in the
    template's full-resolution (input) grid; NaN rows give NaN matches with confidence 0. `strides`
    (K, nd): input voxels per feature voxel per scale (default: the `ImageFeatures`' own, else the
    map shapes' ratios to the first map, taken as full resolution); `target_strides` likewise for the
    target (default: the same). `window`: the search radius in voxels at every finer scale.

    Returns (idx (L, nd) continuous indices in the target's input grid, confidence (L,) in [0, 1]:
    the cosine similarity at the final match).
    """
    t_maps, g_maps = _as_maps(template_features), _as_maps(target_features)
    if len(t_maps) != len(g_maps) or not t_maps:
        raise ValueError(f"template has {len(t_maps)} feature scales, target {len(g_maps)}")
    if strides is None and isinstance(template_features, ImageFeatures):
        strides = template_features.strides
    if target_strides is None:
        target_strides = target_features.strides if isinstance(target_features, ImageFeatures) else strides
    t_str, g_str = _strides(t_maps, strides), _strides(g_maps, target_strides)
    idx_in = np.atleast_2d(np.asarray(template_idx, dtype=np.float64))
    nd = t_maps[0].ndim - 1
    if idx_in.shape[1] != nd:
        raise ValueError(f"template indices have {idx_in.shape[1]} axes, the feature maps {nd}")
    present = ~np.isnan(idx_in).any(1)
    out_idx = np.full(idx_in.shape, np.nan)
    out_conf = np.zeros(len(idx_in))
    if not present.any():
        return out_idx, out_conf
    idx0 = idx_in[present]
    K = len(t_maps)
    # the template's feature vector of every landmark at every scale
    queries = [feature_at(t_maps[k], (idx0 + 0.5) / t_str[k] - 0.5) for k in range(K)]  # (L, D) each

    coarse = g_maps[-1]
    sims = queries[-1] @ coarse.reshape(coarse.shape[0], -1)  # (L, N)
    flat = sims.argmax(1)
    peak = torch.stack(torch.unravel_index(flat, tuple(coarse.shape[1:])), -1)  # (L, nd)
    for k in range(K - 2, -1, -1):
        fmap = g_maps[k]
        shape = torch.as_tensor(fmap.shape[1:])
        centre = (peak.double() + 0.5) * torch.as_tensor(g_str[k + 1] / g_str[k]) - 0.5
        centre = torch.minimum(centre.round().long().clamp(min=0), shape - 1)
        pos = centre[:, None, :] + _window_offsets(window, fmap.shape[1:])[None]  # (L, W, nd)
        pos = torch.minimum(pos.clamp(min=0), shape - 1)
        lin = np.ravel_multi_index(tuple(pos.reshape(-1, nd).T.numpy()), tuple(fmap.shape[1:]))
        cand = fmap.reshape(fmap.shape[0], -1)[:, torch.as_tensor(lin)]  # (D, L W)
        s = (queries[k][:, :, None] * cand.T.reshape(pos.shape[0], pos.shape[1], -1).transpose(1, 2)).sum(1)
        peak = pos[torch.arange(pos.shape[0]), s.argmax(1)]
    fine, q = g_maps[0], queries[0]

    def sim_at(p: torch.Tensor) -> torch.Tensor:
        lin_p = np.ravel_multi_index(tuple(p.T.numpy()), tuple(fine.shape[1:]))
        return (fine.reshape(fine.shape[0], -1)[:, torch.as_tensor(lin_p)].T * q).sum(1).double()

    conf = sim_at(peak).clamp(0, 1).numpy()
    idx_f = _subvoxel(sim_at, peak, fine.shape[1:]) if subvoxel else peak.double()
    out_idx[present] = (idx_f.numpy() + 0.5) * g_str[0] - 0.5  # finest map -> input grid
    out_conf[present] = conf
    return out_idx, out_conf


# ---------------------------------------------------------------------------- pseudo-labels
def cc2d_pseudo_labels(model_folder: Union[PathLike, FeatureExtractor], template_image: Union[PathLike, Sequence[PathLike]], template_landmarks,
                       images: Mapping[str, Union[PathLike, Sequence[PathLike]]], fold: Union[int, str] = 0,
                       device: Union[str, torch.device] = "cpu", checkpoint_name: str = "checkpoint_final.pth",
                       window: int = 3, subvoxel: bool = True, progress: bool = True
                       ) -> Dict[str, Tuple["LandmarkSet", np.ndarray]]:  # noqa: F821
    """CC2D pseudo-labels: {case: (LandmarkSet in world LPS mm, confidence (L,) in [0, 1])}.

    The template's landmarks (world LPS, NaN = absent: absent in every case, confidence 0) are mapped
    into the template's preprocessed grid, their features matched in each image (`match_points`) and
    the matches mapped back to each image's world coordinates. A case that fails raises a `OneShotError`
    naming it and its file. `model_folder` may also be a `FeatureExtractor` already loaded (then
    `fold`, `device` and `checkpoint_name` are its own).
    """
    from tqdm import tqdm

    from nnlandmark_h3de.inference.index_mapping import network_index_to_world, world_to_network_index
    from nnlandmark_h3de.landmarks import LandmarkSet
    from nnlandmark_h3de.oneshot.pseudo_labels import OneShotError

    extractor = model_folder if isinstance(model_folder, FeatureExtractor) else \
        FeatureExtractor(model_folder, fold, checkpoint_name, device)
    pm, cm = extractor.plans_manager, extractor.configuration_manager
    try:
        template = extractor(template_image)
    except Exception as e:  # noqa: BLE001
        raise OneShotError(f"template {template_image}: feature extraction failed ({type(e).__name__}: {e})") from e
    t_idx = world_to_network_index(template_landmarks.points_lps, template.properties, pm, cm,
                                   network_shape=template.shape)
    names = list(template_landmarks.names)
    out: Dict[str, Tuple[LandmarkSet, np.ndarray]] = {}
    for case, image in tqdm(list(images.items()), desc="CC2D pseudo-labels", unit="case", disable=not progress):
        try:
            target = extractor(image)
            idx, conf = match_points(template, t_idx, target, window=window, subvoxel=subvoxel)
            points = network_index_to_world(idx, target.properties, pm, cm, network_shape=target.shape)
            out[case] = (LandmarkSet(names, points, confidence=conf, source=f"{case} (CC2D pseudo-labels)"), conf)
        except Exception as e:  # noqa: BLE001
            raise OneShotError(f"case {case} ({image}): CC2D pseudo-labelling failed ({type(e).__name__}: {e})") from e
    return out
