"""Where the trainer shims live: the folder nnU-Net's `nnUNet_extTrainer` must name."""
import importlib.util
from pathlib import Path

__all__ = ["trainer_folder"]


def trainer_folder() -> Path:
    """Installed copy (nnlandmark_h3de/ext_trainers) or, from a source tree, the repo's trainers/."""
    try:
        spec = importlib.util.find_spec("nnlandmark_h3de.ext_trainers")
    except ModuleNotFoundError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0]).resolve()
    repo_trainers = Path(__file__).resolve().parents[2] / "trainers"
    if repo_trainers.is_dir():
        return repo_trainers
    raise RuntimeError("nnlandmark_h3de trainer shims not found; reinstall the package")
