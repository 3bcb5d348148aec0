"""decode_peaks: known sub-voxel Gaussian peaks come back within 0.1 voxel."""
import numpy as np
import pytest
import torch

from nnlandmark_h3de.inference.peaks import decode_peaks

SHAPE = (24, 28, 32)


def gaussian(center, sigma, shape=SHAPE, cov=None):
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"), axis=-1)
    d = grid - np.asarray(center, dtype=np.float64)
    if cov is None:
        cov = np.diag(np.asarray(sigma, dtype=np.float64) ** 2)
    m = np.einsum("...i,ij,...j->...", d, np.linalg.inv(cov), d)
    return np.exp(-0.5 * m)


CENTERS = [(10.0, 12.0, 15.0), (10.3, 12.7, 15.45), (5.49, 20.1, 7.77), (17.9, 3.33, 25.5)]


@pytest.mark.parametrize("center", CENTERS)
@pytest.mark.parametrize("sigma", [(2.0, 2.0, 2.0), (1.5, 3.0, 4.0), (4.0, 4.0, 4.0)])
def test_subvoxel_gaussian(center, sigma):
    idx, peak, spread = decode_peaks(gaussian(center, sigma)[None])
    assert np.abs(idx[0] - center).max() < 0.1, (idx[0], center)
    assert 0.9 < peak[0] <= 1.0
    np.testing.assert_allclose(spread[0], sigma, rtol=0.05)


def test_vectorised_channels_and_rotated_anisotropic():
    rot = np.array([[np.cos(0.6), -np.sin(0.6), 0], [np.sin(0.6), np.cos(0.6), 0], [0, 0, 1]])
    cov = rot @ np.diag([1.5, 4.0, 2.5]) ** 2 @ rot.T
    centers = [(12.35, 14.8, 16.2), (6.6, 9.1, 22.9), (15.5, 20.5, 10.05)]
    h = np.stack([gaussian(centers[0], None, cov=cov)] + [gaussian(c, (2.5, 2, 3)) for c in centers[1:]])
    idx, peak, spread = decode_peaks(h)
    assert idx.shape == (3, 3) and peak.shape == (3,) and spread.shape == (3, 3)
    assert np.abs(idx - np.asarray(centers)).max() < 0.1, idx
    np.testing.assert_allclose(spread[0], np.sqrt(np.diag(cov)), rtol=0.05)


@pytest.mark.parametrize("center", [(0.0, 12.0, 15.0), (0.3, 0.2, 31.4), (23.4, 27.0, 0.45), (-0.4, 5.2, 31.3)])
def test_near_border(center):
    idx, _, _ = decode_peaks(gaussian(center, (2.0, 2.5, 3.0))[None])
    assert np.abs(idx[0] - center).max() < 0.1, (idx[0], center)


def test_noise():
    rng = np.random.default_rng(0)
    errs = []
    for trial in range(20):
        center = rng.uniform([4, 4, 4], np.asarray(SHAPE) - 5)
        h = gaussian(center, (3.0, 3.0, 3.0)) * 0.8
        h += rng.normal(0, 0.01, size=h.shape)  # ~1 % of the peak height
        idx, _, _ = decode_peaks(h[None])
        errs.append(np.abs(idx[0] - center).max())
    assert max(errs) < 0.1, errs
    # the plain argmax would be up to 0.5 voxel off: the refinement must be doing the work
    assert np.mean(errs) < 0.05


def test_logits_input_matches_sigmoid_input():
    h = gaussian((9.2, 13.6, 18.3), (3.0, 2.0, 2.5)) * 0.9 + 0.01
    logit = np.log(h / (1 - h))
    a = decode_peaks(h[None])
    b = decode_peaks(logit[None], logits=True)
    np.testing.assert_allclose(a[0], b[0], atol=1e-9)
    np.testing.assert_allclose(a[1], b[1], atol=1e-9)


def test_torch_input_same_result():
    h = np.stack([gaussian((9.2, 13.6, 18.3), (3.0, 2.0, 2.5)), gaussian((3.3, 3.3, 3.3), (2.0, 2.0, 2.0))]).astype(np.float32)
    a = decode_peaks(h)
    b = decode_peaks(torch.from_numpy(h))
    c = decode_peaks(torch.from_numpy(h).half())
    np.testing.assert_allclose(a[0], b[0], atol=1e-6)
    assert np.abs(c[0] - a[0]).max() < 0.1


