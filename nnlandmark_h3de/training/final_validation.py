"""The landmark trainer's final validation: nnU-Net's sliding window on the fold's preprocessed
validation cases, landmarks decoded in network space (`decode_peaks`) and mapped to world LPS
(`network_index_to_world`) instead of exporting segmentations, then

    fold_X/validation/<case>.mrk.json   (absent landmarks: positionStatus undefined)
    fold_X/validation/summary.json      (evaluate_landmarks vs the raw dataset's landmarks.json)
    fold_X/landmark_thresholds.json     (existence thresholds on peak height or anchor existence, best F1)
    fold_X/landmark_uncertainty.json    (per-landmark error scale and peak-height exponent)

When the fold has a calibrated global stage (fold_X/global_stage.json, nnLandmark_calibrate_global)
the validation cases are predicted in two stages, as nnLandmark_predict --global auto does, so the
thresholds and the uncertainty model are fitted on what prediction does; their global estimates are
the ones the calibration recorded (fold_X/global_stage_estimates.json), not registered again.

Two passes, each timed in the log and in summary.json (`final_validation_seconds`): the validation
cases with test-time mirrors (what prediction runs), then a few training cases in-sample, without
mirrors, only to teach existence (`_training_keys_for_existence`: the pass costs no more than the
validation pass).

Both calibrations are in `training/calibration.py`.

Under DDP every rank predicts its share of the cases; rank 0 gathers, calibrates and writes.
"""
from __future__ import annotations

import time
import warnings
from os.path import isfile, join
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import distributed as dist
from tqdm import tqdm

from batchgenerators.utilities.file_and_folder_operations import maybe_mkdir_p
from nnunetv2.inference.sliding_window_prediction import compute_gaussian

from nnlandmark_h3de.inference.index_mapping import network_index_to_world
from nnlandmark_h3de.inference.landmark_predictor import nnLandmarkPredictor
from nnlandmark_h3de.inference.uncertainty import member_spread_mm
from nnlandmark_h3de.landmarks import LandmarkSet, write_landmarks
from nnlandmark_h3de.training.landmark_loss import HeatmapMSELoss
from nnlandmark_h3de.training.calibration import calibrate_relative_thresholds, fit_uncertainty_model
from nnlandmark_h3de.training.existence_calibration import (EXISTENCE_SCORES_FILE, held_out_existence_check,
                                                           write_existence_scores)
from nnlandmark_h3de.training.landmark_validation import (DEFAULT_PEAK_THRESHOLD, UNLEARNED_PEAK, unlearned_landmarks,
                                                          write_thresholds)

__all__ = ["run_final_validation", "predict_validation_landmarks", "in_sample_keys"]

# At most this many training cases are predicted in the final validation to teach existence (time).
MAX_TRAINING_CASES_FOR_EXISTENCE = 50
TRAINING_SET = "training (in-sample, existence only)"


