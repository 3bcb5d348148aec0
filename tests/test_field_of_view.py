"""Landmarks outside the image's field of view: absent (with a warning) by default, an error when
most of a case's landmarks are outside (a RAS/LPS mix-up or the wrong image), or always with
outside_fov="error"."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnlandmark_h3de.conversion import ConversionError, ConversionWarning, convert_dataset
from nnlandmark_h3de.landmarks import ImageGeometry, LandmarkSet, load_dataset_landmarks
from test_conversion import ROT, make_image, write_case

NAMES4 = ["L_eye", "R_eye", "nose", "chin"]
INSIDE = [(8, 12, 10), (20, 12, 10), (14, 16, 7), (14, 6, 12)]  # ITK indices (i, j, k), well inside
LAST_I = 27  # make_image: 28 voxels along i, spacing 1.0 mm along i


def image():
    """Anisotropic, rotated, off-centre image (like a scanner's LPS frame)."""
    return make_image(spacing=(1.0, 1.1, 1.3), origin=(-100.0, 60.0, 5.0), direction=ROT)


def landmarks(img, moved=None, source="<mem>"):
    """NAMES4 inside the image; `moved` maps a landmark index to its new ITK index."""
    idx = np.array(INSIDE, dtype=float)
    for k, ijk in (moved or {}).items():
        idx[k] = ijk
    return LandmarkSet(NAMES4, ImageGeometry.from_sitk(img).itk_index_to_world(idx), source=source)


def fov_warnings(rec):
    return [str(w.message) for w in rec if issubclass(w.category, ConversionWarning)
            and "cut off by the field of view" in str(w.message)]


def test_landmark_20mm_beyond_the_image_becomes_absent(tmp_path):
    img = image()
    ok = landmarks(img)
    cut = landmarks(img, {3: (LAST_I + 20.0, 6, 12)})  # chin 20 mm beyond the last voxel centre
    rim = landmarks(img, {3: (LAST_I + 0.6, 6, 12)})  # just beyond the half-voxel margin, within a ball radius
    edge = landmarks(img, {3: (LAST_I + 0.45, 6, 12)})  # just within the margin: kept exactly
    test = landmarks(img, {2: (-20.0, 16, 7)})  # test case: nose 20 mm before the first voxel centre
    files = {c: write_case(tmp_path / "in", c, img, ls) for c, ls in
             {"ok": ok, "cut": cut, "rim": rim, "edge": edge, "t": test}.items()}
    with pytest.warns(ConversionWarning) as rec:
        out = convert_dataset(files, tmp_path / "D", test_cases=["t"], progress=False)

    msgs = fov_warnings(rec)
    assert len(msgs) == 3, msgs
    by_case = {m.split(":")[0]: m for m in msgs}
    assert set(by_case) == {"case cut", "case rim", "case t"}
    assert str(files["cut"][1]) in by_case["case cut"] and "chin" in by_case["case cut"]
    assert "nose" not in by_case["case cut"] and "absent" in by_case["case cut"]
    assert str(files["t"][1]) in by_case["case t"] and "nose" in by_case["case t"]

    lj = json.loads((out / "landmarks.json").read_text())
    assert lj["cases"]["cut"]["chin"] is None and lj["cases"]["rim"]["chin"] is None
    assert lj["cases"]["t"]["nose"] is None and lj["cases"]["t"]["chin"] is not None
    loaded = load_dataset_landmarks(out)
    np.testing.assert_allclose(loaded["cut"].points_lps[:3], cut.points_lps[:3], atol=1e-9)
    np.testing.assert_allclose(loaded["edge"].points_lps, edge.points_lps, atol=1e-9)
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 4

    def labels(case):
        return set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTr" / f"{case}.nii.gz")))))
    assert labels("ok") == labels("edge") == {0, 1, 2, 3, 4}
    # a present chin 0.6 voxel beyond the rim would still paint a 1.95 mm ball inside the image
    assert labels("cut") == labels("rim") == {0, 1, 2, 3}


@pytest.mark.parametrize("outside, fails", [
    ((3,), False),           # 1 of 4: cut off
    ((2, 3), False),         # 2 of 4: half, not most
    ((1, 2, 3), True),       # 3 of 4: most
    ((0, 1, 2, 3), True),    # all
])
def test_most_landmarks_outside_is_still_an_error(tmp_path, outside, fails):
    img = image()
    moved = {k: (LAST_I + 20.0 + k, 6, 12) for k in outside}
    files = {"ok": write_case(tmp_path / "in", "ok", img, landmarks(img)),
             "bad": write_case(tmp_path / "in", "bad", img, landmarks(img, moved))}
    if fails:
        with pytest.raises(ConversionError, match=rf"bad\.mrk\.json: {len(outside)} of 4 landmark\(s\) outside "
                                                  r"the image.*chin.*RAS vs LPS"):
            convert_dataset(files, tmp_path / "D", progress=False)
        assert not (tmp_path / "D").exists()
    else:
        with pytest.warns(ConversionWarning, match="cut off by the field of view"):
            out = convert_dataset(files, tmp_path / "D", progress=False)
        absent = [n for n, p in json.loads((out / "landmarks.json").read_text())["cases"]["bad"].items() if p is None]
        assert absent == [NAMES4[k] for k in outside]


def test_single_present_landmark_outside_is_cut_off(tmp_path):
    """Fewer than 2 landmarks outside never looks like a coordinate mix-up."""
    img = image()
    lone = landmarks(img, {3: (LAST_I + 20.0, 6, 12)})
    lone.points_lps[:3] = np.nan
    with pytest.warns(ConversionWarning, match="chin.*cut off by the field of view"):
        out = convert_dataset({"ok": (img, landmarks(img)), "lone": (img, lone)}, tmp_path / "D", progress=False)
    assert all(p is None for p in json.loads((out / "landmarks.json").read_text())["cases"]["lone"].values())


def test_ras_instead_of_lps_is_caught_and_drop_mode(tmp_path):
    img = image()
    lps = landmarks(img)
    ras = LandmarkSet(NAMES4, lps.points_ras(), source="/x/ras.fcsv")  # x, y negated: the classic mix-up
    with pytest.raises(ConversionError, match=r"/x/ras\.fcsv: 4 of 4 landmark\(s\) outside.*RAS vs LPS"):
        convert_dataset({"a": (img, lps), "r": (img, ras)}, tmp_path / "D", progress=False)
    with pytest.warns(ConversionWarning, match="dropping case r: /x/ras"):
        out = convert_dataset({"a": (img, lps), "r": (img, ras)}, tmp_path / "D", on_error="drop", progress=False)
    assert sorted(load_dataset_landmarks(out)) == ["a"]


def test_outside_fov_error_restores_the_strict_check(tmp_path):
    img = image()
    cut = landmarks(img, {3: (LAST_I + 20.0, 6, 12)}, source="/x/cut.fcsv")
    with pytest.raises(ConversionError, match=r"/x/cut\.fcsv: 1 of 4 landmark\(s\) outside the image.*chin"):
        convert_dataset({"a": (img, landmarks(img)), "c": (img, cut)}, tmp_path / "D", outside_fov="error",
                        progress=False)
    with pytest.raises(ConversionError, match="outside_fov must be one of"):
        convert_dataset({"a": (img, landmarks(img))}, tmp_path / "D", outside_fov="ignore", progress=False)
    assert not (tmp_path / "D").exists()


def test_cli_outside_fov(tmp_path, capsys):
    from nnlandmark_h3de.cli.convert import main
    img = image()
    write_case(tmp_path / "in", "a", img, landmarks(img))
    _, lm_b = write_case(tmp_path / "in", "b", img, landmarks(img, {3: (LAST_I + 20.0, 6, 12)}))
    args = ["-i", str(tmp_path / "in" / "images"), "-l", str(tmp_path / "in" / "landmarks"), "-d", "9", "-n", "Fov",
            "-o", str(tmp_path / "raw")]
    with pytest.warns(ConversionWarning, match=r"case b: .*b\.mrk\.json: landmark\(s\) chin.*cut off"):
        assert main(args) == 0, capsys.readouterr().err
    out = tmp_path / "raw" / "Dataset009_Fov"
    assert json.loads((out / "landmarks.json").read_text())["cases"]["b"]["chin"] is None
    assert main(args + ["--overwrite", "--outside_fov", "error"]) == 1
    err = capsys.readouterr().err
    assert f"{lm_b}: 1 of 4 landmark(s) outside the image" in err and "RAS vs LPS" in err
    assert json.loads((out / "landmarks.json").read_text())["cases"]["b"]["chin"] is None  # old dataset kept
