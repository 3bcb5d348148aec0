"""Running the real commands for the demo and the benchmarks: find a console script, run it with
its output copied to a log (a failure raises `DemoError` with the log's last lines), and an
environment whose nnUNet_raw/preprocessed/results stay inside one output folder, so a run never
reads or writes a user's datasets."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

# Console scripts the demo runs, with the package module behind each of ours (to say what is missing).
COMMANDS = {
    "plan_and_preprocess": ("nnUNetv2_plan_and_preprocess", None),
    "small_configuration": ("nnLandmark_add_small_config", "nnlandmark_h3de.cli.small_config"),
    "train": ("nnUNetv2_train", None),
    "calibrate_global": ("nnLandmark_calibrate_global", "nnlandmark_h3de.cli.calibrate_global"),
    "predict": ("nnLandmark_predict", "nnlandmark_h3de.cli.predict"),
    "evaluate": ("nnLandmark_evaluate", "nnlandmark_h3de.cli.evaluate"),
}


class DemoError(RuntimeError):
    """A demo stage failed or cannot run; the message names the stage."""

    def __init__(self, stage: str, message: str):
        super().__init__(f"demo stage '{stage}': {message}")
        self.stage = stage


def find_command(name: str) -> Optional[str]:
    """The console script beside this Python first (the venv), else on PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


def missing_commands(stages: Sequence[str] = tuple(COMMANDS)) -> Dict[str, str]:
    """{stage: why it cannot run} for the stages whose command or module is unavailable."""
    missing = {}
    for stage in stages:
        command, module = COMMANDS[stage]
        if module is not None and importlib.util.find_spec(module) is None:
            missing[stage] = f"module {module} (command {command}) is not part of this installation"
        elif find_command(command) is None:
            missing[stage] = f"command {command} not found beside {sys.executable} or on PATH (reinstall the package)"
    return missing


def nnunet_environment(root: Path) -> Dict[str, str]:
    """os.environ with nnUNet_raw/preprocessed/results inside `root` and the trainer folders
    (`root/trainers` for generated budget trainers, then the package's)."""
    from nnlandmark_h3de.training.trainer_folder import trainer_folder
    env = dict(os.environ)
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[name] = str(Path(root) / name)
    env["nnUNet_extTrainer"] = os.pathsep.join([str(Path(root) / "trainers"), str(trainer_folder())])
    env.setdefault("nnUNet_n_proc_DA", "0")  # 2-core machines: augmentation in the training process
    # (the planner calls torch.set_num_threads(nnUNet_n_proc_DA), so plan_and_preprocess gets >= 1)
    env["nnUNet_compile"] = "false"  # torch.compile costs minutes on CPU and gains nothing here
    env["PYTHONUNBUFFERED"] = "1"  # stream progress lines
    return env


@contextlib.contextmanager
def environment(env: Dict[str, str]):
    """Temporarily use `env` in this process (for in-process steps that read nnU-Net variables)."""
    old = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(old)


def run_command(stage: str, cmd: List[str], env: Dict[str, str], log_path: Path,
                progress_pattern: Optional[str] = None, show_progress: bool = True) -> List[str]:
    """Run `cmd`, copy its output to `log_path`, tick a progress bar on lines matching the pattern.
    Raises DemoError with the log's last lines when the command fails."""
    from tqdm import tqdm
    log_path.parent.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(progress_pattern) if progress_pattern else None
    lines: List[str] = []
    with open(log_path, "w", encoding="utf-8") as log, \
            tqdm(desc=f"  {stage}", unit=" lines" if pattern is None else " epochs", disable=not show_progress,
                 leave=False) as bar:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        try:
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    bufsize=1, errors="replace")
        except OSError as e:
            raise DemoError(stage, f"cannot start {cmd[0]}: {e}") from None
        try:
            for line in proc.stdout:
                log.write(line)
                log.flush()  # the log is where users look while a long stage runs
                lines.append(line.rstrip("\n"))
                if pattern is None or pattern.search(line):
                    bar.update(1)
            rc = proc.wait()
        except BaseException:
            proc.terminate()  # only the child we started
            proc.wait()
            raise
    if rc != 0:
        tail = "\n".join("    " + l for l in lines[-25:])
        raise DemoError(stage, f"`{shlex.join(cmd)}` exited with status {rc}; see {log_path}. Last lines:\n{tail}")
    return lines


def count_epochs(lines: List[str]) -> Optional[int]:
    """Epochs an nnUNetv2_train log reports (its last "Epoch N" line + 1); None when it shows none."""
    epochs = [int(m.group(1)) for l in lines for m in [re.search(r"Epoch (\d+)\s*$", l)] if m]
    return (max(epochs) + 1) if epochs else None
