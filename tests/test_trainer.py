"""Landmark trainer parts, in process and small: network wrapper, losses, schedule, gradient clip,
patch errors, threshold calibration, small configuration."""
import json
import math

import numpy as np
import pytest
import torch

from nnlandmark_h3de.heatmaps import gaussian_heatmaps
from nnlandmark_h3de.training.landmark_loss import HeatmapMSELoss, TopKHeatmapBCELoss
from nnlandmark_h3de.training.landmark_network import LandmarkHeatmapNetwork
from nnlandmark_h3de.training.landmark_validation import (DEFAULT_PEAK_THRESHOLD, calibrate_peak_threshold,
                                                          unlearned_landmarks,
                                                          patch_radial_errors, write_thresholds)
from nnlandmark_h3de.planning.small_configuration import add_small_configuration, small_configuration
from nnlandmark_h3de.training.step_lr import StepLRScheduler


def tiny_unet(n_out=3, deep_supervision=True):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    return PlainConvUNet(1, 3, (4, 8, 8), torch.nn.Conv3d, 3, (1, 2, 2), 1, n_out, 1,
                         norm_op=torch.nn.InstanceNorm3d, nonlin=torch.nn.LeakyReLU, deep_supervision=deep_supervision)


def test_wrapper_prepends_constant_zero_channel_at_every_scale():
    net = LandmarkHeatmapNetwork(tiny_unet(3))
    x = torch.randn(2, 1, 16, 16, 16)
    out = net(x)
    assert [tuple(o.shape) for o in out] == [(2, 4, 16, 16, 16), (2, 4, 8, 8, 8)]
    assert all(torch.count_nonzero(o[:, 0]) == 0 for o in out)
    body_out = net.body(x)
    assert torch.allclose(out[0][:, 1:], body_out[0] + net.logit_offset)
    # nnU-Net's own toggle (network.decoder.deep_supervision) and ours reach the body
    net.decoder.deep_supervision = False
    assert isinstance(net(x), torch.Tensor)
    net.set_deep_supervision(True)
    assert isinstance(net(x), list)
    # the stock predictor's argmax over (background, landmarks): landmark k where its logit > 0
    single = net.eval()
    single.set_deep_supervision(False)
    with torch.no_grad():
        logits = single(x)
    seg = logits.argmax(1)
    assert torch.equal(seg > 0, (logits[:, 1:] > 0).any(1))
    # checkpoint round trip
    other = LandmarkHeatmapNetwork(tiny_unet(3, deep_supervision=False))
    other.load_state_dict(net.state_dict())
    with torch.no_grad():
        assert torch.equal(other.eval()(x), logits)


def test_mse_loss_ignores_channel_zero_and_is_float32():
    target = torch.rand(2, 3, 8, 8, 8)
    logits = torch.randn(2, 4, 8, 8, 8)
    expected = ((torch.sigmoid(logits[:, 1:]) - target) ** 2).mean()
    assert torch.allclose(HeatmapMSELoss()(logits, target), expected)
    logits[:, 0] = 1e6
    assert torch.allclose(HeatmapMSELoss()(logits, target), expected)
    assert HeatmapMSELoss()(logits.half(), target.half()).dtype == torch.float32


def test_topk_bce_takes_the_worst_voxels():
    target = torch.zeros(1, 1, 10, 1, 1)
    logits = torch.full((1, 2, 10, 1, 1), -10.0)
    logits[0, 1, :2] = 10.0  # two badly wrong voxels = the worst 20 %
    bce = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor(10.0), torch.tensor(0.0))
    assert torch.allclose(TopKHeatmapBCELoss(20)(logits, target), bce)
    # k = 100: every voxel of the landmark channels (channel 0 never scored)
    every = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 1:], target)
    assert torch.allclose(TopKHeatmapBCELoss(100)(logits, target), every)
    with pytest.raises(ValueError):
        TopKHeatmapBCELoss(0)


def test_local_stage_loss_still_learns_a_flat_channel():
    """At the network's start (every logit -4), the MSE of sigmoids barely moves a channel towards its
    landmark; the local stage's BCE does (the flat channels of a short training)."""
    from nnlandmark_h3de.training.variants import nnLandmarkTrainerLocal, nnLandmarkTrainerLocalMSE
    target = torch.zeros(1, 1, 8, 8, 8)
    target[0, 0, 4, 4, 4] = 1.0

    def pull_on_the_peak(trainer_class) -> float:
        logits = torch.full((1, 2, 8, 8, 8), -4.0, requires_grad=True)
        trainer_class.build_heatmap_loss(None)(logits, target).backward()
        return -float(logits.grad[0, 1, 4, 4, 4])

    bce, mse = pull_on_the_peak(nnLandmarkTrainerLocal), pull_on_the_peak(nnLandmarkTrainerLocalMSE)
    assert mse > 0 and bce > 0
    assert bce > 20 * mse  # 1 - 0.018 against 2 (1 - 0.018) 0.018 (1 - 0.018)


