"""Prediction at GPU scale, checked on the CPU (issue 27, item 3).

- nnU-Net 2.8.1 returns a mirror's logits on the CPU after a device out-of-memory: the mirrors' sum
  must still come out on one device and equal the sum without the fallback;
- the two-stage tiles are summed over the mirrors as they come: the same logits and mirror peaks as
  averaging every mirror's stacked tiles, with memory that does not grow with the number of mirrors;
- an out-of-memory or device error stops the run at the case it happened in, instead of failing
  every later case the same way;
- a fold ensemble applies each fold's own local peak floor to its own peaks, and refuses folds whose
  global stage calibrations are missing or disagree.
"""
import gc
import json

import numpy as np
import pytest
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from nnlandmark_h3de.inference.device_errors import PredictionStopped, stops_the_run
from nnlandmark_h3de.inference.global_stage import GlobalStageChoice, ensemble_local_peak_floors
from nnlandmark_h3de.inference.two_stage_tiles import plan_tiles, tile_peaks
from test_fold_ensemble import _TwoViewNet, _predictor, _properties
from test_mirror_tta import _predictors
from test_two_stage import _FixedGlobalStage, blob_logits

CPU = torch.device("cpu")


# ------------------------------------------------------------------ logits back on another device
class _OnTheAccelerator(torch.Tensor):
    """Stands in for logits left on the GPU (this machine has none): a CPU tensor that reports device
    cuda:0, becomes an ordinary tensor when moved to the CPU, and, as CUDA does, refuses an operation
    that mixes it with an ordinary (CPU) tensor."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func == torch.Tensor.device.__get__:
            return torch.device("cuda", 0)
        if _moves_to_cpu(func, args, kwargs):
            with torch._C.DisableTorchFunctionSubclass():
                return args[0].as_subclass(torch.Tensor).clone()
        tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        if any(isinstance(t, cls) for t in tensors) and any(type(t) is torch.Tensor and t.dim() > 0 for t in tensors):
            raise RuntimeError("Expected all tensors to be on the same device, but found at least two devices, "
                               "cuda:0 and cpu!")
        return super().__torch_function__(func, types, args, kwargs)


def _moves_to_cpu(func, args, kwargs) -> bool:
    if func is torch.Tensor.cpu:
        return True
    targets = list(args[1:]) + [kwargs.get("device")]
    return func is torch.Tensor.to and any(isinstance(t, (str, torch.device)) and torch.device(t).type == "cpu"
                                           for t in targets)


def test_oom_fallback_simulation_refuses_mixed_devices_like_cuda():
    """What the old accumulation did (an fp32 total on the device plus CPU logits) fails here as on a GPU."""
    on_device = torch.ones(2, 3).as_subclass(_OnTheAccelerator)
    assert on_device.device == torch.device("cuda", 0)
    with pytest.raises(RuntimeError, match="same device"):
        on_device.float().add_(torch.ones(2, 3))
    with pytest.raises(RuntimeError, match="same device"):
        torch.ones(2, 3).add_(on_device)
    back = on_device.to(CPU)
    assert type(back) is torch.Tensor and back.device == CPU and torch.equal(back, torch.ones(2, 3))


@pytest.mark.parametrize("on_device", [{0}, {1, 2, 3, 4, 5, 6, 7}], ids=["fallback_after_mirror_0",
                                                                          "fallback_at_mirror_0"])
def test_oom_fallback_mirror_logits_on_another_device_sum_on_one(on_device, monkeypatch, one_torch_thread):
    """Mirror by mirror, nnU-Net's sliding window returns fp16 logits on the device, or (after a device
    out-of-memory) on the CPU. The mirrors' sum equals the one without any fallback, on the CPU."""
    _, ours = _predictors((0, 1, 2))
    x = torch.randn(1, 24, 32, 16)
    _, _, folds, expected, _ = ours.locate(x, None)
    original = nnUNetPredictor.predict_sliding_window_return_logits
    calls = []

    def sometimes_on_the_device(self, image):
        logits = original(self, image)
        calls.append(len(calls))
        if calls[-1] in on_device:
            return logits.half().as_subclass(_OnTheAccelerator)  # left on the device (fp16)
        return logits.float()  # the fallback's CPU logits (here fp32: the dtype may differ too)

    monkeypatch.setattr(nnUNetPredictor, "predict_sliding_window_return_logits", sometimes_on_the_device)
    _, _, fallback_folds, got, _ = ours.locate(x, None)
    assert len(calls) == 8, "every mirror goes through nnU-Net's sliding window"
    assert type(got) is torch.Tensor and got.device == CPU and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=0, atol=1e-6)
    for a, b in zip(fallback_folds[0].member_idx, folds[0].member_idx):
        np.testing.assert_allclose(a, b, atol=1e-9)


