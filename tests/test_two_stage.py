"""Global-to-local parts: atlas registration recovers landmarks through a known pose, tiles cover every
estimate once, and the local search keeps the peak near its estimate over a brighter look-alike."""
import numpy as np
import pytest
import torch

from nnlandmark_h3de.inference.atlas import Atlas, atlas_estimate, choose_atlases, combine
from nnlandmark_h3de.inference.two_stage_tiles import TilePlan, tile_groups, tile_peaks
from nnlandmark_h3de.landmarks import LandmarkSet


def blob_logits(shape, peaks):
    """Logits whose sigmoid is a sum of Gaussians (centre, height, sigma)."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"), -1)
    h = torch.zeros(shape, dtype=torch.float64)
    for c, height, sigma in peaks:
        h += height * torch.exp(-0.5 * ((grid - torch.tensor(c)) ** 2).sum(-1) / sigma ** 2)
    h = h.clamp(1e-6, 1 - 1e-6)
    return torch.log(h / (1 - h)).float()


def test_tiles_cover_each_estimate_once_and_keep_balls_inside():
    rng = np.random.default_rng(0)
    shape, patch, radius = np.array([80, 90, 100]), np.array([32, 32, 32]), np.array([4.0, 4.0, 4.0])
    centres = rng.uniform(0, shape - 1, (12, 3))
    centres[3] = np.nan
    groups = tile_groups(centres, shape, patch, radius)
    seen = sorted(k for _, m in groups for k in m)
    assert seen == [k for k in range(12) if k != 3]
    for lo, members in groups:
        assert np.all(lo >= 0) and np.all(lo + patch <= shape)
        for k in members:
            assert np.all(centres[k] - radius >= lo - 1e-9) or np.any(lo == 0)
            assert np.all(centres[k] < lo + patch)
    close = np.array([[40.0, 40, 40], [42, 41, 40], [44, 40, 42]])
    assert len(tile_groups(close, shape, patch, radius)) == 1


def test_local_search_prefers_the_peak_near_the_estimate():
    """The predictor's path: tiles planned around the estimates, each landmark's peak read in its ball; a
    peak in the tile but outside the ball is not taken (the maximum on the ball's surface: the estimate)."""
    shape = (60, 60, 60)
    truth = np.array([[20.3, 30.6, 25.2], [40.0, 20.0, 45.5], [30.0, 30.0, 30.0]])
    # landmark 0 has a brighter look-alike far away (what a whole-image argmax would pick) and one in its
    # tile, outside its search ball
    full = [blob_logits(shape, [(truth[0], 0.7, 2.0), ((45.0, 45.0, 10.0), 0.95, 2.0),
                                ((20.3, 30.6, 37.2), 0.9, 2.0)]),
            blob_logits(shape, [(truth[1], 0.9, 2.0)]), blob_logits(shape, [(truth[2], 0.9, 2.0)])]
    full = torch.stack(full)
    with_zero_channel = torch.cat([torch.zeros_like(full[:1]), full])  # the network's channel 0

    estimate = truth + np.array([[2.0, -2.5, 1.0], [-3.0, 1.0, 2.0], [0.0, 0.0, 9.0]])  # 2: 9 voxels off
    radius = np.array([6.0, 6.0, 6.0])
    plan = TilePlan(tile_groups(estimate, shape, (32, 32, 32), radius), estimate, radius, np.zeros(3))
    tiles = torch.stack([with_zero_channel[:, lo[0]:lo[0] + 32, lo[1]:lo[1] + 32, lo[2]:lo[2] + 32]
                         for lo, _ in plan.groups])
    idx, peak, _, fallback = tile_peaks(tiles, plan)
    np.testing.assert_allclose(idx[:2], truth[:2], atol=0.05)
    assert peak[0] == pytest.approx(0.7, abs=0.05) and len(plan.groups) <= 3
    assert list(fallback) == [False, False, True]
    np.testing.assert_allclose(idx[2], estimate[2])
    whole_image_argmax = np.unravel_index(int(full[0].argmax()), shape)
    assert np.linalg.norm(np.array(whole_image_argmax) - truth[0]) > 20


def test_combine_is_a_robust_median_over_the_atlases_that_have_the_landmark():
    per = np.array([[[0, 0, 0], [10, 0, 0], [np.nan] * 3], [[1, 0, 0], [np.nan] * 3, [np.nan] * 3],
                    [[50, 0, 0], [np.nan] * 3, [np.nan] * 3]], float)
    median, spread = combine(per)
    np.testing.assert_allclose(median[0], [1, 0, 0])
    assert spread[0] == pytest.approx(np.sqrt((1 + 0 + 49 ** 2) / 3))
    # an atlas lacking a landmark says nothing about the case: the one atlas that has it decides
    np.testing.assert_allclose(median[1], [10, 0, 0])
    assert np.isnan(median[2]).all()  # no atlas has it


def test_atlas_recovers_landmarks_through_a_known_pose():
    import SimpleITK as sitk
    from nnlandmark_h3de.demo.phantoms import generate_phantom_cases
    from nnlandmark_h3de.synthesis.reposing import repose_case
    from nnlandmark_h3de.landmarks import read_landmarks
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        cases = generate_phantom_cases(tmp, 2, shape=(48, 56, 56), spacing=(2.0, 2.0, 2.0), seed=3,
                                       absent_fraction=0.0, progress=False)
        names = sorted(cases)
        atlas_img = sitk.ReadImage(str(cases[names[0]][0]), sitk.sitkFloat32)
        atlas_ls = read_landmarks(cases[names[0]][1])
        rng = np.random.default_rng(1)
        case_img, case_ls = repose_case(atlas_img, atlas_ls, rng, max_rotation_deg=12, max_translation_mm=8,
                                        intensity=None)
        est = atlas_estimate(case_img, [Atlas("a", atlas_img, atlas_ls)], spacing_mm=2.0)
    err = np.linalg.norm(est.points_lps - case_ls.points_lps, axis=1)
    ok = np.isfinite(err)
    assert ok.sum() >= len(err) - 2
    assert np.nanmean(err) < 2.0, err  # one voxel of 2 mm: the same anatomy, only posed


def test_choose_atlases_prefers_complete_and_diverse_cases():
    base = np.zeros((3, 3))
    sets = [LandmarkSet(["a", "b", "c"], base + d) for d in ([0, 0, 0], [0.1, 0, 0], [0, 0, 0])]
    sets[0].points_lps[2] = np.nan
    sets[1].points_lps[1] = [30, 0, 0]
    assert choose_atlases(sets, 2) == [1, 2] or choose_atlases(sets, 2)[0] in (1, 2)
    assert len(choose_atlases(sets, 5)) == 3
    # an incomplete case is not chosen while complete ones remain, however far away it looks
    far = [LandmarkSet(["a", "b", "c"], base + [i, 0, 0]) for i in range(4)]
    far[3].points_lps[:2] = [[100, 0, 0], [np.nan] * 3]
    assert 3 not in choose_atlases(far, 3) and choose_atlases(far, 4)[-1] == 3


# ----------------------------------------------------------------- the predictor in two stages
class _HeatmapNet(torch.nn.Module):
    """Returns its input as heatmap logits (background channel first) and counts its calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        self.calls += 1
        h = x.clamp(1e-4, 1 - 1e-4)
        out = torch.log(h / (1 - h))
        return torch.cat([torch.zeros_like(out[:, :1]), out], 1)


class _FixedGlobalStage:
    def __init__(self, names, points, spread):
        self.names, self.points, self.spread = names, np.asarray(points, float), np.asarray(spread, float)

    def estimate(self, files):
        assert files == ["case_0000.nii.gz"]
        return LandmarkSet(self.names, self.points.copy(), uncertainty_mm=self.spread.copy())


def test_predictor_refines_global_estimates_on_a_few_tiles_and_keeps_them_without_a_local_peak():
    """48^3 volume, 16^3 tiles (343 in the sliding window). A: its true peak (0.7) near the estimate and a
    brighter look-alike (0.95) far away: the whole-image argmax takes the look-alike, two stages the
    true peak. B: no peak within the 6 mm search radius (its blob lies 9 voxels away): the global
    estimate stands, with at least the global stage's validated error as uncertainty."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnlandmark_h3de.inference.landmark_predictor import nnLandmarkPredictor
    from test_index_mapping import _plans
    shape = (48, 48, 48)
    names = ["A", "B"]
    vol_a = torch.sigmoid(blob_logits(shape, [((10.0, 12.0, 11.0), 0.7, 2.0), ((40.0, 38.0, 36.0), 0.95, 2.0)]))
    vol_b = torch.sigmoid(blob_logits(shape, [((30.0, 30.0, 39.0), 0.9, 2.0)]))
    data = torch.stack([vol_a, vol_b]).float()
    plans = _plans((0, 1, 2), (1.0, 1.0, 1.0))
    pm = PlansManager(plans)
    props = {"sitk_stuff": {"spacing": (1.0, 1.0, 1.0), "origin": (0.0, 0.0, 0.0), "direction": tuple(np.eye(3).ravel())},
             "spacing": [1.0, 1.0, 1.0], "shape_before_cropping": shape,
             "bbox_used_for_cropping": [[0, n] for n in shape], "shape_after_cropping_and_before_resampling": shape}
    dataset_json = {"labels": {"background": 0, "A": 1, "B": 2}, "file_ending": ".nii.gz",
                    "landmarks": {"names": names, "pairs": []}}
    net = _HeatmapNet()

    def predictor():
        p = nnLandmarkPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False, uncertainty="spread")
        p.manual_initialization(net, pm, pm.get_configuration("3d_fullres"), None, dataset_json, "x", None)
        p.postprocessing.absent = False
        return p

    # world (x, y, z) = array (z, y, x) reversed: identity geometry
    estimate_zyx = np.array([[12.0, 10.0, 13.0], [30.0, 30.0, 30.0]])
    whole, _, _ = predictor().predict_case(data, props)
    calls_whole, net.calls = net.calls, 0
    two = predictor()
    two.use_global_stage(_FixedGlobalStage(names, estimate_zyx[:, ::-1], [1.5, 2.5]), radius_mm=6.0,
                         fallback_uncertainty_mm=4.0)
    ls, report, logits = two.predict_case(data, props, files=["case_0000.nii.gz"])
    assert logits is None and report["n_tiles"] == net.calls <= 2 < calls_whole
    np.testing.assert_allclose(whole.points_lps[0][::-1], [40.0, 38.0, 36.0], atol=0.3)  # the look-alike
    np.testing.assert_allclose(ls.points_lps[0][::-1], [10.0, 12.0, 11.0], atol=0.3)  # the true peak
    np.testing.assert_allclose(ls.points_lps[1][::-1], estimate_zyx[1])  # no local peak: the estimate
    assert report["global_estimate_kept"] == ["B"]
    assert ls.uncertainty_mm[1] >= 4.0 and ls.uncertainty_mm[0] < 4.0
    # a local peak floor above A's peak (0.7): the global estimate stands for A too
    floored = predictor()
    floored.use_global_stage(_FixedGlobalStage(names, estimate_zyx[:, ::-1], [1.5, 2.5]), radius_mm=6.0,
                             fallback_uncertainty_mm=4.0, local_peak_floor=np.array([0.8, 0.0]))
    ls, report, _ = floored.predict_case(data, props, files=["case_0000.nii.gz"])
    np.testing.assert_allclose(ls.points_lps[:, ::-1], estimate_zyx, atol=1e-6)
    assert report["global_estimate_kept"] == ["A", "B"] and np.all(ls.uncertainty_mm >= 4.0)


