"""torch.compile and autocast for every landmark network and trainer, on the CPU.

Compile (`test_compile_*`): torch.compile is nnU-Net's default on CUDA (`nnUNetTrainer._do_i_compile`:
on unless `nnUNet_compile` says otherwise, always off on cpu/mps/Windows). Each trainer here goes
through nnU-Net's own `initialize()` with that switch on, so its network is `torch.compile(network)`
exactly as on a GPU (inductor compiles for the CPU with gcc), trains 3 steps of its own `train_step` on
a fixed batch, and its losses match an eager twin built from the same seed.

Autocast (`test_autocast_*`): nnU-Net trains under `torch.autocast` (fp16 on CUDA). Here bf16 on the CPU:
outputs finite and close to float32, also with activations large enough that ``q @ k^T`` would
overflow fp16; what must stay float32 (V-BRA's routing, the anchor head's outputs) is checked to be.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo import OptimizedModule
from torch.overrides import TorchFunctionMode

from nnlandmark_h3de.networks.building_blocks.anchor_head import AnchorHead
from nnlandmark_h3de.networks.building_blocks.vbra import VBRA
from nnlandmark_h3de.networks.h3de_unet import H3DEUNet
from nnlandmark_h3de.training import adapter_trainers, nnH3DETrainer, nnH3DETrainerAnchor, nnLandmarkTrainer
from nnlandmark_h3de.training.self_supervised_trainer import nnLandmarkSelfSupervisedTrainer
from test_h3de_network import _plans, plans_kwargs, plans_kwargs_2d

PLAIN = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
N_LANDMARKS = 3
DATASET_JSON = {"channel_names": {"0": "MRI"}, "numTraining": 2, "file_ending": ".nii.gz",
                "labels": {"background": 0, **{f"L{i}": i for i in range(1, N_LANDMARKS + 1)}}}
# tiny configurations: 3 stages, 4..16 features; odd stage maps so V-BRA pads its regions
PATCH = {3: (12, 16, 20), 2: (32, 40)}
STRIDES = {3: [[1, 1, 1], [2, 2, 2], [2, 2, 2]], 2: [[1, 1], [2, 2], [2, 2]]}
# one H3DE block, at the deepest stage, top-k 4: routing, padded regions (3D) and 4 checkpointed chunks
H3DE_EXTRA = {"vbra_stages": [2], "vbra_blocks_per_stage": 1, "vbra_topk": 4}
FP16_MAX = float(torch.finfo(torch.float16).max)

# name -> (trainer class, ndim, H3DE body)
TRAINERS = {
    "nnLandmarkTrainer": (nnLandmarkTrainer.nnLandmarkTrainer, 3, False),
    "nnH3DETrainer": (nnH3DETrainer.nnH3DETrainer, 3, True),
    "nnH3DETrainerAnchor": (nnH3DETrainerAnchor.nnH3DETrainerAnchor, 3, True),
    "nnH3DETrainerAdapter": (adapter_trainers.nnH3DETrainerAdapter, 3, True),
    "nnLandmarkTrainerAdapter": (adapter_trainers.nnLandmarkTrainerAdapter, 3, False),
    "nnH3DETrainer_2d": (nnH3DETrainer.nnH3DETrainer, 2, True),
    "nnLandmarkSelfSupervisedTrainer": (nnLandmarkSelfSupervisedTrainer, 3, False),
}

# correct but split graphs, left to the trainer's owner
KNOWN_GRAPH_BREAKS: dict = {}


def make_trainer(name: str, preprocessed, monkeypatch, compiled: bool):
    """The trainer through nnU-Net's `initialize()` (network from the plans, optimiser, loss), CPU, with
    nnU-Net's compile switch forced to `compiled` (nnU-Net turns it off on the CPU). Seeded init."""
    cls, nd, h3de = TRAINERS[name]
    config = "3d_fullres" if nd == 3 else "2d"
    kwargs_for = plans_kwargs if nd == 3 else plans_kwargs_2d
    kw = kwargs_for(STRIDES[nd], features=(4, 8, 16), **(H3DE_EXTRA if h3de else {}))
    plans = {**_plans(PLAIN, kw, PATCH[nd], configuration=config), "continue_training": False}  # as run_training
    folder = preprocessed / plans["dataset_name"] / f"nnUNetPlans_{config}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "case_000.b2nd").touch()  # initialize() infers nnU-Net's dataset class from the file ending
    trainer = cls(plans, config, 0, DATASET_JSON, torch.device("cpu"))
    monkeypatch.setattr(trainer, "_do_i_compile", lambda: compiled)
    torch.manual_seed(0)
    trainer.initialize()
    assert isinstance(trainer.network, OptimizedModule) == compiled
    return trainer