# ------------------------------------------------------------------ the tiles' running sum
SHAPE = (48, 48, 48)
PROPS = {"sitk_stuff": {"spacing": (1.0, 1.0, 1.0), "origin": (0.0, 0.0, 0.0), "direction": tuple(np.eye(3).ravel())},
         "spacing": [1.0, 1.0, 1.0], "shape_before_cropping": SHAPE,
         "bbox_used_for_cropping": [[0, n] for n in SHAPE], "shape_after_cropping_and_before_resampling": SHAPE}
ESTIMATE_ZYX = np.array([[12.0, 10.0, 13.0], [34.0, 33.0, 30.0]])


class _LiveTileBytes(torch.nn.Module):
    """A small random convolution that, at every call, records the bytes of the live tensors as large as
    one tile's logits or larger (what the caller holds while the network runs)."""

    def __init__(self, min_numel):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.LeakyReLU(),
                                       torch.nn.Conv3d(4, 3, 3, padding=1))
        self.min_numel, self.samples = min_numel, None

    def forward(self, x):
        if self.samples is not None:
            self.samples.append(live_tensor_bytes(self.min_numel))
        return self.net(x)


def live_tensor_bytes(min_numel: int) -> int:
    """Bytes of the distinct storages of live real tensors with at least `min_numel` elements (tensors
    without data, such as the fake tensors torch.compile's caches keep alive from earlier tests, hold no
    memory and are skipped)."""
    gc.collect()
    storages = {}
    for o in gc.get_objects():
        if type(o) in (torch.Tensor, torch.nn.Parameter) and o.numel() >= min_numel and o.layout == torch.strided:
            s = o.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def _tile_predictor(net, mirror_axes):
    p = _predictor(net, None, ["A", "B"], [], mirror_axes)
    p.use_global_stage(_FixedGlobalStage(["A", "B"], ESTIMATE_ZYX[:, ::-1], [1.5, 2.5]), radius_mm=5.0,
                       fallback_uncertainty_mm=4.0)
    return p


def _predict_tiles(p, data):
    """The predictor's tile stage for one fold, as predict_case runs it: (tile logits, plan, mirror peaks)."""
    from nnlandmark_h3de.landmarks import LandmarkSet
    estimate = LandmarkSet(["A", "B"], ESTIMATE_ZYX[:, ::-1].copy())
    with p.case_in_flight(PROPS) as case:
        padded, case.tiles = plan_tiles(p.local_search(), data, PROPS, estimate)
        logits = p.predict_sliding_window_return_logits(padded)
    return logits, padded, case.tiles, case.folds[0].member_idx


def test_tile_sum_equals_the_mean_of_every_mirrors_stacked_tiles(one_torch_thread):
    net = _LiveTileBytes(1).eval()
    p = _tile_predictor(net, (0, 1, 2))
    data = torch.rand(1, *SHAPE)
    got, padded, plan, members = _predict_tiles(p, data)
    assert len(plan.groups) == 2 and not plan.whole_image
    # what the tile stage computed before: every mirror's tiles kept, stacked and averaged
    per_mirror = []
    with torch.no_grad():
        for combo in [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]:
            dims = [a + 2 for a in combo]
            outs = []
            for lo, _ in plan.groups:
                x = padded[(slice(None),) + tuple(slice(int(o), int(o) + 16) for o in lo)][None]
                out = net(torch.flip(x, dims) if dims else x)
                outs.append((torch.flip(out, dims) if dims else out)[0].float())
            per_mirror.append(torch.stack(outs))
    expected = torch.stack(per_mirror).mean(0)
    assert got.shape == expected.shape and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=0, atol=1e-6)
    assert len(members) == 8
    for m, tiles in zip(members, per_mirror):
        np.testing.assert_allclose(m, tile_peaks(tiles, plan)[0], atol=1e-9)
    spread = np.ptp(np.stack(members), axis=0)
    assert np.nanmax(spread) > 0, "the mirrors disagree: their peaks carry information"


def test_tile_stage_memory_does_not_grow_with_the_number_of_mirrors(one_torch_thread):
    """While the network runs on a tile, what the tile stage holds beyond what it held at the first call
    (the padded case, ...): the running sum of the tiles, the same for 2 and for 8 mirrors (keeping
    every mirror's tiles, it held 7 x the tiles at the last call of 8 mirrors)."""
    tile_numel = 3 * 16 ** 3  # one tile's logits: (1 + L) x patch
    data = torch.rand(1, *SHAPE)
    growth = {}
    for axes in [(0,), (0, 1, 2)]:  # 2 and 8 mirrors
        net = _LiveTileBytes(tile_numel).eval()
        p = _tile_predictor(net, axes)
        net.samples = []
        logits, padded, plan, members = _predict_tiles(p, data)
        assert len(net.samples) == len(plan.groups) * len(members)
        growth[len(members)] = max(net.samples) - net.samples[0]
        n_tiles = len(plan.groups)
        del logits, padded, p
    one_tile = tile_numel * 4
    assert growth[8] <= growth[2], growth
    assert 0 < growth[8] <= (n_tiles + 1) * one_tile, f"more than the sum and one tile held: {growth}"


