"""Train any nnU-Net trainer for a wall-clock budget instead of a fixed epoch count.

The demo and the benchmark promise a run time, but the time per step on a shared CPU is unknown
in advance. `TrainingBudget` is a mixin placed in front of a trainer class: epochs are short
(few iterations), and after every epoch the run stops once the budget is spent (or the epoch cap
is reached), then finishes exactly as a normal run does (`on_train_end`: final checkpoint), so
nnU-Net's final validation and `nnUNetv2_predict -tr <name>` work unchanged.

The learning-rate schedule runs on the budget, not on the nominal epoch count the run never
reaches: at the start of every epoch the base trainer's own scheduler is stepped with the epoch it
would be at if the elapsed fraction of the budget were the fraction of `num_epochs` done (or the
real epoch, when the epoch cap comes first). The schedule keeps its shape, so nnLandmarkTrainer's
step decay x0.1 falls at 80 % of the budget and nnU-Net's poly schedule becomes poly in elapsed time.

nnU-Net finds trainers by class name in the `nnUNet_extTrainer` folders, so
`write_budget_trainer` writes a three-line shim module defining the named subclass.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from nnlandmark_h3de.landmarks.atomic import atomic_write_text


class _BudgetReached(Exception):
    pass


class _ScheduleOnBudget:
    """The base trainer's scheduler, stepped with the budget's epoch instead of nnU-Net's epoch."""

    def __init__(self, scheduler, budget_epoch):
        self._scheduler = scheduler
        self._budget_epoch = budget_epoch

    def step(self, current_step=None):
        return self._scheduler.step(self._budget_epoch(current_step))

    def __getattr__(self, name):  # only called for names not set here
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._scheduler, name)


class TrainingBudget:
    """Mixin: `class T(TrainingBudget, SomeTrainer)` with the class attributes below set."""
    budget_seconds: float = 60.0
    budget_max_epochs: int = 1000
    budget_iterations_per_epoch: int = 10
    budget_val_iterations_per_epoch: int = 2
    clock = staticmethod(time.monotonic)  # seconds; a test substitutes a fake clock

    # Same signature as nnUNetTrainer.__init__: nnU-Net records the arguments by inspecting it.
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(self.budget_max_epochs)
        self.num_iterations_per_epoch = int(self.budget_iterations_per_epoch)
        self.num_val_iterations_per_epoch = int(self.budget_val_iterations_per_epoch)
        self._budget_deadline = None

    def configure_optimizers(self):
        optimizer, scheduler = super().configure_optimizers()
        return optimizer, _ScheduleOnBudget(scheduler, self.budget_epoch)

    def budget_epoch(self, epoch=None) -> int:
        """The epoch of a `num_epochs` run at the budget's elapsed fraction (the real epoch if larger):
        what the learning-rate schedule is stepped with."""
        epoch = self.current_epoch if epoch is None else int(epoch)
        if self._budget_deadline is None:
            return epoch
        elapsed = float(self.budget_seconds) - (self._budget_deadline - self.clock())
        fraction = min(1.0, max(0.0, elapsed / max(float(self.budget_seconds), 1e-9)))
        return min(self.num_epochs - 1, max(epoch, int(fraction * self.num_epochs)))

    def on_train_start(self):
        super().on_train_start()
        self._budget_deadline = self.clock() + float(self.budget_seconds)

    def on_epoch_end(self):
        super().on_epoch_end()  # increments current_epoch
        out_of_time = self._budget_deadline is not None and self.clock() >= self._budget_deadline
        if out_of_time and self.current_epoch < self.num_epochs:
            self.print_to_log_file(f"training budget of {self.budget_seconds:.0f} s reached after "
                                   f"{self.current_epoch} epochs; finishing")
            raise _BudgetReached()

    def run_training(self):
        try:
            super().run_training()
        except _BudgetReached:
            self.on_train_end()


def budget_trainer_name(base_name: str, seconds: float) -> str:
    return f"{base_name}_budget{int(round(seconds))}s"  # no "__": nnU-Net splits folder names on it


def write_budget_trainer(folder, base_name: str, seconds: float, max_epochs: int = 1000,
                         iterations_per_epoch: int = 10, val_iterations_per_epoch: int = 2,
                         attributes: Optional[dict] = None) -> str:
    """Write `<folder>/<name>.py` defining a budgeted subclass of trainer `base_name`; returns the
    class name. The base is looked up the way nnU-Net does (its own trainers, then nnUNet_extTrainer).
    `attributes`: more class attributes (plain Python literals), e.g. {"existence_training_cases": 1}."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    try:
        base = recursive_find_trainer_class_by_name(base_name)
    except (RuntimeError, AssertionError) as e:
        raise RuntimeError(f"trainer {base_name!r} not found (is nnUNet_extTrainer set to "
                           f"`nnLandmark_trainer_path`?): {e}") from None
    module = base.__module__
    if "." not in module:
        raise RuntimeError(f"trainer {base_name!r} is defined in the top-level module {module!r} (a file in "
                           f"nnUNet_extTrainer), which other modules cannot import; define it in a package")
    name = budget_trainer_name(base_name, seconds)
    source = (
        f'"""Generated: {base_name} stopped after {seconds:.0f} s of training (nnlandmark_h3de.demo.budget_trainer)."""\n'
        f"from nnlandmark_h3de.demo.budget_trainer import TrainingBudget\n"
        f"from {module} import {base.__name__} as _Base\n\n\n"
        f"class {name}(TrainingBudget, _Base):\n"
        f"    budget_seconds = {float(seconds)!r}\n"
        f"    budget_max_epochs = {int(max_epochs)}\n"
        f"    budget_iterations_per_epoch = {int(iterations_per_epoch)}\n"
        f"    budget_val_iterations_per_epoch = {int(val_iterations_per_epoch)}\n"
    ) + "".join(f"    {k} = {v!r}\n" for k, v in (attributes or {}).items())
    atomic_write_text(Path(folder) / f"{name}.py", source)
    return name