def test_step_lr_schedule():
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=5e-4)
    sched = StepLRScheduler(opt, 5e-4, step_size=800, gamma=0.1)
    lrs = {}
    for epoch in (0, 799, 800, 999):
        sched.step(epoch)
        lrs[epoch] = opt.param_groups[0]["lr"]
    assert lrs == pytest.approx({0: 5e-4, 799: 5e-4, 800: 5e-5, 999: 5e-5})


def _schedule_holder(schedule):
    """Just what nnLandmarkTrainer.configure_optimizers reads from a trainer."""
    from nnlandmark_h3de.training.nnLandmarkTrainer import nnLandmarkTrainer

    class Holder:
        network = torch.nn.Linear(2, 2)
        initial_lr, weight_decay, num_epochs, grad_clip_norm = 2e-3, 0.0, 1000, 1.0
        lr_schedule, lr_step_fraction, lr_gamma = schedule, 0.8, 0.1
        _add_grad_clip_hook = nnLandmarkTrainer._add_grad_clip_hook
    return Holder()


@pytest.mark.parametrize("schedule, expected_at_900", [("step", 2e-4), ("poly", 2e-3 * 0.1 ** 0.9)])
def test_trainer_builds_the_schedule_its_lr_schedule_names(schedule, expected_at_900):
    from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
    from nnlandmark_h3de.training.nnLandmarkTrainer import nnLandmarkTrainer
    opt, sched = nnLandmarkTrainer.configure_optimizers(_schedule_holder(schedule))
    assert isinstance(sched, {"step": StepLRScheduler, "poly": PolyLRScheduler}[schedule])
    sched.step(900)
    assert opt.param_groups[0]["lr"] == pytest.approx(expected_at_900)


def test_unknown_lr_schedule_is_an_error():
    from nnlandmark_h3de.training.nnLandmarkTrainer import nnLandmarkTrainer
    with pytest.raises(ValueError, match="lr_schedule"):
        nnLandmarkTrainer.configure_optimizers(_schedule_holder("cosine"))


def test_grad_clip_hook_clips_to_one_before_the_step():
    from nnlandmark_h3de.training.nnLandmarkTrainer import nnLandmarkTrainer

    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=1.0)

    class Holder:
        grad_clip_norm = 1.0

    nnLandmarkTrainer._add_grad_clip_hook(Holder(), opt)
    p.grad = torch.tensor([30.0, 40.0, 0.0])  # norm 50
    opt.step()
    assert torch.allclose(p.detach(), torch.tensor([-0.6, -0.8, 0.0]))


def test_patch_radial_errors_match_known_offsets():
    shape = (20, 20, 20)
    centres = torch.tensor([[8.2, 9.7, 10.1], [5.0, 5.0, 5.0], [12.3, 11.1, 7.9]], dtype=torch.float64)
    points = centres.clone()[None]
    points[0, 1] = float("nan")  # the batch's target: landmark 1 absent from the patch
    shift = torch.tensor([0.6, -0.3, 0.2], dtype=torch.float64)
    pred = gaussian_heatmaps(centres + shift, torch.ones(3, dtype=torch.bool), shape, [4.0] * 3)[None]
    logits = torch.cat((torch.zeros(1, 1, *shape), torch.logit(pred.clamp(1e-6, 1 - 1e-6))), 1)
    spacing = (2.0, 1.0, 0.5)
    sums, counts = patch_radial_errors(logits, points, spacing)
    expected = float(np.linalg.norm(shift.numpy() * np.array(spacing)))
    assert counts.tolist() == [1, 0, 1]
    assert sums[1] == 0
    assert sums[0] == pytest.approx(expected, abs=0.02) and sums[2] == pytest.approx(expected, abs=0.02)
    with pytest.raises(ValueError, match="for a 3D output"):
        patch_radial_errors(logits, points[..., :2], spacing)


