"""Warnings printed as `PROG: warning: message`, one line, while a command runs: users read what is
wrong with their files, not the Python file and line that noticed it."""
from __future__ import annotations

import warnings
from typing import Callable

__all__ = ["run_with_short_warnings"]


def run_with_short_warnings(prog: str, run: Callable[[], int]) -> int:
    """`run()` with every warning formatted as one line naming `prog`; the format is restored after."""
    old_format = warnings.formatwarning
    try:
        with warnings.catch_warnings():
            warnings.formatwarning = lambda message, *args, **kwargs: f"{prog}: warning: {message}\n"
            return run()
    finally:
        warnings.formatwarning = old_format
