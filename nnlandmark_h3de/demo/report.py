"""report.md for a demo run: what was done, on which data, how long each stage took, and the
measured accuracy, with links (relative to OUTPUT_DIR) to plots, landmark files and logs.

Every number comes from the run's own records and the evaluator's summary.json; nothing is
estimated here.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import List, Optional

from nnlandmark_h3de.landmarks.atomic import atomic_write_text


def _rel(path, root: Path) -> str:
    return os.path.relpath(str(path), str(root))


def _fmt(v: Optional[float], spec: str = ".2f") -> str:
    return "n/a" if v is None else format(v, spec)


def _pct(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{100 * v:.1f} %"


def _versions() -> str:
    import importlib.metadata as md
    out = []
    for pkg in ("nnlandmark_h3de", "nnunetv2", "torch", "SimpleITK"):
        try:
            out.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            pass
    return ", ".join(out)


def results_tables(summary: dict) -> List[str]:
    """Markdown tables (overall micro/macro, then per landmark) from an evaluator summary."""
    from nnlandmark_h3de.evaluation.radial_errors import sdr_key
    radii = summary["sdr_radii_mm"]
    sdr_head = " | ".join(f"SDR<={r:g} mm" for r in radii)
    lines = [f"| | MRE mm (mean +- std) | median mm | {sdr_head} | TP | FP | FN | TN | existence acc. | F1 |",
             "|---" * (7 + len(radii)) + "|---|---|"]

    def row(label, b, counts=True):
        mre = "n/a" if b["mean_radial_error_mm"] is None else \
            f"{b['mean_radial_error_mm']:.2f} +- {b['std_radial_error_mm']:.2f}"
        cnt = " | ".join(str(b[k]) for k in ("TP", "FP", "FN", "TN")) if counts else " | ".join("" for _ in range(4))
        return (f"| {label} | {mre} | {_fmt(b['median_radial_error_mm'])} | "
                + " | ".join(_pct(b[sdr_key(r)]) for r in radii)
                + f" | {cnt} | {_pct(b['accuracy'])} | {_fmt(b['F1'])} |")

    fm = summary["foreground_mean"]
    lines.append(row("**all points (micro)**", fm["micro"]))
    lines.append(row("**landmark average (macro)**", fm["macro"], counts=False))
    for name in summary["landmark_names"]:
        lines.append(row(name, summary["mean"][name]))
    return lines


def stage_comparison(result) -> List[str]:
    """The global stage alone vs both stages on the same test cases, and what the calibration chose."""
    from nnlandmark_h3de.evaluation.radial_errors import sdr_key
    radii = result.summary["sdr_radii_mm"]
    choice = _read_json(Path(result.model_folder or "") / "fold_0" / "global_stage.json")
    kind = choice["kind"] if choice is not None else "atlas"
    registration = {"atlas": "affine atlas registration", "deformable": "affine + nonlinear atlas registration"}
    lines = ["## Two stages: what each contributes", "",
             "The phantoms are larger than one network patch; a tile alone cannot tell the left eye from the right. "
             "The global stage registers a few training images to the case and carries their landmarks "
             "over; the network then refines each landmark on the tiles around that estimate, within a search "
             "radius learned on the validation cases. Same test cases, same evaluator:", "",
             "| | MRE mm (mean +- std) | median mm | " + " | ".join(f"SDR<={r:g} mm" for r in radii) + " | F1 |",
             "|---|---|---|" + "---|" * len(radii) + "---|"]
    pair = ((f"global stage alone ({kind}: {registration.get(kind, kind)})", result.global_summary),
            (f"**two stages** ({kind} + network)", result.summary))
    for label, summ in pair:
        m = summ["foreground_mean"]["micro"]
        mre = "n/a" if m["mean_radial_error_mm"] is None else \
            f"{m['mean_radial_error_mm']:.2f} +- {m['std_radial_error_mm']:.2f}"
        lines.append(f"| {label} | {mre} | {_fmt(m['median_radial_error_mm'])} | "
                     + " | ".join(_pct(m[sdr_key(r)]) for r in radii) + f" | {_fmt(m['F1'])} |")
    g, b = (summ["foreground_mean"]["micro"]["mean_radial_error_mm"] for _, summ in pair)
    if g and b is not None:
        lines += ["", f"Two stages / global stage alone: {b / g:.2f}x the MRE (below 1: the network improved on "
                      f"the registration)."]
    lines += ["", "The global stage has no existence signal of its own here (a missing structure is still "
              "registered), so its F1 counts every landmark present."]
    if choice is not None:
        v = choice["validation"][choice["kind"]]
        floor = v.get("local_peak_floor_fit") or {}
        lines += ["", f"Calibration (fold 0 validation cases): {choice['kind']} global stage, validation MRE "
                      f"{v['mre_mm']:.2f} mm, search radius {v['radius_mm']:.1f} mm; local peaks kept where at least "
                      f"{_fmt(floor.get('relative_floor'), '.3g')} x the landmark's median peak "
                      f"({_pct(floor.get('local_used_fraction'))} of the validation points)."]
    return lines + [""]


def existence_notes(result) -> List[str]:
    """How the absent-landmark thresholds were fitted, and how the fit did on cases it was not fitted on."""
    thresholds = _read_json(Path(result.model_folder or "") / "fold_0" / "landmark_thresholds.json")
    if thresholds is None:
        return []
    cal = thresholds.get("calibration", {})
    m = result.summary["foreground_mean"]["micro"]
    lines = ["## Absent landmarks", "",
             f"Test cases: {m['TP'] + m['FN']} present and {m['FP'] + m['TN']} absent landmarks; TP {m['TP']}, "
             f"FP {m['FP']}, FN {m['FN']}, TN {m['TN']}, F1 {_fmt(m['F1'], '.3f')}.", "",
             f"Thresholds: score `{thresholds.get('score')}`, {cal.get('method')}, relative threshold "
             f"{_fmt(cal.get('relative_threshold'), '.3g')}, fitted on {cal.get('n_cases')} validation cases and "
             f"{cal.get('n_training_cases_in_sample', 0)} training cases predicted in-sample (each set on its own "
             f"scale, each landmark's median present peak pooled over both)."]
    check = cal.get("held_out_check")
    if check:
        lines.append(f"Fitted on the training cases alone, it scores the validation cases with F1 "
                     f"{check['f1']:.3f} (TP {check['tp']}, FP {check['fp']}, FN {check['fn']}, TN {check['tn']}).")
    return lines + [""]


def _read_json(path: Path) -> Optional[dict]:
    import json
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_report(result, path: Path, total_seconds: float) -> Path:
    """report.md from the run's records: what was done, the data, each stage, results, landmark files."""
    root = result.settings.output_dir
    L: List[str] = ["# nnLandmark demo report", ""]
    L += _overview(result, total_seconds)
    L += _dataset_section(result, root)
    L += _stages_section(result, root)
    if result.summary is not None:
        L += _results_section(result, root)
    if result.predictions_folder:
        L += _landmark_files_section(result, root)
    return atomic_write_text(path, "\n".join(L))