def test_refinement_clamped_and_degenerate_maps():
    spike = np.zeros((1, 8, 8, 8))
    spike[0, 3, 4, 5] = 1.0
    flat = np.full((1, 8, 8, 8), 0.2)
    ramp = np.broadcast_to(np.exp(np.arange(8.0))[None, None, None, :], (1, 8, 8, 8)).copy()
    idx, peak, spread = decode_peaks(np.concatenate([spike, flat, ramp]))
    np.testing.assert_allclose(idx[0], [3, 4, 5])
    assert np.isnan(spread[0]).all()
    assert np.all(np.isfinite(idx))
    # the ramp peaks at the last voxel; whatever the fit says, it may move at most 1 voxel
    assert abs(idx[2, 2] - 7) <= 1.0 + 1e-9
    assert peak[1] == pytest.approx(0.2)


def test_bad_shape():
    with pytest.raises(ValueError, match="expects"):
        decode_peaks(np.zeros((8, 8)))
    with pytest.raises(ValueError, match="expects"):
        decode_peaks(np.zeros((2, 1, 8, 8, 8)))


# ------------------------------------------------------------------------------------------ 2D
CENTERS_2D = [(12.0, 15.0), (12.7, 15.45), (20.1, 7.77), (3.33, 25.5), (0.2, 31.4)]


@pytest.mark.parametrize("center", CENTERS_2D)
@pytest.mark.parametrize("sigma", [(2.0, 2.0), (1.5, 4.0)])
def test_subpixel_gaussian_2d(center, sigma):
    """(L, y, x) heatmaps: sub-pixel peaks within 0.1 pixel (the 2D issue's bound), spread = sigma."""
    h = gaussian(center, sigma, shape=(28, 32))
    idx, peak, spread = decode_peaks(h[None])
    assert idx.shape == (1, 2) and spread.shape == (1, 2)
    np.testing.assert_allclose(idx[0], center, atol=0.1)
    if min(center) >= 2:  # the whole window inside: the fit is exact
        np.testing.assert_allclose(idx[0], center, atol=1e-3)
        np.testing.assert_allclose(spread[0], sigma, rtol=1e-3)


@pytest.mark.parametrize("center", CENTERS_2D)
def test_singleton_axis_is_2d(center):
    """nnU-Net's (1, y, x) form of a 2D image: index 0 and spread 0 on the singleton axis, the same
    sub-pixel peak as the (y, x) form on the others (a 3D fit would be singular there)."""
    h = gaussian(center, (2.0, 3.0), shape=(28, 32))
    rotated = gaussian(center, None, shape=(28, 32), cov=np.array([[4.0, 2.5], [2.5, 9.0]]))
    for image in (h, rotated):
        idx2, peak2, spread2 = decode_peaks(image[None])
        idx3, peak3, spread3 = decode_peaks(torch.from_numpy(image)[None, None], logits=False)
        np.testing.assert_allclose(idx3[0], [0.0, *idx2[0]], atol=1e-9)
        np.testing.assert_allclose(spread3[0], [0.0, *spread2[0]], atol=1e-9)
        assert peak3[0] == peak2[0]
        np.testing.assert_allclose(idx3[0, 1:], center, atol=0.1)


def test_a_border_peak_leaning_outwards_stays_inside_the_grid():
    """A Gaussian centred 0.9 voxel outside the first row has its argmax on the border and a fit that
    leans outwards: the decoded point stays within half a voxel of the outer voxel centres (it was found
    in this image; a 2D e2e run once placed such a landmark outside the image)."""
    from nnlandmark_h3de.inference.peaks import decode_peaks
    y, x = np.meshgrid(np.arange(12.0), np.arange(10.0), indexing="ij")
    h = np.exp(-((y + 0.9) ** 2 + (x - 4.3) ** 2) / (2 * 1.5 ** 2))[None]
    idx, _, _ = decode_peaks(h)
    assert idx[0, 0] == pytest.approx(-0.5) and idx[0, 1] == pytest.approx(4.3, abs=1e-6)
    far = np.exp(-((y - 11.9) ** 2 + (x - 9.8) ** 2) / (2 * 1.5 ** 2))[None]  # beyond the last row and column
    idx, _, _ = decode_peaks(far)
    assert idx[0, 0] == pytest.approx(11.5) and idx[0, 1] == pytest.approx(9.5)
