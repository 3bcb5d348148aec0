"""Two-stage prediction that resamples only the tiles' regions (regional_preprocessing.py) against
nnU-Net's whole-image preprocessing: the same network input where the grids align, the same landmarks
where they do not."""
import numpy as np
import SimpleITK as sitk
import torch

from nnlandmark_h3de.inference.two_stage_tiles import plan_regional_tiles
from nnlandmark_h3de.landmarks import ImageGeometry, LandmarkSet
from rotations import rotation_matrix
from test_index_mapping import _plans
from test_two_stage import _HeatmapNet


class _EveryLandmarkSeesTheImage(_HeatmapNet):
    """One image channel as every landmark's heatmap (each landmark's search ball picks its own blob)."""

    def __init__(self, n_landmarks):
        super().__init__()
        self.n = n_landmarks

    def forward(self, x):
        return super().forward(x.repeat(1, self.n, 1, 1, 1))


class _GlobalStage:
    def __init__(self, names, points):
        self.names, self.points = names, np.asarray(points, dtype=np.float64)

    def estimate(self, files):
        return LandmarkSet(self.names, self.points.copy(), uncertainty_mm=np.ones(len(self.names)))


def _write(path, values_zyx, spacing, origin=(0.0, 0.0, 0.0), direction=np.eye(3)) -> ImageGeometry:
    shape = values_zyx.shape
    geom = ImageGeometry(tuple(shape[::-1]), tuple(spacing), tuple(origin), tuple(np.asarray(direction).ravel()))
    sitk.WriteImage(geom.to_sitk_image(values_zyx.astype(np.float32)), str(path))
    return geom


def _predictor(plans, names, net, stage, radius_mm, regional=True):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnlandmark_h3de.inference.landmark_predictor import nnLandmarkPredictor
    pm = PlansManager(plans)
    labels = {"background": 0, **{n: i + 1 for i, n in enumerate(names)}}
    dataset_json = {"labels": labels, "file_ending": ".nii.gz", "landmarks": {"names": names, "pairs": []}}
    p = nnLandmarkPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False, perform_everything_on_device=False,
                            device=torch.device("cpu"), verbose=False, verbose_preprocessing=False, allow_tqdm=False,
                            uncertainty="spread", regional_preprocessing=regional)
    p.manual_initialization(net, pm, pm.get_configuration("3d_fullres"), None, dataset_json, "x", None)
    p.postprocessing.absent = False
    p.use_global_stage(stage, radius_mm=radius_mm, fallback_uncertainty_mm=4.0)
    return p


def _case(p, files, regional):
    from nnlandmark_h3de.inference.preprocessing_pool import preprocess_case
    item = preprocess_case(files, None, None, p.plans_manager, p.configuration_manager, p.dataset_json, regional)
    assert "error" not in item, item.get("error")
    return item


def test_tile_inputs_equal_nnunet_preprocessing_where_the_grids_align(tmp_path):
    """0.5 mm image, model at 1 mm: every region's grid is the whole image's. Z-score normalisation needs the
    whole image's statistics, the crop to the non-zero box shifts every index: the tiles the network sees
    must be nnU-Net's whole preprocessed array at the same place."""
    rng = np.random.default_rng(0)
    zyx = np.stack(np.meshgrid(*[np.arange(n) for n in (60, 64, 72)], indexing="ij"), -1).astype(np.float64)
    values = 100 + 20 * np.sin(zyx[..., 0] / 5) * np.cos(zyx[..., 1] / 7) + 10 * np.sin(zyx[..., 2] / 4) + \
        rng.normal(0, 1, zyx.shape[:3])
    values[:, :, :8] = 0  # the crop to the non-zero box removes 8 columns
    path = tmp_path / "case_0000.nii.gz"
    geom = _write(path, values, (0.5, 0.5, 0.5), origin=(-10.0, 4.0, 2.5))
    plans = _plans((0, 1, 2), (1.0, 1.0, 1.0))
    plans["configurations"]["3d_fullres"]["normalization_schemes"] = ["ZScoreNormalization"]
    names = ["a", "b", "c"]
    points = geom.array_index_to_world(np.array([[12.0, 14.0, 20.0], [40.0, 50.0, 60.0], [30.0, 20.0, 50.0]]))
    p = _predictor(plans, names, _EveryLandmarkSeesTheImage(3), _GlobalStage(names, points), radius_mm=3.0)
    case = _case(p, [str(path)], regional=True)["data"]
    whole = _case(p, [str(path)], regional=False)
    assert case.data.shape[1:] == (60, 64, 64) and case.network_shape == tuple(whole["data"].shape[1:])
    assert case.properties["bbox_used_for_cropping"] == whole["data_properties"]["bbox_used_for_cropping"]
    inputs, plan = plan_regional_tiles(p.local_search(), case, p.global_estimate([str(path)]))
    assert plan.n_tiles == len(plan.regions) == inputs.shape[0] == 3
    patch = np.asarray(p.configuration_manager.patch_size)
    for g, ((origin, _), region) in enumerate(zip(plan.groups, plan.regions)):
        at = region.to_case_index(origin[None].astype(np.float64))[0]
        np.testing.assert_allclose(at, np.round(at), atol=1e-9)  # aligned grids
        lo = np.round(at).astype(int)
        expected = whole["data"][(slice(None),) + tuple(slice(a, a + n) for a, n in zip(lo, patch))]
        np.testing.assert_allclose(inputs[g].numpy(), expected, atol=1e-3)


