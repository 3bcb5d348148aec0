"""`nnLandmark_export`: landmark files from `nnUNetv2_predict --save_probabilities` outputs or saved heatmaps."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nnlandmark_h3de.cli.predict import add_postprocessing_args, postprocessing_options


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Turn <case>.npz + <case>.pkl written by nnUNetv2_predict "
                                            "--save_probabilities with a landmark trainer (or <case>_heatmaps.nii.gz "
                                            "from nnLandmark_predict --save_heatmaps) into landmark files.")
    p.add_argument("-i", required=True, help="folder with the predictions")
    p.add_argument("-o", required=True, help="output folder for the landmark files")
    p.add_argument("-m", help="trained model folder: landmark names, pairs, calibrated thresholds and uncertainty")
    p.add_argument("-d", help="dataset name or id (with -tr/-p/-c), instead of -m")
    p.add_argument("-p", default="nnUNetPlans")
    p.add_argument("-tr", default="nnLandmarkTrainer")
    p.add_argument("-c", default="3d_fullres")
    p.add_argument("-f", nargs="+", default=None, help="folds whose thresholds to average (default: all found)")
    p.add_argument("--continue_prediction", action="store_true", help="skip cases whose landmark file exists")
    p.add_argument("--disable_progress_bar", action="store_true")
    add_postprocessing_args(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from nnlandmark_h3de.inference.export import export_folder
    from nnlandmark_h3de.landmarks import landmark_names
    from nnlandmark_h3de.inference.postprocessing import read_fold_thresholds, resolve_pairs
    from nnlandmark_h3de.inference.uncertainty import read_fold_uncertainty

    model_folder = args.m
    if model_folder is None and args.d is not None:
        from nnunetv2.utilities.file_path_utilities import get_output_folder
        model_folder = get_output_folder(args.d, args.tr, args.p, args.c)
    # nnUNetv2_predict copies dataset.json into its output folder: enough for names and pairs
    dj_path = Path(model_folder or args.i) / "dataset.json"
    if not dj_path.is_file():
        raise SystemExit(f"nnLandmark_export: {dj_path} not found; give the model with -m or -d")
    dataset_json = json.loads(dj_path.read_text())
    names = landmark_names(dataset_json)
    thresholds, uncertainty_model = None, None
    if model_folder is not None:
        folds = args.f or sorted(p.name[len("fold_"):] for p in Path(model_folder).glob("fold_*")
                                 if (p / "landmark_thresholds.json").is_file()
                                 or (p / "landmark_uncertainty.json").is_file())
        thresholds, kind = read_fold_thresholds(model_folder, folds, names)
        uncertainty_model = read_fold_uncertainty(model_folder, folds, names)
        if len(folds) > 1 and (thresholds is not None or uncertainty_model is not None):
            print(f"WARNING: the {len(folds)} folds' calibrations are averaged and applied to the already averaged "
                  "prediction (flatter peaks than any fold's, on which they were fitted: more landmarks may be "
                  "called absent); nnLandmark_predict applies each fold's calibration to its own prediction")
        if kind not in (None, "peak") and args.threshold is None:
            print(f"WARNING: thresholds were calibrated on '{kind}' scores, not peak heights; absent detection is off")
            thresholds = None
    _, failed = export_folder(args.i, args.o, names, resolve_pairs(dataset_json, names), thresholds,
                              postprocessing_options(args), args.format, overwrite=not args.continue_prediction,
                              show_progress=not args.disable_progress_bar, uncertainty_model=uncertainty_model)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
