"""The global estimates as input channels of the local network (nnLandmarkTrainerPrior): drawn where the
estimates are, in training and in every tile of two-stage prediction (regional or whole-image
preprocessing), and kept consistent under a left/right test-time mirror."""
import numpy as np
import pytest
import torch

from nnlandmark_h3de.heatmaps.estimate_channels import estimate_channels, simulated_estimates
from nnlandmark_h3de.inference.estimate_input import check_whole_image_allowed, mirrored_input
from test_index_mapping import _plans
from test_regional_preprocessing import _GlobalStage, _case, _predictor, _write
from rotations import rotation_matrix
from nnlandmark_h3de.landmarks import ImageGeometry


def test_channels_peak_at_the_estimates_and_are_empty_without_one():
    est = torch.tensor([[[3.0, 4.5, 5.2], [np.nan, np.nan, np.nan], [20.0, 2.0, 2.0], [-0.4, 0.0, 9.4]]])
    ch = estimate_channels(est, (8, 10, 10), sigma=1.5)
    assert ch.shape == (1, 4, 8, 10, 10) and ch.dtype == torch.float32
    assert tuple(np.unravel_index(int(ch[0, 0].argmax()), (8, 10, 10))) == (3, 4, 5)  # round(4.5) either way
    assert float(ch[0, 0].max()) > 0.8
    assert float(ch[0, 1].abs().max()) == 0.0  # absent
    assert float(ch[0, 2].abs().max()) == 0.0  # its estimate lies outside the patch: no tail drawn either
    assert float(ch[0, 3].max()) > 0.8  # on the border, still inside (-0.5 <= x <= n - 0.5)


def test_simulated_estimates_have_the_asked_error():
    torch.manual_seed(0)
    points = torch.zeros((64, 32, 3), dtype=torch.float64)
    points[:, 5] = float("nan")
    sd = np.array([1.0, 2.0, 0.5])
    moved = simulated_estimates(points, sd)
    assert torch.isnan(moved[:, 5]).all()
    offsets = moved[:, [i for i in range(32) if i != 5]].reshape(-1, 3).numpy()
    np.testing.assert_allclose(offsets.std(0), sd, rtol=0.05)
    np.testing.assert_allclose(offsets.mean(0), 0.0, atol=0.05)


def test_a_mirror_swaps_the_pairs_estimate_channels_and_not_the_image():
    x = torch.arange(2 * 5 * 4, dtype=torch.float32).reshape(1, 5, 4, 1, 2)[:, :, :, :, :]  # 1 image + 4 estimates
    out = mirrored_input(x, [2], pair_channels=[0, 2, 1, 3, 4], n_estimates=4)  # landmarks 0 <-> 1 are a pair
    flipped = torch.flip(x, [2])
    assert torch.equal(out[:, 0], flipped[:, 0])
    assert torch.equal(out[:, 1], flipped[:, 2]) and torch.equal(out[:, 2], flipped[:, 1])
    assert torch.equal(out[:, 3:], flipped[:, 3:])
    assert torch.equal(mirrored_input(x, [2], None, 4), flipped)
    assert torch.equal(mirrored_input(x, [], None, 0), x)


class _EchoesItsEstimates(torch.nn.Module):
    """A 'local network' whose heatmaps are its estimate channels: two-stage prediction must return the
    global estimates themselves, wherever the tiles lie and however they were resampled."""
    estimate_sigma = 2.0

    def __init__(self, n_landmarks):
        super().__init__()
        self.n, self.calls, self.seen = n_landmarks, 0, []
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        self.calls += 1
        assert x.shape[1] == 1 + self.n, x.shape  # one image channel + one per landmark
        self.seen.append(int((x[:, 1:].amax(dim=(2, 3, 4)) > 0.5).sum()))  # estimates drawn in this tile
        h = (0.98 * x[:, 1:]).clamp(1e-6, 1 - 1e-6)
        out = torch.log(h / (1 - h))
        return torch.cat([torch.zeros_like(out[:, :1]), out], 1)


@pytest.mark.parametrize("regional", [True, False])
def test_two_stage_prediction_draws_the_estimates_where_they_are(tmp_path, regional):
    size = (60, 56, 40)
    spacing, origin, direction = (0.8, 0.9, 1.3), (-20.0, 5.0, 12.0), rotation_matrix(0.2, -0.1, 0.3)
    geom = ImageGeometry(size, spacing, origin, tuple(direction.ravel()))
    rng = np.random.default_rng(1)
    path = tmp_path / "case_0000.nii.gz"
    _write(path, 1 + rng.random(geom.shape_zyx), spacing, origin, direction)
    plans = _plans((2, 0, 1), (1.2, 1.0, 1.1))
    names = ["a", "b", "c"]
    estimate = geom.array_index_to_world(np.array([[12.3, 15.0, 14.6], [28.0, 40.2, 45.0], [12.9, 15.6, 15.0]]))
    net = _EchoesItsEstimates(3)
    p = _predictor(plans, names, net, _GlobalStage(names, estimate), radius_mm=5.0, regional=regional)
    item = _case(p, [str(path)], regional)
    data = item["data"] if regional else torch.as_tensor(item["data"]).float()
    ls, report, _ = p.predict_case(data, item["data_properties"], files=[str(path)])
    assert report["n_tiles"] == net.calls == 2
    assert sorted(net.seen) == [1, 2]  # a and c share a tile and both are drawn in it; b has its own
    np.testing.assert_allclose(ls.points_lps, estimate, atol=0.15)
    with pytest.raises(ValueError, match="takes the global stage's estimates as input"):
        check_whole_image_allowed(net)
