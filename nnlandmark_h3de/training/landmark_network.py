"""The 1 + L channel contract: a landmark network body emits L heatmap logits; this wrapper puts a
constant zero logit in front, so nnU-Net's stock predictor (softmax/argmax over `labels`, one of
which is the background) still works: softmax over (0, l_k) is sigmoid(l_k) near a peak and the
argmax is a ball around each landmark. Deep-supervision lists get the channel at every scale.

`logit_offset` (a constant, not a parameter) is added to the landmark logits: heatmaps are ~0
almost everywhere, so starting at sigmoid(-4) ~ 0.02 instead of 0.5 spares the optimiser the first
thousands of steps of pushing every voxel down (the prior-probability bias init of focal loss, but
independent of how the body's last layer looks).
"""
from __future__ import annotations

from typing import List, Optional, Union

import torch
from torch import nn

__all__ = ["LandmarkHeatmapNetwork", "prepend_zero_channel"]

_HEAD_KEY = "seg_layers.0.0.weight"  # an output head's first convolution; a 1x1 output layer is seg_layers.0.weight


def prepend_zero_channel(logits: torch.Tensor) -> torch.Tensor:
    """(B, L, ...) -> (B, 1 + L, ...) with channel 0 == 0 (same dtype/device, no gradient)."""
    return torch.cat((logits.new_zeros((logits.shape[0], 1, *logits.shape[2:])), logits), 1)


class LandmarkHeatmapNetwork(nn.Module):
    """Wraps any body whose forward returns (B, L, ...) logits or a list of them (deep supervision)."""

    # set (voxels) by a trainer whose network takes the global stage's estimates as L more input channels
    # after the image's (heatmaps.estimate_channels, drawn by the predictor); None: the image only
    estimate_sigma: Optional[float] = None

    def __init__(self, body: nn.Module, logit_offset: float = -4.0):
        super().__init__()
        self.body = body
        self.logit_offset = float(logit_offset)

    def _finish(self, logits: torch.Tensor) -> torch.Tensor:
        out = prepend_zero_channel(logits)
        if self.logit_offset:
            out[:, 1:] += self.logit_offset  # in place on the fresh cat output: one full-size copy only
        return out

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        out = self.body(x)
        if isinstance(out, (list, tuple)):
            return [self._finish(o) for o in out]
        return self._finish(out)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """nn.Module's, but a checkpoint whose output layers are not this network's kind (1x1 convolutions
        vs output heads, networks/building_blocks/output_heads.py) stops with what happened and what to do,
        not only PyTorch's list of missing keys: nnLandmarkTrainerLocal gained its heads on 2026-12-05."""
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as error:
            mine, theirs = (any(k.endswith(_HEAD_KEY) for k in keys) for keys in (self.state_dict(), state_dict))
            if mine == theirs:
                raise
            kinds = ("output heads with a hidden layer", "1x1 output convolutions")
            raise RuntimeError(
                f"the checkpoint has {kinds[not theirs]} but this trainer builds {kinds[not mine]}: the model was "
                "trained by another version of its trainer (nnLandmarkTrainerLocal before 2026-12-05 had 1x1 "
                "outputs and the MSE, today's nnLandmarkTrainerLocalMSE). Retrain it, or load it with the trainer "
                "that made it (the checkpoint's 'trainer_name').") from error

    @property
    def decoder(self):
        """nnU-Net code toggles `network.decoder.deep_supervision`; the body's decoder is the one."""
        return self.body.decoder

    def set_deep_supervision(self, enabled: bool) -> None:
        if hasattr(self.body, "set_deep_supervision"):
            self.body.set_deep_supervision(enabled)
        else:
            self.body.decoder.deep_supervision = enabled
