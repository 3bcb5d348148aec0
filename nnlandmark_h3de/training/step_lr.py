"""Step learning-rate schedule driven by nnU-Net's `lr_scheduler.step(current_epoch)` call.

torch's StepLR warns on every `step(epoch)`; nnU-Net always passes the epoch, so this mirrors
nnU-Net's PolyLRScheduler: lr = initial_lr * gamma ** (epoch // step_size).
"""
from __future__ import annotations

from torch.optim.lr_scheduler import _LRScheduler

__all__ = ["StepLRScheduler"]


class StepLRScheduler(_LRScheduler):
    def __init__(self, optimizer, initial_lr: float, step_size: int, gamma: float = 0.1, current_step: int = None):
        if step_size < 1:
            raise ValueError(f"step_size must be >= 1, got {step_size}")
        self.optimizer = optimizer
        self.initial_lr = initial_lr
        self.step_size = int(step_size)
        self.gamma = float(gamma)
        self.ctr = 0
        super().__init__(optimizer, current_step if current_step is not None else -1)

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        new_lr = self.initial_lr * self.gamma ** (int(current_step) // self.step_size)
        for param_group in self.optimizer.param_groups:
            param_group["lr"] = new_lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self):
        return self._last_lr