def test_local_peak_floor_keeps_the_better_source_on_validation():
    """Strong local peaks are right, weak ones wrong: the floor lets only the strong ones overrule the
    global estimate; a useless local stage is switched off (floor inf); a perfect one always used."""
    from nnlandmark_h3de.training.calibration import fit_local_peak_floor
    rng = np.random.default_rng(0)
    peaks = rng.uniform(0.1, 1.0, (20, 4)) * np.array([1.0, 0.3, 0.6, 0.9])  # landmarks peak at their own heights
    relative = peaks / np.median(peaks, axis=0)
    global_err = np.full((20, 4), 2.0)
    local_err = np.where(relative >= 0.8, 0.5, 10.0)
    floor, info = fit_local_peak_floor(local_err, global_err, peaks)
    used = peaks >= floor[None]
    assert np.all(used == (relative >= 0.8)) and info["mre_mm"] < info["mre_global_mm"] < info["mre_local_mm"]
    floor, info = fit_local_peak_floor(np.full((20, 4), 9.0), global_err, peaks)
    assert np.all(np.isinf(floor)) and info["local_used_fraction"] == 0.0
    floor, info = fit_local_peak_floor(np.full((20, 4), 0.1), global_err, peaks)
    assert np.all(floor == 0.0) and info["local_used_fraction"] == 1.0