def test_threshold_calibration():
    peaks = np.array([[0.9, 0.2], [0.8, 0.7], [0.95, 0.1]])
    present = np.array([[True, False], [True, True], [True, False]])
    t, info = calibrate_peak_threshold(peaks, present)
    assert 0.2 < t <= 0.7 and info["f1"] == 1.0 and info["method"] == "best_f1"
    t, info = calibrate_peak_threshold(peaks, np.ones_like(present))
    assert t == DEFAULT_PEAK_THRESHOLD and info["method"] == "default" and "no absent" in info["reason"]


def test_unlearned_landmarks_are_those_flat_on_every_case():
    # columns: learned on one case only; flat everywhere (the start, sigmoid(-4)); never searched; flat or unsearched
    peaks = np.array([[0.9, 0.018, np.nan, 0.02],
                      [0.03, 0.017, np.nan, np.nan]])
    assert unlearned_landmarks(peaks, ["a", "b", "c", "d"]) == ["b", "d"]
    assert unlearned_landmarks(peaks, ["a", "b", "c", "d"], floor=0.01) == []


def test_write_thresholds_format(tmp_path):
    write_thresholds(tmp_path / "landmark_thresholds.json", ["a", "b"], [0.3, 0.3], {"method": "default"})
    d = json.loads((tmp_path / "landmark_thresholds.json").read_text())
    assert d["names"] == ["a", "b"] and d["threshold"] == [0.3, 0.3] and d["score"] == "peak"


def plans_with_fullres():
    return {"dataset_name": "Dataset999_X", "plans_name": "nnUNetPlans", "transpose_forward": [0, 1, 2],
            "transpose_backward": [0, 1, 2], "configurations": {"3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres", "batch_size": 2, "patch_size": [112, 128, 96],
                "spacing": [1.0, 0.8, 0.8], "architecture": {
                    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                    "arch_kwargs": {"n_stages": 6, "features_per_stage": [32, 64, 128, 256, 320, 320],
                                    "conv_op": "torch.nn.modules.conv.Conv3d",
                                    "kernel_sizes": [[3, 3, 3]] * 6, "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5,
                                    "n_conv_per_stage": [2] * 6, "n_conv_per_stage_decoder": [2] * 5,
                                    "conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                                    "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                                    "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                                    "nonlin_kwargs": {"inplace": True}},
                    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}}}}


def test_small_configuration_topology_fits_the_patch(tmp_path):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnlandmark_h3de.training.nnLandmarkTrainer import nnLandmarkTrainer

    plans_file = tmp_path / "nnUNetPlans.json"
    plans_file.write_text(json.dumps(plans_with_fullres()))
    entry = add_small_configuration(plans_file, patch_size=(48, 64, 40), base_features=8, max_features=64)
    mtime = plans_file.stat().st_mtime_ns
    assert add_small_configuration(plans_file, patch_size=(48, 64, 40), base_features=8, max_features=64) == entry
    assert plans_file.stat().st_mtime_ns == mtime  # idempotent: nothing rewritten
    kw = entry["architecture"]["arch_kwargs"]
    n = kw["n_stages"]
    assert len(kw["strides"]) == len(kw["kernel_sizes"]) == len(kw["n_conv_per_stage"]) == n
    assert len(kw["n_conv_per_stage_decoder"]) == n - 1
    assert kw["features_per_stage"] == [min(8 * 2 ** i, 64) for i in range(n)]
    # the patch is divisible by the total stride on every axis
    total = np.prod(np.array(kw["strides"]), 0)
    assert all(p % s == 0 for p, s in zip(entry["patch_size"], total))
    pm = PlansManager(json.loads(plans_file.read_text()))
    cm = pm.get_configuration("3d_fullres_small")
    assert cm.data_identifier == "nnUNetPlans_3d_fullres" and cm.batch_size == 2 and cm.spacing == [1.0, 0.8, 0.8]
    net = nnLandmarkTrainer.build_network_architecture(pm, cm, 1, 4, True)
    with torch.no_grad():
        out = net(torch.zeros(1, 1, *cm.patch_size))
    assert out[0].shape == (1, 4, *cm.patch_size) and len(out) == n - 1
    with pytest.raises(ValueError, match="too small"):
        small_configuration(plans_with_fullres(), patch_size=(4, 64, 64))
    with pytest.raises(ValueError, match="no configuration"):
        small_configuration(plans_with_fullres(), base="2d")