def fixed_batch(nd: int) -> dict:
    """data (2, 1, *patch) and landmark points (2, L, nd) in the patch, one landmark absent (NaN row)."""
    g = torch.Generator().manual_seed(1)
    patch = PATCH[nd]
    points = torch.rand(2, N_LANDMARKS, nd, generator=g) * (torch.tensor(patch, dtype=torch.float32) - 1)
    points[1, 2] = float("nan")
    return {"data": torch.randn(2, 1, *patch, generator=g), "target": points}


def train_losses(trainer, batch, steps=3):
    losses = []
    for step in range(steps):
        torch.manual_seed(100 + step)  # the same random draws (self-supervised views) in both twins
        losses.append(float(trainer.train_step(dict(batch))["loss"]))
    return losses


def assert_close_to(out, ref, rel, mean=False):
    """Finite, and every element within rel * max|ref| of the float32 reference (bf16 keeps ~3 significant
    digits); with `mean`, the mean error within rel * mean|ref|."""
    out, ref = out.float(), ref.float()
    assert torch.isfinite(out).all()
    err = (out - ref).abs()
    err, scale = (float(err.mean()), float(ref.abs().mean())) if mean else (float(err.max()), float(ref.abs().max()))
    assert err <= rel * scale, f"{'mean' if mean else 'max'} error {err:.3g} > {rel} x |ref| {scale:.3g}"


# -------------------------------------------------------------------------------------------- compile
@pytest.fixture
def fresh_dynamo():
    """Empty dynamo caches and counters: no recompile limit reached by earlier tests (dynamo would then
    run the frame eagerly, and the comparison would prove nothing); yields the counters."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield torch._dynamo.utils.counters
    torch._dynamo.reset()


@pytest.mark.parametrize("name", list(TRAINERS))
def test_compile_trainer_train_steps_match_eager(name, nnunet_env, monkeypatch, fresh_dynamo):
    nd = TRAINERS[name][1]
    batch = fixed_batch(nd)
    eager = make_trainer(name, nnunet_env["nnUNet_preprocessed"], monkeypatch, compiled=False)
    compiled = make_trainer(name, nnunet_env["nnUNet_preprocessed"], monkeypatch, compiled=True)
    ref, got = train_losses(eager, batch), train_losses(compiled, batch)
    assert fresh_dynamo["stats"]["unique_graphs"] > 0  # inductor compiled it (not an eager fallback)
    assert all(math.isfinite(v) for v in got) and ref[0] != ref[-1]  # it trained
    assert got == pytest.approx(ref, rel=1e-4, abs=1e-7)  # measured: <= 1e-6 relative
    if name not in KNOWN_GRAPH_BREAKS:  # a break splits the graph: slower on the GPU, though still correct
        assert not fresh_dynamo["graph_break"], list(fresh_dynamo["graph_break"])
    if name == "nnH3DETrainerAnchor":
        _check_recorded_existence(eager, compiled, batch["data"])


def _check_recorded_existence(eager, compiled, data):
    """Prediction's setting (eval, no deep supervision, existence recorded by the network) compiled too."""
    results = []
    for trainer in (eager, compiled):
        trainer.set_deep_supervision_enabled(False)
        trainer.network.eval()
        net = trainer._unwrapped_network()
        net.record_existence = True
        net.reset_existence()
        with torch.no_grad():
            heat = trainer.network(data[:1])
            trainer.network(data[1:])
        results.append((heat, net.anchor_existence.clone()))
    (heat_e, exist_e), (heat_c, exist_c) = results
    assert torch.is_tensor(heat_c) and heat_c.shape == heat_e.shape
    torch.testing.assert_close(heat_c, heat_e, rtol=1e-4, atol=1e-5)
    assert exist_c.shape == (N_LANDMARKS,)
    torch.testing.assert_close(exist_c, exist_e, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kv_chunks", [None, 1])
def test_compile_vbra_forward_backward_matches_eager(kv_chunks, fresh_dynamo):
    """Routing, padded regions and the checkpointed chunk loop (kv_chunks None = top-k chunks) compiled."""
    torch.manual_seed(0)
    m = VBRA(16, num_heads=2, n_regions=3, topk=3, kv_chunks=kv_chunks)
    x = torch.randn(2, 16, 5, 7, 6)
    outs, grads = [], []
    for fn in (m, torch.compile(m, fullgraph=True)):  # fullgraph: any graph break fails
        m.zero_grad()
        xi = x.clone().requires_grad_()
        out = fn(xi)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append([xi.grad] + [p.grad.clone() for p in m.parameters()])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    for g_c, g_e in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_c, g_e, rtol=1e-3, atol=1e-6)