# ------------------------------------------------------------------ device errors stop the run
class _FailingNet(torch.nn.Module):
    """A small convolution whose first call raises `error` (an out-of-memory, a CUDA error, ...)."""

    def __init__(self, error):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(1, 3, 3, padding=1)
        self.error, self.calls = error, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 1:
            raise self.error
        return self.conv(x)


def _cases(out_folder, pulled, closed):
    try:
        for name in ("case_a", "case_b", "case_c"):
            pulled.append(name)
            yield {"data": torch.rand(1, 16, 16, 16), "data_properties": _properties(),
                   "ofile": str(out_folder / name)}
    finally:
        closed.append(True)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 21.50 GiB"),
                                   RuntimeError("CUDA error: device-side assert triggered")],
                         ids=["out_of_memory", "device_assert"])
def test_oom_fallback_stops_run(error, tmp_path, one_torch_thread):
    """The first case meets the error: the run stops there with the case and the remedies named, no later
    case is predicted, nothing is written, and the preprocessing iterator is closed."""
    assert stops_the_run(error)
    net = _FailingNet(error)
    p = _predictor(net, None, ["A", "B"], [], None)
    out, pulled, closed = tmp_path / "out", [], []
    out.mkdir()
    with pytest.raises(PredictionStopped, match="stopped at case case_a") as stopped:
        p.predict_from_data_iterator(_cases(out, pulled, closed))
    message = str(stopped.value)
    for remedy in ("-npp", "--not_on_device", "-f 0", "--continue_prediction"):
        assert remedy in message
    assert stopped.value.__cause__ is error and stopped.value.case == "case_a"
    assert net.calls == 1 and pulled == ["case_a"] and closed == [True]
    assert list(out.iterdir()) == []


def test_other_errors_fail_only_their_case(tmp_path, one_torch_thread):
    net = _FailingNet(ValueError("a broken case"))
    assert not stops_the_run(net.error) and not stops_the_run(RuntimeError("preprocessing failed: bad header"))
    p = _predictor(net, None, ["A", "B"], [], None)
    out, pulled, closed = tmp_path / "out", [], []
    out.mkdir()
    assert p.predict_from_data_iterator(_cases(out, pulled, closed)) == []
    assert p.failed == ["case_a"] and closed == [True]
    assert sorted(f.name for f in out.iterdir()) == ["case_b.mrk.json", "case_c.mrk.json"]


# ------------------------------------------------------------------ per-fold floors in an ensemble
def test_ensemble_each_fold_floor_judges_its_own_peak(one_torch_thread):
    """Two folds see the same local peaks with different heights (A: 0.6 and 0.9; B: 0.9 and 0.6). Fold 0's
    floors are (0.8, 0.5), fold 1's (0.5, inf: its local peak never beats the global estimate for B).
    Each fold judged by its own floor (mean peak/floor ratio): A local ((0.75 + 1.8) / 2), B the global
    estimate ((1.8 + 0) / 2). Fold 0's floor applied to the folds' mean peak (0.75) says the opposite."""
    names = ["A", "B"]
    peaks_zyx = ESTIMATE_ZYX + np.array([[-2.0, 2.0, -2.0], [2.0, -1.0, 1.0]])
    heights = [[0.6, 0.9], [0.9, 0.6]]  # per fold: A, B

    def view(k, h):
        return torch.sigmoid(blob_logits(SHAPE, [(tuple(peaks_zyx[k]), h, 2.0)]))

    data = torch.stack([view(k, heights[f][k]) for f in (0, 1) for k in (0, 1)]).float()
    params = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}]

    def predict(floor):
        p = _predictor(_TwoViewNet(2), params, names, [], None)
        p.postprocessing.absent = False
        p.use_global_stage(_FixedGlobalStage(names, ESTIMATE_ZYX[:, ::-1], [1.5, 2.5]), radius_mm=6.0,
                           fallback_uncertainty_mm=4.0, local_peak_floor=floor)
        ls, report, _ = p.predict_case(data, PROPS, files=["case_0000.nii.gz"])
        return ls.points_lps[:, ::-1], report["global_estimate_kept"]

    points, kept = predict(np.array([[0.8, 0.5], [0.5, np.inf]]))
    assert kept == ["B"]
    np.testing.assert_allclose(points[0], peaks_zyx[0], atol=0.3)
    np.testing.assert_allclose(points[1], ESTIMATE_ZYX[1], atol=1e-6)
    points, kept = predict(np.array([0.8, 0.5]))  # one floor for every fold (fold 0's, as before)
    assert kept == ["A"]
    with pytest.raises(ValueError, match="one row per fold"):
        predict(np.ones((3, 2)))


