"""`nnLandmark_demo`: the whole pipeline on phantoms generated on the spot (thin argparse wrapper)."""
import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnLandmark_demo",
        description="Generate head phantoms with exact landmarks, then run nnU-Net planning/preprocessing, "
                    "CPU training for a time budget, nnLandmark_predict and nnLandmark_evaluate, and write "
                    "OUTPUT_DIR/report.md. All nnU-Net folders live inside OUTPUT_DIR; nothing is downloaded.")
    p.add_argument("-o", "--output_dir", default="nnLandmark_demo", help="output folder (default ./nnLandmark_demo)")
    p.add_argument("--quick", action="store_true", help="tiny run (10 phantoms of 32^3 voxels, a few minutes) for smoke tests")
    p.add_argument("--minutes", type=float, default=None,
                   help="wall-time budget of the whole demo in minutes (default 10, 6 with --2d, 2.5 with --quick); "
                        "training gets what the other stages leave")
    p.add_argument("--2d", dest="two_d", action="store_true",
                   help="2D X-ray-like phantoms (cephalogram-like, 96 x 80 pixels at 1 mm) on nnU-Net's 2d configuration "
                        "(default budget 6 minutes); errors in mm and pixels")
    p.add_argument("--trainer", default="nnLandmarkTrainer", help="trainer class (default nnLandmarkTrainer)")
    p.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    p.add_argument("--deform_mm", type=float, default=None,
                   help="3D: deform each phantom by a smooth random nonlinear field of this RMS displacement (mm), "
                        "so subjects differ beyond pose, and calibrate the deformable global stage beside the "
                        "affine one (default 4; 0 = rigidly re-posed phantoms, the affine atlas only)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous demo run in OUTPUT_DIR")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from nnlandmark_h3de.demo.pipeline import DemoError, DemoSettings, run_demo
    try:
        settings = DemoSettings.make(args.output_dir, quick=args.quick, minutes=args.minutes, trainer=args.trainer,
                                     seed=args.seed, overwrite=args.overwrite, two_d=args.two_d,
                                     **({} if args.deform_mm is None else {"deform_mm": args.deform_mm}))
        result = run_demo(settings)
    except (DemoError, ValueError) as e:
        print(f"nnLandmark_demo: error: {e}", file=sys.stderr)
        return 1
    micro = result.summary["foreground_mean"]["micro"]
    mre = micro["mean_radial_error_mm"]
    print(f"test MRE {'n/a' if mre is None else f'{mre:.2f} mm'} over {micro['TP']} detected points; "
          f"report: {result.report_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