def test_choose_atlases_takes_exact_labels_first(tmp_path):
    """A one-shot dataset: the template and its copies (exact) before pseudo-labelled cases, even an
    incomplete copy before a complete pseudo-label; exact_label_cases reads them from pseudo_labels.json."""
    import json

    from nnlandmark_h3de.landmarks.dataset_file import exact_label_cases
    sets = [LandmarkSet(["a", "b"], np.array([[i * 10.0, 0, 0], [0, i * 10.0, 0]])) for i in range(5)]
    sets[3].points_lps[1] = np.nan
    exact = [False, False, False, True, True]
    assert sorted(choose_atlases(sets, 2, exact=exact)) == [3, 4]
    assert choose_atlases(sets, 2, exact=exact)[0] == 4  # complete before incomplete among the exact ones
    assert set(choose_atlases(sets, 3, exact=exact)[:2]) == {3, 4}
    assert 3 not in choose_atlases(sets, 2)  # without `exact`: complete cases first, as before

    assert exact_label_cases(tmp_path) is None  # no pseudo_labels.json: every case is labelled
    (tmp_path / "pseudo_labels.json").write_text(json.dumps({"template": "t", "template_copies": ["t_atd00"],
                                                             "cases": {}}))
    assert exact_label_cases(tmp_path) == ["t", "t_atd00"]