def _write_choice(fold_folder, kind="atlas", floor=(0.3, None), radius=6.0, kinds=None):
    fold_folder.mkdir(parents=True, exist_ok=True)
    validation = {k: {"mre_mm": 2.0, "rms_mm": 2.5, "radius_mm": radius} for k in (kinds or [kind])}
    if floor is not None:
        validation[kind]["local_peak_floor"] = list(floor)
    GlobalStageChoice(kind=kind, validation=validation).write(fold_folder / "global_stage.json")


def test_ensemble_reads_each_folds_own_floor(tmp_path):
    _write_choice(tmp_path / "fold_0", floor=(0.3, None))
    _write_choice(tmp_path / "fold_1", floor=(0.5, 0.2), radius=9.0)
    kind, floors = ensemble_local_peak_floors(tmp_path, [1, 0])
    assert kind == "atlas"
    np.testing.assert_array_equal(floors, [[0.5, 0.2], [0.3, np.inf]])  # in the order of -f; None: never local
    _write_choice(tmp_path / "fold_0", floor=None)
    _write_choice(tmp_path / "fold_1", floor=None)
    assert ensemble_local_peak_floors(tmp_path, [0, 1]) == ("atlas", None)  # no two-stage validation yet


def test_ensemble_refuses_missing_or_differing_calibrations(tmp_path):
    _write_choice(tmp_path / "fold_0")
    with pytest.raises(FileNotFoundError, match=r"fold_1.global_stage\.json not found.*calibrate_global -f 1"):
        ensemble_local_peak_floors(tmp_path, [0, 1])
    _write_choice(tmp_path / "fold_1", kind="learned", kinds=["learned"])
    with pytest.raises(ValueError, match="fold_0: atlas, fold_1: learned"):
        ensemble_local_peak_floors(tmp_path, [0, 1])
    with pytest.raises(ValueError, match=r"'atlas' global stage was not calibrated for fold\(s\) \[1\]"):
        ensemble_local_peak_floors(tmp_path, [0, 1], "atlas")
    _write_choice(tmp_path / "fold_1", floor=None)
    with pytest.raises(ValueError, match=r"floor of the 'atlas' global stage is missing for fold\(s\) \[1\]"):
        ensemble_local_peak_floors(tmp_path, [0, 1])


class _RecordingPredictor:
    def use_global_stage(self, stage, radius_mm, fallback_uncertainty_mm, local_peak_floor=None, local_weight=1.0):
        self.args = (stage, radius_mm, fallback_uncertainty_mm, local_peak_floor)
        self.local_weight = local_weight


def test_ensemble_cli_attaches_the_first_folds_stage_with_every_folds_floor(tmp_path, monkeypatch, capsys):
    import nnlandmark_h3de.inference.global_stage as gs
    from nnlandmark_h3de.cli.predict import attach_global_stage
    _write_choice(tmp_path / "fold_0", floor=(0.3, 0.4), radius=6.0)
    _write_choice(tmp_path / "fold_1", floor=(0.5, 0.2), radius=9.0)
    loaded = []

    def load_global_stage(fold_folder, kind, device):
        loaded.append((fold_folder.name, kind))
        return "stage", GlobalStageChoice.read(fold_folder / "global_stage.json"), kind

    monkeypatch.setattr(gs, "load_global_stage", load_global_stage)
    p = _RecordingPredictor()
    attach_global_stage(p, str(tmp_path), [0, 1], "auto", CPU)
    assert loaded == [("fold_0", "atlas")]
    stage, radius, fallback, floors = p.args
    assert p.local_weight == 1.0  # files without a fitted weight: the local peak, as before
    assert stage == "stage" and radius == 6.0 and fallback == 2.5
    np.testing.assert_array_equal(floors, [[0.3, 0.4], [0.5, 0.2]])
    assert "each of 2 fold(s) with its own local peak floor" in capsys.readouterr().out
    (tmp_path / "fold_1" / "global_stage.json").unlink()
    with pytest.raises(SystemExit, match="fold 1 of the ensemble has no calibrated global stage"):
        attach_global_stage(_RecordingPredictor(), str(tmp_path), [0, 1], "auto", CPU)
    (tmp_path / "fold_0" / "global_stage.json").unlink()  # no fold calibrated: the whole-image sliding window
    p = _RecordingPredictor()
    attach_global_stage(p, str(tmp_path), [0, 1], "auto", CPU)
    assert not hasattr(p, "args") and "whole-image sliding window" in capsys.readouterr().out
