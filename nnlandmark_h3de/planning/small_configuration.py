"""A small, CPU-friendly configuration added to an nnU-Net plans file.

The new configuration `inherits_from` the base one (same preprocessed data, spacing and
normalisation) and replaces only the patch size, batch size and the U-Net topology. Given a
`spacing`, it is a coarser (or finer) configuration with its own `data_identifier`, preprocessed
by `nnUNetv2_preprocess -c NAME`: exact landmark targets make any spacing usable. The topology
(n_stages, strides, kernel sizes) is recomputed for the new patch with nnU-Net's own planner
function, so the network fits the patch exactly as a planned one would.
"""
from __future__ import annotations

import json
from copy import deepcopy
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from nnlandmark_h3de.landmarks.atomic import atomic_write_text

__all__ = ["small_configuration", "add_small_configuration", "DEFAULT_NAME"]

DEFAULT_NAME = "3d_fullres_small"
DEFAULT_MAX_PATCH = 64  # voxels per axis when no patch size is given
MIN_FEATURE_MAP_EDGE = 4  # nnU-Net's UNet_featuremap_min_edge_length


def _resize(values: Sequence, n: int) -> list:
    values = list(values)
    return values[:n] if len(values) >= n else values + [values[-1]] * (n - len(values))


def whole_image_spacing(plans: dict, patch_size: Sequence[int], base: str = "3d_fullres") -> List[float]:
    """The spacing (mm per axis) at which the base's median image fits one patch: one isotropic step,
    the largest median extent / patch ratio over the axes, never finer than the base's own spacing.
    What a learned global stage needs: every landmark in one network input."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    if base not in plans.get("configurations", {}):
        raise ValueError(f"plans have no configuration {base!r} (have {list(plans.get('configurations', {}))})")
    cfg = PlansManager(plans).get_configuration(base)
    extent = np.asarray(cfg.median_image_size_in_voxels, dtype=np.float64) * np.asarray(cfg.spacing, dtype=np.float64)
    patch = np.asarray(patch_size, dtype=np.float64)
    if patch.shape != extent.shape:
        raise ValueError(f"patch size {list(patch_size)} has {len(patch)} axes, configuration {base!r} has {len(extent)}")
    step = float(np.max(extent / patch))
    return [float(max(step, s)) for s in cfg.spacing]


def small_configuration(plans: dict, base: str = "3d_fullres", patch_size: Optional[Sequence[int]] = None,
                        base_features: int = 16, max_features: Optional[int] = None, batch_size: int = 2,
                        spacing: Optional[Sequence[float]] = None, name: str = DEFAULT_NAME) -> dict:
    """The configuration entry (not yet inserted) for `plans`; `spacing` (mm per axis) resamples."""
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    if base not in plans.get("configurations", {}):
        raise ValueError(f"plans have no configuration {base!r} (have {list(plans.get('configurations', {}))})")
    cfg = PlansManager(plans).get_configuration(base)  # resolves the base's own inheritance
    own_spacing = spacing is not None
    spacing = [float(s) for s in spacing] if own_spacing else list(cfg.spacing)
    if len(spacing) != len(cfg.spacing) or min(spacing) <= 0:
        raise ValueError(f"spacing {spacing} must be {len(cfg.spacing)} positive numbers")
    if patch_size is None:
        patch_size = [min(int(p), DEFAULT_MAX_PATCH) for p in cfg.patch_size]
    patch_size = [int(p) for p in patch_size]
    if len(patch_size) != len(spacing):
        raise ValueError(f"patch size {patch_size} has {len(patch_size)} axes, configuration {base!r} has {len(spacing)}")
    if min(patch_size) < 2 * MIN_FEATURE_MAP_EDGE:
        raise ValueError(f"patch size {patch_size} too small (every axis needs >= {2 * MIN_FEATURE_MAP_EDGE})")
    if base_features < 1 or batch_size < 1:
        raise ValueError("base_features and batch_size must be >= 1")
    _, strides, kernel_sizes, patch_size, _ = get_pool_and_conv_props(spacing, patch_size, MIN_FEATURE_MAP_EDGE, 999999)
    n_stages = len(strides)
    architecture = deepcopy(plans["configurations"][base].get("architecture") or
                            {"network_class_name": cfg.network_arch_class_name,
                             "arch_kwargs": dict(cfg.network_arch_init_kwargs),
                             "_kw_requires_import": list(cfg.network_arch_init_kwargs_req_import)})
    kwargs = architecture["arch_kwargs"]
    if max_features is None:
        max_features = max(kwargs["features_per_stage"])
    if max_features < base_features:
        raise ValueError(f"max_features {max_features} < base_features {base_features}")
    kwargs.update({
        "n_stages": n_stages,
        "features_per_stage": [min(base_features * 2 ** i, max_features) for i in range(n_stages)],
        "kernel_sizes": [list(k) for k in kernel_sizes],
        "strides": [list(s) for s in strides],
    })
    for key in ("n_conv_per_stage", "n_blocks_per_stage"):
        if key in kwargs:
            kwargs[key] = _resize(kwargs[key], n_stages)
    if "n_conv_per_stage_decoder" in kwargs:
        kwargs["n_conv_per_stage_decoder"] = _resize(kwargs["n_conv_per_stage_decoder"], n_stages - 1)
    entry = {"inherits_from": base, "patch_size": [int(p) for p in patch_size], "batch_size": int(batch_size),
             "architecture": architecture}
    if own_spacing:
        entry.update({"spacing": spacing, "data_identifier": f"{plans.get('plans_name', 'nnUNetPlans')}_{name}"})
    return entry


def add_small_configuration(plans_file, name: str = DEFAULT_NAME, base: str = "3d_fullres", **kwargs) -> dict:
    """Insert (or replace) configuration `name` in `plans_file`, written atomically; returns it.

    Idempotent: the same arguments give the same file; the file is not rewritten if nothing changes.
    """
    plans_file = Path(plans_file)
    if not plans_file.is_file():
        raise FileNotFoundError(f"{plans_file}: plans file not found (run nnUNetv2_plan_and_preprocess first)")
    plans = json.loads(plans_file.read_text(encoding="utf-8"))
    if name == base:
        raise ValueError(f"the small configuration cannot replace its base {base!r}")
    entry = small_configuration(plans, base=base, name=name, **kwargs)
    if plans["configurations"].get(name) != entry:
        plans["configurations"][name] = entry
        atomic_write_text(plans_file, json.dumps(plans, indent=4) + "\n")
    return entry