def _overview(result, total_seconds: float) -> List[str]:
    """What the demo did, how long it took against its budget, and on which machine."""
    s = result.settings
    what = "2D X-ray-like phantoms (`nnlandmark_h3de.demo.phantoms_2d`" if s.two_d else \
        "Procedural head phantoms (generated by `nnlandmark_h3de.demo.phantoms`"
    return [f"{what}, nothing downloaded) were "
            "converted to an nnU-Net dataset, planned and preprocessed by nnU-Net, trained on CPU for a fixed "
            "time budget, and the held-out test cases were predicted and evaluated with the package's own "
            "commands. The exact landmark positions are known by construction, so the errors below are the "
            "model's alone. Phantom figures say nothing about real anatomy; see `benchmarks/afids_benchmark.py`.",
            "", f"- Total wall time: {total_seconds:.0f} s (budget {s.minutes:g} min{', --quick' if s.quick else ''}"
                + ("; exceeded: the stages around training took longer than the budget allows for on this "
                   "machine, see the stage table" if total_seconds > 60 * s.minutes else "") + ")",
            f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores visible, Python "
            f"{platform.python_version()}; {_versions()}", ""]


def _dataset_section(result, root: Path) -> List[str]:
    """The phantoms, the split and the raw dataset."""
    s = result.settings
    if s.two_d:
        data = (f"- {s.n_train + s.n_test} 2D X-ray-like phantoms (a lateral cephalogram's layout, generated by "
                f"`nnlandmark_h3de.demo.phantoms_2d`) of {tuple(s.shape_zyx)} pixels (y, x), spacing "
                f"{tuple(s.spacing_xyz)} mm (x, y), seed {s.seed}, each structure absent with probability "
                f"{s.absent_fraction:g}; nnU-Net's `2d` configuration, the whole image in one patch "
                f"(parameters: [phantoms/phantoms.json](phantoms/phantoms.json))")
    else:
        data = (f"- {s.n_train + s.n_test} phantoms of {tuple(s.shape_zyx)} voxels (z, y, x), spacing "
                f"{tuple(s.spacing_xyz)} mm (x, y, z), seed {s.seed}, each structure absent with probability "
                f"{s.absent_fraction:g}, image direction rotated up to {s.oblique_deg:g} deg, "
                + (f"each deformed by a smooth random nonlinear field of {s.deform_mm:g} mm RMS displacement, "
                   f"landmarks moved exactly " if s.deform_mm > 0 else "rigidly re-posed only ")
                + "(parameters: [phantoms/phantoms.json](phantoms/phantoms.json))")
    L = ["## Dataset", "", data,
         f"- Split: {len(result.cases.get('train', []))} training, {len(result.cases.get('val', []))} validation "
         f"(fold 0), {len(result.cases.get('test', []))} test cases never seen in training: "
         f"{', '.join(result.cases.get('test', []))}",
         f"- nnU-Net raw dataset: `{_rel(result.dataset_folder, root) if result.dataset_folder else 'n/a'}` "
         f"(`landmarks.json` holds the exact world coordinates, LPS mm)", ""]
    if result.summary is not None:
        L += [f"- Landmarks ({len(result.summary['landmark_names'])}): "
              + ", ".join(f"`{n}`" for n in result.summary["landmark_names"]), ""]
    return L