def predict_validation_landmarks(trainer, existence_net=None, sets: Optional[Dict[str, list]] = None,
                                 unmirrored: Sequence[str] = (), seconds: Optional[Dict[str, float]] = None
                                 ) -> Dict[str, Dict[str, tuple]]:
    """This rank's cases of each set ({name: case keys}; default: the fold's validation cases as
    "validation"), predicted with one predictor -> {name: {case: (points LPS (L, 3), existence scores
    {"peak": (L,)[, "anchor": (L,)]}, spread of the test-time mirrors' peaks around the points (L,) in
    mm, NaN without mirroring, the global stage's estimates (L, 3) in two-stage validation, else None)}}.

    The mirrors run the way nnLandmark_predict runs them (each over the whole volume, the pair
    channels swapped where a mirror flips the case's own left/right axis), and nnLandmark_predict
    applies what is calibrated here to each fold's own prediction, so both see the same members.
    `existence_net`: the network's anchor-head wrapper (record_existence / reset_existence /
    anchor_existence) to also score existence with the anchors (max over tiles and mirrors).
    `unmirrored`: the sets predicted without test-time mirrors (a pass that only scores existence);
    `seconds`: filled with each set's wall time on this rank.
    """
    if sets is None:
        sets = {"validation": trainer.do_split()[1]}
    predictor = nnLandmarkPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=True, device=trainer.device, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.manual_initialization(trainer.network, trainer.plans_manager, trainer.configuration_manager, None,
                                    trainer.dataset_json, trainer.__class__.__name__,
                                    trainer.inference_allowed_mirroring_axes)
    # as nnLandmark_predict does (the trainer class says; a validation-only run has not set up the augmentation)
    predictor.mirror_left_right = bool(getattr(trainer, "mirror_left_right_at_inference", False))
    two_stage = _use_global_stage(trainer, predictor)
    predicted = {}
    if existence_net is not None:
        existence_net.record_existence = True
    try:
        for what, keys in sets.items():
            if trainer.is_ddp:
                keys = keys[trainer.local_rank::dist.get_world_size()]
            dataset = trainer.dataset_class(trainer.preprocessed_dataset_folder, keys,
                                            folder_with_segs_from_previous_stage=trainer.folder_with_segs_from_previous_stage)
            predictor.use_mirroring = what not in unmirrored
            started = time.monotonic()
            progress = tqdm(dataset.identifiers, desc=f"final validation: {what}", unit="case",
                            disable=trainer.local_rank != 0 or not keys)
            predicted[what] = {k: _predict_case(trainer, predictor, dataset, k, what, two_stage, existence_net)
                               for k in progress}
            if seconds is not None:
                seconds[what] = time.monotonic() - started
            _log_pass(trainer, predictor, what, len(keys), time.monotonic() - started, what not in unmirrored, two_stage)
    finally:
        if existence_net is not None:
            existence_net.record_existence = False
    return predicted


def _log_pass(trainer, predictor, what: str, n: int, seconds: float, mirrored: bool, two_stage: bool) -> None:
    """Where the final validation's time goes, one line per pass."""
    how = ("test-time mirrors" if mirrored else "no test-time mirrors") + (", two stages" if two_stage else ", whole image")
    if two_stage and getattr(predictor.global_stage, "reused", 0):
        how += f", {predictor.global_stage.reused} global estimate(s) reused from the calibration so far"
    trainer.print_to_log_file(f"final validation, {what}: {n} case(s) in {seconds:.1f} s ({how}; rank "
                              f"{trainer.local_rank})", also_print_to_console=True)


