"""nnLandmark_evaluate: compare predicted landmark files with a reference (thin argparse wrapper)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nnlandmark_h3de.evaluation.summary import DEFAULT_SDR_RADII


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnLandmark_evaluate",
        description="Radial error (mm), SDR and existence metrics of predicted landmark files "
                    "(.mrk.json, .fcsv, .csv, .json) against a reference, matched by case (file name "
                    "minus extension) and landmark name. Writes summary.json, a per-case CSV beside it "
                    "and optionally PNG plots.")
    p.add_argument("-ref", required=True, help="folder of reference landmark files, or a converted dataset's "
                                               "landmarks.json (or the raw dataset folder holding it)")
    p.add_argument("-pred", required=True, help="folder of predicted landmark files")
    p.add_argument("-o", default=None, help="summary JSON to write (default: <pred>/summary.json); the CSV "
                                            "goes beside it with the .csv suffix")
    p.add_argument("--sdr", nargs="+", type=float, default=list(DEFAULT_SDR_RADII), metavar="MM",
                   help="SDR radii in mm; a landmark counts as success when error <= r (default: 2 2.5 3 4)")
    p.add_argument("--plots", action="store_true", help="write PNG plots into plots/ beside the summary")
    p.add_argument("--case", default=None, help="case to draw slices for (with --plots and --image)")
    p.add_argument("--image", default=None, help="image of --case for the three-slice plots")
    p.add_argument("--images", default=None, help="folder of the cases' images (<case>_0000.*) for errors in pixels "
                                                  "(default: imagesTs/ and imagesTr/ beside a dataset's landmarks.json)")
    p.add_argument("--test_set", default=None, metavar="NAME",
                   help="evaluate only the cases of this group of the dataset's landmarks.json `test_sets` (e.g. "
                        "ISBI 2015's test1 / test2); every case of the group needs a prediction")
    p.add_argument("--chill", action="store_true", help="skip missing/unreadable cases and unknown landmark "
                                                        "names instead of failing; they are listed in the summary")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from nnlandmark_h3de.evaluation.evaluate import evaluate_folders
    from nnlandmark_h3de.evaluation.report import format_table
    from nnlandmark_h3de.landmarks.landmark_set import LandmarkError

    output = Path(args.o) if args.o else Path(args.pred) / "summary.json"
    if (args.case or args.image) and not args.plots:
        print("nnLandmark_evaluate: --case/--image draw slice plots and need --plots", file=sys.stderr)
        return 2
    try:
        cases = None if args.test_set is None else _test_set_cases(args.ref, args.test_set)
        summary = evaluate_folders(args.ref, args.pred, output, sdr_radii=args.sdr, chill=args.chill,
                                   plots=args.plots, plot_case=args.case, plot_image=args.image,
                                   images=args.images, cases=cases)
    except (LandmarkError, ValueError, FileNotFoundError) as e:
        print(f"nnLandmark_evaluate: error: {e}", file=sys.stderr)
        return 1
    print(format_table(summary))
    for item in summary["skipped"]:
        print(f"skipped: {item}", file=sys.stderr)
    print(f"wrote {output} and {summary['per_case_csv']}" + (f" and {len(summary['plots'])} plots" if args.plots else ""))
    return 0


def _test_set_cases(reference, name: str) -> list:
    """The case ids of test set `name` in the reference dataset's landmarks.json."""
    from nnlandmark_h3de.landmarks.dataset_file import load_dataset_test_sets
    from nnlandmark_h3de.evaluation.landmark_files import reference_kind
    if reference_kind(reference) != "dataset_json":
        raise ValueError(f"--test_set needs a dataset's landmarks.json as -ref, got the folder {reference}")
    sets = load_dataset_test_sets(reference)
    if name not in sets:
        raise ValueError(f"{reference}: no test set {name!r} (test_sets: {sorted(sets) or 'none'})")
    return sets[name]


if __name__ == "__main__":
    sys.exit(main())