def test_landmark_info_from_dataset_json():
    from nnlandmark_h3de.training.nnLandmarkTrainer import landmark_info_from_dataset_json

    dj = {"labels": {"background": 0, "a": 1, "b": 2},
          "landmarks": {"names": ["a", "b"], "pairs": [["a", "b"]], "ball_radius_mm": 2.5}}
    info = landmark_info_from_dataset_json(dj, [1, 2])
    assert info == {"names": ["a", "b"], "pairs": [("a", "b")], "ball_radius_mm": 2.5}
    assert landmark_info_from_dataset_json({"labels": dj["labels"]}, [1, 2])["pairs"] == []
    with pytest.raises(ValueError, match="labels 1..L"):
        landmark_info_from_dataset_json(dj, [1, 3])


def test_whole_image_spacing_fits_the_median_image_in_one_patch():
    from nnlandmark_h3de.planning.small_configuration import whole_image_spacing
    plans = plans_with_fullres()
    plans["configurations"]["3d_fullres"]["median_image_size_in_voxels"] = [200, 300, 250]  # 200, 240, 200 mm
    spacing = whole_image_spacing(plans, (48, 48, 48))
    assert spacing == pytest.approx([5.0, 5.0, 5.0])  # 240 mm / 48 voxels, isotropic
    entry = small_configuration(plans, patch_size=(48, 48, 48), spacing=spacing, name="3d_global")
    extent = np.array([200, 240, 200])
    assert np.all(np.array(entry["patch_size"]) * np.array(entry["spacing"]) >= extent - 1e-6)
    # never finer than the base: a small image keeps its own spacing
    plans["configurations"]["3d_fullres"]["median_image_size_in_voxels"] = [20, 20, 20]
    assert whole_image_spacing(plans, (48, 48, 48)) == pytest.approx([1.0, 0.8, 0.8])


def _mirror_axes_of(trainer_cls, lr_world_axis_column: int, pairs, patch_axis_offset: int = 0):
    """`_landmark_mirror_axes` of a trainer class for cases whose world x runs along ITK axis
    `lr_world_axis_column` (numpy axis 2 - column), without building a whole trainer."""
    from types import SimpleNamespace
    order = [lr_world_axis_column] + [c for c in range(3) if c != lr_world_axis_column]
    direction = np.eye(3)[order]  # row r = world axis r's components: world x along ITK axis `column`
    props = {"sitk_stuff": {"direction": tuple(direction.ravel())}}
    fake = SimpleNamespace(mirror_left_right_only=trainer_cls.mirror_left_right_only,
                           mirror_left_right_with_pair_swap=trainer_cls.mirror_left_right_with_pair_swap,
                           landmark_pairs=pairs, patch_axis_offset=patch_axis_offset,
                           plans_manager=SimpleNamespace(transpose_forward=[0, 1, 2]),
                           _training_case_properties=lambda: [props, props], print_to_log_file=lambda *a: None)
    axes = (0, 1) if patch_axis_offset else (0, 1, 2)
    return trainer_cls._landmark_mirror_axes(fake, axes)


@pytest.mark.parametrize("column", [0, 1, 2])
def test_left_right_only_mirroring_keeps_the_one_symmetric_axis(column):
    from nnlandmark_h3de.training.nnLandmarkTrainer import nnLandmarkTrainer
    from nnlandmark_h3de.training.variants import nnLandmarkTrainerLocal
    lr = 2 - column  # world x along ITK axis `column` = numpy axis 2 - column
    assert _mirror_axes_of(nnLandmarkTrainer, column, [("L", "R")]) == ((0, 1, 2), lr)
    assert _mirror_axes_of(nnLandmarkTrainerLocal, column, [("L", "R")]) == ((lr,), lr)
    # no pairs to swap: the left/right axis cannot be mirrored, and nothing else may be
    assert _mirror_axes_of(nnLandmarkTrainer, column, []) == (tuple(a for a in (0, 1, 2) if a != lr), None)
    assert _mirror_axes_of(nnLandmarkTrainerLocal, column, []) == ((), None)


def test_left_right_only_mirroring_of_a_2d_slice_across_left_right_mirrors_nothing():
    from nnlandmark_h3de.training.nnLandmarkTrainer import nnLandmarkTrainer
    from nnlandmark_h3de.training.variants import nnLandmarkTrainerLocal
    # world x along numpy axis 0, the slice axis of a 2D configuration (a lateral view)
    assert _mirror_axes_of(nnLandmarkTrainer, 2, [("L", "R")], patch_axis_offset=1) == ((0, 1), None)
    assert _mirror_axes_of(nnLandmarkTrainerLocal, 2, [("L", "R")], patch_axis_offset=1) == ((), None)