def _predict_case(trainer, predictor, dataset, k: str, what: str, two_stage: bool, existence_net) -> tuple:
    """One preprocessed case -> (points, scores, spread, global points), see predict_validation_landmarks."""
    data, _, _, properties = dataset.load_case(k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 'The given NumPy array is not writable'
        data = torch.from_numpy(data[:])
    trainer.print_to_log_file(f"predicting {what} case {k}, shape {tuple(data.shape)}, rank {trainer.local_rank}")
    if existence_net is not None:
        existence_net.reset_existence()
    files = _raw_image_files(trainer, k) if two_stage else None
    idx, _, folds, logits, stages = predictor.locate(data, properties, files, source=k)
    peak, member_peaks = folds[0].peak, folds[0].member_idx
    del logits

    def to_world(i):
        return network_index_to_world(i, properties, trainer.plans_manager, trainer.configuration_manager,
                                      network_shape=data.shape[1:])

    points = to_world(idx)
    spread = member_spread_mm(member_peaks, points, to_world)
    spread = np.full(len(points), np.nan) if spread is None else spread
    scores = {"peak": np.asarray(peak, dtype=np.float64)}
    if existence_net is not None:
        scores["anchor"] = existence_net.anchor_existence.detach().cpu().numpy().astype(np.float64)
    global_points = None if stages is None else stages["estimate"].reordered(trainer.landmark_names).points_lps
    return points, scores, spread, global_points


def in_sample_keys(train_keys, n: int) -> list:
    """`n` of the training cases (0 = none), evenly over the sorted list."""
    keys = sorted(train_keys)
    if n <= 0:
        return []
    if len(keys) > n:
        keys = [keys[i] for i in np.linspace(0, len(keys) - 1, n).round().astype(int)]
    return keys


def _training_keys_for_existence(trainer, n_validation: int) -> list:
    """Training cases predicted after training to teach existence (validation sets are small and often
    hold no absent landmark), without test-time mirrors, so that the pass costs no more than the
    validation pass: as many as one validation case's mirrors times the validation cases over the whole
    image; in two stages (each training case registered, where the validation cases' registrations are
    the calibration's) as many as the validation cases. At most `trainer.existence_training_cases`.
    Measured on bench_absent_landmarks.py seed 3 (2026-12-05): held-out F1 0.993 for 0 to 18 in-sample
    cases, with or without mirrors."""
    cap = int(getattr(trainer, "existence_training_cases", MAX_TRAINING_CASES_FOR_EXISTENCE))
    if has_global_stage(trainer):
        per_validation_case = 1
    else:
        per_validation_case = 2 ** len(trainer.inference_allowed_mirroring_axes or ())
    return in_sample_keys(trainer.do_split()[0], min(cap, per_validation_case * n_validation))


def has_global_stage(trainer) -> bool:
    from nnlandmark_h3de.inference.global_stage import GLOBAL_STAGE_FILE
    return isfile(join(trainer.output_folder, GLOBAL_STAGE_FILE))


def _use_global_stage(trainer, predictor) -> bool:
    """Two-stage validation when the fold has a calibrated global stage (the validation cases' estimates
    recorded by its calibration are reused, not registered again)."""
    from nnlandmark_h3de.inference.global_stage import load_global_stage
    from nnlandmark_h3de.inference.recorded_estimates import ESTIMATES_FILE, RecordedGlobalStage, read_recorded_estimates
    if not has_global_stage(trainer):
        return False
    stage, choice, kind = load_global_stage(trainer.output_folder, "auto", trainer.device)
    recorded = read_recorded_estimates(join(trainer.output_folder, ESTIMATES_FILE), kind)
    validation = set(trainer.do_split()[1])
    stage = RecordedGlobalStage(stage, {_raw_image_files(trainer, c)[0]: ls for c, ls in recorded.items()
                                        if c in validation})
    predictor.use_global_stage(stage, choice.radius_mm(kind), choice.fallback_uncertainty_mm(kind))  # no floor yet
    trainer.print_to_log_file(f"two-stage validation: {kind} global stage, local search radius "
                              f"{choice.radius_mm(kind):.1f} mm", also_print_to_console=True)
    return True


def _raw_image_files(trainer, case: str):
    """The raw dataset's image files of a training case (what a global stage reads)."""
    from nnunetv2.paths import nnUNet_raw
    from nnlandmark_h3de.inference.global_stage import raw_case_images
    return raw_case_images(join(nnUNet_raw or "", trainer.plans_manager.dataset_name), case, trainer.dataset_json)


def _fit_local_peak_floor(trainer, results: dict, evaluated, reference) -> None:
    """Two-stage validation: the local peak is blended with the global estimate by a weight per landmark, and
    where the local peak is too weak to help, the global estimate stands (both fitted on these cases); the
    weights and the floors go into fold_X/global_stage.json for prediction."""
    from nnlandmark_h3de.inference.global_stage import GLOBAL_STAGE_FILE, GlobalStageChoice
    from nnlandmark_h3de.inference.two_stage_tiles import blend_points
    from nnlandmark_h3de.training.calibration import fit_local_peak_floor, fit_local_weights
    truth = np.array([reference[c].points_lps for c in evaluated])
    weight, weight_info = fit_local_weights(np.array([results[c][0] for c in evaluated]),
                                            np.array([results[c][3] for c in evaluated]), truth)
    blended = {c: blend_points(results[c][3], results[c][0], weight) for c in results}
    local = np.linalg.norm(np.array([blended[c] for c in evaluated]) - truth, axis=-1)
    glob = np.array([np.linalg.norm(results[c][3] - reference[c].points_lps, axis=1) for c in evaluated])
    peaks = np.array([results[c][1]["peak"] for c in evaluated])
    floor, info = fit_local_peak_floor(local, glob, peaks)
    for c in results:
        points, scores, spread, global_points = results[c]
        weak = (scores["peak"] < floor) & np.all(np.isfinite(global_points), axis=1)
        results[c] = (np.where(weak[:, None], global_points, blended[c]), scores, spread, global_points)
    file = join(trainer.output_folder, GLOBAL_STAGE_FILE)
    choice = GlobalStageChoice.read(file)
    choice.validation[choice.kind]["local_weight"] = weight_info["weight"]  # the pooled weight, for a reader
    choice.validation[choice.kind]["local_weights"] = [float(w) for w in weight]
    choice.validation[choice.kind]["local_weight_fit"] = weight_info
    choice.validation[choice.kind]["local_peak_floor"] = [None if not np.isfinite(v) else float(v) for v in floor]
    choice.validation[choice.kind]["local_peak_floor_fit"] = info
    choice.write(file)
    trainer.print_to_log_file(f"local weights: {weight.min():.2f}-{weight.max():.2f} per landmark (pooled "
                              f"{weight_info['weight']:.2f}; global + w (local - global)); validation MRE local "
                              f"{weight_info.get('mre_local_mm', float('nan')):.2f}, global "
                              f"{weight_info.get('mre_global_mm', float('nan')):.2f}, blended "
                              f"{weight_info.get('mre_mm', float('nan')):.2f} mm", also_print_to_console=True)
    trainer.print_to_log_file(f"local peak floor: {info['relative_floor']:.3g} x each landmark's median local peak; "
                              f"validation MRE local {info['mre_local_mm']:.2f}, global {info['mre_global_mm']:.2f}, "
                              f"combined {info['mre_mm']:.2f} mm ({info['local_used_fraction']:.0%} local)",
                              also_print_to_console=True)


def _warn_unlearned(trainer, results: dict, cases, names) -> list:
    """Landmarks whose heatmap stayed flat on every validation case: said in the log and as a warning,
    since their points are no better than a guess (two-stage prediction keeps the global estimate there)."""
    if not cases:
        return []
    flat = unlearned_landmarks(np.array([results[c][1]["peak"] for c in cases]), names)
    if flat:
        mse = isinstance(getattr(trainer.loss, "loss", trainer.loss), HeatmapMSELoss)  # inside deep supervision
        hint = ("; with the MSE of sigmoids, channels of landmarks that few patches show can stay flat through a "
                "short training (nnLandmarkTrainerLocal's BCE keeps them learning)") if mse else ""
        message = (f"the network has not learned {len(flat)} of {len(names)} landmarks: their heatmap peak stayed "
                   f"under {UNLEARNED_PEAK} on every validation case (it starts at 0.018): {flat}. Train longer{hint}")
        trainer.print_to_log_file("WARNING: " + message, also_print_to_console=True)
        warnings.warn(message, stacklevel=2)
    return flat


def _gather(results: dict, is_ddp: bool) -> dict:
    if not is_ddp:
        return results
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, results)
    merged = {}
    for r in everything:
        merged.update(r)
    return merged


