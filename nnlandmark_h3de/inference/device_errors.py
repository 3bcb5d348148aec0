"""Which errors stop a prediction run instead of failing one case.

Why: the predictor reports a failing case by name and goes on with the next (a corrupt image should
not cost the others). An out-of-memory or a CUDA error is no property of one case: after it every
later case fails the same way (a device-side assert even leaves the CUDA context unusable), so the
run stops at the first one with what to change.
"""
from __future__ import annotations

import torch

__all__ = ["PredictionStopped", "stops_the_run"]

# RuntimeError messages of the accelerator's own failures (torch raises some as plain RuntimeErrors)
_DEVICE_MESSAGES = ("out of memory", "cuda error", "cudnn_status", "cublas_status", "cudnn error",
                    "device-side assert")


def stops_the_run(error: BaseException) -> bool:
    """True for out-of-memory (device or host) and accelerator errors, which every later case would meet too."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    if isinstance(error, getattr(torch, "AcceleratorError", ())):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error).lower() for m in _DEVICE_MESSAGES)


class PredictionStopped(RuntimeError):
    """The run stopped at `case` on an out-of-memory or device error; the message says what to change."""

    def __init__(self, case: str, error: BaseException, n_done: int):
        self.case = case
        first_line = (str(error).strip().splitlines() or [""])[0]
        super().__init__(
            f"prediction stopped at case {case} ({n_done} case(s) written before it): {type(error).__name__}: "
            f"{first_line}\nThis is no fault of the case, every later case would fail the same way. To use less "
            f"memory: fewer preprocessing workers (smaller -npp, e.g. -npp 1; each holds a resampled case in RAM), "
            f"results off the accelerator (--not_on_device), fewer folds (-f 0), without test-time mirroring "
            f"(--disable_tta), or predict on the CPU (-device cpu). After a CUDA error (device-side assert), "
            f"restart the process. Cases already written are kept (--continue_prediction skips them).")
