"""Which axes test-time mirroring may flip for one case, and which flip swaps the pair channels.

Flipping a case along its patient left/right axis turns every left landmark into a right one, so
in such a mirror the network's "L0" channel shows R0: the pair channels must be swapped before the
mirrors are averaged. Which array axis is left/right is a property of each case (its direction and
the plans' transpose_forward), not of the training cases the trainer looked at, so it is read per
case (`nnlandmark_h3de.heatmaps.left_right_axis`). When it cannot be told (no SimpleITK geometry,
an oblique direction) and the dataset has pairs, the case is not mirrored at all.

The mirrors' logits are summed as they come (`add_on_one_device`), on one device whatever nnU-Net's
sliding window returned: after a device out-of-memory it gives its logits on the CPU.
"""
from __future__ import annotations

import contextlib
import io
import itertools
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from nnlandmark_h3de.heatmaps import left_right_axis

__all__ = ["CaseMirroring", "case_mirroring", "mirrors_left_right_at_inference", "logit_channel_permutation",
           "mirror_combos", "add_on_one_device"]


@dataclass(frozen=True)
class CaseMirroring:
    axes: Tuple[int, ...]  # spatial axes to mirror for this case
    swap_axis: Optional[int]  # a mirror that flips this axis swaps the pair channels
    note: Optional[str] = None  # why mirroring was reduced, for the log


def case_mirroring(allowed_axes: Optional[Sequence[int]], properties: Optional[dict], transpose_forward: Sequence[int],
                   has_pairs: bool, add_left_right: bool = False, first_patch_axis: int = 0) -> CaseMirroring:
    """The mirroring plan of one case from the model's allowed axes and the case's own properties.
    `add_left_right`: also mirror the case's own left/right array axis (pair channels swapped) when it is
    known, the dataset has pairs and it is a patch axis (>= `first_patch_axis`; a 2D model's slice axis is
    not): for models trained with that mirror, whose checkpoint leaves it out for nnU-Net's stock predictor."""
    axes = tuple(allowed_axes or ())
    lr = left_right_axis(properties, transpose_forward) if has_pairs and properties and (axes or add_left_right) \
        else None
    if add_left_right and lr is not None and lr >= first_patch_axis and lr not in axes:
        axes = tuple(sorted(axes + (lr,)))
    if not axes or not has_pairs:
        return CaseMirroring(axes, None)  # nothing to swap: midline landmarks stay what they are
    if lr is None:
        return CaseMirroring((), None, "test-time mirroring off for this case: its left/right array axis is unknown "
                                       "(no SimpleITK geometry or an oblique direction), so the pair channels "
                                       "could not be swapped")
    return CaseMirroring(axes, lr if lr in axes else None)


def logit_channel_permutation(pair_permutation: Sequence[int]) -> list:
    """Channel order of a left/right-flipped output: channel 0 (constant zero) stays, landmark channel
    1 + i takes 1 + p[i]."""
    return [0] + [1 + p for p in pair_permutation]


def mirror_combos(plan: CaseMirroring) -> list:
    """Every subset of the case's mirroring axes, the identity first."""
    return [c for k in range(len(plan.axes) + 1) for c in itertools.combinations(plan.axes, k)]


def add_on_one_device(total: Optional[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """The running fp32 sum of the mirrors' logits plus one more mirror's (`total` None: the first).

    nnU-Net's sliding window returns fp16 logits on the device, or on the CPU after it ran out of device
    memory, so one mirror's logits may lie elsewhere than the sum: then both go to the CPU (the
    fallback says the device is short of memory). The sum is updated in place where it can be."""
    if total is None:
        return out.float().clone() if out.dtype == torch.float32 else out.float()
    if out.device != total.device:
        cpu = torch.device("cpu")
        total, out = total.to(cpu), out.to(cpu)
    return total.add_(out)


def mirrors_left_right_at_inference(trainer_name: Optional[str]) -> bool:
    """Whether the model's trainer asks for the left/right test-time mirror (pair-swapped per case), which
    its checkpoint cannot say: nnU-Net's stock predictor would flip without swapping the pairs."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    try:  # nnU-Net has just found (and announced) this class to build the network: look it up quietly
        with contextlib.redirect_stdout(io.StringIO()):
            trainer_class = recursive_find_trainer_class_by_name(trainer_name) if trainer_name else None
    except (RuntimeError, ImportError):  # not found here although nnU-Net built the network with it
        return False
    return bool(getattr(trainer_class, "mirror_left_right_at_inference", False))
