"""Anchor head (H3DE-Net): target encoding/decoding, absent landmarks, loss, shapes; 3D and 2D grids."""
import math

import pytest
import torch
from torch import nn

from nnlandmark_h3de.training.anchor_targets import (AnchorLoss, anchor_positives, build_anchor_targets,
                                                     centres_from_heatmaps)
from nnlandmark_h3de.heatmaps.gaussian_heatmap import gaussian_heatmaps
from nnlandmark_h3de.networks.building_blocks.anchor_head import (AnchorHead, cell_coordinates, decode_anchors,
                                                                  decode_offsets, grid_stride, grid_to_voxel,
                                                                  voxel_to_grid)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


PATCH = (28, 20, 12)
GRID = (7, 5, 3)  # stride 4, odd sizes
RADII = torch.tensor([1.0, 2.0])
GEOMETRY = {3: (PATCH, GRID, nn.Conv3d), 2: ((28, 20), (7, 5), nn.Conv2d)}  # ndim -> patch, grid, conv op


def _centres(seed=0, b=2, n_l=4, patch=PATCH):
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(b, n_l, len(patch), generator=g) * (torch.tensor(patch) - 1)
    present = torch.ones(b, n_l, dtype=torch.bool)
    present[0, 1] = False
    present[1, 3] = False
    c[~present] = float("nan")
    return c, present


def _perfect_outputs(c, present, patch=PATCH, grid=GRID):
    """Offsets = the exact targets on positives (garbage elsewhere), logits +-12 by positivity."""
    tg = build_anchor_targets(c, present, patch, grid, RADII)
    b, n_l = present.shape
    offsets = torch.randn(b, len(RADII), n_l, len(grid), *grid) * 5
    offsets.movedim(3, -1)[tg.positive] = tg.offsets
    logits = torch.where(tg.positive, 12.0, -12.0)
    return tg, offsets, logits


def test_grid_convention_round_trip_and_mirror_symmetry():
    s = grid_stride(PATCH, GRID)
    assert s == (4.0, 4.0, 4.0)
    c = torch.tensor([[0.0, 3.3, 11.0]])
    assert torch.allclose(grid_to_voxel(voxel_to_grid(c, s), s), c)
    # cell i covers voxels 4i..4i+3: its centre is voxel 4i + 1.5; mirroring maps cell i to n-1-i
    assert torch.allclose(grid_to_voxel(torch.zeros(1, 3), s), torch.full((1, 3), 1.5))
    flipped = torch.tensor(PATCH) - 1 - c
    assert torch.allclose(voxel_to_grid(flipped, s), torch.tensor(GRID) - 1 - voxel_to_grid(c, s))


@pytest.mark.parametrize("nd", [3, 2])
def test_offsets_decode_back_to_the_exact_landmark(nd):
    patch, grid, _ = GEOMETRY[nd]
    c, present = _centres(patch=patch)
    tg, offsets, logits = _perfect_outputs(c, present, patch, grid)
    assert tg.offsets.shape[1] == nd
    cells = cell_coordinates(grid).movedim(0, -1)  # (*grid, nd)
    bi, ai, li, *cell = tg.positive.nonzero(as_tuple=True)
    f = cells[tuple(cell)]
    g = decode_offsets(tg.offsets, f, RADII[ai][:, None])
    assert torch.allclose(grid_to_voxel(g, grid_stride(patch, grid)), c[bi, li], atol=1e-5)
    for location in ("weighted", "medoid", "best"):
        pos, prob = decode_anchors(offsets, logits, RADII, patch, top_k=5, location=location)
        assert pos.shape == (2, 4, nd)
        assert torch.allclose(pos[present], c[present], atol=1e-4), location
        assert (prob[present] > 0.99).all() and (prob[~present] < 0.01).all()


def test_absent_landmark_is_negative_everywhere_and_present_ones_always_have_positives():
    c, present = _centres(seed=1)
    pos = anchor_positives(voxel_to_grid(c, grid_stride(PATCH, GRID)), present, GRID, torch.tensor([0.3, 0.6]))
    assert pos.shape == (2, 2, 4, *GRID)
    assert not pos[0, :, 1].any() and not pos[1, :, 3].any()
    # radii below half a cell diagonal: the nearest cell still makes every present landmark positive
    assert pos.flatten(3).any(-1).any(1)[present].all()
    # a landmark between cells with radius 1: exactly the cells within distance 1 (+ the nearest)
    g = torch.tensor([[[2.5, 2.0, 1.0]]])
    p = anchor_positives(g, torch.ones(1, 1, dtype=torch.bool), GRID, torch.tensor([1.0]))[0, 0, 0]
    expected = {(2, 2, 1), (3, 2, 1)}
    assert {tuple(i.tolist()) for i in p.nonzero()} == expected


