"""`nnLandmark_add_small_config`: add a small (CPU-friendly) configuration to a dataset's plans."""
import argparse
import sys
from pathlib import Path


def main(argv=None):
    p = argparse.ArgumentParser(description="Add a configuration that inherits from 3d_fullres with a smaller "
                                            "patch and fewer features to $nnUNet_preprocessed/DatasetXXX/PLANS.json.")
    p.add_argument("-d", "--dataset", required=True, help="dataset id or name (DatasetXXX_Name)")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("--name", default="3d_fullres_small", help="new configuration name (default 3d_fullres_small)")
    p.add_argument("--base", default="3d_fullres", help="configuration to inherit from (default 3d_fullres)")
    p.add_argument("--patch_size", type=int, nargs="+", default=None,
                   help="patch size per axis (default: the base's, capped at 64 per axis)")
    # CPU defaults: 8..64 features, what the demo and the AFIDs benchmark train (README, "CPU path")
    p.add_argument("--base_features", type=int, default=8, help="features of the first stage (default 8)")
    p.add_argument("--max_features", type=int, default=64, help="feature cap (default 64)")
    p.add_argument("--batch_size", type=int, default=2, help="batch size (default 2)")
    p.add_argument("--spacing", type=float, nargs="+", default=None,
                   help="target spacing in mm per axis, in the plans' axis order (default: the base's); a new spacing needs "
                        "`nnUNetv2_preprocess -d D -c NAME` afterwards")
    p.add_argument("--whole_image", action="store_true",
                   help="choose the spacing at which the median image fits one patch (--patch_size, default 64 per "
                        "axis): a whole-image configuration for a learned global stage (two-stage prediction)")
    args = p.parse_args(argv)
    if args.whole_image and args.spacing is not None:
        sys.exit("nnLandmark_add_small_config: --whole_image chooses the spacing; do not also give --spacing")

    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    import json
    from nnlandmark_h3de.planning.small_configuration import DEFAULT_MAX_PATCH, add_small_configuration, whole_image_spacing

    if not nnUNet_preprocessed.is_set():
        sys.exit("nnUNet_preprocessed is not set")
    try:
        dataset = maybe_convert_to_dataset_name(args.dataset)
    except RuntimeError as e:
        sys.exit(str(e))
    plans_file = Path(nnUNet_preprocessed.get()) / dataset / f"{args.plans}.json"
    try:
        if args.whole_image:
            if not plans_file.is_file():
                raise FileNotFoundError(f"{plans_file}: plans file not found (run nnUNetv2_plan_and_preprocess first)")
            plans = json.loads(plans_file.read_text(encoding="utf-8"))
            n_axes = len(plans["configurations"].get(args.base, {}).get("spacing") or [0, 0, 0])
            args.patch_size = args.patch_size or [DEFAULT_MAX_PATCH] * n_axes
            args.spacing = whole_image_spacing(plans, args.patch_size, args.base)
        entry = add_small_configuration(plans_file, name=args.name, base=args.base, patch_size=args.patch_size,
                                        base_features=args.base_features, max_features=args.max_features,
                                        batch_size=args.batch_size, spacing=args.spacing)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"nnLandmark_add_small_config: {e}")
    kw = entry["architecture"]["arch_kwargs"]
    print(f"{plans_file}: configuration {args.name!r} (inherits {args.base!r}): patch {entry['patch_size']}, "
          f"batch {entry['batch_size']}, {kw['n_stages']} stages, features {kw['features_per_stage']}")
    if args.spacing is not None:
        print(f"spacing {entry['spacing']} mm: now run nnUNetv2_preprocess -d {args.dataset} -c {args.name}")


if __name__ == "__main__":
    main()