def _stages_section(result, root: Path) -> List[str]:
    """Each stage's status, time and log; the training budget; the commands run."""
    s = result.settings
    L = ["## Stages", "", "| stage | status | seconds | command / log |", "|---|---|---|---|"]
    for r in result.stages:
        what = f"[log]({_rel(r.log, root)})" if r.log else ""
        if r.note:
            what = (what + "; " if what else "") + r.note
        L.append(f"| {r.name} | {r.status} | {r.seconds:.1f} | {what} |")
    L += ["", f"Training: `{result.trainer_name}` = `{s.trainer}` with a budget of "
              f"{_fmt(result.train_budget_seconds, '.0f')} s of training ({result.epochs_done} epochs of "
              f"{s.iterations_per_epoch} iterations), configuration `{s.configuration}`, fold 0, `-device cpu`.", ""]
    cmds = [r.command for r in result.stages if r.command]
    if cmds:
        L += ["Commands run (with `nnUNet_raw`, `nnUNet_preprocessed`, `nnUNet_results` inside the output folder):",
              "", "```"] + cmds + ["```", ""]
    return L


def _results_section(result, root: Path) -> List[str]:
    """The evaluator's figures on the test cases, the two stages compared, existence, uncertainty, plots."""
    summ = result.summary
    L = ["## Results on the test cases", "",
         f"{summ['n_cases']} cases. Radial errors are world distances (mm) over true positives; "
         f"SDR counts error <= r. Existence: TP present in both, FN missed, FP hallucinated, TN correctly "
         f"absent. Full numbers: [{_rel(result.summary_file, root)}]({_rel(result.summary_file, root)}) "
         f"and the per-case CSV beside it.", ""]
    L += results_tables(summ) + [""]
    px = summ.get("pixel_errors") or {}
    if px.get("mean_radial_error_px") is not None:
        L += [f"In pixels (voxels) of each image ({px['n_cases_with_image']} of {px['n_cases']} cases): MRE "
              f"{px['mean_radial_error_px']:.2f} +- {px['std_radial_error_px']:.2f}, median "
              f"{px['median_radial_error_px']:.2f}, max {px['max_radial_error_px']:.2f}.", ""]
    if result.global_summary is not None:
        L += stage_comparison(result)
    L += existence_notes(result)
    corr = summ.get("uncertainty_vs_error")
    if corr:
        L += [f"Uncertainty: Spearman rho between the uncertainty written for each landmark and its error "
              f"{corr['spearman_rho']:.2f} over {corr['n_points']} true positives, "
              f"{_fmt(corr.get('within_landmark_spearman_rho'))} within landmarks (1 = the points to check by "
              f"hand are exactly the worst ones).", ""]
    if summ["foreground_mean"]["micro"]["TP"] == 0:
        L += ["**No landmark was detected in the test cases** (every reference landmark is a false "
              "negative): the model is under-trained for this budget, and the existence thresholds "
              "calibrated in its final validation declared every landmark absent. Run again with a "
              "larger `--minutes`.", ""]
    plots = summ.get("plots") or []
    if plots:
        L += ["## Plots", ""] + [f"![{Path(p).stem}]({_rel(p, root)})" for p in plots] + [""]
    return L


def _landmark_files_section(result, root: Path) -> List[str]:
    """Links to each test case's predicted and reference .mrk.json and its image."""
    pred = Path(result.predictions_folder)
    files = sorted(p for p in pred.iterdir() if p.name.endswith(".mrk.json"))
    L = ["## Landmark files", "",
         "Predictions (3D Slicer markups, LPS; drag into Slicer together with the image):", ""]
    for f in files:
        case = f.name[:-len(".mrk.json")]
        img = Path(result.dataset_folder) / "imagesTs" / f"{case}_0000.nii.gz"
        ref = root / "phantoms" / "landmarks" / f"{case}.mrk.json"
        L.append(f"- `{case}`: [prediction]({_rel(f, root)}), [reference]({_rel(ref, root)}), "
                 f"[image]({_rel(img, root)})")
    L.append("")
    return L
