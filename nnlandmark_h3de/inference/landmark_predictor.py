"""`nnLandmarkPredictor`: nnU-Net's predictor, exporting landmark files instead of segmentations.

nnU-Net does the model loading, fold ensembling, preprocessing and sliding-window inference. We
replace only the export: heatmap peaks are decoded in network space and just L points are mapped to
the world, so the heatmaps are never resampled to the original grid (unless `save_heatmaps`). The
per-case loop also differs from nnU-Net's on purpose: a failing case is reported by name and the
run goes on, and finished cases are recognised by their landmark file (`--continue_prediction`).
"""
from __future__ import annotations

import itertools
import multiprocessing
import os
import traceback
from collections import deque
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from tqdm import tqdm

from nnlandmark_h3de.inference.index_mapping import network_index_to_world
from nnlandmark_h3de.inference.peaks import decode_peaks
from nnlandmark_h3de.inference.postprocessing import (PostprocessingOptions, postprocess, read_fold_thresholds,
                                                      resolve_pairs)
from nnlandmark_h3de.inference.uncertainty import (axis_step_mm, heatmap_spread_mm, member_spread_mm,
                                                   read_fold_uncertainty)
from nnlandmark_h3de.landmarks import LandmarkSet, write_landmarks

OUTPUT_FORMATS = ("mrk.json", "fcsv", "csv", "json")
UNCERTAINTY_SOURCES = ("calibrated", "spread")
HEATMAP_SUFFIX = "_heatmaps.nii.gz"


def landmark_names(dataset_json: dict) -> List[str]:
    """Landmark names in channel order: the `landmarks` block, else the labels without background."""
    block = dataset_json.get("landmarks") or {}
    if block.get("names"):
        return list(block["names"])
    labels = sorted(((int(v), k) for k, v in dataset_json["labels"].items() if int(v) != 0))
    return [k for _, k in labels]


