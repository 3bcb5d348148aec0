"""nnLandmark_oneshot: one labelled image + a folder of unlabelled images -> a pseudo-labelled nnU-Net raw dataset.

    nnLandmark_oneshot -t TEMPLATE_IMAGE -l TEMPLATE_LANDMARKS -u UNLABELLED_FOLDER -d ID -n NAME
                       --method registration [--deformable demons|none] [--min_confidence C]
                       | --method cc2d --ssl_model MODEL_FOLDER
                       [--template_copies K] [--seed S] [-o OUTPUT_ROOT] [--overwrite]

A method turns the template's landmarks into per-case pseudo-labels with a confidence per landmark
(oneshot/pseudo_labels.py); `write_pseudo_label_dataset` writes them (points under
--min_confidence absent), the template and K re-posed copies of it, through the converter, with
pseudo_labels.json beside landmarks.json. Then plan, train and predict as usual.

Methods live in the table `METHODS`: a name -> `OneShotMethod(help, add_arguments, run)`. A new
method is one more entry: `add_arguments(group)` adds its own options, `run(args, template_image,
template_landmarks, images)` returns {case: PseudoLabels} for the images it could label (and
reports those it could not). `--method` offers exactly the table's names.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

PROG = "nnLandmark_oneshot"


@dataclass(frozen=True)
class OneShotMethod:
    help: str
    add_arguments: Callable[[argparse._ArgumentGroup], None]
    run: Callable[..., Dict[str, "PseudoLabels"]]  # noqa: F821  (args, template_image, template_landmarks, images)


# ------------------------------------------------------------------------------ registration
def _registration_arguments(g) -> None:
    from nnlandmark_h3de.oneshot.registration_labels import DEFORMABLE_CHOICES
    g.add_argument("--deformable", choices=DEFORMABLE_CHOICES, default="demons",
                   help="deformable stage after the affine one: demons on a coarse grid, or none (default: demons)")
    g.add_argument("--registration_spacing_mm", type=float, default=None,
                   help="isotropic grid of the affine registration in mm (default: 4 for volumes; for 2D images "
                        "the longest extent / 128, at least the pixel spacing)")
    g.add_argument("--patch_radius_mm", type=float, default=10.0,
                   help="half-size of the neighbourhood whose local correlation gives the confidence (default: 10)")


def _registration_run(args, template_image, template_landmarks, images) -> Dict[str, "PseudoLabels"]:  # noqa: F821
    from nnlandmark_h3de.oneshot.registration_labels import registration_pseudo_labels
    return registration_pseudo_labels(template_image, template_landmarks, images, deformable=args.deformable,
                                      spacing_mm=args.registration_spacing_mm, patch_radius_mm=args.patch_radius_mm,
                                      seed=args.seed, on_error="raise" if args.stop_on_failure else "warn",
                                      pixel_spacing=args.spacing)


# ------------------------------------------------------------------------------------ cc2d
def _cc2d_arguments(g) -> None:
    g.add_argument("--ssl_model", default=None,
                   help="trained self-supervised model folder (nnUNetv2_train ... -tr nnLandmarkSelfSupervisedTrainer "
                        "on a dataset of the template and the unlabelled images; README 'One labelled image')")
    g.add_argument("--ssl_fold", default="0", help="fold of --ssl_model (default: 0)")
    g.add_argument("--ssl_device", default="cpu", help="device for the feature network (default: cpu)")


def _cc2d_run(args, template_image, template_landmarks, images) -> Dict[str, "PseudoLabels"]:  # noqa: F821
    from nnlandmark_h3de.oneshot.feature_matching import cc2d_pseudo_labels
    from nnlandmark_h3de.oneshot.pseudo_labels import OneShotError, PseudoLabels
    if args.spacing is not None:
        raise OneShotError("--method cc2d reads images the way its nnU-Net model does: convert 2D pictures first "
                           "(nnLandmark_convert --spacing) and give the converted images, without --spacing")
    if args.ssl_model is None or not Path(args.ssl_model).is_dir():
        raise OneShotError(f"--method cc2d needs --ssl_model, a trained self-supervised model folder "
                           f"(got {args.ssl_model})")
    fold = int(args.ssl_fold) if str(args.ssl_fold).isdigit() else args.ssl_fold
    matched = cc2d_pseudo_labels(args.ssl_model, args.template_image, template_landmarks, images, fold=fold,
                                 device=args.ssl_device)
    return {c: PseudoLabels(ls, np.where(ls.present, conf, 0.0), "cc2d", {"ssl_model": str(args.ssl_model)})
            for c, (ls, conf) in matched.items()}


METHODS: Dict[str, OneShotMethod] = {
    "cc2d": OneShotMethod(
        help="match the template's self-supervised features (CC2D, coarse to fine) in each image; confidence = "
             "the cosine similarity of the match; needs --ssl_model",
        add_arguments=_cc2d_arguments, run=_cc2d_run),
    "registration": OneShotMethod(
        help="register the template to each image (affine, refined, + optional demons; SimpleITK); confidence "
             "= local correlation of the landmark's neighbourhoods",
        add_arguments=_registration_arguments, run=_registration_run),
}


# ------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    from nnlandmark_h3de.oneshot.pseudo_dataset import DEFAULT_MIN_CONFIDENCE
    p = argparse.ArgumentParser(
        prog=PROG,
        description="One-shot landmark detection: pseudo-label a folder of unlabelled 3D or 2D images from ONE "
                    "labelled image (the template) and write an nnU-Net raw dataset DatasetXXX_NAME (pseudo-labelled cases, "
                    "the template and re-posed copies of it; pseudo_labels.json beside landmarks.json). Then "
                    "nnUNetv2_plan_and_preprocess / nnUNetv2_train as usual.")
    p.add_argument("-t", "--template_image", required=True,
                   help="the labelled image (3D or 2D .nii.gz .nii .nrrd .mha; 2D .png .bmp .tif .jpg with --spacing)")
    p.add_argument("-l", "--template_landmarks", required=True,
                   help="its landmark file (.mrk.json .fcsv .csv .json; world LPS/RAS as the format says)")
    p.add_argument("-u", "--unlabelled", required=True,
                   help="folder of unlabelled images (the template's dimension: 3D, or 2D X-rays)")
    p.add_argument("--spacing", nargs="+", type=float, default=None, metavar=("SX", "SY"),
                   help="2D images: pixel spacing in mm (x, then y; one value for square pixels), required for "
                        "PNG/BMP/TIFF/JPEG pictures, replaces a 2D NIfTI's own; as nnLandmark_convert --spacing")
    p.add_argument("-d", "--dataset_id", required=True, type=int, help="nnU-Net dataset id (1..999)")
    p.add_argument("-n", "--dataset_name", required=True, help="dataset name (letters, digits, _ or -)")
    p.add_argument("-o", "--output_root", default=None, help="parent folder of the dataset (default: $nnUNet_raw)")
    p.add_argument("--method", required=True, choices=sorted(METHODS),
                   help="pseudo-labelling method: " + "; ".join(f"{k}: {m.help}" for k, m in METHODS.items()))
    p.add_argument("--min_confidence", type=float, default=DEFAULT_MIN_CONFIDENCE,
                   help="pseudo-labels with a lower confidence (0..1) are written absent, not wrong "
                        f"(default: {DEFAULT_MIN_CONFIDENCE})")
    p.add_argument("--template_copies", type=int, default=10,
                   help="re-posed copies of the template, with exact landmarks, added to the dataset (default: 10)")
    p.add_argument("--seed", type=int, default=0, help="random seed (template copies, registration sampling)")
    p.add_argument("--stop_on_failure", action="store_true",
                   help="stop at the first image that cannot be pseudo-labelled (default: skip it; skipped images "
                        "are listed in a warning and in the summary)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    for name, m in METHODS.items():
        m.add_arguments(p.add_argument_group(f"--method {name}"))
    return p


def main(argv: Optional[List[str]] = None) -> int:
    from nnlandmark_h3de.cli.warning_format import run_with_short_warnings
    return run_with_short_warnings(PROG, lambda: _run(build_parser().parse_args(argv)))


def _unlabelled_images(folder, template_image) -> Dict[str, Path]:
    """Case -> image file of the unlabelled folder, without the template (if it lies there too)."""
    from nnlandmark_h3de.conversion.case_matching import IMAGE_SUFFIXES, list_cases
    from nnlandmark_h3de.oneshot.pseudo_labels import OneShotError
    images = list_cases(folder, IMAGE_SUFFIXES, "unlabelled image")
    template = Path(template_image).resolve()
    images = {c: f for c, f in images.items() if f.resolve() != template}
    if not images:
        raise OneShotError(f"{folder}: no unlabelled image (expected {', '.join(IMAGE_SUFFIXES)} files)")
    return images


def _summary(folder: Path, failed: List[str]) -> str:
    from nnlandmark_h3de.oneshot.pseudo_labels import PSEUDO_LABELS_FILE, read_pseudo_labels_file
    header, pseudo = read_pseudo_labels_file(folder / PSEUDO_LABELS_FILE)
    thr = float(header["min_confidence"])
    lines = [f"Wrote {folder}: {len(pseudo)} cases, {len(next(iter(pseudo.values())).names)} landmarks, "
             f"min_confidence {thr}"]
    by_method: Dict[str, list] = {}
    for p in pseudo.values():
        by_method.setdefault(p.method, []).append(p)
    for method, ps in by_method.items():
        kept = sum(int(p.kept_mask(thr).sum()) for p in ps)
        total = sum(len(p.names) for p in ps)
        conf = np.concatenate([p.confidence[p.landmarks.present] for p in ps])
        mean = f"{conf.mean():.3f}" if conf.size else "n/a"
        lines.append(f"  {method}: {len(ps)} case(s), landmarks kept {kept}, absent {total - kept}, "
                     f"mean confidence {mean}")
    if header.get("dropped_cases"):
        lines.append(f"  left out (no landmark at or above {thr}): {header['dropped_cases']}")
    if failed:
        lines.append(f"  skipped (could not be pseudo-labelled): {failed}")
    return "\n".join(lines)


def _run(args) -> int:
    from nnlandmark_h3de.conversion import ConversionError, ConversionWarning
    from nnlandmark_h3de.conversion.raw_dataset import resolve_output_folder, dataset_folder_name
    from nnlandmark_h3de.landmarks.landmark_set import LandmarkError
    from nnlandmark_h3de.oneshot.pseudo_dataset import write_pseudo_label_dataset
    from nnlandmark_h3de.oneshot.pseudo_labels import OneShotWarning, read_template

    warnings.simplefilter("always", ConversionWarning)
    warnings.simplefilter("always", OneShotWarning)
    method = METHODS[args.method]
    if not 0.0 <= args.min_confidence <= 1.0:
        raise SystemExit(f"{PROG}: error: --min_confidence must be in [0, 1], got {args.min_confidence}")
    if args.template_copies < 0 or args.seed < 0:
        raise SystemExit(f"{PROG}: error: --template_copies and --seed must be >= 0")
    try:
        if args.output_root:
            target = Path(args.output_root) / dataset_folder_name(args.dataset_id, args.dataset_name)
        else:
            target = (args.dataset_id, args.dataset_name)
        target = resolve_output_folder(target, None, None, args.overwrite)  # fail before any registration
        template_image, template_ls = read_template(args.template_image, args.template_landmarks, args.spacing)
        images = _unlabelled_images(args.unlabelled, args.template_image)
        pseudo = method.run(args, template_image, template_ls, images)
        failed = sorted(set(images) - set(pseudo))
        folder = write_pseudo_label_dataset(
            args.template_image, args.template_landmarks, {c: (images[c], p) for c, p in pseudo.items()}, target,
            min_confidence=args.min_confidence, template_copies=args.template_copies, seed=args.seed,
            overwrite=args.overwrite, header={"failed_cases": failed},
            convert_options={"spacing": args.spacing} if args.spacing is not None else None)
    except (ConversionError, LandmarkError) as e:  # OneShotError is a LandmarkError
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    print(_summary(folder, failed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
