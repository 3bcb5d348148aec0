"""Torch CPU threads sized to the CPUs this process may really run on.

nnU-Net's entry points call `torch.set_num_threads(multiprocessing.cpu_count())`, the machine's
count. Under taskset or a cgroup cpuset (containers, Slurm) only the affinity mask's CPUs exist;
OpenMP threads beyond them time-share cores and spin-wait, which makes CPU training and inference
many times slower. One helper for the trainer and `nnLandmark_predict`.
"""
from __future__ import annotations

import os

import torch

__all__ = ["usable_cpu_count", "limit_torch_threads"]


def usable_cpu_count() -> int:
    """CPUs this process may run on: the affinity mask where the OS has one, else the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def limit_torch_threads() -> int:
    """Cap torch's intra-op threads at the usable CPUs; a lower setting (OMP_NUM_THREADS, a test's
    choice) is kept. Returns the number set."""
    n = max(1, min(torch.get_num_threads(), usable_cpu_count()))
    torch.set_num_threads(n)
    return n
