"""H3DEUNet built the nnU-Net way (dotted class name + plans kwargs): shapes, deep supervision, V-BRA stages,
in 3D (3d_fullres plans) and 2D (2d plans: conv_op Conv2d, BRA blocks)."""
import pytest
import torch

from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnlandmark_h3de.networks.building_blocks.h3de_block import H3DEBlock
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

CLASS = "nnlandmark_h3de.networks.h3de_unet.H3DEUNet"
REQ_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]


def plans_kwargs(strides, features=(4, 8, 16, 16), **extra):
    n = len(strides)
    kw = {"n_stages": n, "features_per_stage": list(features[:n]), "conv_op": "torch.nn.modules.conv.Conv3d",
          "kernel_sizes": [[1, 3, 3]] + [[3, 3, 3]] * (n - 1), "strides": strides,
          "n_conv_per_stage": [1] * n, "n_conv_per_stage_decoder": [1] * (n - 1), "conv_bias": True,
          "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
          "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
          "nonlin_kwargs": {"inplace": True}}
    kw.update(extra)
    return kw


def build(kw, deep_supervision, out_channels=3):
    torch.manual_seed(0)
    return get_network_from_plans(CLASS, kw, REQ_IMPORT, 1, out_channels, deep_supervision=deep_supervision)


def skip_sizes(size, strides):
    out = []
    for s in strides:
        size = [-(-i // j) for i, j in zip(size, s)]  # 'same' padded strided convs round up
        out.append(size)
    return out


ANISO = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [1, 2, 2]]


@pytest.mark.parametrize("patch", [(7, 21, 19), (4, 16, 16), (9, 13, 30)])
def test_output_shapes_odd_sizes_anisotropic_strides(patch):
    kw = plans_kwargs(ANISO, vbra_stages=[2, 3], vbra_blocks_per_stage=1, vbra_n_regions=2, vbra_topk=[1, 2])
    net = build(kw, deep_supervision=True)
    x = torch.randn(1, 1, *patch)
    with torch.no_grad():
        outs = net(x)
    assert isinstance(outs, list) and len(outs) == len(ANISO) - 1
    expected = [list(patch)] + skip_sizes(patch, ANISO)[1:-1]  # highest resolution first, no bottleneck
    assert [list(o.shape[2:]) for o in outs] == expected
    assert all(o.shape[:2] == (1, 3) for o in outs)

    net.decoder.deep_supervision = False  # what nnU-Net's set_deep_supervision_enabled does
    with torch.no_grad():
        single = net(x)
    assert torch.is_tensor(single) and single.shape == (1, 3, *patch)
    assert torch.allclose(single, outs[0])


def test_deep_supervision_off_and_weights_shared():
    kw = plans_kwargs([[1, 1, 1], [2, 2, 2], [2, 2, 2]], vbra_stages=[-1], vbra_blocks_per_stage=1)
    on, off = build(kw, True), build(kw, False)
    off.load_state_dict(on.state_dict())  # same parameters whatever the deep supervision setting
    x = torch.randn(2, 1, 10, 12, 14)
    with torch.no_grad():
        assert torch.is_tensor(off(x)) and off(x).shape == (2, 3, 10, 12, 14)
        assert torch.allclose(off(x), on(x)[0])


def test_vbra_stage_selection_and_per_stage_settings():
    strides = [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    # patch 64^3 -> stage sizes 64^3, 32^3 (32768), 16^3 (4096), 8^3, 4^3: at most 4096 tokens -> stages 2, 3, 4
    net = build(plans_kwargs(strides, features=(4, 8, 16, 32, 32), patch_size=[64, 64, 64], vbra_max_tokens=4096,
                             vbra_topk=[1, 4, 16], vbra_blocks_per_stage=[2, 1, 1], vbra_head_dim=8), False)
    assert net.vbra_stages == [2, 3, 4]
    blocks = {s: [m for m in net.encoder.stages[s] if isinstance(m, H3DEBlock)] for s in range(5)}
    assert [len(blocks[s]) for s in range(5)] == [0, 0, 2, 1, 1]
    assert [blocks[s][0].attn.topk for s in (2, 3, 4)] == [1, 4, 16]
    assert [blocks[s][0].attn.num_heads for s in (2, 3, 4)] == [2, 4, 4]
    # without a patch size: the deepest two stages; default top-k is H3DE-Net's 1, 4, 16 from the finest
    net = build(plans_kwargs(strides, features=(4, 8, 16, 32, 32)), False)
    assert net.vbra_stages == [3, 4]
    assert [net.encoder.stages[s][-1].attn.topk for s in (3, 4)] == [1, 4]
    net = build(plans_kwargs(strides, features=(4, 8, 16, 32, 32), vbra_stages=[1, 2, 3, 4]), False)
    assert [net.encoder.stages[s][-1].attn.topk for s in (1, 2, 3, 4)] == [1, 4, 16, 16]
    with pytest.raises(ValueError):
        build(plans_kwargs(strides, features=(4, 8, 16, 32, 32), vbra_topk=[1, 2, 3]), False)


def test_conv_weights_keep_nnunet_names_and_attention_gets_gradients():
    kw = plans_kwargs(ANISO, vbra_stages=[2, 3], vbra_blocks_per_stage=1, vbra_n_regions=2)
    net = build(kw, True)
    plain = get_network_from_plans("dynamic_network_architectures.architectures.unet.PlainConvUNet",
                                   plans_kwargs(ANISO), REQ_IMPORT, 1, 3, deep_supervision=True)
    assert isinstance(plain, PlainConvUNet)
    ours = net.state_dict()
    enc_plain = {k: v.shape for k, v in plain.state_dict().items() if k.startswith("encoder.")}
    assert all(ours[k].shape == s for k, s in enc_plain.items())  # nnU-Net encoder weights load as they are

    x = torch.randn(1, 1, 6, 20, 18)
    sum(o.square().mean() for o in net(x)).backward()
    attn_params = [p for n, p in net.named_parameters() if ".attn.qkv." in n or ".attn.proj." in n]
    assert attn_params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in attn_params)
    assert all(p.grad is not None for p in net.parameters())


def test_feature_map_size_estimate_is_positive_and_grows_with_patch():
    net = build(plans_kwargs(ANISO, vbra_stages=[3]), False)
    assert 0 < net.compute_conv_feature_map_size((8, 32, 32)) < net.compute_conv_feature_map_size((16, 64, 64))


def _plans(arch_class, arch_kwargs, patch_size, configuration="3d_fullres"):
    """A small plans dict with one configuration; `2d` as nnU-Net plans it for 2D images (spacing 999 on the
    dummy first axis, 2-element patch size and spacing in the configuration)."""
    nd = len(patch_size)
    return {"dataset_name": "Dataset999_T", "plans_name": "nnUNetPlans",
            "original_median_spacing_after_transp": [1, 1, 1] if nd == 3 else [999, 1, 1],
            "original_median_shape_after_transp": [32, 32, 32] if nd == 3 else [1, 64, 64],
            "image_reader_writer": "SimpleITKIO" if nd == 3 else "NaturalImage2DIO",
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "configurations": {configuration: {
                "data_identifier": f"nnUNetPlans_{configuration}", "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2, "patch_size": list(patch_size), "median_image_size_in_voxels": [32] * nd,
                "spacing": [1.0] * nd, "normalization_schemes": ["ZScoreNormalization"],
                "use_mask_for_norm": [False], "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape", "resampling_fn_data_kwargs": {},
                "resampling_fn_seg_kwargs": {}, "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {}, "batch_dice": False,
                "architecture": {"network_class_name": arch_class, "arch_kwargs": arch_kwargs,
                                 "_kw_requires_import": REQ_IMPORT}}},
            "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {}}


@pytest.mark.parametrize("arch", ["plain", "resenc"])
def test_nnH3DETrainer_builds_h3de_body_with_zero_channel(arch):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnlandmark_h3de.training.nnH3DETrainer import nnH3DETrainer

    patch = (8, 24, 20)
    kw = plans_kwargs(ANISO)
    cls = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
    if arch == "resenc":  # residual-encoder plans: n_blocks_per_stage instead of n_conv_per_stage
        cls = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
        kw["n_blocks_per_stage"] = kw.pop("n_conv_per_stage")
    cm = PlansManager(_plans(cls, kw, patch)).get_configuration("3d_fullres")
    torch.manual_seed(0)
    net = nnH3DETrainer.build_network_architecture(PlansManager(_plans(cls, kw, patch)), cm, 1, 1 + 4, True)
    body = net.body
    assert type(body).__name__ == "H3DEUNet"
    # the configuration's patch size picked the V-BRA stages: 8x24x20 -> stage maps of 3840, 960, 120, 30 tokens
    assert body.vbra_stages == [1, 2, 3]
    x = torch.randn(1, 1, *patch)
    with torch.no_grad():
        outs = net(x)
        assert [tuple(o.shape) for o in outs] == [(1, 5, 8, 24, 20), (1, 5, 8, 12, 10), (1, 5, 4, 6, 5)]
        assert all(float(o[:, 0].abs().max()) == 0.0 for o in outs)  # constant-zero channel 0
        net.decoder.deep_supervision = False  # nnU-Net's toggle reaches the H3DE decoder
        assert tuple(net(x).shape) == (1, 5, 8, 24, 20)


def test_h3de_block_is_three_residual_branches():
    """x + DWConv(x), then + VBRA(LN(.)), then + MLP(LN(.)): silencing each branch's last layer leaves x."""
    torch.manual_seed(5)
    blk = H3DEBlock(16, num_heads=2, n_regions=2, topk=2)
    x = torch.randn(1, 16, 5, 6, 7)
    assert blk(x).shape == x.shape
    with torch.no_grad():
        for layer in (blk.pos, blk.attn.proj, blk.mlp[-1]):
            layer.weight.zero_()
            layer.bias.zero_()
        assert torch.equal(blk(x), x)
        blk.pos.bias.fill_(1.0)  # only the conv branch on: x + 1 everywhere
        assert torch.allclose(blk(x), x + 1)


# ------------------------------------------------------------------------------------------------ 2D
def plans_kwargs_2d(strides, features=(4, 8, 16, 16), **extra):
    """What nnU-Net's `2d` configuration plans for a 2D dataset: Conv2d, InstanceNorm2d, 2-element kernels/strides."""
    n = len(strides)
    kw = plans_kwargs([[1, 1, 1]] * n, features, **extra)
    kw.update({"conv_op": "torch.nn.modules.conv.Conv2d", "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
               "kernel_sizes": [[3, 3]] * n, "strides": strides})
    return kw


ANISO_2D = [[1, 1], [2, 2], [2, 1], [2, 2]]


@pytest.mark.parametrize("patch", [(21, 19), (16, 16), (13, 30)])
def test_2d_output_shapes_odd_sizes_anisotropic_strides(patch):
    kw = plans_kwargs_2d(ANISO_2D, vbra_stages=[2, 3], vbra_blocks_per_stage=1, vbra_n_regions=2, vbra_topk=[1, 2])
    net = build(kw, deep_supervision=True)
    blocks = [m for m in net.modules() if isinstance(m, H3DEBlock)]
    assert len(blocks) == 2 and all(b.attn.ndim == 2 and isinstance(b.pos, torch.nn.Conv2d) for b in blocks)
    x = torch.randn(2, 1, *patch)
    with torch.no_grad():
        outs = net(x)
    assert isinstance(outs, list) and len(outs) == len(ANISO_2D) - 1
    expected = [list(patch)] + skip_sizes(patch, ANISO_2D)[1:-1]
    assert [list(o.shape[2:]) for o in outs] == expected
    assert all(o.shape[:2] == (2, 3) for o in outs)

    off = build(kw, deep_supervision=False)
    off.load_state_dict(net.state_dict())  # same parameters whatever the deep supervision setting
    net.decoder.deep_supervision = False
    with torch.no_grad():
        single, single_off = net(x), off(x)
    assert torch.is_tensor(single) and single.shape == (2, 3, *patch)
    assert torch.allclose(single, outs[0]) and torch.allclose(single_off, outs[0])


def test_2d_vbra_stage_selection_defaults_and_gradients():
    strides = [[1, 1], [2, 2], [2, 2], [2, 2], [2, 2]]
    # patch 256^2 -> 65536, 16384, 4096, 1024, 256 tokens: at most 16384 (the default) -> stages 1..4
    kw = plans_kwargs_2d(strides, features=(4, 8, 16, 32, 32), patch_size=[256, 256], vbra_head_dim=8)
    net = build(kw, False)
    assert net.vbra_stages == [1, 2, 3, 4]
    attn = [net.encoder.stages[s][-1].attn for s in net.vbra_stages]
    assert [a.topk for a in attn] == [1, 4, 16, 16] and all(a.n_regions == 8 for a in attn)  # 8x8 = 64 regions

    kw = plans_kwargs_2d(strides, features=(4, 8, 16, 32, 32), vbra_stages=[2, 3], vbra_n_regions=[(2, 3), 2],
                         vbra_blocks_per_stage=1, vbra_head_dim=8)
    net = build(kw, True)
    assert [net.encoder.stages[s][-1].attn.n_regions for s in (2, 3)] == [(2, 3), 2]
    plain = get_network_from_plans("dynamic_network_architectures.architectures.unet.PlainConvUNet",
                                   plans_kwargs_2d(strides, features=(4, 8, 16, 32, 32)), REQ_IMPORT, 1, 3,
                                   deep_supervision=True)
    ours = net.state_dict()
    assert all(ours[k].shape == v.shape for k, v in plain.state_dict().items() if k.startswith("encoder."))
    sum(o.square().mean() for o in net(torch.randn(1, 1, 40, 36))).backward()
    assert all(p.grad is not None for p in net.parameters())
    attn_params = [p for n, p in net.named_parameters() if ".attn." in n]
    assert attn_params and all(p.grad.abs().sum() > 0 for p in attn_params)
    assert 0 < net.compute_conv_feature_map_size((32, 32)) < net.compute_conv_feature_map_size((64, 64))


@pytest.mark.parametrize("trainer", ["nnH3DETrainer", "nnH3DETrainerAnchor", "nnH3DETrainerAdapter"])
def test_trainers_build_the_2d_network_from_a_2d_configuration(trainer):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnlandmark_h3de.training import adapter_trainers, nnH3DETrainer, nnH3DETrainerAnchor
    cls = {"nnH3DETrainer": nnH3DETrainer.nnH3DETrainer, "nnH3DETrainerAnchor": nnH3DETrainerAnchor.nnH3DETrainerAnchor,
           "nnH3DETrainerAdapter": adapter_trainers.nnH3DETrainerAdapter}[trainer]
    patch = (48, 40)
    strides = [[1, 1], [2, 2], [2, 2], [2, 2]]
    pm = PlansManager(_plans("dynamic_network_architectures.architectures.unet.PlainConvUNet",
                             plans_kwargs_2d(strides), patch, configuration="2d"))
    cm = pm.get_configuration("2d")
    torch.manual_seed(0)
    net = cls.build_network_architecture(pm, cm, 1, 1 + 4, True)
    body = net.body
    assert type(body).__name__ == "H3DEUNet" and body.encoder.conv_op is torch.nn.Conv2d
    assert body.vbra_stages == [1, 2, 3]  # 48x40 -> 480, 120, 30 tokens after stage 0
    x = torch.randn(2, 1, *patch)
    with torch.no_grad():
        outs = net(x)
        if trainer == "nnH3DETrainerAnchor":
            outs, anchors = outs
            # anchor head on the stride-4 decoder stage: 12x10 grid, 2 offsets (y, x) per anchor and landmark
            assert net.anchor_grid_stride == (4, 4)
            assert tuple(anchors.offsets.shape) == (2, 2, 4, 2, 12, 10)
            assert tuple(anchors.logits.shape) == (2, 2, 4, 12, 10)
        assert [tuple(o.shape) for o in outs] == [(2, 5, 48, 40), (2, 5, 24, 20), (2, 5, 12, 10)]
        assert all(float(o[:, 0].abs().max()) == 0.0 for o in outs)  # constant-zero channel 0
        net.eval()
        net.decoder.deep_supervision = False
        assert tuple(net(x).shape) == (2, 5, 48, 40)


def test_2d_h3de_block_is_three_residual_branches():
    torch.manual_seed(5)
    blk = H3DEBlock(16, num_heads=2, n_regions=2, topk=2, conv_op=torch.nn.Conv2d)
    x = torch.randn(1, 16, 6, 7)
    assert blk(x).shape == x.shape
    with torch.no_grad():
        for layer in (blk.pos, blk.attn.proj, blk.mlp[-1]):
            layer.weight.zero_()
            layer.bias.zero_()
        assert torch.equal(blk(x), x)
