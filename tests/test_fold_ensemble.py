"""nnLandmarkPredictor applies each fold's calibration to that fold's own prediction, and swaps the
pair channels in test-time mirrors that flip the case's own left/right axis.

Fake networks on a 16^3 volume (one sliding-window tile) stand in for trained ones, so every peak
height is known: no planning, no training.
"""
import json

import numpy as np
import pytest
import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnlandmark_h3de.inference.case_mirroring import case_mirroring, logit_channel_permutation
from nnlandmark_h3de.inference.landmark_predictor import nnLandmarkPredictor
from nnlandmark_h3de.inference.postprocessing import existence_ratio
from nnlandmark_h3de.inference.uncertainty import UncertaintyModel
from test_index_mapping import _plans

SHAPE = (16, 16, 16)


def _logit(x):
    h = x.clamp(1e-4, 1 - 1e-4)
    return torch.log(h / (1 - h))


def _blob(center_zyx, amplitude=0.9, sigma=3.0):
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1)
    d2 = np.sum((grid - np.asarray(center_zyx, float)) ** 2, axis=-1)
    return (amplitude * np.exp(-d2 / (2 * sigma ** 2))).astype(np.float32)


def _properties(direction=np.eye(3)):
    return {"sitk_stuff": {"spacing": (1.0, 1.0, 1.0), "origin": (0.0, 0.0, 0.0),
                           "direction": tuple(np.asarray(direction, float).ravel())},
            "spacing": [1.0, 1.0, 1.0], "shape_before_cropping": SHAPE,
            "bbox_used_for_cropping": [[0, n] for n in SHAPE], "shape_after_cropping_and_before_resampling": SHAPE}


def _predictor(net, params, names, pairs, mirror_axes):
    pm = PlansManager(_plans((0, 1, 2), (1.0, 1.0, 1.0)))
    dataset_json = {"labels": {"background": 0, **{n: i + 1 for i, n in enumerate(names)}}, "file_ending": ".nii.gz",
                    "landmarks": {"names": names, "pairs": pairs}}
    p = nnLandmarkPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True, perform_everything_on_device=False,
                            device=torch.device("cpu"), verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    p.manual_initialization(net.eval(), pm, pm.get_configuration("3d_fullres"), params, dataset_json, "x", mirror_axes)
    return p


# ------------------------------------------------------------------------ per-fold calibration
class _TwoViewNet(torch.nn.Module):
    """Fold f's heatmaps are the input's channels [f L, (f + 1) L): the weights select the view."""

    def __init__(self, n_landmarks):
        super().__init__()
        self.n = n_landmarks
        self.w = torch.nn.Parameter(torch.zeros(2))

    def forward(self, x):
        out = self.w[0] * _logit(x[:, :self.n]) + self.w[1] * _logit(x[:, self.n:])
        return torch.cat([torch.zeros_like(out[:, :1]), out], 1)


def test_two_folds_are_each_judged_by_their_own_calibration(tmp_path, one_torch_thread):
    """A: both folds see a clear peak (0.9, above their thresholds 0.8) but 4 voxels apart, so the folds'
    average peaks at ~0.72: judged on the average against the mean threshold (the old behaviour) A would
    be absent and its uncertainty inflated. B: a weak peak (0.5) in both folds, absent either way."""
    names = ["A", "B"]
    fold_views = [[_blob((8, 8, 6)), _blob((8, 4, 8), amplitude=0.5)],
                  [_blob((8, 8, 10)), _blob((8, 4, 8), amplitude=0.5)]]
    data = torch.from_numpy(np.stack(fold_views[0] + fold_views[1]))
    params = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}]
    predictor = _predictor(_TwoViewNet(2), params, names, [], None)
    rms = {0: [1.0, 2.0], 1: [3.0, 4.0]}
    for f in (0, 1):
        (tmp_path / f"fold_{f}").mkdir()
        (tmp_path / f"fold_{f}" / "landmark_thresholds.json").write_text(
            json.dumps({"names": names, "threshold": [0.8, 0.8], "score": "peak"}))
        UncertaintyModel(names, rms[f], [0.9, 0.9], 1.0).write(tmp_path / f"fold_{f}" / "landmark_uncertainty.json")
    predictor.load_calibration(tmp_path, [0, 1])

    ls, report, logits = predictor.predict_case(data, _properties(), source="case")
    ensemble_peak = torch.sigmoid(logits[1:].float().amax(dim=(1, 2, 3))).numpy()
    assert ensemble_peak[0] < 0.75, "the folds' average must flatten A's peak below the thresholds"
    assert ls.present.tolist() == [True, False] and report["absent"] == ["B"]
    np.testing.assert_allclose(ls.confidence, [0.9, 0.5], rtol=1e-4)  # the folds' own peak heights, averaged
    np.testing.assert_allclose(ls.points_lps[0], [8.0, 8.0, 8.0], atol=0.1)  # the point: the averaged logits
    # each fold's model on its own peak, RMS over the folds
    per_fold = np.array([np.asarray(rms[f]) * 0.9 / np.array([0.9, 0.5]) for f in (0, 1)])
    np.testing.assert_allclose(ls.uncertainty_mm, np.sqrt(np.mean(per_fold ** 2, axis=0)), rtol=1e-4)
    # what the old rule (mean model on the averaged peak) would have said for A
    assert abs(2.0 * 0.9 / ensemble_peak[0] - ls.uncertainty_mm[0]) > 0.2