class nnLandmarkPredictor(nnUNetPredictor):
    def __init__(self, *args, output_format: str = "mrk.json", postprocessing: Optional[PostprocessingOptions] = None,
                 save_heatmaps: bool = False, uncertainty: str = "calibrated", **kwargs):
        super().__init__(*args, **kwargs)
        if output_format not in OUTPUT_FORMATS:
            raise ValueError(f"unknown output format {output_format!r}; choose one of {OUTPUT_FORMATS}")
        self.output_format = output_format
        self.postprocessing = postprocessing or PostprocessingOptions()
        self.save_heatmaps = save_heatmaps
        if uncertainty not in UNCERTAINTY_SOURCES:
            raise ValueError(f"unknown uncertainty {uncertainty!r}; choose one of {UNCERTAINTY_SOURCES}")
        self.uncertainty = uncertainty
        self.uncertainty_model = None  # fitted in the final validation (fold_X/landmark_uncertainty.json)
        self.names: List[str] = []
        self.pairs = []
        self.thresholds = None
        self.failed: List[str] = []
        self._fold_peaks = None  # network-space peaks of each ensemble member (fold x mirror) of the current case
        self._fold_existence = None  # per fold: anchor existence probabilities (L,) when the thresholds use them
        self.score_kind = "peak"

    # ------------------------------------------------------------------ setup
    def initialize_from_trained_model_folder(self, model_training_output_dir, use_folds, checkpoint_name="checkpoint_final.pth"):
        if use_folds is None:
            use_folds = self.auto_detect_available_folds(model_training_output_dir, checkpoint_name)
        use_folds = [use_folds] if isinstance(use_folds, (str, int)) else list(use_folds)
        super().initialize_from_trained_model_folder(model_training_output_dir, use_folds, checkpoint_name)
        self._landmark_setup(model_training_output_dir, use_folds)

    def manual_initialization(self, *args, **kwargs):
        super().manual_initialization(*args, **kwargs)
        self._landmark_setup(None, [])

    def _landmark_setup(self, model_folder, folds):
        self.names = landmark_names(self.dataset_json)
        if self.label_manager.num_segmentation_heads != len(self.names) + 1:
            raise ValueError(f"the network has {self.label_manager.num_segmentation_heads} output channels but the "
                             f"dataset names {len(self.names)} landmarks (expected 1 + L: constant-zero channel first)")
        self.pairs = resolve_pairs(self.dataset_json, self.names)
        self.uncertainty_model = None
        if model_folder is not None and self.uncertainty == "calibrated":
            self.uncertainty_model = read_fold_uncertainty(model_folder, folds, self.names)
        self.thresholds, kind = (None, None) if model_folder is None else read_fold_thresholds(model_folder, folds, self.names)
        self.score_kind = "peak"
        if kind == "anchor" and self.postprocessing.threshold is None:
            if self._existence_network() is not None:
                self.score_kind = "anchor"
            else:
                print("WARNING: the thresholds were calibrated on anchor existence scores, but this network has no "
                      "anchor head; absent-landmark detection is off (use --threshold to set one for peak heights)")
                self.thresholds = None
        elif kind not in (None, "peak") and self.postprocessing.threshold is None:
            print(f"WARNING: the thresholds were calibrated on '{kind}' scores, which this predictor does not "
                  f"compute; absent-landmark detection is off (use --threshold to set one for peak heights)")
            self.thresholds = None

    def _existence_network(self):
        """The network itself (unwrapped from torch.compile) when it records anchor existence, else None."""
        net = getattr(self.network, "_orig_mod", self.network)
        return net if hasattr(net, "reset_existence") and hasattr(net, "anchor_existence") else None

    # ------------------------------------------------------------ per case
    @torch.inference_mode()
    def predict_sliding_window_return_logits(self, input_image: torch.Tensor):
        """nnU-Net's (called once per fold), plus: each member's peaks for the spread uncertainty and,
        for networks with an anchor head, the fold's existence probabilities (max over tiles and mirrors)."""
        anchor_net = self._existence_network() if self._fold_existence is not None else None
        if anchor_net is not None:  # max existence over this fold's tiles and mirrors
            anchor_net.reset_existence()
            anchor_net.record_existence = True
        try:
            return self._members_sliding_window(input_image)
        finally:
            if anchor_net is not None:
                anchor_net.record_existence = False
                self._fold_existence.append(anchor_net.anchor_existence.detach().cpu().numpy().astype(np.float64))

    def _members_sliding_window(self, input_image: torch.Tensor):
        """With test-time mirroring, the mirrors run one at a time over the whole volume (each output
        flipped back) instead of inside every tile: the same average nnU-Net computes up to its tile
        weighting (its Gaussian map sits half a voxel off-centre in even tiles, so a flipped tile is
        weighted slightly differently), at the same cost, but every mirror's own peaks are known."""
        axes = tuple(self.allowed_mirroring_axes or ()) if self.use_mirroring else ()
        if self._fold_peaks is None or not axes:
            logits = super().predict_sliding_window_return_logits(input_image)
            if self._fold_peaks is not None:
                self._fold_peaks.append(decode_peaks(logits[1:], logits=True)[0])
            return logits
        combos = [c for k in range(len(axes) + 1) for c in itertools.combinations(axes, k)]
        self.use_mirroring = False
        try:
            total = None
            for combo in combos:
                dims = [a + 1 for a in combo]  # input_image is (C, z, y, x); mirroring axes are spatial
                out = super().predict_sliding_window_return_logits(torch.flip(input_image, dims) if dims else input_image)
                out = torch.flip(out, dims) if dims else out
                self._fold_peaks.append(decode_peaks(out[1:], logits=True)[0])
                total = out.float() if total is None else total.add_(out)  # nnU-Net returns fp16
        finally:
            self.use_mirroring = True
        return total.div_(len(combos))

    def sliding_window_with_member_peaks(self, data: torch.Tensor):
        """The loaded network's sliding-window logits of one case (mirrors averaged) and each mirror's
        own network-space peaks: what the final validation needs to calibrate the spread cue."""
        self._fold_peaks = []
        try:
            logits = self.predict_sliding_window_return_logits(data)
        finally:
            member_peaks, self._fold_peaks = self._fold_peaks, None
        return logits, member_peaks

    def predict_case(self, data: torch.Tensor, properties: dict, source: str = "<memory>"):
        """Preprocessed case -> (LandmarkSet in world LPS mm, postprocessing report, ensemble logits)."""
        self._fold_peaks = []
        self._fold_existence = [] if self.score_kind == "anchor" else None
        try:
            logits = self.predict_logits_from_preprocessed_data(data)
        finally:
            fold_peaks, self._fold_peaks = self._fold_peaks, None
            fold_existence, self._fold_existence = self._fold_existence, None
        idx, peak, width = decode_peaks(logits[1:], logits=True)
        score = np.mean(fold_existence, axis=0) if fold_existence else peak

        def to_world(i):
            return network_index_to_world(i, properties, self.plans_manager, self.configuration_manager,
                                          network_shape=tuple(data.shape[1:]))

        points = to_world(idx)
        spread = member_spread_mm(fold_peaks, points, to_world)  # folds x test-time mirrors
        if self.uncertainty_model is not None:
            uncertainty = self.uncertainty_model(peak, spread)
        elif spread is not None:
            uncertainty = spread
        else:
            uncertainty = heatmap_spread_mm(width, axis_step_mm(to_world, idx))
        ls = LandmarkSet(self.names, points, uncertainty_mm=uncertainty, source=source)
        ls, report = postprocess(ls, score, self.postprocessing, self.pairs, self.thresholds)
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
        outs = output_filenames_truncated or [None] * len(input_list_of_lists)
        segs = seg_from_prev_stage_files or [None] * len(input_list_of_lists)
        jobs = [(files, seg, o, self.plans_manager, self.configuration_manager, self.dataset_json)
                for files, seg, o in zip(input_list_of_lists, segs, outs)]
        if num_processes == 0:
            return (preprocess_case(*job) for job in jobs)
        return _pooled(jobs, min(num_processes, len(jobs)))

    def predict_from_data_iterator(self, data_iterator, save_probabilities: bool = False,
                                   num_processes_segmentation_export: int = 0):
        """Predict, decode and write each case; returns the LandmarkSets of cases without an output file.

        Failures are printed with the case name and collected in `self.failed`; the run continues.
        """
        if save_probabilities:
            raise ValueError("nnLandmarkPredictor writes landmark files; use nnUNetv2_predict --save_probabilities "
                             "and nnLandmark_export for probability maps")
        self.failed, returned = [], []
        bar = tqdm(data_iterator, total=getattr(self, "_n_cases", None), desc="Predicting landmarks",
                   unit="case", disable=not self.allow_tqdm)
        for item in bar:
            ofile = item.get("ofile")
            case = os.path.basename(ofile) if ofile else f"case {len(returned) + len(self.failed)}"
            bar.set_postfix_str(case)
            try:
                if "error" in item:
                    raise RuntimeError(f"preprocessing failed: {item['error']}")
                data = item["data"]
                if isinstance(data, str):
                    data = np.load(data)
                data = torch.as_tensor(np.asarray(data) if not torch.is_tensor(data) else data).float()
                ls, report, logits = self.predict_case(data, item["data_properties"], source=case)
                if report["swapped"]:
                    tqdm.write(f"{case}: left/right swapped {report['swapped']}")
                if report["absent"]:
                    tqdm.write(f"{case}: absent {report['absent']}")
                if ofile is None:
                    returned.append(ls)
                else:
                    self.export_case(ls, logits, item["data_properties"], ofile)
            except Exception as e:  # noqa: BLE001 - one bad case must not stop the others
                self.failed.append(case)
                tqdm.write(f"FAILED {case}: {type(e).__name__}: {e}")
                if self.verbose:
                    traceback.print_exc()
        bar.close()
        if self.failed:
            print(f"{len(self.failed)} case(s) failed: {', '.join(self.failed)}")
        return returned

    def predict_from_files_sequential(self, list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files,
                                      save_probabilities=False, overwrite=True, folder_with_segs_from_prev_stage=None):
        """Same as predict_from_files without worker processes (nnU-Net's -npp 0 -nps 0)."""
        return self.predict_from_files(list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files,
                                       save_probabilities, overwrite, 0, 0, folder_with_segs_from_prev_stage)


# ------------------------------------------------------------------- preprocessing workers
def preprocess_case(files, seg_prev, ofile, plans_manager, configuration_manager, dataset_json) -> dict:
    """nnU-Net's preprocessor on one case; errors come back as a record naming the files."""
    try:
        pre = configuration_manager.preprocessor_class(verbose=False)
        data, _, props = pre.run_case(files, seg_prev, plans_manager, configuration_manager, dataset_json)
        return {"data": data, "data_properties": props, "ofile": ofile}
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e} ({', '.join(map(str, files))})", "ofile": ofile}


def _pooled(jobs, n_proc: int):
    """Ordered results of preprocess_case from a spawn pool, at most n_proc + 1 cases in flight."""
    with multiprocessing.get_context("spawn").Pool(n_proc) as pool:
        pending, it = deque(), iter(jobs)
        for job in it:
            pending.append(pool.apply_async(preprocess_case, job))
            if len(pending) > n_proc:
                break
        while pending:
            result = pending.popleft().get()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.apply_async(preprocess_case, nxt))
            yield result
