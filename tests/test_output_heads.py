"""Nonlinear output heads: L heatmap channels are no longer confined to the span of the last stage's k features."""
import pytest
import torch
from torch import nn

from dynamic_network_architectures.architectures.unet import PlainConvUNet

from nnlandmark_h3de.networks.building_blocks.output_heads import NonlinearOutputHead, use_nonlinear_output_heads


def _unet(base: int, n_out: int) -> PlainConvUNet:
    return PlainConvUNet(1, 3, [base, 2 * base, 4 * base], nn.Conv3d, 3, [1, 2, 2], 1, n_out, 1, True,
                         nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}, None, None, nn.LeakyReLU,
                         {"inplace": True}, deep_supervision=True)


def _output_rank(net: nn.Module) -> int:
    """Rank of the full-resolution output maps (voxels x channels), each map's mean removed (the biases)."""
    torch.manual_seed(1)
    with torch.no_grad():
        out = net(torch.randn(1, 1, 16, 16, 16))[0][0]
    flat = out.flatten(1).T.double()
    singular = torch.linalg.svdvals(flat - flat.mean(0))
    return int((singular > 1e-4 * singular[0]).sum())  # float32 outputs: round-off far below 1e-4


def test_linear_output_layer_limits_the_channels_to_the_feature_count_and_the_head_lifts_it():
    torch.manual_seed(0)
    net = _unet(base=2, n_out=6)
    assert _output_rank(net) <= 2  # six heatmap channels, two features at full resolution
    use_nonlinear_output_heads(net.decoder, hidden=16)
    assert _output_rank(net) == 6


def test_every_scale_gets_a_head_and_the_outputs_keep_their_shapes():
    net = _unet(base=4, n_out=5)
    shapes = [o.shape for o in net(torch.randn(2, 1, 16, 16, 16))]
    use_nonlinear_output_heads(net.decoder, hidden=8)
    assert all(isinstance(m, NonlinearOutputHead) for m in net.decoder.seg_layers)
    assert [o.shape for o in net(torch.randn(2, 1, 16, 16, 16))] == shapes
    assert [m[0].in_channels for m in net.decoder.seg_layers] == [8, 4]  # deepest decoder stage first


def test_a_decoder_without_1x1_output_convolutions_is_refused():
    with pytest.raises(TypeError, match="no seg_layers"):
        use_nonlinear_output_heads(nn.Identity(), hidden=8)
    decoder = nn.Module()
    decoder.seg_layers = nn.ModuleList([nn.Conv3d(4, 2, 3)])
    with pytest.raises(TypeError, match="not a 1x1 convolution"):
        use_nonlinear_output_heads(decoder, hidden=8)


def test_a_checkpoint_of_the_other_output_kind_stops_with_a_clear_message():
    from nnlandmark_h3de.training.landmark_network import LandmarkHeatmapNetwork
    linear = LandmarkHeatmapNetwork(_unet(base=2, n_out=4))
    heads = LandmarkHeatmapNetwork(_unet(base=2, n_out=4))
    use_nonlinear_output_heads(heads.body.decoder, 8)
    with pytest.raises(RuntimeError, match="checkpoint has 1x1 output convolutions but this trainer builds output heads"):
        heads.load_state_dict(linear.state_dict())
    with pytest.raises(RuntimeError, match="checkpoint has output heads with a hidden layer but this trainer builds 1x1"):
        linear.load_state_dict(heads.state_dict())
    twin = LandmarkHeatmapNetwork(_unet(base=2, n_out=4))
    twin.load_state_dict(linear.state_dict())  # the same kind loads as before
    with pytest.raises(RuntimeError, match="size mismatch"):  # other errors are PyTorch's own
        LandmarkHeatmapNetwork(_unet(base=2, n_out=5)).load_state_dict(linear.state_dict())
