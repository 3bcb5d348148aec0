"""Heatmap trainers with H3DE-Net's anchor head: explicit existence of every landmark.

`AnchorTrainerMixin` in front of any landmark trainer (`nnLandmarkTrainer`, `nnH3DETrainer`):
- network: the trainer's body, plus an `AnchorHead` on the decoder stage whose stride is closest to
  `anchor_stride` (paper: 4); the stage's output is taken with a forward hook, so any body whose
  `decoder.stages[j]` produce the encoder's skip resolutions works (PlainConvUNet, H3DEUNet);
- loss: the trainer's heatmap loss + `anchor_loss_weight` * `AnchorLoss` (offsets, balanced BCE,
  case-level BCE); the anchor targets are built on the device from the batch's landmark points (the
  same points the heatmaps are drawn from, handed to the loss in `targets_from_points`), so the data
  pipeline is unchanged;
- final validation: besides the heatmap peaks, the anchor existence probability of every case
  (max over the anchors of all sliding-window tiles) is recorded; both scores are calibrated (best
  F1) and compared in summary.json; `landmark_thresholds.json` stores the one with the better
  validation F1, the anchor one on ties (`"score": "anchor"|"peak"`). Locations stay the heatmap
  peaks (`benchmarks/bench_absent_landmarks.py` measures why).

The wrapper returns `(heatmaps, AnchorOutput)` only in training mode; in eval mode it returns the
heatmaps (stock predictor unchanged) and, with `record_existence`, keeps the running max existence
in `anchor_existence` (the predictor hook), or `forward_with_anchors(x)` gives both.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from nnlandmark_h3de.training.anchor_targets import AnchorLoss, centres_from_heatmaps
from nnlandmark_h3de.networks.building_blocks.anchor_head import AnchorHead, AnchorOutput
from nnlandmark_h3de.training.landmark_network import LandmarkHeatmapNetwork
from nnlandmark_h3de.training.final_validation import run_final_validation
from nnlandmark_h3de.training.nnH3DETrainer import nnH3DETrainer
from nnlandmark_h3de.training.nnLandmarkTrainer import nnLandmarkTrainer
from nnlandmark_h3de.training.schedule import smoke_init

__all__ = ["AnchorHeatmapNetwork", "HeatmapAnchorLoss", "AnchorTrainerMixin", "choose_anchor_stage",
           "nnLandmarkTrainerAnchor", "nnLandmarkTrainerAnchor_2epochs_3iters", "nnH3DETrainerAnchor",
           "nnH3DETrainerAnchor_2epochs_3iters"]


def choose_anchor_stage(encoder, target_stride: float) -> Tuple[int, Tuple[int, ...]]:
    """(index into decoder.stages, per-axis stride) of the decoder output closest to `target_stride`
    (geometric mean over axes, in log scale). decoder.stages[j] has encoder stage n - 2 - j's size."""
    n = len(encoder.strides)
    best = None
    for i in range(n - 1):  # the bottleneck (n - 1) has no decoder stage
        stride = tuple(int(np.prod([encoder.strides[s][a] for s in range(i + 1)])) for a in range(len(encoder.strides[0])))
        cost = abs(np.mean(np.log(stride)) - math.log(target_stride))
        if best is None or cost < best[0] - 1e-9:
            best = (cost, n - 2 - i, stride)
    return best[1], best[2]