# -------------------------------------------------------------------------------------------- autocast
class RecordCalls(TorchFunctionMode):
    """Records the input dtype of every routing top-k (with its indices) and attention call."""

    def __init__(self):
        super().__init__()
        self.topk, self.attention = [], []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.topk:
            self.topk.append((args[0].dtype, out.indices, float(args[0].abs().max())))
        elif func is F.scaled_dot_product_attention:
            self.attention.append(args[0].dtype)
        return out


def run_recorded(fn, x, autocast: bool):
    rec = RecordCalls()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), rec:
        out = fn(x)
    return out, rec


@pytest.mark.parametrize("scale", [1.0, 1e3])
@pytest.mark.parametrize("conv_op, shape", [(nn.Conv3d, (2, 32, 5, 7, 6)), (nn.Conv2d, (2, 32, 11, 13))])
def test_autocast_vbra_routing_float32_attention_bf16_matches_float32(conv_op, shape, scale):
    torch.manual_seed(0)
    m = VBRA(32, num_heads=2, n_regions=3, topk=3, conv_op=conv_op)
    x = torch.randn(shape) * scale
    ref, rec32 = run_recorded(m, x, autocast=False)
    out, rec16 = run_recorded(m, x, autocast=True)
    assert out.dtype == torch.bfloat16 and set(rec16.attention) == {torch.bfloat16}  # autocast reached the attention
    (dtype, idx, logit_max), = rec16.topk
    assert dtype == torch.float32 and torch.equal(idx, rec32.topk[0][1])  # routing: float32, same as without autocast
    if scale == 1:
        assert_close_to(out, ref, rel=2e-2)
    else:
        assert logit_max > FP16_MAX  # the region affinities (and the attention scores) would overflow fp16
        # finite, and close on average: the softmax is then nearly an argmax, and which of two keys within
        # bf16's rounding of a ~1e5 score wins flips single tokens in any half precision (measured: max
        # error up to 0.65 of max|ref| from scale 30 on, mean error ~1 % at every scale)
        assert_close_to(out, ref, rel=3e-2, mean=True)


def _h3de_net(nd: int, deep_supervision=True):
    conv, norm = (nn.Conv3d, nn.InstanceNorm3d) if nd == 3 else (nn.Conv2d, nn.InstanceNorm2d)
    torch.manual_seed(0)
    return H3DEUNet(1, 3, [8, 16, 32], conv, 3, STRIDES[nd], 1, N_LANDMARKS, 1, conv_bias=True, norm_op=norm,
                    norm_op_kwargs={"affine": True, "eps": 1e-5}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True},
                    deep_supervision=deep_supervision, vbra_stages=[1, 2], vbra_blocks_per_stage=1,
                    vbra_n_regions=3, vbra_topk=[2, 4], vbra_head_dim=8)


