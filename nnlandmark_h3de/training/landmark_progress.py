"""Per-epoch landmark metrics in nnU-Net's local logger and a progress.png that shows them.

nnU-Net's LocalLogger plots pseudo Dice, which means nothing for heatmaps; this subclass adds the
validation radial-error keys (one value per epoch, like every LocalLogger key) and draws the
loss curves against the mean radial error (mm) instead.
"""
from __future__ import annotations

import numpy as np

from nnunetv2.training.logging.nnunet_logger import LocalLogger

__all__ = ["LandmarkLocalLogger", "LANDMARK_KEYS"]

# val_mre_mm: mean radial error over the landmarks present in this epoch's validation patches (NaN if none)
# ema_val_mre_mm: its moving average, the best-checkpoint criterion (lower is better)
# val_re_per_landmark_mm: per-landmark mean radial error (NaN where never present)
LANDMARK_KEYS = ("val_mre_mm", "ema_val_mre_mm", "val_re_per_landmark_mm")


class LandmarkLocalLogger(LocalLogger):
    def __init__(self, verbose: bool = False):
        super().__init__(verbose)
        for k in LANDMARK_KEYS:
            self.my_fantastic_logging[k] = list()

    def load_checkpoint(self, checkpoint: dict):
        """A checkpoint of a stock trainer lacks our keys: pad them with NaN so the lists stay aligned."""
        n = len(checkpoint.get("train_losses", []))
        for k in LANDMARK_KEYS:
            checkpoint.setdefault(k, [float("nan")] * n)
        super().load_checkpoint(checkpoint)

    def plot_progress_png(self, output_folder):
        from batchgenerators.utilities.file_and_folder_operations import join
        import matplotlib
        matplotlib.use("agg")
        import matplotlib.pyplot as plt

        log = self.my_fantastic_logging
        epoch = min(len(v) for v in log.values()) - 1
        if epoch < 0:
            return
        x = list(range(epoch + 1))
        fig, axes = plt.subplots(3, 1, figsize=(12, 18))
        ax = axes[0]
        ax.plot(x, log["train_losses"][:epoch + 1], color="b", label="loss_tr", linewidth=2)
        ax.plot(x, log["val_losses"][:epoch + 1], color="r", label="loss_val", linewidth=2)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.legend(loc="upper left")
        ax2 = ax.twinx()
        ax2.plot(x, log["val_mre_mm"][:epoch + 1], color="g", ls="dotted", label="val MRE (mm, patches)", linewidth=2)
        ax2.plot(x, log["ema_val_mre_mm"][:epoch + 1], color="g", label="val MRE (mov. avg.)", linewidth=2)
        ax2.set_ylabel("mean radial error [mm]")
        ax2.legend(loc="upper right")

        ax = axes[1]
        durations = [e - s for e, s in zip(log["epoch_end_timestamps"][:epoch + 1], log["epoch_start_timestamps"])]
        ax.plot(x, durations, color="b", label="epoch duration", linewidth=2)
        ax.set_ylim(0, max(durations + [1e-3]) * 1.1)
        ax.set_xlabel("epoch")
        ax.set_ylabel("time [s]")
        ax.legend(loc="upper left")

        ax = axes[2]
        ax.plot(x, log["lrs"][:epoch + 1], color="b", label="learning rate", linewidth=2)
        ax.set_xlabel("epoch")
        ax.set_ylabel("learning rate")
        ax.legend(loc="upper left")
        fig.tight_layout()
        fig.savefig(join(output_folder, "progress.png"))
        plt.close(fig)

    def latest_finite(self, key: str) -> float:
        vals = [v for v in self.my_fantastic_logging[key] if v is not None and np.isfinite(v)]
        return float(vals[-1]) if vals else float("nan")
