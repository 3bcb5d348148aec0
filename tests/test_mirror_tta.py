"""nnLandmarkPredictor runs test-time mirroring one mirror at a time over the whole volume, so each
mirror's peaks feed the uncertainty. Its logits must equal nnU-Net's own per-tile mirroring."""
import numpy as np
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnlandmark_h3de.inference.landmark_predictor import nnLandmarkPredictor
from test_index_mapping import _plans


def _predictors(mirror_axes):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.LeakyReLU(),
                              torch.nn.Conv3d(4, 3, 3, padding=1)).eval()  # 1 + 2 landmark channels
    plans = _plans((0, 1, 2), (1.0, 1.0, 1.0))
    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    dataset_json = {"labels": {"background": 0, "a": 1, "b": 2}, "file_ending": ".nii.gz"}
    out = []
    for cls in (nnUNetPredictor, nnLandmarkPredictor):
        p = cls(tile_step_size=0.5, use_gaussian=True, use_mirroring=True, perform_everything_on_device=False,
                device=torch.device("cpu"), verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        p.manual_initialization(net, pm, cm, None, dataset_json, "x", mirror_axes)
        out.append(p)
    return out


def test_whole_volume_mirroring_averages_the_mirrors_like_nnunet():
    stock, ours = _predictors((0, 1, 2))
    x = torch.randn(1, 24, 32, 16)  # tile 16^3, step 8: symmetric tile positions on every axis
    _, _, folds, got, _ = ours.locate(x, None)  # the product path; no pairs: all axes mirrored without properties
    members = folds[0].member_idx
    got = got.float().numpy()
    assert ours.use_mirroring, "mirroring must be restored"
    assert len(members) == 8  # identity + 7 mirror combinations, one peak set each

    # exactly the mean of the 8 whole-volume predictions of the flipped image, flipped back
    stock.use_mirroring = False
    combos = [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    members = [stock.predict_sliding_window_return_logits(torch.flip(x, [a + 1 for a in c]))
               .flip([a + 1 for a in c]).float().numpy() for c in combos]
    np.testing.assert_allclose(got, np.mean(members, 0), atol=1e-5)
    # and nnU-Net's per-tile mirroring up to its off-centre Gaussian tile weights (fp16 output)
    stock.use_mirroring = True
    expected = stock.predict_sliding_window_return_logits(x).float().numpy()
    assert np.abs(got - expected).mean() < 0.02 * expected.std()
    assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.99
    # the mirrors really disagree (the net is not symmetric), so the spread carries information
    peaks = np.stack(members)
    assert np.ptp(peaks, axis=0).max() > 0


def test_without_a_case_in_flight_it_is_nnunets_path():
    stock, ours = _predictors((1,))
    x = torch.randn(1, 16, 24, 16)
    np.testing.assert_allclose(ours.predict_sliding_window_return_logits(x).numpy(),
                               stock.predict_sliding_window_return_logits(x).numpy(), atol=1e-6)


class _FakeAnchorNet(torch.nn.Module):
    """Heatmaps from a conv; existence = running max of a per-landmark value that grows per call."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 3, 3, padding=1)
        self.record_existence = False
        self.register_buffer("anchor_existence", torch.zeros(2), persistent=False)
        self.calls = 0

    def reset_existence(self):
        self.anchor_existence.zero_()

    def forward(self, x):
        self.calls += 1
        if self.record_existence:
            p = torch.tensor([0.1, 0.05]) * self.calls
            torch.maximum(self.anchor_existence, p, out=self.anchor_existence)
        return self.conv(x)


def test_anchor_existence_is_collected_per_fold_over_all_tiles_and_mirrors():
    _, ours = _predictors((0,))
    net = _FakeAnchorNet().eval()
    ours.network = net
    assert ours._existence_network() is net
    with ours.case_in_flight(None, record_existence=True) as case:
        ours.predict_sliding_window_return_logits(torch.randn(1, 16, 16, 16))
    # one tile x 2 mirrors = 2 calls while recording: the max is the second call's value
    assert net.calls == 2 and not net.record_existence
    np.testing.assert_allclose(case.folds[0].existence, [0.2, 0.1])
    # outside a case nothing is recorded: calls 3 and 4 would have given 0.4, 0.2
    ours.predict_sliding_window_return_logits(torch.randn(1, 16, 16, 16))
    assert net.calls == 4 and not net.record_existence
    np.testing.assert_allclose(net.anchor_existence.numpy(), [0.2, 0.1])
