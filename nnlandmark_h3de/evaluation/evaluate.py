"""`evaluate_folders`: the one entry point the CLI, the trainers' final validation and the demo share.

Which cases are evaluated: `cases` when given; else every reference case when the reference is a
folder of files (a missing prediction is then an error); else (a dataset's landmarks.json, which
holds every case of the dataset) the cases found in the prediction folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

from nnlandmark_h3de.evaluation.landmark_files import (LANDMARK_EXTENSIONS, find_landmark_files, load_reference,
                                                       read_landmark_files, reference_kind)
from nnlandmark_h3de.evaluation.pixel_errors import add_pixel_errors, dataset_image_folders, find_case_images
from nnlandmark_h3de.evaluation.radial_errors import check_sdr_radii
from nnlandmark_h3de.evaluation.report import write_case_csv, write_summary_json
from nnlandmark_h3de.evaluation.summary import DEFAULT_SDR_RADII, evaluate_landmarks
from nnlandmark_h3de.landmarks.landmark_set import LandmarkError


def _expected_cases(cases, ref_kind: str, reference: Dict, predicted: Dict) -> List[str]:
    if cases is not None:
        return sorted(str(c) for c in cases)
    return sorted(reference) if ref_kind == "folder" else sorted(predicted)


def evaluate_folders(reference, prediction_folder, output_file=None,
                     sdr_radii: Sequence[float] = DEFAULT_SDR_RADII, chill: bool = False, plots: bool = False,
                     plot_case: Optional[str] = None, plot_image=None, plots_folder=None,
                     cases: Optional[Sequence[str]] = None, images=None) -> dict:
    """Evaluate the landmark files of `prediction_folder` against `reference`.

    Writes `output_file` (summary.json), a per-case CSV beside it (same name, `.csv`) and with
    `plots` PNGs into `plots_folder` (default: `plots/` beside the summary). Missing or extra cases,
    unreadable files and unknown landmark names raise `LandmarkError` naming the file; with `chill`
    they are skipped and listed under `skipped` in the summary.
    Errors are also given in pixels (voxels) where each case's image is found: in `images` (a folder
    of `<case>_0000.*` files), else beside a dataset's landmarks.json (pixel_errors.py).
    """
    check_sdr_radii(sdr_radii)  # fail before reading anything
    output_file = None if output_file is None else Path(output_file)
    csv_file = None if output_file is None else output_file.with_suffix(".csv")
    if plots and plots_folder is None:
        if output_file is None:
            raise ValueError("plots need an output_file (or a plots_folder) to be written to")
        plots_folder = output_file.parent / "plots"
    if (plot_case is not None or plot_image is not None) and not plots:
        raise ValueError("plot_case / plot_image are only used with plots=True")
    if images is not None and not Path(images).is_dir():
        raise FileNotFoundError(f"{images}: images folder (for errors in pixels) not found")
    if plot_image is not None and not Path(plot_image).is_file():
        raise FileNotFoundError(f"{plot_image}: image for the slice plots not found")

    skipped: List[dict] = []
    ref_kind = reference_kind(reference)
    ref_sets = load_reference(reference, chill=chill, skipped=skipped)
    pred_files = find_landmark_files(prediction_folder, exclude=(output_file, csv_file))
    expected = _expected_cases(cases, ref_kind, ref_sets, pred_files)

    def problem(case: str, file, message: str) -> None:
        if not chill:
            raise LandmarkError(message)
        if not any(s.get("case") == case for s in skipped):  # e.g. its reference file was skipped
            skipped.append({"case": case, "file": None if file is None else str(file), "reason": message})

    for case in expected:
        if case not in pred_files:
            problem(case, None, f"{prediction_folder}: no prediction for case {case!r} (expected a file "
                                f"{case}{{{','.join(LANDMARK_EXTENSIONS)}}})")
    candidates = expected if cases is not None else sorted(set(expected) | set(pred_files))
    for case in candidates:
        if case in pred_files and case not in ref_sets:
            problem(case, pred_files[case], f"{pred_files[case]}: case {case!r} has no reference landmarks in {reference}")

    to_read = {c: pred_files[c] for c in expected if c in pred_files and c in ref_sets}
    pred_sets = read_landmark_files(to_read, chill=chill, skipped=skipped)
    if not pred_sets:
        raise LandmarkError(f"{prediction_folder}: no case with both a readable prediction and a reference "
                            f"in {reference}" + (f" (skipped: {skipped})" if skipped else ""))
    summary = evaluate_landmarks({c: ref_sets[c] for c in pred_sets}, pred_sets, sdr_radii, chill=chill)
    summary["skipped"] = skipped + summary["skipped"]
    folders = [images] if images is not None else (dataset_image_folders(reference) if ref_kind == "dataset_json"
                                                   else [])
    add_pixel_errors(summary, ref_sets, find_case_images(folders, pred_sets))
    summary["reference"] = str(reference)
    summary["prediction_folder"] = str(prediction_folder)

    if plots:
        from nnlandmark_h3de.evaluation.plots import write_plots  # matplotlib only when asked
        summary["plots"] = [str(p) for p in write_plots(summary, plots_folder, plot_case, plot_image)]
    if output_file is not None:
        summary["per_case_csv"] = str(csv_file)
        write_case_csv(summary, csv_file)
        write_summary_json(summary, output_file)
    return summary
