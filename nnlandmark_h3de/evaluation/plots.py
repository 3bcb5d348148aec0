"""The pictures people look at: cumulative error curve, per-landmark box plot, and three
orthogonal slices through each landmark of one case with reference and prediction marked.

World LPS points are mapped to array indices with `ImageGeometry` only; the slices are plain
numpy array slices (z, y, x) shown with the voxel aspect ratio, labelled with their array axes.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import numpy as np

from nnlandmark_h3de.evaluation.radial_errors import sdr_key
from nnlandmark_h3de.evaluation.report import write_atomically

LANDMARKS_PER_PAGE = 8


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path) -> Path:
    plt = _pyplot()
    try:
        return write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=100), binary=True)
    finally:
        plt.close(fig)


def true_positive_errors(summary: dict) -> dict:
    """Landmark name -> list of TP radial errors (mm) across cases."""
    errors = {n: [] for n in summary["landmark_names"]}
    for entry in summary["metric_per_case"]:
        for name, m in entry["metrics"].items():
            if m["status"] == "TP":
                errors[name].append(m["radial_error_mm"])
    return errors


def plot_cumulative_errors(summary: dict, path) -> Path:
    """Fraction of TP landmarks with error <= x, with each SDR radius and its value marked."""
    plt = _pyplot()
    errors = np.sort(np.concatenate([np.asarray(v, float) for v in true_positive_errors(summary).values()] + [np.zeros(0)]))
    fig, ax = plt.subplots(figsize=(6, 4.5))
    if errors.size:
        x = np.concatenate([[0.0], errors])
        y = np.concatenate([[0.0], np.arange(1, errors.size + 1) / errors.size])
        ax.step(x, y, where="post", color="tab:blue", label=f"{errors.size} true positives")
    for r in summary["sdr_radii_mm"]:
        sdr = summary["foreground_mean"]["micro"][sdr_key(r)]
        ax.axvline(r, color="grey", ls="--", lw=0.8)
        if sdr is not None:
            ax.plot([r], [sdr], "o", color="tab:red")
            ax.annotate(f"{100 * sdr:.1f}% <= {r:g} mm", (r, sdr), textcoords="offset points", xytext=(4, -12), fontsize=8)
    ax.set_xlim(0, max([float(errors.max()) if errors.size else 0.0] + list(summary["sdr_radii_mm"])) * 1.1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("radial error (mm)")
    ax.set_ylabel("fraction of true-positive landmarks with error <= x")
    ax.set_title(f"Cumulative radial error ({summary['n_cases']} cases, micro)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_error_boxplot(summary: dict, path) -> Path:
    """One box of TP errors per landmark (landmarks without a TP are shown empty and labelled)."""
    plt = _pyplot()
    errors = true_positive_errors(summary)
    names = list(errors)
    fig, ax = plt.subplots(figsize=(6, max(3.0, 0.28 * len(names) + 1.2)))
    data = [np.asarray(errors[n], float) for n in names]
    boxes = [d if d.size else [np.nan] for d in data]
    try:  # matplotlib >= 3.10 names it `orientation`; `vert` is deprecated there
        ax.boxplot(boxes, orientation="horizontal", showfliers=True)
    except TypeError:
        ax.boxplot(boxes, vert=False, showfliers=True)
    ax.set_yticks(range(1, len(names) + 1))
    ax.set_yticklabels([n if d.size else f"{n} (no TP)" for n, d in zip(names, data)], fontsize=8)
    ax.invert_yaxis()
    for r in summary["sdr_radii_mm"]:
        ax.axvline(r, color="grey", ls="--", lw=0.6)
    ax.set_xlabel("radial error (mm), true positives only")
    ax.set_title("Radial error per landmark")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _window(array: np.ndarray):
    finite = array[np.isfinite(array)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [1, 99])
    return float(lo), float(hi if hi > lo else lo + 1)


def plot_case_slices(summary: dict, case: str, image_path, folder, per_page: int = LANDMARKS_PER_PAGE) -> List[Path]:
    """Axial/coronal/sagittal array slices through each landmark of `case` (pages of `per_page`)."""
    from nnlandmark_h3de.landmarks.geometry import ImageGeometry, read_image
    import SimpleITK as sitk

    entry = next((e for e in summary["metric_per_case"] if e["case"] == case), None)
    if entry is None:
        raise ValueError(f"case {case!r} is not among the evaluated cases {[e['case'] for e in summary['metric_per_case']]}")
    image = read_image(image_path)
    if image.GetDimension() == 2:
        return [plot_case_image_2d(entry, case, image, folder)]
    if image.GetDimension() != 3:
        raise ValueError(f"{image_path}: expected a 2D or 3D image, got {image.GetDimension()}D")
    geometry = ImageGeometry.from_sitk(image)
    array = sitk.GetArrayFromImage(image).astype(np.float32)  # (z, y, x)
    vmin, vmax = _window(array)
    sz, sy, sx = geometry.spacing_zyx
    shown = [(n, m) for n, m in entry["metrics"].items() if m["status"] != "TN"]
    if not shown:
        return []
    plt = _pyplot()
    paths = []
    views = (("axial: array[z]", 0, ("x", "y"), sy / sx), ("coronal: array[:, y]", 1, ("x", "z"), sz / sx),
             ("sagittal: array[:, :, x]", 2, ("y", "z"), sz / sy))
    for page, start in enumerate(range(0, len(shown), per_page)):
        rows = shown[start:start + per_page]
        fig, axes = plt.subplots(len(rows), 3, figsize=(10, 3.2 * len(rows)), squeeze=False)
        for row, (name, m) in enumerate(rows):
            ref = None if m["reference_lps"] is None else geometry.world_to_array_index(np.array(m["reference_lps"]))
            pred = None if m["prediction_lps"] is None else geometry.world_to_array_index(np.array(m["prediction_lps"]))
            centre = ref if ref is not None else pred
            slab = np.clip(np.rint(centre), 0, np.array(array.shape) - 1).astype(int)
            err = "" if m["radial_error_mm"] is None else f", error {m['radial_error_mm']:.2f} mm"
            for col, (title, axis, (hname, vname), aspect) in enumerate(views):
                ax = axes[row, col]
                section = np.take(array, slab[axis], axis=axis)  # remaining axes keep (z, y, x) order
                ax.imshow(section, cmap="gray", vmin=vmin, vmax=vmax, origin="lower", aspect=aspect,
                          interpolation="nearest")
                in_plane = [a for a in range(3) if a != axis]  # (row axis, column axis) of `section`
                for point, style, label in ((ref, dict(marker="+", color="lime", ms=12, mew=2), "reference"),
                                            (pred, dict(marker="x", color="red", ms=9, mew=2), "prediction")):
                    if point is not None:
                        off = abs(point[axis] - slab[axis])
                        ax.plot(point[in_plane[1]], point[in_plane[0]], ls="none", alpha=1.0 if off < 1.5 else 0.45,
                                label=f"{label}" + ("" if off < 1.5 else f" ({off:.0f} slices off)"), **style)
                ax.set_title(f"{name} [{m['status']}{err}]\n{title}={slab[axis]}" if col == 0
                             else f"{title}={slab[axis]}", fontsize=8)
                ax.set_xlabel(f"array {hname}", fontsize=7)
                ax.set_ylabel(f"array {vname}", fontsize=7)
                ax.tick_params(labelsize=6)
                if col == 2:
                    ax.legend(fontsize=6, loc="upper right")
        fig.suptitle(f"{case}: reference (+ green) vs prediction (x red)", fontsize=10)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / len(rows) / 3.2))  # room for the suptitle
        paths.append(_save(fig, Path(folder) / f"{case}_slices_{page + 1:02d}.png"))
    return paths


def plot_case_image_2d(entry: dict, case: str, image, folder) -> Path:
    """A 2D image (X-ray) whole, every landmark's reference and prediction on it, joined by a line."""
    from nnlandmark_h3de.landmarks.geometry import ImageGeometry
    import SimpleITK as sitk

    geometry = ImageGeometry.from_sitk(image)
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    if array.ndim == 3:  # a vector (RGB) image: its mean
        array = array.mean(-1)
    vmin, vmax = _window(array)
    sy, sx = geometry.spacing_zyx[1:]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 7 * array.shape[0] * sy / max(1.0, array.shape[1] * sx)))
    ax.imshow(array, cmap="gray", vmin=vmin, vmax=vmax, aspect=sy / sx, interpolation="nearest")
    for i, (name, m) in enumerate(entry["metrics"].items()):
        pts = [None if m[k] is None else geometry.world_to_array_index(np.array(m[k]))
               for k in ("reference_lps", "prediction_lps")]
        if pts[0] is not None and pts[1] is not None:
            ax.plot([pts[0][2], pts[1][2]], [pts[0][1], pts[1][1]], color="yellow", lw=0.8)
        for point, style in zip(pts, (dict(marker="+", color="lime", ms=10, mew=2),
                                      dict(marker="x", color="red", ms=8, mew=2))):
            if point is not None:
                ax.plot(point[2], point[1], ls="none", **style, label=None if i else
                        ("reference" if style["color"] == "lime" else "prediction"))
        anchor = pts[0] if pts[0] is not None else pts[1]
        if anchor is not None:
            ax.annotate(f"{name} [{m['status']}]", (anchor[2], anchor[1]), color="cyan", fontsize=6,
                        xytext=(4, 4), textcoords="offset points")
    ax.set_title(f"{case}: reference (+ green) vs prediction (x red)", fontsize=9)
    ax.set_xlabel("array x", fontsize=7)
    ax.set_ylabel("array y", fontsize=7)
    ax.legend(fontsize=6, loc="upper right")
    return _save(fig, Path(folder) / f"{case}_image.png")


def write_plots(summary: dict, folder, case: Optional[str] = None, image=None) -> List[Path]:
    """All plots into `folder`; the slice pages only when an image is given."""
    folder = Path(folder)
    if image is not None and case is None:
        cases = [e["case"] for e in summary["metric_per_case"]]
        if len(cases) != 1:
            raise ValueError(f"{image}: name the case it shows (--case), one of {cases}")
        case = cases[0]
    if case is not None and image is None:
        raise ValueError(f"case {case!r}: slices need the case's image (--image)")
    evaluated = [e["case"] for e in summary["metric_per_case"]]
    if case is not None and case not in evaluated:
        raise ValueError(f"case {case!r} is not among the evaluated cases {evaluated}")
    paths = [plot_cumulative_errors(summary, folder / "cumulative_error.png"),
             plot_error_boxplot(summary, folder / "error_boxplot.png")]
    if image is not None:
        paths += plot_case_slices(summary, case, image, folder)
    return paths