def _calibrate(results: dict, evaluated, training: dict, reference, names, score: str) -> Tuple[np.ndarray, dict]:
    """Per-landmark best-F1 thresholds of one existence score over the evaluated validation (case, landmark)
    pairs and the training cases predicted in-sample (each set on its own scale, the landmarks' median
    present peaks pooled: calibration.relative_scores)."""
    values, present, groups = _existence_table(results, evaluated, training, reference, len(names), score)
    # a probability gets 0.5 when there is nothing to calibrate on
    default = 0.5 if score == "anchor" else DEFAULT_PEAK_THRESHOLD
    thresholds, info = calibrate_relative_thresholds(values, present, default, groups)
    info = {**info, "n_cases": len(evaluated), "n_training_cases_in_sample": int((groups == 1).sum())}
    check = held_out_existence_check(values, present, groups)
    if check is not None:
        info["held_out_check"] = check
    return thresholds, info


def _existence_table(results: dict, evaluated, training: dict, reference, L: int, score: str):
    """(N, L) scores, truth and set (0 validation, 1 training) of every case that can teach existence."""
    cases = [(results, c, 0) for c in evaluated] + [(training, c, 1) for c in sorted(training) if c in reference]
    values = np.array([r[c][1][score] for r, c, _ in cases], dtype=np.float64).reshape(-1, L)
    present = np.array([reference[c].present for _, c, _ in cases], dtype=bool).reshape(-1, L)
    return values, present, np.array([g for _, _, g in cases], dtype=int)


