"""`nnLandmarkPredictor`: nnU-Net's predictor, exporting landmark files instead of segmentations.

nnU-Net does the model loading, fold ensembling, preprocessing and sliding-window inference. We
replace only the export: heatmap peaks are decoded in network space and just L points are mapped to
the world, so the heatmaps are never resampled to the original grid (unless `save_heatmaps`). The
per-case loop also differs from nnU-Net's on purpose: a failing case is reported by name and the
run goes on (an out-of-memory or device error stops it: device_errors.py), and finished cases are
recognised by their landmark file (`--continue_prediction`).

Calibration and prediction see the same ensemble members. The existence thresholds and the
uncertainty model of fold_X were fitted in the final validation on fold X's own predictions (its
test-time mirrors averaged); the folds' average has flatter peaks and other spreads. So the point
comes from the folds' averaged logits (the better localiser), while what was calibrated is applied
per fold (`FoldOutput`): each fold's score against its own thresholds, the folds' score/threshold
ratios averaged (a soft majority vote, `existence_ratio`); each fold's uncertainty model on its own
peak and mirror spread, combined as the RMS over folds (`per_fold_uncertainty`). The written
confidence is the folds' mean score.

Test-time mirrors run one at a time over the whole volume (summed as they come, on one device), and
a mirror that flips the case's own left/right axis swaps the pair channels (`case_mirroring`).

Two-stage prediction (`use_global_stage`): a global stage (atlas registration or a coarse model,
global_stage.py) estimates every landmark in the whole image; the network then runs only on the
tiles around the estimates, each landmark's peak searched within the calibrated radius of its
estimate (two_stage_tiles.py). Where the maximum lies on the search ball's surface (no local peak
inside), or the folds' local peaks are under their own floors (fitted in each fold's two-stage
validation, `keep_weak_estimates`), the global estimate stands, with the global stage's validated
error as its uncertainty; elsewhere the point is the estimate moved towards the local peak by the
validated weight (`blend_with_estimates`). One global stage (the first fold's) places every fold's
tiles, so their logits average; each fold's tiles are one FoldOutput, their mirrors summed tile by
tile (`TileSum`). From image files only the tiles' regions are resampled (regional_preprocessing.py);
a preprocessed case (the final validation) is tiled as it is. Cases are preprocessed ahead in worker
processes (preprocessing_pool.py).
"""
from __future__ import annotations

import contextlib
import os
import traceback
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.helpers import dummy_context
from tqdm import tqdm

from nnlandmark_h3de.heatmaps import pair_permutation
from nnlandmark_h3de.inference.case_mirroring import (CaseMirroring, add_on_one_device, case_mirroring,
                                                      logit_channel_permutation, mirror_combos,
                                                      mirrors_left_right_at_inference)
from nnlandmark_h3de.inference.device_errors import PredictionStopped, stops_the_run
from nnlandmark_h3de.inference.estimate_input import check_whole_image_allowed, estimate_sigma, mirrored_input, \
    with_estimate_channels
from nnlandmark_h3de.inference.index_mapping import network_index_to_world
from nnlandmark_h3de.inference.peaks import decode_peaks
from nnlandmark_h3de.inference.postprocessing import (PostprocessingOptions, postprocess, read_thresholds_per_fold,
                                                      resolve_pairs)
from nnlandmark_h3de.inference.preprocessing_pool import preprocessed_cases
from nnlandmark_h3de.inference.regional_preprocessing import NormalizedCase
from nnlandmark_h3de.inference.two_stage_tiles import (LocalSearch, TilePlan, TileSum, blend_with_estimates,
                                                       global_fallback_uncertainty, keep_weak_estimates,
                                                       plan_regional_tiles, plan_tiles, tile_peaks)
from nnlandmark_h3de.inference.uncertainty import case_uncertainty, read_uncertainty_per_fold
from nnlandmark_h3de.inference.save_heatmaps import HEATMAP_SUFFIX
from nnlandmark_h3de.landmarks import OUTPUT_FORMATS, LandmarkSet, landmark_names, write_landmarks

UNCERTAINTY_SOURCES = ("calibrated", "spread")
GLOBAL_ESTIMATES_FOLDER = "global_stage"  # OUT/global_stage/<case>: the global stage's own estimates