@pytest.mark.parametrize("scale", [1.0, 1e3])
@pytest.mark.parametrize("nd", [3, 2])
def test_autocast_h3de_network_bf16_matches_float32(nd, scale):
    net = _h3de_net(nd)
    x = torch.randn(2, 1, *PATCH[nd]) * scale
    ref, rec32 = run_recorded(net, x, autocast=False)
    out, rec16 = run_recorded(net, x, autocast=True)
    # routing float32 (its inputs, the bf16 conv features, differ from float32's: the routes may too)
    assert len(rec16.topk) == 2 and all(d == torch.float32 for d, _, _ in rec16.topk)
    for o, r in zip(out, ref):  # measured: max error <= 5.2 % of max|ref|, mean error <= 1.6 % of mean|ref|
        assert_close_to(o, r, rel=0.1)
        assert_close_to(o, r, rel=3e-2, mean=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # and it trains: finite gradients everywhere
        loss = sum(o.float().square().mean() for o in net(x))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_autocast_vbra_lepe_weight_gradient_on_a_map_smaller_than_its_kernel():
    """A deep stage's 3x4x5 map under the 5^3 LePE: bf16 gradients of every VBRA parameter match float32.
    (Regression: the LePE conv on the channels-last V got a wrong weight gradient from the CPU's bf16 depthwise
    conv3d, off by up to 1.1x max|ref|, at times ~1e20, so the trainer's gradient cosine test flaked.)"""
    torch.manual_seed(0)
    attn = VBRA(16, num_heads=2, n_regions=1, topk=1, lepe_kernel_size=5)
    x = torch.randn(2, 16, 3, 4, 5)
    grads = []
    for autocast in (False, True):
        attn.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            attn(x).float().square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in attn.named_parameters()})
    rel_err = {n: float((grads[1][n] - ref).abs().max() / ref.abs().max()) for n, ref in grads[0].items()}
    assert max(rel_err.values()) < 5e-2, rel_err  # measured: <= 0.53 % (the LePE weight 59 % before the fix)


@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_autocast_anchor_head_outputs_float32_and_match(scale):
    torch.manual_seed(0)
    head = AnchorHead(nn.Conv3d, 16, N_LANDMARKS, norm_op=nn.InstanceNorm3d, norm_op_kwargs={"affine": True},
                      nonlin=nn.LeakyReLU)
    x = torch.randn(2, 16, 3, 5, 4) * scale
    with torch.no_grad():
        ref = head(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = head(x)
    assert out.offsets.dtype == out.logits.dtype == torch.float32
    assert_close_to(out.offsets, ref.offsets, rel=3e-2)
    assert_close_to(out.logits, ref.logits, rel=3e-2)


def test_autocast_anchor_network_recorded_existence_matches_float32():
    from nnlandmark_h3de.training.nnH3DETrainerAnchor import AnchorHeatmapNetwork
    net = AnchorHeatmapNetwork(_h3de_net(3), N_LANDMARKS, anchor_stride=2).eval()
    net.set_deep_supervision(False)
    net.record_existence = True
    x = torch.randn(2, 1, *PATCH[3]) * 1e3
    existence = []
    for autocast in (False, True):
        net.reset_existence()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            heat = net(x)
        assert torch.isfinite(heat).all() and net.anchor_existence.dtype == torch.float32
        existence.append(net.anchor_existence.clone())
    torch.testing.assert_close(existence[1], existence[0], rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("scale", [1.0, 1e3])  # 1e3: large activations (an image left unnormalised)
@pytest.mark.parametrize("name", list(TRAINERS))
def test_autocast_trainer_loss_and_gradients_match_float32(name, scale, nnunet_env, monkeypatch):
    """The body of nnU-Net's train_step (network + loss under autocast, then backward), in bf16 on the CPU."""
    trainer = make_trainer(name, nnunet_env["nnUNet_preprocessed"], monkeypatch, compiled=False)
    batch = fixed_batch(TRAINERS[name][1])
    data = batch["data"] * scale
    self_supervised = name == "nnLandmarkSelfSupervisedTrainer"
    if self_supervised:
        torch.manual_seed(5)
        data, target = trainer.make_views(data)  # [view 1; view 2] and the packed corresponding points
    losses, grads = [], []
    for autocast in (False, True):
        if not self_supervised:  # the heatmaps (and, for the anchor loss, the points) as train_step makes them
            target = trainer.targets_from_points(batch["target"], data.shape[2:])
        trainer.network.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = trainer.loss(trainer.network(data), target)
        loss.backward()
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        losses.append(float(loss.detach()))
        grads.append(torch.cat([p.grad.flatten() for p in trainer.network.parameters() if p.grad is not None]))
    # measured: losses within 1.7e-3 relative, gradient cosine >= 0.996
    assert losses[1] == pytest.approx(losses[0], rel=1e-2)
    assert torch.isfinite(grads[1]).all()
    cos = F.cosine_similarity(grads[0], grads[1], dim=0)
    assert cos > 0.98, f"bf16 gradient direction off: cosine {float(cos):.3f}"