def test_calibration_of_other_folds_than_predicted_is_refused(tmp_path, one_torch_thread):
    predictor = _predictor(_TwoViewNet(1), [{"w": torch.tensor([1.0, 0.0])}], ["A"], [], None)
    for f in (0, 1):
        (tmp_path / f"fold_{f}").mkdir()
        (tmp_path / f"fold_{f}" / "landmark_thresholds.json").write_text(
            json.dumps({"names": ["A"], "threshold": [0.5], "score": "peak"}))
    predictor.load_calibration(tmp_path, [0, 1])
    data = torch.from_numpy(np.stack([_blob((8, 8, 8))] * 2))
    with pytest.raises(RuntimeError, match="2 folds' thresholds loaded for 1 folds predicted"):
        predictor.predict_case(data, _properties())


def test_existence_ratio_is_a_soft_vote_of_the_folds():
    thr = np.array([[0.5, 0.5, 0.5, np.nan], [0.9, 0.9, np.nan, np.nan]])
    scores = np.array([[0.6, 0.4, 0.2, 0.1], [0.95, 0.8, 0.9, 0.1]])
    r = existence_ratio(scores, thr)
    np.testing.assert_allclose(r[:3], [(1.2 + 0.95 / 0.9) / 2, (0.8 + 0.8 / 0.9) / 2, 0.4])  # NaN threshold: no vote
    assert r[3] == np.inf  # no fold calibrated: never absent
    # one fold: exactly its own decision, NaN scores absent, a threshold <= 0 always present
    np.testing.assert_array_equal(existence_ratio([0.3, 0.29, np.nan, 0.0], [0.3, 0.3, 0.3, 0.0]) >= 1,
                                  [True, False, False, True])


