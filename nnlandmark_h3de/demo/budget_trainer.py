"""Train any nnU-Net trainer for a wall-clock budget instead of a fixed epoch count.

The demo and the benchmark promise a run time, but the time per step on a shared CPU is unknown
in advance. `TrainingBudget` is a mixin placed in front of a trainer class: epochs are short
(few iterations), and after every epoch the run stops once the budget is spent (or the epoch cap
is reached), then finishes exactly as a normal run does (`on_train_end`: final checkpoint), so
nnU-Net's final validation and `nnUNetv2_predict -tr <name>` work unchanged.

nnU-Net finds trainers by class name in the `nnUNet_extTrainer` folders, so
`write_budget_trainer` writes a three-line shim module defining the named subclass.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from nnlandmark_h3de.landmarks.atomic import atomic_write_text


class _BudgetReached(Exception):
    pass


class TrainingBudget:
    """Mixin: `class T(TrainingBudget, SomeTrainer)` with the class attributes below set."""
    budget_seconds: float = 60.0
    budget_max_epochs: int = 1000
    budget_iterations_per_epoch: int = 10
    budget_val_iterations_per_epoch: int = 2

    # Same signature as nnUNetTrainer.__init__: nnU-Net records the arguments by inspecting it.
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(self.budget_max_epochs)
        self.num_iterations_per_epoch = int(self.budget_iterations_per_epoch)
        self.num_val_iterations_per_epoch = int(self.budget_val_iterations_per_epoch)
        self._budget_deadline = None

    def on_train_start(self):
        super().on_train_start()
        self._budget_deadline = time.monotonic() + float(self.budget_seconds)

    def on_epoch_end(self):
        super().on_epoch_end()  # increments current_epoch
        out_of_time = self._budget_deadline is not None and time.monotonic() >= self._budget_deadline
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
                         iterations_per_epoch: int = 10, val_iterations_per_epoch: int = 2) -> str:
    """Write `<folder>/<name>.py` defining a budgeted subclass of trainer `base_name`; returns the
    class name. The base is looked up the way nnU-Net does (its own trainers, then nnUNet_extTrainer)."""
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
    )
    atomic_write_text(Path(folder) / f"{name}.py", source)
    return name
