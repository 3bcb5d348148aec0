"""Landmark files from outputs that already exist on disk, the same way our predictor makes them.

Two sources:
- what stock `nnUNetv2_predict --save_probabilities` wrote with our trainers: `<case>.npz`
  (`probabilities`, softmax over the channels [constant-zero logit, landmark logits...], already in
  the ORIGINAL image grid) + `<case>.pkl` (nnU-Net's properties with the original geometry);
- heatmaps saved by `nnLandmark_predict --save_heatmaps`: `<case>_heatmaps.nii.gz`.

Recovering the landmark scores from the softmax: with logit_0 = 0, p_k / p_0 = exp(logit_k), hence
sigmoid(logit_k) = p_k / (p_0 + p_k) exactly, independent of the other landmarks' channels. Those
are the per-landmark heatmaps the network was trained to output, so decoding, thresholds and
uncertainty mean the same as in `nnLandmark_predict` (up to nnU-Net's interpolation of the logits).
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from nnlandmark_h3de.inference.index_mapping import original_geometry
from nnlandmark_h3de.inference.peaks import decode_peaks
from nnlandmark_h3de.inference.postprocessing import PostprocessingOptions, postprocess
from nnlandmark_h3de.inference.save_heatmaps import HEATMAP_SUFFIX
from nnlandmark_h3de.inference.uncertainty import axis_step_mm, heatmap_spread_mm
from nnlandmark_h3de.landmarks import ImageGeometry, LandmarkSet, write_landmarks



def softmax_to_sigmoid_scores(probabilities: np.ndarray) -> np.ndarray:
    """(1+L, ...) softmax over [zero logit, logits] -> (L, ...) per-landmark sigmoid(logit_k) = p_k/(p_0+p_k)."""
    p = np.asarray(probabilities, dtype=np.float32)
    p0 = p[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        s = p[1:] / (p0[None] + p[1:])
    return np.nan_to_num(s, nan=0.0, copy=False)


def decode_to_landmarks(heatmaps: np.ndarray, geometry: ImageGeometry, names: Sequence[str], source: str
                        ) -> Tuple[LandmarkSet, np.ndarray]:
    """Heatmaps (L, z, y, x) in the grid of `geometry` -> (LandmarkSet, peak scores)."""
    if heatmaps.shape[0] != len(names):
        raise ValueError(f"{source}: {heatmaps.shape[0]} heatmap channels for {len(names)} landmarks")
    idx, peak, spread = decode_peaks(heatmaps)
    points = geometry.array_index_to_world(idx)
    unc = heatmap_spread_mm(spread, axis_step_mm(geometry.array_index_to_world, idx))
    return LandmarkSet(list(names), points, uncertainty_mm=unc, source=source), peak


def landmarks_from_probabilities(npz_path, pkl_path, names: Sequence[str]) -> Tuple[LandmarkSet, np.ndarray]:
    with np.load(npz_path) as z:
        probs = z["probabilities"]
    with open(pkl_path, "rb") as f:
        properties = pickle.load(f)
    if probs.shape[0] != len(names) + 1:
        raise ValueError(f"{npz_path}: {probs.shape[0]} probability channels, expected 1 + {len(names)} "
                         f"(constant-zero channel + one per landmark): was it predicted with a landmark trainer?")
    scores = softmax_to_sigmoid_scores(probs)
    del probs
    return decode_to_landmarks(scores, original_geometry(properties), names, str(npz_path))


def landmarks_from_heatmap_nifti(path, names: Sequence[str]) -> Tuple[LandmarkSet, np.ndarray]:
    import SimpleITK as sitk
    from nnlandmark_h3de.landmarks import read_image
    img = read_image(path)
    arr = sitk.GetArrayViewFromImage(img)  # (z, y, x, L) for a vector image, (z, y, x) for L = 1; 2D: no z
    arr = np.ascontiguousarray(np.moveaxis(arr, -1, 0)) if img.GetNumberOfComponentsPerPixel() > 1 else arr[None]
    if img.GetDimension() == 2:
        arr = arr[:, None]  # (L, 1, y, x): nnU-Net's form of a 2D image, as ImageGeometry maps it
    return decode_to_landmarks(arr, ImageGeometry.from_sitk(img), names, str(path))


def find_exportable_cases(folder) -> Dict[str, Tuple[str, Path]]:
    """case -> ('probabilities', npz) or ('heatmaps', nii); probabilities win when both exist."""
    folder = Path(folder)
    cases = {}
    for p in sorted(folder.glob(f"*{HEATMAP_SUFFIX}")):
        cases[p.name[: -len(HEATMAP_SUFFIX)]] = ("heatmaps", p)
    for p in sorted(folder.glob("*.npz")):
        if p.with_suffix(".pkl").is_file():
            cases[p.stem] = ("probabilities", p)
    return dict(sorted(cases.items()))


def export_folder(input_folder, output_folder, names: Sequence[str], pairs=(), thresholds=None,
                  options: Optional[PostprocessingOptions] = None, output_format: str = "mrk.json",
                  overwrite: bool = True, show_progress: bool = True, uncertainty_model=None
                  ) -> Tuple[List[str], List[str]]:
    """Write one landmark file per exportable case; returns (written cases, failed cases).

    `uncertainty_model` (the folds' `UncertaintyModel`): the calibrated uncertainty from the peak
    heights instead of the heatmap width. A failing case is reported by name and the others go on.
    """
    options = options or PostprocessingOptions()
    cases = find_exportable_cases(input_folder)
    if not cases:
        raise FileNotFoundError(f"{input_folder}: no <case>.npz + <case>.pkl (nnUNetv2_predict --save_probabilities) "
                                f"and no <case>{HEATMAP_SUFFIX} (nnLandmark_predict --save_heatmaps) found")
    done, failed = [], []
    for case, (kind, path) in tqdm(cases.items(), desc="Exporting landmarks", unit="case", disable=not show_progress):
        out = Path(output_folder) / f"{case}.{output_format}"
        if not overwrite and out.is_file():
            continue
        try:
            if kind == "probabilities":
                ls, peak = landmarks_from_probabilities(path, path.with_suffix(".pkl"), names)
            else:
                ls, peak = landmarks_from_heatmap_nifti(path, names)
            if uncertainty_model is not None:
                ls.uncertainty_mm = uncertainty_model(peak)
            ls, report = postprocess(ls, peak, options, pairs, thresholds)
            for what in ("swapped", "absent"):
                if report[what]:
                    tqdm.write(f"{case}: {what} {report[what]}")
            write_landmarks(ls, out, output_format)
            done.append(case)
        except Exception as e:  # noqa: BLE001 - one bad case must not stop the others
            failed.append(case)
            tqdm.write(f"FAILED {case}: {type(e).__name__}: {e}")
    if failed:
        print(f"{len(failed)} case(s) failed: {', '.join(failed)}")
    return done, failed