def test_regional_and_whole_image_preprocessing_find_the_same_landmarks(tmp_path):
    """An oblique, anisotropic case, transposed and resampled to another spacing (grids not aligned): both
    routes put each landmark on its blob, within a small fraction of a voxel of each other; the regional
    route predicts the same tiles. An image smaller than a patch is resampled whole, with the same result."""
    size = (60, 56, 40)  # i, j, k
    spacing, origin, direction = (0.8, 0.9, 1.3), (-20.0, 5.0, 12.0), rotation_matrix(0.2, -0.1, 0.3)
    geom = ImageGeometry(size, spacing, origin, tuple(direction.ravel()))
    truth = geom.array_index_to_world(np.array([[12.0, 15.0, 14.0], [28.0, 40.0, 45.0]]))
    zyx = np.stack(np.meshgrid(*[np.arange(n) for n in geom.shape_zyx], indexing="ij"), -1).reshape(-1, 3)
    world = geom.array_index_to_world(zyx)
    values = np.full(len(zyx), 0.05)
    for t, height in zip(truth, (0.7, 0.9)):
        values += height * np.exp(-0.5 * np.sum((world - t) ** 2, axis=1) / 2.5 ** 2)
    path = tmp_path / "case_0000.nii.gz"
    _write(path, values.reshape(geom.shape_zyx), spacing, origin, direction)
    plans = _plans((2, 0, 1), (1.2, 1.0, 1.1))
    names = ["a", "b"]
    estimate = truth + np.array([[1.5, -1.0, 0.5], [-1.0, 1.0, 1.5]])
    results = {}
    for regional in (True, False):
        net = _EveryLandmarkSeesTheImage(2)
        p = _predictor(plans, names, net, _GlobalStage(names, estimate), radius_mm=5.0, regional=regional)
        item = _case(p, [str(path)], regional)
        data = item["data"] if regional else torch.as_tensor(item["data"]).float()
        ls, report, _ = p.predict_case(data, item["data_properties"], files=[str(path)])
        results[regional] = (ls.points_lps, report["n_tiles"], net.calls)
    (regional_pts, regional_tiles, regional_calls), (whole_pts, whole_tiles, _) = results[True], results[False]
    assert regional_tiles == whole_tiles == regional_calls == 2
    np.testing.assert_allclose(regional_pts, whole_pts, atol=0.1)
    np.testing.assert_allclose(regional_pts, truth, atol=0.3)
    # a patch larger than the image: resampled whole (and padded), one window, the same landmarks
    plans["configurations"]["3d_fullres"]["patch_size"] = [64, 64, 64]
    net = _EveryLandmarkSeesTheImage(2)
    p = _predictor(plans, names, net, _GlobalStage(names, estimate), radius_mm=5.0)
    item = _case(p, [str(path)], True)
    ls, report, _ = p.predict_case(item["data"], item["data_properties"], files=[str(path)])
    assert report["n_tiles"] == net.calls == 1
    np.testing.assert_allclose(ls.points_lps, truth, atol=0.3)