def _choose_score(calibrations: dict, preferred: str) -> str:
    """The existence score that separated present from absent best on the validation cases (F1);
    `preferred` on ties and when nothing was calibrated. Measured on generated phantoms
    (bench_absent_landmarks.py), the anchor head's existence did not separate at all after 600 CPU steps
    (F1 = calling everything present) and after 1500 separated less than relative peak heights (held-out
    F1 0.881 vs 0.968, seed 2), so an anchor trainer must not be stuck with its own score."""
    f1 = {k: info.get("f1") for k, (_, info) in calibrations.items() if info["method"].startswith("best_f1")}
    if preferred not in calibrations or not f1:
        return preferred if preferred in calibrations else next(iter(calibrations))
    best = max(f1, key=f1.get)
    return preferred if preferred in f1 and f1[preferred] >= f1[best] else best


def _fit_uncertainty(results: dict, evaluated, reference, names):
    """Radial errors of the (unthresholded) validation peaks -> `UncertaintyModel`."""
    shape = (-1, len(names))
    errors = np.array([np.linalg.norm(results[c][0] - reference[c].points_lps, axis=1) for c in evaluated])
    peaks = np.array([results[c][1]["peak"] for c in evaluated])
    spread = np.array([results[c][2] for c in evaluated]).reshape(shape)
    present = np.array([reference[c].present for c in evaluated])
    return fit_uncertainty_model(names, errors.reshape(shape), peaks.reshape(shape), present.reshape(shape),
                                 spread_mm=spread)


def _reference_landmarks(trainer, results: dict, names) -> dict:
    """{case: LandmarkSet} of the raw dataset's landmarks.json in the model's order ({} without one, said
    in the log, as are validation cases it lacks)."""
    from nnlandmark_h3de.landmarks.dataset_file import load_dataset_landmarks
    reference_file = trainer.reference_landmarks_file()
    if reference_file is None:
        trainer.print_to_log_file("WARNING: no landmarks.json in $nnUNet_raw/<dataset>/ nor in the preprocessed "
                                  "folder: landmarks are written but not evaluated, the threshold is the default")
        return {}
    reference = {k: v.reordered(names) for k, v in load_dataset_landmarks(reference_file).items()}
    missing = sorted(set(results) - set(reference))
    if missing:
        trainer.print_to_log_file(f"WARNING: {reference_file} has no landmarks for validation cases {missing}")
    return reference


