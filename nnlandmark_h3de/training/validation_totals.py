"""Validation totals summed over DDP ranks: the landmark trainers report ratios (radial error per
landmark, matching accuracy per scale) whose numerators and denominators must be summed over every
rank before dividing, like nnU-Net sums its tp/fp/fn."""
from __future__ import annotations

from typing import Tuple

import numpy as np
from torch import distributed as dist

__all__ = ["summed_over_ranks"]


def summed_over_ranks(is_ddp: bool, numerator: np.ndarray, denominator: np.ndarray,
                      losses) -> Tuple[np.ndarray, np.ndarray, float]:
    """(numerator, denominator) summed over the ranks and the mean validation loss of all ranks."""
    if not is_ddp:
        return numerator, denominator, float(np.mean(losses))
    world_size = dist.get_world_size()
    nums, dens, all_losses = [None] * world_size, [None] * world_size, [None] * world_size
    dist.all_gather_object(nums, numerator)
    dist.all_gather_object(dens, denominator)
    dist.all_gather_object(all_losses, losses)
    return np.sum(nums, 0), np.sum(dens, 0), float(np.vstack(all_losses).mean())
