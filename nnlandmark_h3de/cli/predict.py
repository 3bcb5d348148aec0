"""`nnLandmark_predict`: nnUNetv2_predict's flags, landmark files out (see nnLandmarkPredictor)."""
from __future__ import annotations

import argparse
import sys

from nnlandmark_h3de.inference.postprocessing import PostprocessingOptions
from nnlandmark_h3de.landmarks.io import OUTPUT_FORMATS


def add_postprocessing_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared with nnLandmark_export."""
    parser.add_argument("--format", default="mrk.json", choices=OUTPUT_FORMATS,
                        help="landmark file format (default: Slicer .mrk.json, LPS mm)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="peak-height threshold below which a landmark is written as absent; overrides "
                             "fold_X/landmark_thresholds.json")
    parser.add_argument("--no_absent", action="store_true", help="never mark landmarks absent")
    parser.add_argument("--no_lr_check", action="store_true", help="skip the left/right pair check")


def postprocessing_options(args) -> PostprocessingOptions:
    return PostprocessingOptions(lr_check=not args.no_lr_check, absent=not args.no_absent, threshold=args.threshold)


def build_parser() -> argparse.ArgumentParser:
    from nnunetv2.inference.predict_from_raw_data import _getDefaultValue
    p = argparse.ArgumentParser(description="Predict landmarks (world LPS mm) with a trained nnU-Net landmark model. "
                                            "Same flags as nnUNetv2_predict; writes <case>.mrk.json per case.")
    p.add_argument("-i", required=True, help="input folder (case_0000.nii.gz, ...), as for nnUNetv2_predict")
    p.add_argument("-o", required=True, help="output folder for the landmark files")
    p.add_argument("-d", help="dataset name or id (with -tr/-p/-c), unless -m is given")
    p.add_argument("-m", help="trained model folder (instead of -d/-tr/-p/-c)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("-tr", default="nnLandmarkTrainer", help="trainer class (default nnLandmarkTrainer)")
    p.add_argument("-c", default="3d_fullres", help="configuration (default 3d_fullres)")
    p.add_argument("-f", nargs="+", default=(0, 1, 2, 3, 4), help="folds to ensemble (default 0 1 2 3 4)")
    p.add_argument("-step_size", type=float, default=0.5, help="sliding-window step size (default 0.5)")
    p.add_argument("--disable_tta", action="store_true", help="disable mirroring test-time augmentation")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--continue_prediction", action="store_true", help="skip cases whose landmark file exists")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name (default checkpoint_final.pth)")
    p.add_argument("-npp", type=int, default=_getDefaultValue("nnUNet_npp", int, 3),
                   help="preprocessing processes (0 = in this process)")
    p.add_argument("-nps", type=int, default=None,
                   help="accepted for nnUNetv2_predict compatibility and ignored (with a warning unless 0): "
                        "landmark export maps L points, it runs in the main process")
    p.add_argument("-num_parts", type=int, default=1)
    p.add_argument("-part_id", type=int, default=0)
    p.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"])
    p.add_argument("--disable_progress_bar", action="store_true")
    p.add_argument("--not_on_device", action="store_true")
    p.add_argument("--save_heatmaps", action="store_true",
                   help="also write the heatmaps resampled to the original image (<case>_heatmaps.nii.gz; slow)")
    p.add_argument("--uncertainty", choices=["calibrated", "spread"], default="calibrated",
                   help="per-landmark uncertainty (mm): 'calibrated' = the landmark's validation RMS error scaled by "
                        "its peak height and the members' spread (fold_X/landmark_uncertainty.json; falls back to 'spread' without it), "
                        "'spread' = scatter of the folds' and mirrors' peaks (heatmap width with one member)")
    p.add_argument("--global", dest="global_stage", default="auto", choices=["auto", "atlas", "deformable", "learned", "none"],
                   help="two-stage prediction: a global stage finds every landmark in the whole image, the network "
                        "refines it on the tiles around it. 'auto' (default) = the stage nnLandmark_calibrate_global "
                        "kept for the folds (fold_X/global_stage.json; every fold must have chosen the same kind, "
                        "the first fold's stage gives the estimate, each fold's own local peak floor judges its "
                        "peaks), or the whole-image sliding window when no fold has one; 'atlas' (affine "
                        "registration), 'deformable' (affine + demons) or 'learned' force a calibrated kind; "
                        "'none' = always the whole-image sliding window")
    p.add_argument("--save_global_estimates", action="store_true",
                   help="two-stage prediction: also write the global stage's own estimates to OUT/global_stage/ "
                        "(to see, or evaluate, what each stage contributes)")
    p.add_argument("--preprocess_whole_image", action="store_true",
                   help="two-stage prediction: resample the whole image to the model's spacing, as nnU-Net does, "
                        "instead of only the regions of the tiles around the global estimates (slower on large "
                        "images; the same result up to a sub-voxel shift of each region's grid)")
    add_postprocessing_args(p)
    return p


def attach_global_stage(predictor, model_folder: str, folds, kind: str, device) -> None:
    """The calibrated global stage, if asked for and present (see --global): the first fold's stage places
    the tiles of every fold, each fold's own local peak floor judges its own peaks
    (global_stage.ensemble_local_peak_floors); a fold without the calibration stops the run."""
    from pathlib import Path
    from nnlandmark_h3de.inference.global_stage import GLOBAL_STAGE_FILE, ensemble_local_peak_floors, load_global_stage
    if kind == "none":
        return
    fold_folder = Path(model_folder) / f"fold_{folds[0]}"
    if kind == "auto" and not any((Path(model_folder) / f"fold_{f}" / GLOBAL_STAGE_FILE).is_file() for f in folds):
        print(f"no global stage calibrated for {', '.join(f'fold_{f}' for f in folds)} (nnLandmark_calibrate_global): "
              f"predicting with the whole-image sliding window")
        return
    try:
        used, floors = ensemble_local_peak_floors(model_folder, folds, kind)
        stage, choice, used = load_global_stage(fold_folder, used, device)
        radius = choice.radius_mm(used)
        predictor.use_global_stage(stage, radius, choice.fallback_uncertainty_mm(used), floors,
                                   choice.local_weight(used))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"nnLandmark_predict: --global {kind}: {e}")
    print(f"two-stage prediction: {used} global stage (validation MRE {choice.validation[used]['mre_mm']:.2f} mm), "
          f"local search radius {radius:.1f} mm, local weight {describe_weight(choice.local_weight(used))}" +
          ("" if floors is None else f", each of {len(floors)} fold(s) with its own local peak floor"))


def describe_weight(weight) -> str:
    """One number, or the range of the per-landmark weights."""
    import numpy as np
    w = np.asarray(weight, dtype=float)
    return f"{float(w):.2f}" if w.ndim == 0 else f"{w.min():.2f}-{w.max():.2f} per landmark (mean {w.mean():.2f})"


def warn_ignored_flags(args) -> None:
    """Flags kept for nnUNetv2_predict compatibility that do nothing here say so."""
    if args.nps not in (None, 0):
        print(f"WARNING: -nps {args.nps} is ignored: nnLandmark_predict exports landmarks in the main process "
              "(no segmentation export workers)", file=sys.stderr)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    warn_ignored_flags(args)
    import torch
    from nnunetv2.utilities.file_path_utilities import get_output_folder
    from nnlandmark_h3de.inference.landmark_predictor import nnLandmarkPredictor

    if args.m is None and args.d is None:
        raise SystemExit("nnLandmark_predict: give either -m MODEL_FOLDER or -d DATASET (with -tr/-p/-c)")
    if not 0 <= args.part_id < args.num_parts:
        raise SystemExit(f"nnLandmark_predict: -part_id must be in [0, {args.num_parts - 1}]")
    model_folder = args.m or get_output_folder(args.d, args.tr, args.p, args.c)
    folds = [f if f == "all" else int(f) for f in args.f]
    if args.device == "cpu":
        from nnlandmark_h3de.utilities.cpu_threads import limit_torch_threads
        limit_torch_threads()
    elif args.device == "cuda":
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
    predictor = nnLandmarkPredictor(tile_step_size=args.step_size, use_gaussian=True, use_mirroring=not args.disable_tta,
                                    perform_everything_on_device=not args.not_on_device,
                                    device=torch.device(args.device), verbose=args.verbose,
                                    verbose_preprocessing=args.verbose, allow_tqdm=not args.disable_progress_bar,
                                    output_format=args.format, postprocessing=postprocessing_options(args),
                                    save_heatmaps=args.save_heatmaps, uncertainty=args.uncertainty,
                                    save_global_estimates=args.save_global_estimates,
                                    regional_preprocessing=not args.preprocess_whole_image)
    predictor.initialize_from_trained_model_folder(model_folder, folds, checkpoint_name=args.chk)
    kind = args.global_stage
    if args.save_heatmaps and kind == "auto":
        print("--save_heatmaps: whole-image sliding window (two-stage prediction predicts tiles only)")
        kind = "none"
    attach_global_stage(predictor, model_folder, folds, kind, torch.device(args.device))
    from nnlandmark_h3de.inference.device_errors import PredictionStopped
    from nnlandmark_h3de.inference.estimate_input import check_whole_image_allowed
    try:
        if predictor.global_stage is None:  # before any case: it would fail on every one
            check_whole_image_allowed(predictor.network)
    except ValueError as e:
        raise SystemExit(f"nnLandmark_predict: {model_folder}: {e}")
    from nnlandmark_h3de.inference.oriented_inputs import InputHeaderError, inputs_in_orientation
    from nnlandmark_h3de.utilities.orientation import dataset_orientation
    try:
        with inputs_in_orientation(args.i, predictor.dataset_json["file_ending"],
                                   dataset_orientation(predictor.dataset_json)) as input_folder:
            predictor.predict_from_files(input_folder, args.o, save_probabilities=False,
                                         overwrite=not args.continue_prediction, num_processes_preprocessing=args.npp,
                                         num_processes_segmentation_export=0, num_parts=args.num_parts,
                                         part_id=args.part_id)
    except InputHeaderError as e:  # raised before any case is predicted
        raise SystemExit(f"nnLandmark_predict: {e}")
    except PredictionStopped as e:  # out of memory or a device error: every later case would fail too
        raise SystemExit(f"nnLandmark_predict: {e}")
    return 1 if predictor.failed else 0


if __name__ == "__main__":
    sys.exit(main())
