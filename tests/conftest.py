"""Shared fixtures: isolated nnU-Net folders, the shared AFIDs templates, small threads."""
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]
AFIDS_DIR = Path(os.environ.get("NNLANDMARK_AFIDS_DIR", REPO.parent / "shared" / "data" / "afids-templates"))


@pytest.fixture
def nnunet_env(tmp_path, monkeypatch):
    """nnUNet_raw/preprocessed/results in tmp, single-process augmentation, our trainer folder."""
    from nnlandmark_h3de.training.trainer_folder import trainer_folder

    paths = {}
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        p = tmp_path / name
        p.mkdir()
        monkeypatch.setenv(name, str(p))
        paths[name] = p
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    monkeypatch.setenv("nnUNet_compile", "false")
    monkeypatch.setenv("nnUNet_extTrainer", str(trainer_folder()))
    return paths


@pytest.fixture(scope="session")
def afids_dir():
    if not (AFIDS_DIR / "images").is_dir():
        pytest.skip(f"AFIDs templates not found at {AFIDS_DIR} (set NNLANDMARK_AFIDS_DIR)")
    return AFIDS_DIR


@pytest.fixture
def one_torch_thread():
    """Tiny tensors: one thread avoids OpenMP spin-waiting on a shared, loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
