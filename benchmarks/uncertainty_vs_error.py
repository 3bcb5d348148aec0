"""Does the per-landmark uncertainty that nnLandmark_predict writes rank the real errors?

Predicts held-out cases with a trained model three times: the calibrated uncertainty (the default:
fold_X/landmark_uncertainty.json from the final validation), the spread of the test-time mirrors'
(and folds') peaks, and without mirroring the heatmap width; evaluates each against the exact
landmarks and prints Spearman's rho between uncertainty and radial error over the true positives
(the `uncertainty_vs_error` block of summary.json), pooled and within landmarks.

    python benchmarks/uncertainty_vs_error.py -m MODEL_FOLDER --phantoms 16 --seed 1 [--json]
    python benchmarks/uncertainty_vs_error.py -m MODEL_FOLDER --images DIR --landmarks DIR

MODEL_FOLDER is nnU-Net's trained model folder (e.g. the one `nnLandmark_demo` leaves in
OUTPUT/nnUNet_results/...; for the demo's budget trainer also add OUTPUT/trainers to
nnUNet_extTrainer); phantoms are generated like the demo's (same size and spacing).
"""
import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BIN = Path(sys.executable).parent


def run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def _fmt(x):
    return "n/a" if x is None else f"{x:.3g}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", required=True, help="trained model folder")
    ap.add_argument("-f", nargs="+", default=["0"], help="folds")
    ap.add_argument("--images", help="folder of images (<case>.nii.gz) instead of generated phantoms")
    ap.add_argument("--landmarks", help="folder of reference landmark files matching --images")
    ap.add_argument("--phantoms", type=int, default=16, help="number of generated phantoms")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--shape", type=int, nargs=3, default=(40, 40, 40))
    ap.add_argument("--spacing", type=float, nargs=3, default=(3.2, 3.2, 3.2))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="unc_vs_err_"))
    try:
        if args.images:
            images, refs = Path(args.images), Path(args.landmarks)
            cases = {p.name.split(".")[0]: p for p in images.iterdir() if p.is_file()}
        else:
            from nnlandmark_h3de.demo.phantoms import generate_phantom_cases
            gen = generate_phantom_cases(work / "phantoms", args.phantoms, shape=tuple(args.shape),
                                         spacing=tuple(args.spacing), seed=args.seed, absent_fraction=0.1,
                                         oblique_deg=10.0, case_prefix="heldout", progress=False)
            cases = {c: Path(img) for c, (img, _) in gen.items()}
            refs = work / "phantoms" / "landmarks"
        inp = work / "input"
        inp.mkdir()
        for case, img in cases.items():
            shutil.copy(img, inp / f"{case}_0000.nii.gz")
        result = {}
        modes = (("calibrated", []), ("tta_spread", ["--uncertainty", "spread"]),
                 ("heatmap_width", ["--disable_tta", "--uncertainty", "spread"]))
        for mode, extra in modes:
            out = work / mode
            run([str(BIN / "nnLandmark_predict"), "-i", str(inp), "-o", str(out), "-m", args.m,
                 "-f", *args.f, "-device", "cpu", "-npp", "0", "--disable_progress_bar", *extra])
            run([str(BIN / "nnLandmark_evaluate"), "-ref", str(refs), "-pred", str(out), "-o", str(out / "summary.json")])
            s = json.loads((out / "summary.json").read_text())
            corr = s["uncertainty_vs_error"] or {}
            result[mode] = {"spearman_rho": corr.get("spearman_rho"), "p_value": corr.get("p_value"),
                            "within_landmark_spearman_rho": corr.get("within_landmark_spearman_rho"),
                            "n_points": corr.get("n_points"),
                            "mre_mm": s["foreground_mean"]["micro"]["mean_radial_error_mm"]}
            print(f"{mode:>14}: Spearman rho(uncertainty, error) = {_fmt(corr.get('spearman_rho'))} "
                  f"(p = {_fmt(corr.get('p_value'))}, n = {corr.get('n_points')}), within landmarks "
                  f"{_fmt(corr.get('within_landmark_spearman_rho'))}; MRE {result[mode]['mre_mm']:.2f} mm")
        if args.json:
            print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