def run_final_validation(trainer, score: str = "peak", existence_net=None) -> None:
    """Predict, calibrate the existence thresholds of every score computed ("peak" and, with
    `existence_net`, "anchor"), keep the one with the best validation F1 (`score` preferred on ties),
    write the landmark files, thresholds and summary.json (other scores' calibrations as alternatives)."""
    from nnlandmark_h3de.evaluation import evaluate_landmarks
    from nnlandmark_h3de.evaluation.report import write_summary_json

    validation_folder = join(trainer.output_folder, "validation")
    maybe_mkdir_p(validation_folder)
    validation = trainer.do_split()[1]
    sets = {"validation": validation, TRAINING_SET: _training_keys_for_existence(trainer, len(validation))}
    seconds: Dict[str, float] = {}
    predicted = predict_validation_landmarks(trainer, existence_net, sets, unmirrored=(TRAINING_SET,), seconds=seconds)
    started = time.monotonic()
    results, training = (_gather(predicted[k], trainer.is_ddp) for k in sets)
    compute_gaussian.cache_clear()
    if trainer.local_rank != 0:
        if trainer.is_ddp:
            dist.barrier()
        return

    names = trainer.landmark_names
    reference = _reference_landmarks(trainer, results, names)
    cases = sorted(results)
    evaluated = [c for c in cases if c in reference]
    unlearned = _warn_unlearned(trainer, results, cases, names)
    if evaluated and results[evaluated[0]][3] is not None:
        _fit_local_peak_floor(trainer, results, evaluated, reference)
    calibrations = {kind: _calibrate(results, evaluated, training, reference, names, kind)
                    for kind in (results[cases[0]][1] if cases else {"peak": None})}
    if evaluated:
        write_existence_scores(join(validation_folder, EXISTENCE_SCORES_FILE), names,
                               {c: (results[c][1], reference[c].present) for c in evaluated},
                               {c: (training[c][1], reference[c].present) for c in training if c in reference})
    score = _choose_score(calibrations, score)
    threshold, calibration = calibrations[score]
    write_thresholds(join(trainer.output_folder, "landmark_thresholds.json"), names, threshold, calibration, score=score)
    trainer.print_to_log_file(f"existence thresholds ({score}): {np.round(threshold, 4).tolist()} ({calibration})")
    if evaluated:
        model = _fit_uncertainty(results, evaluated, reference, names)
        model.write(join(trainer.output_folder, "landmark_uncertainty.json"))
        trainer.print_to_log_file(f"uncertainty model: alpha {model.alpha:.3g}, beta {model.beta:.3g}, "
                                  f"RMS error per landmark (mm) "
                                  f"{np.round(model.rms_mm, 2).tolist()}")

    predictions = {}
    for c in cases:
        points, scores = results[c][:2]
        points = np.where((scores[score] >= threshold)[:, None], points, np.nan)
        ls = LandmarkSet(names, points, confidence=scores[score], source=join(validation_folder, c + ".mrk.json"))
        write_landmarks(ls, ls.source)
        predictions[c] = ls

    if evaluated:
        summary = evaluate_landmarks(reference, {c: predictions[c] for c in evaluated})
        summary["existence_threshold"] = {"score": score, "threshold": threshold.tolist(), **calibration,
                                          "chosen_by": "best validation F1 among the scores computed"}
        others = {k: {"threshold": t.tolist(), **info} for k, (t, info) in calibrations.items() if k != score}
        if others:
            summary["existence_threshold"]["alternatives"] = others
        summary["in_sample"] = ("the existence thresholds (with the training cases predicted in-sample) and the "
                                "uncertainty model were fitted on these same validation cases: existence metrics and "
                                "the MRE of kept landmarks are optimistic; existence_threshold.held_out_check fits on "
                                "the training cases alone and scores these validation cases; predict held-out cases "
                                "for unbiased figures")
        summary["unlearned_landmarks"] = unlearned
        seconds["calibration"] = time.monotonic() - started
        summary["final_validation_seconds"] = {k: round(v, 1) for k, v in seconds.items()}
        write_summary_json(summary, join(validation_folder, "summary.json"))
        mre = summary["foreground_mean"]["micro"]["mean_radial_error_mm"]
        trainer.logger.log_summary("final_val/mre_mm", mre)
        trainer.print_to_log_file("Validation complete", also_print_to_console=True)
        trainer.print_to_log_file(f"Mean radial error (mm, all validation landmarks): {mre}", also_print_to_console=True)
    if trainer.is_ddp:
        dist.barrier()