class AnchorHeatmapNetwork(LandmarkHeatmapNetwork):
    """1 + L channel heatmap network (see LandmarkHeatmapNetwork) with an anchor head on one decoder stage."""

    def __init__(self, body: nn.Module, num_landmarks: int, anchor_radii: Sequence[float] = (1.0, 2.0),
                 anchor_stride: float = 4.0, feature_grad_scale: float = 1.0):
        """feature_grad_scale: gradient of the anchor loss let into the shared network (0 = detached head,
        1 = joint training). The balanced BCE's gradient norm is ~20x the heatmap MSE's at initialisation
        and the ratio grows as the MSE falls, so at 1 the anchor task dominates the shared features."""
        super().__init__(body)
        self.feature_grad_scale = float(feature_grad_scale)
        enc = body.encoder
        self.anchor_stage, self.anchor_grid_stride = choose_anchor_stage(enc, anchor_stride)
        channels = enc.output_channels[len(enc.output_channels) - 2 - self.anchor_stage]
        with torch.random.fork_rng(devices=[]):  # the head's init leaves the RNG stream as without it, so
            # runs with and without the head see the same augmentation (comparable in benchmarks)
            self.anchor_head = AnchorHead(enc.conv_op, channels, num_landmarks, anchor_radii,
                                          conv_bias=enc.conv_bias, norm_op=enc.norm_op,
                                          norm_op_kwargs=enc.norm_op_kwargs, nonlin=enc.nonlin,
                                          nonlin_kwargs=enc.nonlin_kwargs)
        self.record_existence = False
        self.register_buffer("anchor_existence", torch.zeros(num_landmarks), persistent=False)
        # one hook for the network's life (one per call split torch.compile's graph): it keeps the stage's
        # latest output, which forward_with_anchors takes and plain forward drops
        self._anchor_features: Dict[str, torch.Tensor] = {}
        self.body.decoder.stages[self.anchor_stage].register_forward_hook(self._keep_anchor_features)

    def _keep_anchor_features(self, module, inputs, output) -> None:
        self._anchor_features["stage"] = output

    def forward_with_anchors(self, x: torch.Tensor):
        heat = super().forward(x)  # the 1 + L wrapper exactly as without the head (zero channel, logit offset)
        f, s = self._anchor_features.pop("stage"), self.feature_grad_scale
        if s != 1.0:  # same value, gradient into the shared network scaled by s
            f = f.detach() if s == 0.0 else f * s + f.detach() * (1.0 - s)
        return heat, self.anchor_head(f)

    def reset_existence(self) -> None:
        self.anchor_existence.zero_()

    def forward(self, x: torch.Tensor):
        if self.training:
            return self.forward_with_anchors(x)
        if not self.record_existence:
            heat = super().forward(x)
            self._anchor_features.pop("stage", None)
            return heat
        heat, anchors = self.forward_with_anchors(x)
        p = torch.sigmoid(anchors.logits.detach().float().transpose(0, 2).flatten(1).amax(1))  # (L,)
        torch.maximum(self.anchor_existence, p, out=self.anchor_existence)
        return heat


class HeatmapAnchorLoss(nn.Module):
    """heatmap loss(heatmaps, target) + weight * AnchorLoss; heatmap loss only for plain (eval) outputs.

    The anchor targets come from the landmark points given to `use_points` before the call (the
    trainer does, in `targets_from_points`; each call consumes them); without points, from the
    centres of the full-resolution heatmap target (`centres_from_heatmaps`, exact for Gaussians)."""

    def __init__(self, heatmap_loss: nn.Module, anchor_loss: AnchorLoss, weight: float = 1.0):
        super().__init__()
        self.heatmap_loss, self.anchor_loss, self.weight = heatmap_loss, anchor_loss, float(weight)
        self.last_parts: Dict[str, torch.Tensor] = {}
        self._points: Optional[torch.Tensor] = None

    def use_points(self, points: torch.Tensor) -> None:
        """The next call's landmark points (B, L, ndim) in voxels of the patch, NaN rows = absent."""
        self._points = points

    def forward(self, output, target):
        points, self._points = self._points, None
        if not (isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], AnchorOutput)):
            return self.heatmap_loss(output, target)
        heat, anchors = output
        full = target[0] if isinstance(target, (list, tuple)) else target
        if points is None:
            centres, present = centres_from_heatmaps(full)
        else:
            if points.shape[:2] != full.shape[:2] or points.shape[2] != full.ndim - 2:
                raise ValueError(f"points {tuple(points.shape)} do not match the heatmap target {tuple(full.shape)}")
            centres, present = points, torch.isfinite(points).all(-1)
        l_anchor, self.last_parts = self.anchor_loss(anchors.offsets, anchors.logits, centres, present, full.shape[2:])
        return self.heatmap_loss(heat, target) + self.weight * l_anchor