def test_centres_from_heatmaps_recover_the_gaussian_centre_exactly():
    shape = (24, 18, 15)
    centres = torch.tensor([[3.3, 9.71, 7.05], [0.2, 17.4, 14.0], [12.0, 0.49, 0.0], [float("nan")] * 3],
                           dtype=torch.float64)
    present = torch.tensor([True, True, True, False])
    hm = gaussian_heatmaps(centres, present, shape, (4.0, 2.5, 3.0))[None]  # anisotropic sigma
    got, got_present = centres_from_heatmaps(hm)
    assert got_present[0].tolist() == present.tolist()
    assert torch.allclose(got[0, :3], centres[:3].float(), atol=2e-3)
    assert torch.isnan(got[0, 3]).all()


@pytest.mark.parametrize("nd", [3, 2])
def test_loss_finite_and_decreasing_on_a_toy_problem(nd):
    patch, grid, conv_op = GEOMETRY[nd]
    torch.manual_seed(0)
    c, present = _centres(seed=2, patch=patch)
    feats = torch.randn(2, 16, *grid)
    head = AnchorHead(conv_op, 16, 4, RADII.tolist(), norm_op=nn.InstanceNorm3d if nd == 3 else nn.InstanceNorm2d,
                      norm_op_kwargs={"affine": True}, nonlin=nn.LeakyReLU)
    loss_fn = AnchorLoss(RADII.tolist())
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    losses = []
    for _ in range(150):
        out = head(feats)
        loss, parts = loss_fn(out.offsets, out.logits, c, present, patch)
        assert torch.isfinite(loss) and all(torch.isfinite(v) for v in parts.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses[::10]
    # after fitting, decoding finds the landmarks and rejects the absent ones
    with torch.no_grad():
        out = head(feats)
        pos, prob = decode_anchors(out.offsets, out.logits, RADII, patch, location="medoid")
    assert (prob[present] > 0.9).all() and (prob[~present] < 0.5).all()
    assert (pos[present] - c[present]).norm(dim=-1).max() < 1.0


def test_loss_without_any_present_landmark_reaches_every_parameter():
    head = AnchorHead(nn.Conv3d, 4, 3, (1.0,))
    out = head(torch.randn(1, 4, 5, 3, 7))
    c = torch.full((1, 3, 3), float("nan"))
    loss, parts = AnchorLoss((1.0,))(out.offsets, out.logits, c, torch.zeros(1, 3, dtype=torch.bool), (20, 12, 28))
    loss.backward()
    assert math.isfinite(loss.item()) and parts["offset"] == 0
    assert all(p.grad is not None for p in head.parameters())


@pytest.mark.parametrize("spatial", [(7, 5, 3), (1, 9, 4), (6, 6, 6), (7, 5), (1, 9)])
def test_head_shapes_with_odd_feature_sizes(spatial):
    nd = len(spatial)
    head = AnchorHead(nn.Conv3d if nd == 3 else nn.Conv2d, 6, 5, (1.0, 2.0, 4.0))
    out = head(torch.randn(2, 6, *spatial))
    assert out.offsets.shape == (2, 3, 5, nd, *spatial)
    assert out.logits.shape == (2, 3, 5, *spatial)
    # the initial existence prior: nearly everything absent
    assert torch.sigmoid(out.logits).mean() < 0.05
    pos, prob = decode_anchors(out.offsets, out.logits, head.radii, [4 * s for s in spatial], top_k=100)
    assert pos.shape == (2, 5, nd) and prob.shape == (2, 5)


def _unet(L=3, deep_supervision=True, nd=3):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    conv, norm = (nn.Conv3d, nn.InstanceNorm3d) if nd == 3 else (nn.Conv2d, nn.InstanceNorm2d)
    return PlainConvUNet(1, 4, [4, 8, 8, 8], conv, 3, [1, 2, 2, 2], 1, L, 1, norm_op=norm,
                         norm_op_kwargs={"affine": True}, nonlin=nn.LeakyReLU, deep_supervision=deep_supervision)


def test_anchor_network_train_eval_outputs_stage_choice_and_existence_recorder():
    from nnlandmark_h3de.training.nnH3DETrainerAnchor import AnchorHeatmapNetwork, HeatmapAnchorLoss
    from nnlandmark_h3de.training.landmark_loss import HeatmapMSELoss
    torch.manual_seed(0)
    net = AnchorHeatmapNetwork(_unet(), 3, (1.0, 2.0), anchor_stride=4)
    assert net.anchor_stage == 0 and net.anchor_grid_stride == (4, 4, 4)  # first decoder stage = encoder stage 2
    x = torch.randn(2, 1, 16, 24, 8)
    heat, anchors = net(x)  # training mode: heatmaps (deep supervision list) + anchors
    assert [tuple(h.shape) for h in heat] == [(2, 4, 16, 24, 8), (2, 4, 8, 12, 4), (2, 4, 4, 6, 2)]
    assert anchors.logits.shape == (2, 2, 3, 4, 6, 2) and torch.all(heat[0][:, 0] == 0)
    target = [torch.zeros(2, 3, *h.shape[2:]) for h in heat]
    target[0][0, 1, 5, 7, 3] = 1.0  # a present landmark (not Gaussian: centre = the argmax voxel)
    loss = HeatmapAnchorLoss(HeatmapMSELoss(), AnchorLoss((1.0, 2.0)))
    l = loss((heat[0], anchors), target[0])
    l.backward()
    assert torch.isfinite(l) and net.anchor_head.out.weight.grad is not None
    net.eval()
    net.set_deep_supervision(False)
    with torch.no_grad():
        plain = net(x[:1])
        assert torch.is_tensor(plain) and plain.shape == (1, 4, 16, 24, 8)
        net.record_existence = True
        net.reset_existence()
        net(x[:1])
        first = net.anchor_existence.clone()
        net(x[1:])
        _, a1 = net.forward_with_anchors(x[1:])
    expected = torch.maximum(first, torch.sigmoid(a1.logits.transpose(0, 2).flatten(1).amax(1)))
    assert torch.allclose(net.anchor_existence, expected)


@pytest.mark.parametrize("scale", [0.0, 0.25])
def test_feature_grad_scale_scales_only_the_gradient_into_the_shared_network(scale):
    from nnlandmark_h3de.training.nnH3DETrainerAnchor import AnchorHeatmapNetwork
    x = torch.randn(1, 1, 16, 16, 8)
    grads, outs = [], []
    for s in (1.0, scale):
        torch.manual_seed(0)
        net = AnchorHeatmapNetwork(_unet(), 3, feature_grad_scale=s)
        _, anchors = net(x)
        anchors.logits.sum().backward()  # the anchor loss alone
        outs.append(anchors.logits.detach())
        grads.append((net.body.encoder.stages[0][0].convs[0].conv.weight.grad, net.anchor_head.out.weight.grad))
    assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(grads[1][1], grads[0][1])  # the head learns at full strength
    if scale == 0:
        assert grads[1][0] is None or torch.all(grads[1][0] == 0)
    else:
        torch.testing.assert_close(grads[1][0], scale * grads[0][0], rtol=1e-4, atol=1e-7)


def test_anchor_network_heatmaps_equal_the_plain_wrapper_output():
    """Same body, same input: the anchor network's heatmaps are exactly LandmarkHeatmapNetwork's
    (zero channel, logit offset, ...), in training and eval mode."""
    from nnlandmark_h3de.training.landmark_network import LandmarkHeatmapNetwork
    from nnlandmark_h3de.training.nnH3DETrainerAnchor import AnchorHeatmapNetwork
    body = _unet()
    plain, anchored = LandmarkHeatmapNetwork(body), AnchorHeatmapNetwork(body, 3)
    x = torch.randn(1, 1, 16, 16, 8)
    with torch.no_grad():
        for o_p, o_a in zip(plain(x), anchored(x)[0]):
            assert torch.equal(o_p, o_a)
        plain.eval(), anchored.eval()
        anchored.record_existence = True
        for o_p, o_a in zip(plain(x), anchored(x)):
            assert torch.equal(o_p, o_a)


def test_2d_absent_landmark_is_negative_everywhere_and_positives_are_the_cells_within_the_radius():
    patch, grid, _ = GEOMETRY[2]
    c, present = _centres(seed=1, patch=patch)
    pos = anchor_positives(voxel_to_grid(c, grid_stride(patch, grid)), present, grid, torch.tensor([0.3, 0.6]))
    assert pos.shape == (2, 2, 4, *grid)
    assert not pos[0, :, 1].any() and not pos[1, :, 3].any()
    assert pos.flatten(3).any(-1).any(1)[present].all()  # the nearest cell makes every present landmark positive
    g = torch.tensor([[[2.5, 2.0]]])
    p = anchor_positives(g, torch.ones(1, 1, dtype=torch.bool), grid, torch.tensor([1.0]))[0, 0, 0]
    assert {tuple(i.tolist()) for i in p.nonzero()} == {(2, 2), (3, 2)}
    # mirror symmetry of the grid convention holds per axis in 2D too
    s = grid_stride(patch, grid)
    flipped = torch.tensor(patch) - 1 - c[present]
    assert torch.allclose(voxel_to_grid(flipped, s), torch.tensor(grid) - 1 - voxel_to_grid(c[present], s), atol=1e-5)


def test_2d_centres_from_heatmaps_recover_the_gaussian_centre_exactly():
    shape = (24, 18)
    centres = torch.tensor([[3.3, 9.71], [0.2, 17.4], [12.0, 0.49], [float("nan")] * 2], dtype=torch.float64)
    present = torch.tensor([True, True, True, False])
    hm = gaussian_heatmaps(centres, present, shape, (4.0, 2.5))[None]
    got, got_present = centres_from_heatmaps(hm)
    assert got.shape == (1, 4, 2) and got_present[0].tolist() == present.tolist()
    assert torch.allclose(got[0, :3], centres[:3].float(), atol=2e-3)
    assert torch.isnan(got[0, 3]).all()


def test_2d_anchor_network_train_eval_outputs_and_existence_recorder():
    from nnlandmark_h3de.training.nnH3DETrainerAnchor import AnchorHeatmapNetwork, HeatmapAnchorLoss
    from nnlandmark_h3de.training.landmark_loss import HeatmapMSELoss
    torch.manual_seed(0)
    net = AnchorHeatmapNetwork(_unet(nd=2), 3, (1.0, 2.0), anchor_stride=4)
    assert net.anchor_stage == 0 and net.anchor_grid_stride == (4, 4)
    x = torch.randn(2, 1, 16, 24)
    heat, anchors = net(x)
    assert [tuple(h.shape) for h in heat] == [(2, 4, 16, 24), (2, 4, 8, 12), (2, 4, 4, 6)]
    assert anchors.offsets.shape == (2, 2, 3, 2, 4, 6) and anchors.logits.shape == (2, 2, 3, 4, 6)
    target = gaussian_heatmaps(torch.tensor([[5.2, 7.7], [float("nan")] * 2, [13.0, 2.4]], dtype=torch.float64),
                               torch.tensor([True, False, True]), (16, 24), (2.0, 2.0))[None].repeat(2, 1, 1, 1)
    l = HeatmapAnchorLoss(HeatmapMSELoss(), AnchorLoss((1.0, 2.0)))((heat[0], anchors), target)
    l.backward()
    assert torch.isfinite(l) and net.anchor_head.out.weight.grad.abs().sum() > 0
    net.eval()
    net.set_deep_supervision(False)
    with torch.no_grad():
        net.record_existence = True
        net.reset_existence()
        plain = net(x)
        _, a = net.forward_with_anchors(x)
    assert plain.shape == (2, 4, 16, 24)
    assert torch.allclose(net.anchor_existence, torch.sigmoid(a.logits.transpose(0, 2).flatten(1).amax(1)))


@pytest.mark.parametrize("nd", [2, 3])
def test_anchor_targets_from_the_batch_points_equal_those_from_the_drawn_heatmaps(nd):
    """The trainer hands the loss the batch's points (the same ones it draws the heatmaps from): the
    anchor loss equals the one from the heatmaps' recovered centres; the points serve one call only,
    and points that do not fit the target are refused."""
    from nnlandmark_h3de.heatmaps import GaussianTargets
    from nnlandmark_h3de.training.nnH3DETrainerAnchor import AnchorHeatmapNetwork, HeatmapAnchorLoss
    from nnlandmark_h3de.training.landmark_loss import HeatmapMSELoss
    torch.manual_seed(0)
    net = AnchorHeatmapNetwork(_unet(nd=nd), 3, (1.0, 2.0), anchor_stride=4)
    patch = (16, 24, 8)[:nd]
    heat, anchors = net(torch.randn(2, 1, *patch))
    points = torch.tensor([[[5.2, 7.7, 3.1], [float("nan")] * 3, [13.0, 2.4, 6.6]],
                           [[0.2, 20.9, 0.4], [9.5, 11.0, 4.0], [float("nan")] * 3]], dtype=torch.float64)[..., :nd]
    target = GaussianTargets(2.0)(points, patch)
    loss = HeatmapAnchorLoss(HeatmapMSELoss(), AnchorLoss((1.0, 2.0)))
    from_heatmaps = loss((heat[0], anchors), target)
    loss.use_points(points)
    from_points = loss((heat[0], anchors), target)
    assert torch.isfinite(from_points) and from_points.item() == pytest.approx(from_heatmaps.item(), rel=1e-5)
    assert loss._points is None  # consumed
    loss.use_points(points[:, :2])
    with pytest.raises(ValueError, match="do not match the heatmap target"):
        loss((heat[0], anchors), target)
