"""Landmark adapters: landmark k reads only its own adapter; equal to a naive per-landmark loop; 3D and 2D."""
import pytest
import torch
from torch import nn

from nnlandmark_h3de.networks.building_blocks.landmark_adapters import LandmarkAdapterHead, attach_adapter_head

pytestmark = pytest.mark.usefixtures("one_torch_thread")


C, L, CA = 6, 4, 3


OPS = {3: (nn.Conv3d, nn.InstanceNorm3d, nn.functional.conv3d), 2: (nn.Conv2d, nn.InstanceNorm2d, nn.functional.conv2d)}


def _head(n_adapter_convs=1, num_plain_outputs=0, nd=3):
    conv_op, norm_op, _ = OPS[nd]
    torch.manual_seed(0)
    head = LandmarkAdapterHead(conv_op, C, L + num_plain_outputs, CA, 3, n_adapter_convs, num_plain_outputs,
                               norm_op=norm_op, norm_op_kwargs={"affine": True, "eps": 1e-5},
                               nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})
    with torch.no_grad():  # non-trivial affine norm parameters
        for m in head.modules():
            if isinstance(m, norm_op):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return head


def _naive(head: LandmarkAdapterHead, x: torch.Tensor) -> torch.Tensor:
    """Per landmark: its own convs (weight slices), its own norm, then a 1x1 over [shared, adapter_k]."""
    nd = x.dim() - 2
    conv_op, norm_op, conv_fn = OPS[nd]
    outs = [head.shared_head(x)[:, :head.num_plain_outputs]]
    convs = [m for m in head.adapter if isinstance(m, conv_op)]
    norms = [m for m in head.adapter if isinstance(m, norm_op)]
    p = head.num_plain_outputs
    for k in range(head.num_landmarks):
        sl = slice(k * CA, (k + 1) * CA)
        a = x
        for i, (conv, norm) in enumerate(zip(convs, norms)):
            w = conv.weight[sl]  # grouped convs: (CA, CA, ...) per group, dense first conv: (CA, C, ...)
            a = conv_fn(a, w, None, 1, 1)
            a = nn.functional.instance_norm(a, weight=norm.weight[sl], bias=norm.bias[sl], eps=norm.eps)
            a = nn.functional.leaky_relu(a)
        w = torch.cat((head.shared_head.weight[p + k], head.adapter_weight[k].view(CA, *[1] * nd)), 0)[None]
        outs.append(conv_fn(torch.cat((x, a), 1), w, head.shared_head.bias[p + k: p + k + 1]))
    return torch.cat(outs, 1)


@pytest.mark.parametrize("spatial", [(5, 6, 7), (9, 7)])
@pytest.mark.parametrize("n_adapter_convs,num_plain", [(1, 0), (2, 1)])
def test_equals_naive_per_landmark_loop(n_adapter_convs, num_plain, spatial):
    head = _head(n_adapter_convs, num_plain, nd=len(spatial))
    x = torch.randn(2, C, *spatial)
    out = head(x)
    assert out.shape == (2, L + num_plain, *spatial)
    torch.testing.assert_close(out, _naive(head, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spatial", [(4, 5, 6), (6, 5)])
@pytest.mark.parametrize("n_adapter_convs", [1, 2])
def test_landmark_k_does_not_depend_on_adapter_j(n_adapter_convs, spatial):
    head = _head(n_adapter_convs, nd=len(spatial))
    x = torch.randn(1, C, *spatial)
    params = dict(head.adapter.named_parameters())
    for k in range(L):
        grads = torch.autograd.grad(head(x)[:, k].sum(), list(params.values()) + [head.adapter_weight])
        for (name, _), g in zip(list(params.items()) + [("adapter_weight", None)], grads):
            rows = g.view(L, -1) if g.shape[0] == L * CA or name == "adapter_weight" else None
            assert rows is not None, name
            for j in range(L):
                if j == k:
                    assert rows[j].abs().sum() > 0, (k, name)  # the test can see a dependence
                else:
                    assert torch.all(rows[j] == 0), (k, j, name)


def test_shared_features_still_reach_every_output_and_cross_channel_norms_are_refused():
    head = _head()
    x = torch.randn(1, C, 3, 3, 3, requires_grad=True)
    for k in range(L):
        g, = torch.autograd.grad(head(x)[:, k].sum(), x)
        assert g.abs().sum() > 0
    with pytest.raises(ValueError, match="mixes channels"):
        LandmarkAdapterHead(nn.Conv3d, C, L, CA, norm_op=nn.GroupNorm)


def test_adapter_is_one_conv_for_all_landmarks():
    head = _head(n_adapter_convs=2)
    convs = [m for m in head.modules() if isinstance(m, nn.Conv3d)]
    # dense adapter conv, grouped adapter conv, shared 1x1 (+ one einsum): independent of L
    assert len(convs) == 3
    assert [c.groups for c in convs] == [1, L, 1]


def _bodies(nd=3):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from nnlandmark_h3de.networks.h3de_unet import H3DEUNet
    conv_op, norm_op, _ = OPS[nd]
    common = dict(input_channels=1, n_stages=3, features_per_stage=[4, 8, 8], conv_op=conv_op, kernel_sizes=3,
                  strides=[1, 2, 2], n_conv_per_stage=1, num_classes=L, n_conv_per_stage_decoder=1,
                  norm_op=norm_op, norm_op_kwargs={"affine": True}, nonlin=nn.LeakyReLU,
                  deep_supervision=True)
    yield "unet", PlainConvUNet(**common)
    yield "h3de", H3DEUNet(**common, vbra_stages=[2], vbra_head_dim=8)


@pytest.mark.parametrize("spatial", [(8, 12, 8), (16, 12)])
@pytest.mark.parametrize("kind", ["unet", "h3de"])
def test_attach_adapter_head_replaces_only_the_full_resolution_head(kind, spatial):
    torch.manual_seed(0)
    body = dict(_bodies(len(spatial)))[kind]
    x = torch.randn(1, 1, *spatial)
    before = [o.shape for o in body(x)]
    attach_adapter_head(body, adapter_channels=CA)
    heads = [m for m in body.modules() if isinstance(m, LandmarkAdapterHead)]
    assert len(heads) == 1 and heads[0].num_landmarks == L
    out = body(x)
    assert [o.shape for o in out] == before  # deep supervision outputs unchanged in number and shape
    out[0].sum().backward()
    assert heads[0].adapter[0].weight.grad.abs().sum() > 0
    body.decoder.deep_supervision = False
    assert body(x).shape == before[0]
