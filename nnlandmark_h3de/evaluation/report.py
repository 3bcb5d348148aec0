"""Write a summary to disk (JSON, per-case CSV) and render the short terminal table.

Files are written to a temporary name in the target folder and renamed, so a crash or a reader
running at the same time never sees a half-written summary.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Callable, List, Optional

from nnlandmark_h3de.evaluation.radial_errors import sdr_key
from nnlandmark_h3de.landmarks.atomic import atomic_path

CSV_COLUMNS = ["case", "landmark", "status", "radial_error_mm", "radial_error_px",
               "reference_x", "reference_y", "reference_z",
               "prediction_x", "prediction_y", "prediction_z", "reference_file", "prediction_file"]


def write_atomically(path, write: Callable[[io.IOBase], None], binary: bool = False) -> Path:
    """Call `write(handle)` on a temp file beside `path`, then rename it over `path` (landmarks.atomic)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"newline": "", "encoding": "utf-8"})) as f:
            write(f)
    return Path(path)


def write_summary_json(summary: dict, path) -> Path:
    return write_atomically(path, lambda f: f.write(json.dumps(summary, indent=2, allow_nan=False) + "\n"))


def case_rows(summary: dict) -> List[dict]:
    """One row per (case, landmark): status, error and both points."""
    rows = []
    for entry in summary["metric_per_case"]:
        for name, m in entry["metrics"].items():
            ref = m["reference_lps"] or [None] * 3
            pred = m["prediction_lps"] or [None] * 3
            rows.append({"case": entry["case"], "landmark": name, "status": m["status"],
                         "radial_error_mm": m["radial_error_mm"], "radial_error_px": m.get("radial_error_px"),
                         "reference_x": ref[0], "reference_y": ref[1], "reference_z": ref[2],
                         "prediction_x": pred[0], "prediction_y": pred[1], "prediction_z": pred[2],
                         "reference_file": entry["reference_file"], "prediction_file": entry["prediction_file"]})
    return rows


def write_case_csv(summary: dict, path) -> Path:
    def write(f):
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for row in case_rows(summary):
            w.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return write_atomically(path, write)


def _num(v: Optional[float], fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def format_table(summary: dict) -> str:
    """Per-landmark MRE/SDR/existence and the micro and macro rows, for the terminal."""
    radii = summary["sdr_radii_mm"]
    width = max([len("macro (landmarks)")] + [len(n) for n in summary["landmark_names"]])
    head = (f"{'landmark':<{width}}  {'TP':>4} {'FP':>4} {'FN':>4} {'TN':>4}  {'MRE mm':>14} {'median':>7} {'max':>7}  "
            + " ".join(f"{'<=' + format(r, 'g') + 'mm':>7}" for r in radii) + f"  {'F1':>5}")
    lines = [head, "-" * len(head)]

    def row(label: str, b: dict, counts: bool = True) -> str:
        mre = "-" if b["mean_radial_error_mm"] is None else \
            f"{b['mean_radial_error_mm']:.2f} +- {b['std_radial_error_mm']:.2f}"
        cnt = " ".join(f"{b[k]:>4}" for k in ("TP", "FP", "FN", "TN")) if counts else " " * 19
        return (f"{label:<{width}}  {cnt}  {mre:>14} {_num(b['median_radial_error_mm'], '7.2f'):>7} "
                f"{_num(b.get('max_radial_error_mm'), '7.2f'):>7}  "
                + " ".join(f"{_pct(b[sdr_key(r)]):>7}" for r in radii) + f"  {_num(b['F1'], '5.2f'):>5}")

    for name in summary["landmark_names"]:
        lines.append(row(name, summary["mean"][name]))
    lines.append("-" * len(head))
    lines.append(row("micro (points)", summary["foreground_mean"]["micro"]))
    lines.append(row("macro (landmarks)", summary["foreground_mean"]["macro"], counts=False))
    lines.append(f"{summary['n_cases']} cases; errors and SDR over true positives; SDR rule: error <= r mm")
    px = summary.get("pixel_errors") or {}
    if px.get("mean_radial_error_px") is not None:
        lines.append(f"in pixels (voxels) of each image ({px['n_cases_with_image']} of {px['n_cases']} cases): MRE "
                     f"{px['mean_radial_error_px']:.2f} +- {px['std_radial_error_px']:.2f}, median "
                     f"{px['median_radial_error_px']:.2f}, max {px['max_radial_error_px']:.2f}")
    corr = summary.get("uncertainty_vs_error")
    if corr:
        within = corr.get("within_landmark_spearman_rho")
        lines.append(f"predicted uncertainty vs radial error: Spearman rho {corr['spearman_rho']:.2f} "
                     f"over {corr['n_points']} true positives"
                     + ("" if within is None else f" ({within:.2f} within landmarks)"))
    if summary.get("skipped"):
        lines.append(f"skipped {len(summary['skipped'])} item(s): see 'skipped' in the summary")
    return "\n".join(lines)