@dataclass
class FoldOutput:
    """One fold's own view of a case: what its calibration was fitted on (network-space indices)."""
    idx: np.ndarray  # (L, 3) peaks of the fold's logits (its mirrors averaged)
    peak: np.ndarray  # (L,) their heights
    member_idx: List[np.ndarray]  # each test-time mirror's own peaks ([idx] without mirroring)
    existence: Optional[np.ndarray] = None  # (L,) anchor existence (max over tiles and mirrors), if recorded


@dataclass
class _CaseInFlight:
    mirroring: CaseMirroring
    record_existence: bool
    folds: List[FoldOutput] = field(default_factory=list)
    tiles: Optional[TilePlan] = None


class nnLandmarkPredictor(nnUNetPredictor):
    def __init__(self, *args, output_format: str = "mrk.json", postprocessing: Optional[PostprocessingOptions] = None,
                 save_heatmaps: bool = False, uncertainty: str = "calibrated", save_global_estimates: bool = False,
                 regional_preprocessing: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        if output_format not in OUTPUT_FORMATS:
            raise ValueError(f"unknown output format {output_format!r}; choose one of {OUTPUT_FORMATS}")
        self.output_format = output_format
        self.postprocessing = postprocessing or PostprocessingOptions()
        self.save_heatmaps = save_heatmaps
        self.save_global_estimates = save_global_estimates
        self.regional_preprocessing = regional_preprocessing  # two stages: resample only the tiles' regions
        if uncertainty not in UNCERTAINTY_SOURCES:
            raise ValueError(f"unknown uncertainty {uncertainty!r}; choose one of {UNCERTAINTY_SOURCES}")
        self.uncertainty = uncertainty
        self.names, self.pairs = [], []  # type: List[str], list
        self.fold_thresholds: Optional[np.ndarray] = None  # (F, L), fold order = the loaded parameters' order
        self.fold_uncertainty = None  # per fold: UncertaintyModel or None (fold_X/landmark_uncertainty.json)
        self.failed: List[str] = []
        self._case: Optional[_CaseInFlight] = None  # set while one case is predicted
        self.score_kind = "peak"
        # two-stage prediction, see use_global_stage
        self.global_stage, self.global_radius_mm, self.global_fallback_mm = None, None, None
        self.local_peak_floor, self.local_weight = None, 1.0  # type: Optional[np.ndarray], float

    # ------------------------------------------------------------------ setup
    def initialize_from_trained_model_folder(self, model_training_output_dir, use_folds, checkpoint_name="checkpoint_final.pth"):
        if use_folds is None:
            use_folds = self.auto_detect_available_folds(model_training_output_dir, checkpoint_name)
        use_folds = [use_folds] if isinstance(use_folds, (str, int)) else list(use_folds)
        super().initialize_from_trained_model_folder(model_training_output_dir, use_folds, checkpoint_name)
        self._landmark_setup()
        self.mirror_left_right = mirrors_left_right_at_inference(self.trainer_name)
        self.load_calibration(model_training_output_dir, use_folds)

    def manual_initialization(self, *args, **kwargs):
        super().manual_initialization(*args, **kwargs)
        self._landmark_setup()
        self.load_calibration(None, [])

    def _landmark_setup(self):
        self.names = landmark_names(self.dataset_json)
        if self.label_manager.num_segmentation_heads != len(self.names) + 1:
            raise ValueError(f"the network has {self.label_manager.num_segmentation_heads} output channels but the "
                             f"dataset names {len(self.names)} landmarks (expected 1 + L: constant-zero channel first)")
        self.pairs = resolve_pairs(self.dataset_json, self.names)
        self.mirror_left_right = False  # see initialize_from_trained_model_folder
        self._flipped_channels = logit_channel_permutation(pair_permutation(self.names, self.pairs))

    def load_calibration(self, model_folder, folds) -> None:
        """Each fold's thresholds and uncertainty model, in the order of `folds` (= the order of the
        loaded parameters, one FoldOutput each per case)."""
        folds = list(folds)
        self.fold_uncertainty = None
        if model_folder is not None and self.uncertainty == "calibrated":
            self.fold_uncertainty = read_uncertainty_per_fold(model_folder, folds, self.names)
        self.fold_thresholds, kind = (None, None) if model_folder is None else \
            read_thresholds_per_fold(model_folder, folds, self.names)
        self.score_kind = "peak"
        if kind == "anchor" and self.postprocessing.threshold is None:
            if self._existence_network() is not None:
                self.score_kind = "anchor"
            else:
                print("WARNING: the thresholds were calibrated on anchor existence scores, but this network has no "
                      "anchor head; absent-landmark detection is off (use --threshold to set one for peak heights)")
                self.fold_thresholds = None
        elif kind not in (None, "peak") and self.postprocessing.threshold is None:
            print(f"WARNING: the thresholds were calibrated on '{kind}' scores, which this predictor does not "
                  f"compute; absent-landmark detection is off (use --threshold to set one for peak heights)")
            self.fold_thresholds = None

    def use_global_stage(self, stage, radius_mm: float, fallback_uncertainty_mm: float,
                         local_peak_floor: Optional[np.ndarray] = None, local_weight=1.0) -> None:
        """Predict in two stages: `stage.estimate(files)` first, then the tiles around its estimates.
        `local_peak_floor`: (L,), or (F, L) each loaded fold's own floor (global_stage.ensemble_local_peak_floors);
        where the folds' local peaks are under their floors (keep_weak_estimates), the global estimate stands;
        elsewhere the point is estimate + local_weight (peak - estimate) (blend_with_estimates; one number or
        one per landmark)."""
        if self.save_heatmaps:
            raise ValueError("--save_heatmaps needs the whole-image sliding window; it cannot be combined with a "
                             "global stage (two-stage prediction predicts tiles only)")
        if len(self.configuration_manager.patch_size) != 3:
            raise ValueError("two-stage prediction (a global stage) is implemented for 3D configurations; a 2D "
                             "configuration predicts the whole image in one sliding window (run without --global)")
        if list(stage.names) != list(self.names):
            raise ValueError(f"the global stage's landmarks {list(stage.names)} differ from the model's {self.names}")
        if not radius_mm > 0:
            raise ValueError(f"the local search radius must be > 0 mm, got {radius_mm}")
        floor = None if local_peak_floor is None else np.asarray(local_peak_floor, dtype=np.float64)
        n_folds = len(self.list_of_parameters or [None])
        if floor is not None and floor.shape not in ((len(self.names),), (n_folds, len(self.names))):
            raise ValueError(f"local peak floors of shape {floor.shape} for {len(self.names)} landmarks and {n_folds} "
                             f"fold(s): expected one per landmark, or one row per fold")
        weight = np.asarray(local_weight, dtype=np.float64)
        if weight.shape not in ((), (len(self.names),)) or not np.all((weight >= 0) & (weight <= 1)):
            raise ValueError(f"local weights {weight.tolist()} for {len(self.names)} landmarks: expected one number "
                             f"or one per landmark, each in [0, 1]")
        self.global_stage, self.global_radius_mm, self.global_fallback_mm = stage, float(radius_mm), \
            float(fallback_uncertainty_mm)
        self.local_peak_floor, self.local_weight = floor, (float(weight) if weight.ndim == 0 else weight)

    def _existence_network(self):
        """The network itself (unwrapped from torch.compile) when it records anchor existence, else None."""
        net = getattr(self.network, "_orig_mod", self.network)
        return net if hasattr(net, "reset_existence") and hasattr(net, "anchor_existence") else None

    # ------------------------------------------------------------ per case
    @contextlib.contextmanager
    def case_in_flight(self, properties: Optional[dict], record_existence: bool = False):
        """While one case is predicted: its mirroring plan, and one FoldOutput per fold collected."""
        plan = case_mirroring(self._array_mirroring_axes() if self.use_mirroring else None, properties,
                              self.plans_manager.transpose_forward, has_pairs=bool(self.pairs),
                              add_left_right=self.use_mirroring and self.mirror_left_right,
                              first_patch_axis=self._first_patch_axis())
        self._case = _CaseInFlight(plan, record_existence)
        try:
            yield self._case
        finally:
            self._case = None

    def _array_mirroring_axes(self) -> Optional[Tuple[int, ...]]:
        """The model's mirroring axes as axes of the (z, y, x) case array: a 2D configuration's patch
        axis a is array axis a + 1 (nnU-Net's (1, y, x) form of a 2D image, or one slice of a volume)."""
        if not self.allowed_mirroring_axes:
            return None
        return tuple(int(a) + self._first_patch_axis() for a in self.allowed_mirroring_axes)

    def _first_patch_axis(self) -> int:
        """The first axis of the (z, y, x) case array that a patch spans: 1 for a 2D configuration."""
        return 3 - len(self.configuration_manager.patch_size)

    @torch.inference_mode()
    def predict_sliding_window_return_logits(self, input_image: torch.Tensor):
        """nnU-Net's (called once per fold); inside `case_in_flight` it also records the fold's own
        peaks, each mirror's peaks and, for networks with an anchor head, the existence probabilities."""
        case = self._case
        if case is None:
            return super().predict_sliding_window_return_logits(input_image)
        anchor_net = self._existence_network() if case.record_existence else None
        if anchor_net is not None:  # max existence over this fold's tiles and mirrors
            anchor_net.reset_existence()
            anchor_net.record_existence = True
        try:
            if case.tiles is not None and case.tiles.whole_image:
                logits, member_idx = self._mirrored_sliding_window(input_image, case.mirroring)
                logits = logits[None]  # one "tile": the whole (padded) image, origin 0
            elif case.tiles is not None:
                logits, member_idx = self._mirrored_tiles(input_image, case.mirroring, case.tiles)
            else:
                logits, member_idx = self._mirrored_sliding_window(input_image, case.mirroring)
        finally:
            if anchor_net is not None:
                anchor_net.record_existence = False
        if case.tiles is not None:
            idx, peak, _, _ = tile_peaks(logits, case.tiles)
        else:
            idx, peak, _ = decode_peaks(logits[1:], logits=True)
        existence = None if anchor_net is None else anchor_net.anchor_existence.detach().cpu().numpy().astype(np.float64)
        case.folds.append(FoldOutput(idx, peak, member_idx if len(member_idx) > 1 else [idx], existence))
        return logits

    def _mirrored_sliding_window(self, input_image: torch.Tensor, plan: CaseMirroring):
        """The mirrors run one at a time over the whole volume (each output flipped back, the pair
        channels swapped where the case's left/right axis was flipped) instead of inside every tile:
        nnU-Net's average up to its tile weighting (its Gaussian map sits half a voxel off-centre in
        even tiles), at the same cost, but every mirror's own peaks are known. Returns the averaged
        logits and each mirror's peaks (none without mirrors)."""
        combos = mirror_combos(plan)
        use_mirroring, self.use_mirroring = self.use_mirroring, False
        total, member_idx = None, []
        try:
            for combo in combos:
                dims = [a + 1 for a in combo]  # input_image is (C, z, y, x); mirroring axes are spatial
                out = super().predict_sliding_window_return_logits(torch.flip(input_image, dims) if dims else input_image)
                out = torch.flip(out, dims) if dims else out
                if plan.swap_axis is not None and plan.swap_axis in combo:
                    out = out[self._flipped_channels]
                if len(combos) > 1:
                    member_idx.append(decode_peaks(out[1:], logits=True)[0])
                total = add_on_one_device(total, out)  # fp16, on the CPU after a device out-of-memory
        finally:
            self.use_mirroring = use_mirroring
        return total.div_(len(combos)), member_idx

    def _mirrored_tiles(self, padded: torch.Tensor, plan: CaseMirroring, tiles: TilePlan):
        """The two-stage counterpart of `_mirrored_sliding_window`: (G, C, *patch) logits of the planned
        tiles (mirrors averaged the same way) and each mirror's own peaks (network indices). Tile by
        tile, each mirror in turn goes into a running sum and gives its peaks at once (TileSum), so
        memory holds the sum and one tile's output, whatever the number of mirrors."""
        combos = mirror_combos(plan)
        patch = tuple(self.configuration_manager.patch_size)
        self.network = self.network.to(self.device)
        self.network.eval()
        tile_sum = TileSum(tiles, len(combos))
        sigma = estimate_sigma(self.network)
        with torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            for g in range(len(tiles.groups)):
                x = with_estimate_channels(tiles.tile_input(padded, g, patch)[None].to(self.device), tiles, g, sigma)
                for m, combo in enumerate(combos):
                    dims = [a + 2 for a in combo]  # the tile batch is (1, C, z, y, x)
                    swap = self._flipped_channels if plan.swap_axis is not None and plan.swap_axis in combo else None
                    out = self.network(mirrored_input(x, dims, swap, 0 if sigma is None else len(self.names)))
                    out = (torch.flip(out, dims) if dims else out)[0].float()
                    if swap is not None:
                        out = out[swap]
                    tile_sum.add(g, m, out)
                    del out
        return tile_sum.mean().cpu(), tile_sum.member_peaks()

    def global_estimate(self, files) -> LandmarkSet:
        """The global stage on the case's image files, in the model's landmark order."""
        if not files:
            raise ValueError("two-stage prediction needs the case's image files for the global stage")
        return self.global_stage.estimate(files).reordered(self.names)

    def local_search(self) -> LocalSearch:
        """What two_stage_tiles plans with: this model's plans and configuration, the search radius and
        nnU-Net's sliding-window tile count."""
        return LocalSearch(self.plans_manager, self.configuration_manager, self.global_radius_mm,
                           lambda shape: len(self._internal_get_sliding_window_slicers(shape))
                           if estimate_sigma(self.network) is None else float("inf"))  # it needs its tiles

    def locate(self, data, properties: dict, files=None, record_existence: bool = False, source: str = "<memory>"):
        """Network-space landmarks of one case (preprocessed tensor, or a NormalizedCase for regional
        preprocessing), by whole-image sliding window or, with a global stage, in two stages. Returns
        (idx (L, 3), width (L, 3), folds, logits or None (two-stage), two-stage info {"estimate", "fallback"
        (L,), "n_tiles"} or None)."""
        with self.case_in_flight(properties, record_existence=record_existence) as case:
            if case.mirroring.note:
                tqdm.write(f"WARNING {source}: {case.mirroring.note}")
            if self.global_stage is None:
                check_whole_image_allowed(self.network)
                logits = self._ensemble_logits(self._resampled_whole(data))
                idx, _, width = decode_peaks(logits[1:], logits=True)
                return idx, width, case.folds, logits, None
            return self._locate_in_tiles(case, data, properties, files, record_existence)

    def _locate_in_tiles(self, case: _CaseInFlight, data, properties: dict, files, record_existence: bool):
        """`locate`'s two stages: the global estimate, then the network on the tiles around it."""
        estimate = self.global_estimate(files)
        search = self.local_search()
        planned = plan_regional_tiles(search, data, estimate) if isinstance(data, NormalizedCase) else None
        padded, case.tiles = planned if planned is not None else \
            plan_tiles(search, self._resampled_whole(data), properties, estimate)
        if not case.tiles.groups:  # no landmark in the image: nothing to predict
            L = len(self.names)
            nan = np.full((L, 3), np.nan)
            folds = [FoldOutput(nan, np.zeros(L), [nan], np.zeros(L) if record_existence else None)
                     for _ in (self.list_of_parameters or [None])]
            return nan, np.full((L, 3), np.nan), folds, None, \
                {"estimate": estimate, "fallback": np.zeros(L, bool), "n_tiles": 0}
        tile_logits = self._ensemble_logits(padded)
        idx, _, width, fallback = tile_peaks(tile_logits, case.tiles)
        idx = blend_with_estimates(idx, case.tiles, self.local_weight)
        if self.local_peak_floor is not None:  # each fold's own peak against its own floor
            idx, fallback = keep_weak_estimates(idx, fallback, np.stack([f.peak for f in case.folds]),
                                                self.local_peak_floor, case.tiles)
        return idx, width, case.folds, None, {"estimate": estimate, "fallback": fallback,
                                              "n_tiles": case.tiles.n_tiles, "whole_image": case.tiles.whole_image}

    def _resampled_whole(self, data):
        """A NormalizedCase resampled whole (what nnU-Net's preprocessing gives); a preprocessed tensor as it is."""
        return torch.from_numpy(data.resample_whole(self.configuration_manager)) \
            if isinstance(data, NormalizedCase) else data

    def _ensemble_logits(self, data: torch.Tensor) -> torch.Tensor:
        """nnU-Net's loop over the folds' parameters; a manually initialised predictor (the trainer's
        final validation) has one network and no parameter list."""
        if self.list_of_parameters is None:
            return self.predict_sliding_window_return_logits(data).to("cpu")
        return self.predict_logits_from_preprocessed_data(data)

    def predict_case(self, data: torch.Tensor, properties: dict, source: str = "<memory>", files=None):
        """Preprocessed case -> (LandmarkSet in world LPS mm, postprocessing report, ensemble logits
        (None in two-stage prediction))."""
        idx, width, folds, logits, two_stage = self.locate(data, properties, files, self.score_kind == "anchor", source)

        network_shape = data.network_shape if isinstance(data, NormalizedCase) else tuple(data.shape[1:])

        def to_world(i):
            return network_index_to_world(i, properties, self.plans_manager, self.configuration_manager,
                                          network_shape=network_shape)

        points = to_world(idx)
        scores = np.stack([f.existence if self.score_kind == "anchor" else f.peak for f in folds])  # (F, L)
        for what, per_fold in (("thresholds", self.fold_thresholds), ("uncertainty models", self.fold_uncertainty)):
            if per_fold is not None and len(per_fold) != len(folds):
                raise RuntimeError(f"{len(per_fold)} folds' {what} loaded for {len(folds)} folds predicted")
        uncertainty = case_uncertainty(self.fold_uncertainty, folds, points, idx, width, to_world)
        if two_stage is not None:
            uncertainty = global_fallback_uncertainty(uncertainty, two_stage, self.global_fallback_mm)
        ls = LandmarkSet(self.names, points, uncertainty_mm=uncertainty, source=source)
        ls, report = postprocess(ls, scores, self.postprocessing, self.pairs, self.fold_thresholds)
        if two_stage is not None:
            report["global_estimate_kept"] = [n for n, f in zip(self.names, two_stage["fallback"]) if f]
            report["global_estimate"] = two_stage["estimate"]
            report["n_tiles"] = two_stage["n_tiles"]
        return ls, report, logits

    def output_file(self, ofile_truncated: str) -> str:
        return f"{ofile_truncated}.{self.output_format}"

    def export_case(self, ls: LandmarkSet, logits, properties: dict, ofile_truncated: str) -> None:
        """Our export step: the landmark file (atomic), and the heatmaps only if asked."""
        if self.save_heatmaps:
            from nnlandmark_h3de.inference.save_heatmaps import write_heatmaps_nifti
            write_heatmaps_nifti(logits[1:], properties, self.plans_manager, self.configuration_manager,
                                 ofile_truncated + HEATMAP_SUFFIX, logits=True)
        write_landmarks(ls, self.output_file(ofile_truncated), self.output_format)

    def export_global_estimate(self, report: dict, ofile_truncated: str) -> None:
        """With `save_global_estimates`, the global stage's own estimates go to OUT/global_stage/ (what the
        local stage started from: to see what each stage contributes)."""
        if self.save_global_estimates and report.get("global_estimate") is not None:  # in the model's order
            folder = os.path.join(os.path.dirname(ofile_truncated), GLOBAL_ESTIMATES_FOLDER)
            os.makedirs(folder, exist_ok=True)
            write_landmarks(report["global_estimate"], self.output_file(os.path.join(
                folder, os.path.basename(ofile_truncated))), self.output_format)

    # ------------------------------------------------------ nnU-Net hooks
    def _manage_input_and_output_lists(self, list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files,
                                       folder_with_segs_from_prev_stage=None, overwrite=True, part_id=0, num_parts=1,
                                       save_probabilities=False):
        """nnU-Net's listing; "already done" means our landmark file (and heatmaps if asked) exists."""
        lists, outs, segs = super()._manage_input_and_output_lists(
            list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files,
            folder_with_segs_from_prev_stage, True, part_id, num_parts, False)
        if not overwrite and outs is not None:
            todo = [i for i, o in enumerate(outs) if not (os.path.isfile(self.output_file(o)) and
                    (not self.save_heatmaps or os.path.isfile(o + HEATMAP_SUFFIX)))]
            print(f"--continue_prediction: {len(outs) - len(todo)} case(s) already done, {len(todo)} to predict")
            lists, outs, segs = [lists[i] for i in todo], [outs[i] for i in todo], [segs[i] for i in todo]
        self._n_cases = len(lists)
        return lists, outs, segs

    def _internal_get_data_iterator_from_lists_of_filenames(self, input_list_of_lists, seg_from_prev_stage_files,
                                                            output_filenames_truncated, num_processes):
        """Preprocess in `num_processes` workers (0 = here), a bounded number of cases ahead.

        Unlike nnU-Net's iterator, an unreadable case yields an error record instead of aborting the run.
        """
        regional = self.global_stage is not None and self.regional_preprocessing and \
            len(self.configuration_manager.patch_size) == 3
        return preprocessed_cases(input_list_of_lists, seg_from_prev_stage_files, output_filenames_truncated,
                                  self.plans_manager, self.configuration_manager, self.dataset_json, regional,
                                  num_processes)

    def predict_from_data_iterator(self, data_iterator, save_probabilities: bool = False,
                                   num_processes_segmentation_export: int = 0):
        """Predict, decode and write each case; returns the LandmarkSets of cases without an output file.

        Failures are printed with the case name and collected in `self.failed`; the run continues. An
        out-of-memory or device error stops it (PredictionStopped, naming the case and what to change):
        every later case would fail the same way.
        """
        if save_probabilities:
            raise ValueError("nnLandmarkPredictor writes landmark files; use nnUNetv2_predict --save_probabilities "
                             "and nnLandmark_export for probability maps")
        self.failed, returned, n_written = [], [], 0
        bar = tqdm(data_iterator, total=getattr(self, "_n_cases", None), desc="Predicting landmarks",
                   unit="case", disable=not self.allow_tqdm)
        try:
            for item in bar:
                ofile = item.get("ofile")
                case = os.path.basename(ofile) if ofile else f"case {len(returned) + len(self.failed)}"
                bar.set_postfix_str(case)
                try:
                    ls = self._predict_item(item, case)
                except Exception as e:  # noqa: BLE001 - one bad case must not stop the others
                    if stops_the_run(e):
                        raise PredictionStopped(case, e, n_written) from e
                    self.failed.append(case)
                    tqdm.write(f"FAILED {case}: {type(e).__name__}: {e}")
                    if self.verbose:
                        traceback.print_exc()
                    continue
                if ofile is None:
                    returned.append(ls)
                n_written += ofile is not None
        finally:
            bar.close()
            if hasattr(data_iterator, "close"):  # stop the preprocessing workers when the run stops early
                data_iterator.close()
        if self.failed:
            print(f"{len(self.failed)} case(s) failed: {', '.join(self.failed)}")
        return returned

    def _predict_item(self, item: dict, case: str) -> LandmarkSet:
        """One record of the data iterator: predicted, reported and, when it names an output file, written."""
        if "error" in item:
            raise RuntimeError(f"preprocessing failed: {item['error']}")
        data = item["data"]
        if isinstance(data, str):
            data = np.load(data)
        if not isinstance(data, NormalizedCase):
            data = torch.as_tensor(np.asarray(data) if not torch.is_tensor(data) else data).float()
        ls, report, logits = self.predict_case(data, item["data_properties"], source=case, files=item.get("files"))
        if report["swapped"]:
            tqdm.write(f"{case}: left/right swapped {report['swapped']}")
        if report["absent"]:
            tqdm.write(f"{case}: absent {report['absent']}")
        kept = report.get("global_estimate_kept")
        if kept:
            tqdm.write(f"{case}: global estimate kept (no local peak inside the search radius, or one under "
                       f"the local peak floor) for "
                       f"{kept if len(kept) <= 5 else f'{len(kept)} of {len(self.names)} landmarks'}")
        if item.get("ofile") is not None:
            self.export_case(ls, logits, item["data_properties"], item["ofile"])
            self.export_global_estimate(report, item["ofile"])
        return ls

    def predict_from_files_sequential(self, list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files,
                                      save_probabilities=False, overwrite=True, folder_with_segs_from_prev_stage=None):
        """Same as predict_from_files without worker processes (nnU-Net's -npp 0 -nps 0)."""
        return self.predict_from_files(list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files,
                                       save_probabilities, overwrite, 0, 0, folder_with_segs_from_prev_stage)