# ------------------------------------------------------------------- per-case left/right mirror
class _SideNet(torch.nn.Module):
    """Like a trained network, it knows L0 by where it lies in the array: channel L0 is the input's
    blob in the upper half of `axis`, R0 the one in the lower half. Mirroring that axis therefore
    turns the network's L0 into R0 unless the pair channels are swapped back."""

    def __init__(self, axis):
        super().__init__()
        self.axis = axis

    def forward(self, x):
        lg = _logit(x[:, 0])
        view = [1, 1, 1]
        view[self.axis] = -1
        upper = (torch.arange(x.shape[2 + self.axis]) >= x.shape[2 + self.axis] // 2).view(1, *view)
        low = torch.full_like(lg, -9.0)
        return torch.stack([torch.zeros_like(lg), torch.where(upper, lg, low), torch.where(upper, low, lg)], 1)


def _lr_direction(axis):
    """A direction whose world x (left/right) runs along transposed array `axis` (identity transpose)."""
    d = np.eye(3)
    c = 2 - axis  # ITK column of numpy axis `axis`
    d[:, [0, c]] = d[:, [c, 0]]
    return d


def _side_case(axis):
    base = np.array([5.0, 9.0, 7.0])
    left, right = base.copy(), base.copy()
    left[axis], right[axis] = 12.0, 3.0
    data = torch.from_numpy(np.maximum(_blob(left), _blob(right))[None])
    return data, left, right


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_mirrors_of_the_cases_own_left_right_axis_swap_the_pairs(axis, one_torch_thread):
    predictor = _predictor(_SideNet(axis), None, ["L0", "R0"], [["L0", "R0"]], (0, 1, 2))
    data, left, right = _side_case(axis)
    _, _, folds, logits, _ = predictor.locate(data, _properties(_lr_direction(axis)))
    members = folds[0].member_idx
    assert len(members) == 8
    from nnlandmark_h3de.inference.peaks import decode_peaks
    idx, peak, _ = decode_peaks(logits[1:], logits=True)
    np.testing.assert_allclose(idx, [left, right], atol=0.05)
    np.testing.assert_allclose(peak, [0.9, 0.9], atol=1e-3)
    for m in members:  # every mirror, flipped back, found each landmark where it is
        np.testing.assert_allclose(m, [left, right], atol=0.05)
    # the same image told to have its left/right axis elsewhere (as the training cases might): wrong swaps
    other = _properties(_lr_direction((axis + 1) % 3))
    _, peak_wrong, _ = decode_peaks(predictor.locate(data, other)[3][1:], logits=True)
    assert peak_wrong.max() < 0.5


def test_a_case_without_a_known_left_right_axis_is_not_mirrored(capsys, one_torch_thread):
    predictor = _predictor(_SideNet(2), [{}], ["L0", "R0"], [["L0", "R0"]], (0, 1, 2))  # one fold, no weights
    data, left, right = _side_case(2)
    a = np.deg2rad(45)
    oblique = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    _, _, folds, logits, _ = predictor.locate(data, _properties(oblique))
    members = folds[0].member_idx
    assert len(members) == 1 and predictor.use_mirroring
    from nnlandmark_h3de.inference.peaks import decode_peaks
    np.testing.assert_allclose(decode_peaks(logits[1:], logits=True)[0], [left, right], atol=0.05)
    predictor.predict_case(data, _properties(oblique), source="oblique_case")
    assert "WARNING oblique_case: test-time mirroring off" in capsys.readouterr().out


def test_case_mirroring_plan():
    props = _properties(_lr_direction(1))
    assert case_mirroring((0, 1, 2), props, (0, 1, 2), has_pairs=True).swap_axis == 1
    assert case_mirroring((0, 2), props, (0, 1, 2), has_pairs=True).swap_axis is None  # axis 1 never flipped
    assert case_mirroring((0, 1, 2), props, (2, 0, 1), has_pairs=True).swap_axis == 2  # transposed axes
    plan = case_mirroring((0, 1, 2), None, (0, 1, 2), has_pairs=False)  # no pairs: nothing to swap
    assert plan.axes == (0, 1, 2) and plan.swap_axis is None
    plan = case_mirroring((0, 1, 2), None, (0, 1, 2), has_pairs=True)
    assert plan.axes == () and "unknown" in plan.note
    assert logit_channel_permutation([1, 0, 2]) == [0, 2, 1, 3]


@pytest.mark.parametrize("axis", [0, 2])
def test_a_model_trained_with_the_left_right_mirror_gets_it_at_test_time(axis, one_torch_thread):
    """A checkpoint without mirroring axes (what the left/right-only trainers store, for nnU-Net's stock
    predictor), told by its trainer to mirror left/right: two members per case, the pairs swapped back."""
    predictor = _predictor(_SideNet(axis), None, ["L0", "R0"], [["L0", "R0"]], None)
    data, left, right = _side_case(axis)
    props = _properties(_lr_direction(axis))
    assert len(predictor.locate(data, props)[2][0].member_idx) == 1  # the checkpoint alone: no mirror
    predictor.mirror_left_right = True
    _, _, folds, logits, _ = predictor.locate(data, props)
    assert len(folds[0].member_idx) == 2
    for m in folds[0].member_idx:
        np.testing.assert_allclose(m, [left, right], atol=0.05)
    plan = case_mirroring(None, props, (0, 1, 2), has_pairs=True, add_left_right=True)
    assert plan.axes == (axis,) and plan.swap_axis == axis
    assert case_mirroring(None, props, (0, 1, 2), has_pairs=False, add_left_right=True).axes == ()  # nothing to swap
    # a 2D model (patch axes 1, 2) never mirrors across its slices
    assert case_mirroring(None, props, (0, 1, 2), True, add_left_right=True, first_patch_axis=1).axes == \
        (() if axis == 0 else (axis,))


def test_which_trainers_mirror_left_right_at_test_time(monkeypatch, capsys):
    from nnlandmark_h3de.inference.case_mirroring import mirrors_left_right_at_inference
    from nnlandmark_h3de.training.trainer_folder import trainer_folder
    monkeypatch.setenv("nnUNet_extTrainer", str(trainer_folder()))
    assert mirrors_left_right_at_inference("nnLandmarkTrainerLocal")
    for name in ("nnLandmarkTrainer", "nnLandmarkTrainerLocalAllMirrors", "nnLandmarkTrainerPrior", "NoSuchTrainer",
                 None):
        assert not mirrors_left_right_at_inference(name), name
    # nnU-Net announced the class when it built the network; this second lookup stays quiet
    assert "Searching in" not in capsys.readouterr().out


def test_every_trainer_variant_is_found_by_nnunet(monkeypatch):
    """The nnUNet_extTrainer shim re-exports variants.__all__, so a new variant needs no second list."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnlandmark_h3de.training import variants
    from nnlandmark_h3de.training.trainer_folder import trainer_folder
    monkeypatch.setenv("nnUNet_extTrainer", str(trainer_folder()))
    for name in variants.__all__:
        assert recursive_find_trainer_class_by_name(name) is getattr(variants, name), name
