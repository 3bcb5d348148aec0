"""Absent landmarks: which existence signal, calibrated on which cases, holds on held-out cases.

Signals: peak height of the heatmap-only trainer (the image fits one patch, so this is also what a
learned whole-image global stage would say: a missing landmark has no peak anywhere), H3DE-Net's anchor
existence, and "all present". Calibrations of the peak threshold: the fold's validation cases alone,
and validation + the training cases predicted in-sample (what the final validation does now).

Generated phantoms where every structure is left out with probability `--absent-fraction` (its
landmarks absent from image and file) -> nnU-Net raw dataset -> plan/preprocess -> small
configuration -> the same number of epochs for each trainer (in this process; `--minutes` caps
each) -> each trainer's own final validation calibrates the thresholds of every score it has (best
F1 on the validation cases) and keeps the better score -> held-out test cases: existence
precision/recall/F1 of each score with its calibrated thresholds, and MRE (mm, world) over the
landmarks present in reference and prediction. Also printed, on the same test cases:
- the oracle F1 (thresholds chosen on the test cases themselves: separability without calibration
  noise), for one global threshold and for thresholds relative to each landmark's median present
  score (what the final validation calibrates),
- the anchor trainer's own peak heights (does joint training change the heatmap score?),
- existence aggregates (max vs top-k mean over anchors) and locations (heatmap peak vs anchor
  medoid / weighted mean), from one forward pass of the whole image (it fits in one patch).
Each signal's row names the landmarks it miscalls (`wrong_calls`: absent called present, present called absent).
The results file (OUT/bench_absent_landmarks.json) keeps every test case's raw scores (`test_scores`), and
each trainer's fold folder its validation and in-sample training scores (existence_scores.json).

    python benchmarks/bench_absent_landmarks.py --out /tmp/bench_absent --json   # ~25 min on 2 cores
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import nnunet_folders

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="work folder (default: a temporary folder)")
    p.add_argument("--epochs", type=int, default=150,
                   help="training epochs per trainer (same for all; after 60 x 10 steps the network still "
                        "places absent landmarks from context)")
    p.add_argument("--minutes", type=float, default=30.0, help="wall-clock cap per trainer")
    p.add_argument("--n-train", type=int, default=24, help="training + validation cases")
    p.add_argument("--n-val", type=int, default=6, help="validation cases (threshold calibration)")
    p.add_argument("--n-test", type=int, default=12)
    p.add_argument("--shape", type=int, default=40, help="phantom edge (voxels)")
    p.add_argument("--spacing", type=float, default=3.0)
    p.add_argument("--absent-fraction", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--h3de", action="store_true", help="nnH3DETrainer / nnH3DETrainerAnchor instead of the U-Net")
    p.add_argument("--iterations", type=int, default=10, help="training iterations per epoch")
    p.add_argument("--grad-scales", nargs="*", type=float, default=[0.01],
                   help="anchor trainers to run: gradient of the anchor loss into the shared network (1 = joint; "
                        "0.01 = the trainer's default); none = the heatmap-only trainer alone")
    p.add_argument("--json", action="store_true", help="print one JSON object (per signal) on the last line")
    return p.parse_args(argv)


def setup_environment(out: Path) -> None:
    nnunet_folders(out)
    os.environ["nnUNet_n_proc_DA"] = "0"
    os.environ["nnUNet_compile"] = "false"
    os.environ["nnUNet_extTrainer"] = str(REPO / "trainers")


def make_dataset(args, out: Path, dataset_id: int = 901):
    from nnlandmark_h3de.conversion import convert_dataset
    from nnlandmark_h3de.demo.phantoms import generate_phantom_cases
    from nnlandmark_h3de.planning.small_configuration import add_small_configuration

    n = args.n_train + args.n_test
    name = f"Dataset{dataset_id:03d}_AbsentPhantoms"
    raw, pre = out / "nnUNet_raw" / name, out / "nnUNet_preprocessed" / name
    if (pre / "nnUNetPlans.json").is_file() and "3d_fullres_small" in (pre / "nnUNetPlans.json").read_text():
        print(f"reusing the dataset in {out} (delete it to regenerate)")
        return raw, pre, json.loads((raw / "landmarks.json").read_text())["test_cases"]
    cases = generate_phantom_cases(out / "phantoms", n, shape=(args.shape,) * 3, spacing=(args.spacing,) * 3,
                                   seed=args.seed, absent_fraction=args.absent_fraction, progress=False)
    ids = sorted(cases)
    train, test = ids[:args.n_train], ids[args.n_train:]
    splits = [{"train": train[:-args.n_val], "val": train[-args.n_val:]}]
    name = f"Dataset{dataset_id:03d}_AbsentPhantoms"
    folder = convert_dataset(cases, out / "nnUNet_raw" / name, test_cases=test, splits=splits, progress=False)
    subprocess.run([str(Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id),
                    "-c", "3d_fullres", "-np", "1"], check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "nnUNet_n_proc_DA": "1"})  # the planner's VRAM estimate needs >= 1
    pre = out / "nnUNet_preprocessed" / name
    if not (pre / "splits_final.json").is_file():
        (pre / "splits_final.json").write_text(json.dumps(splits))
    add_small_configuration(pre / "nnUNetPlans.json", "3d_fullres_small")
    return Path(folder), pre, test


def train(base_cls, pre: Path, seconds: float, epochs: int, iterations: int, **attributes):
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnlandmark_h3de.demo.budget_trainer import TrainingBudget

    cls = type(base_cls.__name__ + "_bench", (TrainingBudget, base_cls),
               {"budget_seconds": seconds, "budget_max_epochs": epochs, "budget_iterations_per_epoch": iterations,
                "budget_val_iterations_per_epoch": 2, **attributes})
    plans = load_json(pre / "nnUNetPlans.json")
    plans["continue_training"] = False  # what nnunetv2.run.run_training passes (2.8.1 pops it)
    trainer = cls(plans, "3d_fullres_small", 0, load_json(pre / "dataset.json"), device=torch.device("cpu"))
    t0 = time.monotonic()
    trainer.run_training()
    t_train = time.monotonic() - t0
    trainer.perform_actual_validation()
    thr = json.loads((Path(trainer.output_folder) / "landmark_thresholds.json").read_text())
    summary = json.loads((Path(trainer.output_folder) / "validation" / "summary.json").read_text())
    # every calibrated score's thresholds: the one kept (thr) and the alternatives
    calibrated = {thr["score"]: thr["threshold"], **{k: v["threshold"] for k, v in
                                                     summary["existence_threshold"].get("alternatives", {}).items()}}
    return trainer, t_train, thr, calibrated


def predict_test(trainer, raw: Path, test_cases, anchors: bool):
    """Per case: world points (peak), peak heights, and for anchor networks the sliding-window anchor
    existence plus whole-image anchor decodings (locations and aggregates)."""
    import numpy as np
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnlandmark_h3de.inference.index_mapping import network_index_to_world
    from nnlandmark_h3de.inference.peaks import decode_peaks
    from nnlandmark_h3de.networks.building_blocks.anchor_head import decode_anchors

    net = trainer._unwrapped_network()
    trainer.set_deep_supervision_enabled(False)
    net.eval()
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                allow_tqdm=False)
    predictor.manual_initialization(trainer.network, trainer.plans_manager, trainer.configuration_manager, None,
                                    trainer.dataset_json, type(trainer).__name__, trainer.inference_allowed_mirroring_axes)
    pre = trainer.configuration_manager.preprocessor_class(verbose=False)
    patch = list(trainer.configuration_manager.patch_size)
    out = {}
    for case in test_cases:
        data, _, props = pre.run_case([str(raw / "imagesTs" / f"{case}_0000.nii.gz")], None, trainer.plans_manager,
                                      trainer.configuration_manager, trainer.dataset_json)
        data = torch.from_numpy(data).float()

        def world(idx):
            return network_index_to_world(np.asarray(idx), props, trainer.plans_manager, trainer.configuration_manager,
                                          network_shape=tuple(data.shape[1:]))

        rec = {}
        if anchors:
            net.record_existence = True
            net.reset_existence()
        with torch.no_grad():
            logits = predictor.predict_sliding_window_return_logits(data)
        idx, peak, _ = decode_peaks(logits[1:], logits=True)
        rec["peak_points"], rec["peak"] = world(idx), np.asarray(peak, dtype=np.float64)
        if anchors:
            net.record_existence = False
            rec["anchor_sw"] = net.anchor_existence.numpy().astype(np.float64)
            if all(s <= p for s, p in zip(data.shape[1:], patch)):  # whole image in one patch: anchor locations
                x = torch.zeros(1, data.shape[0], *patch)
                x[(0, slice(None), *[slice(0, s) for s in data.shape[1:]])] = data
                with torch.no_grad():
                    _, a = net.forward_with_anchors(x)
                for loc in ("medoid", "weighted"):
                    pos, prob = decode_anchors(a.offsets, a.logits, net.anchor_head.radii, patch, location=loc)
                    rec[f"anchor_{loc}_points"] = world(pos[0].numpy())
                    rec["anchor_max"] = prob[0].numpy().astype(np.float64)
                _, prob = decode_anchors(a.offsets, a.logits, net.anchor_head.radii, patch, existence="topk_mean")
                rec["anchor_topk_mean"] = prob[0].numpy().astype(np.float64)
        out[case] = rec
    return out


def existence_metrics(scores, present, threshold, names):
    """One signal's held-out calls against the truth: the product's counts and F1 (existence_f1) and
    the landmarks it miscalls."""
    import numpy as np
    from nnlandmark_h3de.training.existence_calibration import existence_f1
    called = np.asarray(scores) >= np.asarray(threshold)
    return {**existence_f1(called, present), "wrong_calls": wrong_calls_per_landmark(called, present, names)}


def wrong_calls_per_landmark(called, present, names) -> dict:
    """{landmark: {"fp": absent called present, "fn": present called absent}} for the landmarks with any:
    which landmarks a signal confuses (an absent one the network still places from context, a faint one)."""
    fp, fn = (called & ~present).sum(0), (~called & present).sum(0)
    return {n: {"fp": int(a), "fn": int(b)} for n, a, b in zip(names, fp, fn) if a or b}


def oracle_f1(scores, present, relative: bool):
    from nnlandmark_h3de.training.calibration import calibrate_relative_thresholds
    from nnlandmark_h3de.training.landmark_validation import calibrate_peak_threshold
    if relative:
        return calibrate_relative_thresholds(scores, present, default=0.1)[1].get("f1", float("nan"))
    return calibrate_peak_threshold(scores, present)[1].get("f1", float("nan"))


def validation_only_thresholds(trainer, score: str):
    """The thresholds the final validation would fit on the fold's validation cases alone (its
    existence_scores.json), for comparison with the kept fit on validation + in-sample training cases."""
    from nnlandmark_h3de.training.calibration import calibrate_relative_thresholds
    from nnlandmark_h3de.training.existence_calibration import read_existence_scores
    _, s, present = read_existence_scores(Path(trainer.output_folder) / "validation" / "existence_scores.json", score)
    return calibrate_relative_thresholds(s, present, default=0.5 if score == "anchor" else 0.1)


IN_SAMPLE_COUNTS = (0, 3, 6, 12, 18, 50)


def in_sample_variants(trainer, ref: dict, test_scores, test_present, names) -> dict:
    """How the in-sample pass of the final validation may be made cheaper: the peak thresholds fitted on
    the validation cases plus n training cases predicted in-sample, with and without test-time mirrors,
    scored on the held-out cases -> {"mirrors_n": F1 and counts, seconds per in-sample case}. Same
    trained network, same validation scores (fold_X/validation/existence_scores.json) for every variant."""
    import numpy as np
    from nnlandmark_h3de.training.calibration import calibrate_relative_thresholds
    from nnlandmark_h3de.training.existence_calibration import read_existence_scores
    from nnlandmark_h3de.training.final_validation import in_sample_keys, predict_validation_landmarks
    train_keys = sorted(trainer.do_split()[0])
    trainer.set_deep_supervision_enabled(False)
    trainer.network.eval()
    seconds = {}
    pred = predict_validation_landmarks(trainer, sets={"mirrors": train_keys, "no_mirrors": train_keys},
                                        unmirrored=("no_mirrors",), seconds=seconds)
    _, val_scores, val_present = read_existence_scores(
        Path(trainer.output_folder) / "validation" / "existence_scores.json", "peak")
    out = {}
    for mode in ("mirrors", "no_mirrors"):
        for n in IN_SAMPLE_COUNTS:
            keys = in_sample_keys(train_keys, n)
            scores = np.concatenate([val_scores] + [pred[mode][k][1]["peak"][None] for k in keys])
            present = np.concatenate([val_present] + [ref[k].present[None] for k in keys])
            groups = np.array([0] * len(val_scores) + [1] * len(keys))
            t, _ = calibrate_relative_thresholds(scores, present, 0.1, groups)
            m = existence_metrics(test_scores, test_present, t, names)
            out[f"{mode}_{len(keys)}"] = {k: m[k] for k in ("f1", "precision", "recall", "tp", "fp", "fn", "tn")}
        out[f"{mode}_seconds_per_case"] = seconds[mode] / max(1, len(train_keys))
    return out


def mre(points, ref, mask):
    import numpy as np
    d = np.linalg.norm(points - ref, axis=-1)[mask]
    return float(d.mean()) if d.size else float("nan"), int(d.size)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_absent_"))
    setup_environment(out)
    import numpy as np
    import torch
    torch.set_num_threads(args.threads)
    from nnlandmark_h3de.landmarks.dataset_file import load_dataset_landmarks
    if args.h3de:
        from nnlandmark_h3de.training.nnH3DETrainer import nnH3DETrainer as Plain
        from nnlandmark_h3de.training.nnH3DETrainerAnchor import nnH3DETrainerAnchor as Anchor
    else:
        from nnlandmark_h3de.training.nnLandmarkTrainer import nnLandmarkTrainer as Plain
        from nnlandmark_h3de.training.nnH3DETrainerAnchor import nnLandmarkTrainerAnchor as Anchor

    t0 = time.monotonic()
    raw, pre, test = make_dataset(args, out)
    print(f"dataset ready in {time.monotonic() - t0:.0f} s: {raw}")
    names = json.loads((raw / "dataset.json").read_text())["landmarks"]["names"]
    ref = {k: v.reordered(names) for k, v in load_dataset_landmarks(raw / "landmarks.json").items()}
    present = np.array([ref[c].present for c in test])
    ref_pts = np.array([ref[c].points_lps for c in test])
    print(f"{len(test)} test cases x {len(names)} landmarks, {int((~present).sum())} absent "
          f"({100 * (~present).mean():.1f} %)")

    results, rows = {"args": vars(args), "absent_fraction_test": float((~present).mean())}, []
    runs = [("heatmap-only", Plain, False, {})] + [
        (f"anchor g{g:g}", Anchor, True, {"anchor_feature_grad_scale": g}) for g in args.grad_scales]
    for label, cls, has_anchors, attributes in runs:
        torch.manual_seed(args.seed)  # nnU-Net's data loader draws from numpy, the transforms from both
        np.random.seed(args.seed)
        random.seed(args.seed)
        trainer, t_train, thr, calibrated = train(cls, pre, 60 * args.minutes, args.epochs, args.iterations,
                                                  **attributes)
        epochs = trainer.current_epoch
        pred = predict_test(trainer, raw, test, has_anchors)
        get = lambda key: np.array([pred[c][key] for c in test])  # noqa: E731
        scores = {"peak": get("peak")}
        if has_anchors:
            scores["anchor"] = get("anchor_sw")
            if "anchor_max" in pred[test[0]]:
                scores["anchor_max_1patch"], scores["anchor_topk_mean_1patch"] = get("anchor_max"), get("anchor_topk_mean")
        main_score = thr["score"]
        r = {"trainer": cls.__name__, **attributes, "train_seconds": t_train, "epochs": epochs, "threshold": thr}
        for key, s in scores.items():
            entry = {"oracle_f1": oracle_f1(s, present, relative=True),
                     "oracle_f1_global_threshold": oracle_f1(s, present, relative=False)}
            if key in calibrated:  # with the thresholds calibrated on the validation cases
                t = np.asarray(calibrated[key], dtype=np.float64)
                m = existence_metrics(s, present, t, names)
                entry.update(m, mre_mm=mre(get("peak_points"), ref_pts, present & (s >= t))[0], kept=key == main_score)
            r[key] = entry
        t_val, info_val = validation_only_thresholds(trainer, "peak")
        r["peak_validation_only"] = {**existence_metrics(scores["peak"], present, t_val, names), "kept": False,
                                     "calibration": info_val["method"]}
        loc = {"peak": mre(get("peak_points"), ref_pts, present)}
        for l in ("medoid", "weighted"):
            if has_anchors and f"anchor_{l}_points" in pred[test[0]]:
                loc[f"anchor_{l}"] = mre(get(f"anchor_{l}_points"), ref_pts, present)
        r["location_mre_mm_all_present"] = loc
        r["in_sample_variants"] = in_sample_variants(trainer, ref, scores["peak"], present, names)
        print(f"[{label}] in-sample pass variants (held-out F1 of the peak thresholds; validation + n training "
              f"cases in-sample): {json.dumps(r['in_sample_variants'], default=float)}", flush=True)
        # every test case's raw scores, to study other calibrations or signals without training again
        r["test_scores"] = {"cases": list(test), "present": present.tolist(),
                            **{key: np.asarray(v, dtype=np.float64).tolist() for key, v in scores.items()}}
        results[label] = r
        e = r[main_score]
        rel = thr["calibration"].get("relative_threshold", float("nan"))
        rows.append((label, main_score, rel, e["precision"], e["recall"], e["f1"], e["oracle_f1"], e["mre_mm"],
                     epochs, t_train))
        print(f"[{label}] {json.dumps({k: v for k, v in r.items() if k != 'test_scores'}, default=float)}")

    print("\nexistence on held-out cases (thresholds calibrated on the validation cases, best F1; 'rel thr' is "
          "the threshold relative to each landmark's median present score)")
    print(f"{'trainer':14s} {'score':7s} {'rel thr':>7s} {'prec':>6s} {'recall':>6s} {'F1':>6s} {'oracleF1':>8s} "
          f"{'MRE mm':>7s} {'epochs':>6s} {'train s':>7s}")
    for row in rows:
        print(f"{row[0]:14s} {row[1]:7s} {row[2]:7.3f} {row[3]:6.3f} {row[4]:6.3f} {row[5]:6.3f} {row[6]:8.3f} "
              f"{row[7]:7.3f} {row[8]:6d} {row[9]:7.0f}")
    h = results["heatmap-only"]
    print(f"all-present F1 (predict every landmark present): {2 * present.sum() / (2 * present.sum() + (~present).sum()):.3f}")
    print(f"heatmap-only location MRE (mm, all present landmarks, (mre, n)): {json.dumps(h['location_mre_mm_all_present'])}")
    for label, *_ in runs[1:]:
        a = results[label]
        print(f"[{label}] kept score: {a['threshold']['score']}; F1 anchor (its own calibrated thresholds) = "
              f"{a['anchor']['f1']:.3f}, F1 peak(heatmap-only) = {h['peak']['f1']:.3f}; "
              "oracle F1 of each score: " + ", ".join(f"{k} {v['oracle_f1']:.3f}" for k, v in a.items()
                                                       if isinstance(v, dict) and "oracle_f1" in v)
              + "; with one global threshold: " + ", ".join(f"{k} {v['oracle_f1_global_threshold']:.3f}"
                                                              for k, v in a.items() if isinstance(v, dict) and "oracle_f1" in v))
        print(f"[{label}] location MRE (mm, all present landmarks, (mre, n)): {json.dumps(a['location_mre_mm_all_present'])}")
    (out / "bench_absent_landmarks.json").write_text(json.dumps(results, indent=2, default=float))
    signals = signal_table(results, runs, present)
    print("\nper signal (held-out test cases; * = the one the final validation kept):")
    for key, e in signals.items():
        print(f"{'*' if e.get('kept') else ' '} {key:42s} precision {e['precision']:.3f} recall {e['recall']:.3f} "
              f"F1 {e['f1']:.3f}" + (f" (TP {e['tp']} FP {e['fp']} FN {e['fn']} TN {e['tn']})" if "tp" in e else "")
              + (f"; wrong calls by landmark: {json.dumps(e['wrong_calls'])}" if e.get("wrong_calls") else ""))
    print(f"results: {out / 'bench_absent_landmarks.json'}; total {time.monotonic() - t0:.0f} s")
    if args.json:
        print(json.dumps({"absent_fraction_test": results["absent_fraction_test"], "signals": signals,
                          "in_sample_variants": {label: results[label]["in_sample_variants"] for label, *_ in runs}},
                         default=float))


def signal_table(results: dict, runs, present) -> dict:
    """{signal: precision, recall, F1 (and counts), kept} over the held-out cases, "all present" included."""
    n_pos, n_neg = int(present.sum()), int((~present).sum())
    table = {"all present": {"precision": n_pos / (n_pos + n_neg), "recall": 1.0,
                             "f1": 2 * n_pos / (2 * n_pos + n_neg), "kept": False}}
    for label, *_ in runs:
        r = results[label]
        for key in ("peak", "peak_validation_only", "anchor"):
            if key in r and "f1" in r[key]:
                what = {"peak": "peak height (validation + training in-sample)",
                        "peak_validation_only": "peak height (validation cases only)",
                        "anchor": "anchor existence"}[key]
                table[f"{label}: {what}"] = {k: r[key][k] for k in ("precision", "recall", "f1", "tp", "fp", "fn", "tn",
                                                                     "wrong_calls") if k in r[key]}
                table[f"{label}: {what}"]["kept"] = bool(r[key].get("kept", False))
    return table


if __name__ == "__main__":
    main()
