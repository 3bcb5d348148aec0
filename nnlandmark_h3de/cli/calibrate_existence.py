"""`nnLandmark_calibrate_existence`: after training several folds, fit the absent-landmark thresholds on
the out-of-fold validation predictions of all of them (one fold's few validation cases rarely hold
enough absent landmarks), and say how well that carries over (leave one fold out)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Refit every listed fold's landmark_thresholds.json on the pooled "
                                            "out-of-fold validation predictions of all listed folds.")
    p.add_argument("-d", required=True, help="dataset name or id")
    p.add_argument("-c", default="3d_fullres", help="configuration (default 3d_fullres)")
    p.add_argument("-tr", default="nnLandmarkTrainer", help="trainer")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    p.add_argument("-f", nargs="+", default=["0", "1", "2", "3", "4"], help="trained folds (default 0 1 2 3 4)")
    return p


def refit_folds(model_folder: Path, folds) -> dict:
    """Read each fold's existence scores, fit, write each fold's thresholds; returns the calibration info."""
    from nnlandmark_h3de.training.existence_calibration import (EXISTENCE_SCORES_FILE, calibrate_out_of_fold,
                                                               read_existence_scores)
    from nnlandmark_h3de.training.landmark_validation import DEFAULT_PEAK_THRESHOLD, write_thresholds
    fold_dirs = [model_folder / f"fold_{f}" for f in folds]
    score_files = [d / "validation" / EXISTENCE_SCORES_FILE for d in fold_dirs]
    kinds = {json.loads((d / "landmark_thresholds.json").read_text())["score"] for d in fold_dirs
             if (d / "landmark_thresholds.json").is_file()}
    missing = [str(f) for f in score_files if not f.is_file()]
    if missing:
        raise ValueError(f"no existence scores (run the final validation, nnUNetv2_train ... --val): {missing}")
    if len(kinds) != 1:
        raise ValueError(f"the folds' thresholds are on different scores {sorted(kinds)}; retrain them alike")
    score = kinds.pop()
    tables = [read_existence_scores(f, score) for f in score_files]
    if any(t[0] != tables[0][0] for t in tables):
        raise ValueError("the folds' landmark names differ")
    thresholds, info = calibrate_out_of_fold([t[1] for t in tables], [t[2] for t in tables],
                                             0.5 if score == "anchor" else DEFAULT_PEAK_THRESHOLD)
    for d, t in zip(fold_dirs, thresholds):
        write_thresholds(d / "landmark_thresholds.json", tables[0][0], t, {**info, "folds": list(folds)}, score=score)
    return info


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.file_path_utilities import get_output_folder
    try:
        model = Path(get_output_folder(maybe_convert_to_dataset_name(args.d), args.tr, args.p, args.c))
        info = refit_folds(model, args.f)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise SystemExit(f"nnLandmark_calibrate_existence: {e}")
    print(f"existence thresholds refitted on {info['n_cases']} out-of-fold validation cases of {info['n_folds']} "
          f"folds ({info['method']}, relative threshold {info.get('relative_threshold')}, fitted F1 {info.get('f1')})")
    check = info.get("leave_one_fold_out")
    print("leave one fold out: " + ("not measurable (a fold's complement has no absent or no present landmark)"
                                    if check is None else
                                    f"F1 {check['f1']:.3f}, precision {check['precision']:.3f}, recall "
                                    f"{check['recall']:.3f} (TP {check['tp']}, FP {check['fp']}, FN {check['fn']}, "
                                    f"TN {check['tn']})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