# ------------------------------------------------------------------------------------ trainers
class AnchorTrainerMixin:
    """Put in front of a landmark trainer: `class T(AnchorTrainerMixin, nnLandmarkTrainer)`."""
    anchor_radii: Tuple[float, ...] = (1.0, 2.0)  # grid units
    anchor_stride: float = 4.0  # voxels, the decoder stage closest to it gets the head
    anchor_loss_weight: float = 0.1  # keeps the head under nnU-Net's global clip at 12 (Adam: scale-free for the head)
    anchor_feature_grad_scale: float = 0.01  # see AnchorHeatmapNetwork
    anchor_offset_weight: float = 1.0
    anchor_exist_weight: float = 1.0
    anchor_case_weight: float = 1.0

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        body = cls.build_landmark_body(plans_manager, configuration_manager, num_input_channels,
                                       num_output_channels - 1, enable_deep_supervision)
        return AnchorHeatmapNetwork(body, num_output_channels - 1, cls.anchor_radii, cls.anchor_stride,
                                    cls.anchor_feature_grad_scale)

    def _build_loss(self):
        anchor = AnchorLoss(self.anchor_radii, self.anchor_offset_weight, self.anchor_exist_weight,
                            self.anchor_case_weight)
        return HeatmapAnchorLoss(super()._build_loss(), anchor, self.anchor_loss_weight)

    def _add_grad_clip_hook(self, optimizer):
        """Clip the heatmap network and the anchor head separately (each to `grad_clip_norm`).

        One global norm would be dominated by the anchor head (its balanced BCE gives ~30x the heatmap
        loss's gradient norm at initialisation, and the ratio grows as the MSE falls), so clipping it
        would shrink the heatmap network's step whenever the head's gradients are large."""
        mod = self.network
        mod = getattr(mod, "module", mod)  # DDP wraps after configure_optimizers, compile before
        mod = getattr(mod, "_orig_mod", mod)
        head = {id(p) for p in mod.anchor_head.parameters()}
        params = [p for g in optimizer.param_groups for p in g["params"]]
        groups = [[p for p in params if id(p) not in head], [p for p in params if id(p) in head]]
        max_norm = self.grad_clip_norm

        def clip(opt, args, kwargs):
            for g in groups:
                torch.nn.utils.clip_grad_norm_(g, max_norm)

        optimizer.register_step_pre_hook(clip)

    def targets_from_points(self, points: torch.Tensor, patch_shape):
        """The heatmap targets, and the same points handed to the loss for the anchor targets."""
        self.loss.use_points(points)
        return super().targets_from_points(points, patch_shape)

    def train_step(self, batch: dict) -> dict:
        out = super().train_step(batch)
        out.update({f"anchor_{k}": v.cpu().numpy() for k, v in self.loss.last_parts.items()})
        return out

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        keys = [k for k in (train_outputs[0] if train_outputs else {}) if k.startswith("anchor_")]
        if keys:
            self.print_to_log_file("anchor losses: " + ", ".join(
                f"{k[7:]} {np.mean([o[k] for o in train_outputs]):.4f}" for k in keys))

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.set_deep_supervision_enabled(False)
        self.network.eval()
        try:
            run_final_validation(self, score="anchor", existence_net=self._unwrapped_network())
        finally:
            self.set_deep_supervision_enabled(True)


class nnLandmarkTrainerAnchor(AnchorTrainerMixin, nnLandmarkTrainer):
    """nnLandmarkTrainer (plans' U-Net) + H3DE-Net's anchor head."""


class nnH3DETrainerAnchor(AnchorTrainerMixin, nnH3DETrainer):
    """nnH3DETrainer (H3DEUNet) + its anchor head: H3DE-Net as published, with calibrated existence."""


class nnLandmarkTrainerAnchor_2epochs_3iters(nnLandmarkTrainerAnchor):
    __init__ = smoke_init(nnLandmarkTrainerAnchor)


class nnH3DETrainerAnchor_2epochs_3iters(nnH3DETrainerAnchor):
    __init__ = smoke_init(nnH3DETrainerAnchor)
