"""`nnLandmark_calibrate_global`: measure the global stages on a fold's validation cases, keep the
better one for two-stage prediction (fold_X/global_stage.json) and re-run the final validation in two
stages (see nnlandmark_h3de.training.global_calibration)."""
from __future__ import annotations

import argparse
import sys

from nnlandmark_h3de.inference.global_stage import KINDS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Calibrate the global stage of two-stage prediction for a trained "
                                            "(local) model fold; then nnLandmark_predict --global auto uses it.")
    p.add_argument("-d", required=True, help="dataset name or id")
    p.add_argument("-c", default="3d_fullres", help="configuration of the local model (default 3d_fullres)")
    p.add_argument("-f", type=int, default=0, help="fold (default 0)")
    p.add_argument("-tr", default="nnLandmarkTrainer", help="trainer of the local model")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    p.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS),
                   help="global stages to measure (default all; learned needs --learned_model): atlas = affine "
                        "registration of a few training images, deformable = the same followed by demons (about "
                        "1 s more per atlas and case at the 4 mm grid), learned = a coarse whole-image model; the "
                        "lowest validation MRE is kept")
    p.add_argument("--learned_model", default=None,
                   help="model folder of a trained coarse whole-image configuration (e.g. nnUNet_results/"
                        "DatasetX/nnLandmarkTrainer__nnUNetPlans__3d_lowres)")
    p.add_argument("--learned_folds", nargs="+", type=int, default=[0])
    p.add_argument("--n_atlases", type=int, default=4, help="training cases registered per case (default 4)")
    p.add_argument("--registration_spacing", type=float, default=4.0, help="registration grid in mm (default 4)")
    p.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"])
    p.add_argument("--no_revalidate", action="store_true",
                   help="only write global_stage.json (the fold's thresholds stay those of the whole-image validation)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from nnlandmark_h3de.training.global_calibration import calibrate_fold
    if args.kinds == ["learned"] and args.learned_model is None:
        raise SystemExit("nnLandmark_calibrate_global: --kinds learned needs --learned_model")
    if args.device == "cpu":
        from nnlandmark_h3de.utilities.cpu_threads import limit_torch_threads
        limit_torch_threads()
    try:
        calibrate_fold(args.d, args.c, args.f, args.tr, args.p, args.kinds, args.learned_model, args.learned_folds,
                       args.n_atlases, args.registration_spacing, args.device, not args.no_revalidate)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"nnLandmark_calibrate_global: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
