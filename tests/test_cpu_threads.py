"""One torch-threads rule for training and prediction: the CPUs this process may run on."""
import os

import pytest
import torch

from nnlandmark_h3de.utilities import cpu_threads


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_usable_cpus_follow_the_affinity_mask_not_the_machine(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 5}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert cpu_threads.usable_cpu_count() == 2


def test_without_affinity_support_the_machine_count_is_used(monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert cpu_threads.usable_cpu_count() == 6


def test_torch_threads_capped_at_the_mask_and_lower_settings_kept(monkeypatch, restore_threads):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    torch.set_num_threads(2)  # what nnUNetv2_train / nnUNetv2_predict set from cpu_count()
    assert cpu_threads.limit_torch_threads() == 1 and torch.get_num_threads() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert cpu_threads.limit_torch_threads() == 1  # a lower setting (OMP_NUM_THREADS, a test) stays


def test_predict_cli_uses_the_helper(monkeypatch, tmp_path):
    """nnLandmark_predict -device cpu sets threads through the helper, not cpu_count()."""
    from nnlandmark_h3de.cli import predict

    calls = []
    monkeypatch.setattr(cpu_threads, "limit_torch_threads", lambda: calls.append(1) or 1)
    with pytest.raises(FileNotFoundError, match="dataset.json"):  # no model there: fails after the thread setup
        predict.main(["-i", str(tmp_path), "-o", str(tmp_path / "o"), "-m", str(tmp_path / "none"),
                      "-device", "cpu", "-f", "0"])
    assert calls == [1]
