"""Conversion to an nnU-Net raw dataset: layout, JSON contracts, ball geometry, errors, scripts, CLI."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnlandmark_h3de.conversion import (ConversionError, ConversionWarning, ball_radius_mm, convert_dataset,
                                        draw_balls, nnunet_target_spacing)
from nnlandmark_h3de.landmarks import (DatasetFileError, ImageGeometry, LandmarkSet, load_case_subjects,
                                       load_dataset_landmarks, read_dataset_landmark_info, read_landmarks,
                                       write_landmarks)
from rotations import rotation

REPO = Path(__file__).resolve().parents[1]
ROT = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # 90 deg about z


def make_image(shape_zyx=(20, 24, 28), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None, seed=0):
    rng = np.random.default_rng(seed)
    arr = (100 + 10 * rng.standard_normal(shape_zyx)).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    return img


def centre_points(img, offsets_ijk, names):
    """Landmarks at continuous ITK indices (centre of the image + offsets)."""
    g = ImageGeometry.from_sitk(img)
    centre = (np.asarray(g.shape_ijk) - 1) / 2
    pts = g.itk_index_to_world(centre + np.asarray(offsets_ijk, dtype=float))
    return LandmarkSet(names, pts, source=f"<{names}>")


def write_case(folder, case, img, ls, lm_ext=".mrk.json"):
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "landmarks").mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(folder / "images" / f"{case}.nii.gz"))
    write_landmarks(ls, folder / "landmarks" / f"{case}{lm_ext}")
    return folder / "images" / f"{case}.nii.gz", folder / "landmarks" / f"{case}{lm_ext}"


def com_error_vox(labels_zyx, geometry, ls):
    """Per landmark: max-abs over axes of (ball centre of mass - exact array index), in voxels."""
    errs = []
    for k, p in enumerate(ls.points_lps):
        idx = np.argwhere(labels_zyx == k + 1)
        assert len(idx), f"ball {k + 1} ({ls.names[k]}) missing"
        errs.append(np.abs(idx.mean(0) - geometry.world_to_array_index(p)).max())
    return np.array(errs)


NAMES = ["L_eye", "R_eye", "nose"]
OFFS = [(-6, 0, 0), (6, 0, 0), (0.3, 5.2, -2.6)]


@pytest.fixture
def two_plus_test(tmp_path):
    cases = {}
    for i, case in enumerate(["a", "b", "t"]):
        img = make_image(spacing=(1.0, 1.1, 1.3), origin=(i, -2.0, 5.0), seed=i)
        ls = centre_points(img, np.asarray(OFFS) + 0.37 * i, NAMES)
        cases[case] = write_case(tmp_path / "in", case, img, ls, lm_ext=[".mrk.json", ".fcsv", ".json"][i])
    return cases


# ------------------------------------------------------------------------------------ layout
def test_layout_dataset_json_and_landmarks_json(tmp_path, two_plus_test):
    out = convert_dataset(two_plus_test, tmp_path / "Dataset007_Toy", test_cases=["t"], progress=False)
    assert out == tmp_path / "Dataset007_Toy"
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["a_0000.nii.gz", "b_0000.nii.gz"]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == ["a.nii.gz", "b.nii.gz"]
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == ["t_0000.nii.gz"]
    assert not list(tmp_path.glob(".Dataset007_Toy*")), "temporary folder left behind"

    dj = json.loads((out / "dataset.json").read_text())
    assert dj["labels"] == {"background": 0, "L_eye": 1, "R_eye": 2, "nose": 3}
    assert dj["numTraining"] == 2 and dj["file_ending"] == ".nii.gz" and dj["channel_names"] == {"0": "image"}
    assert dj["landmarks"]["names"] == NAMES and dj["landmarks"]["coordinate_system"] == "LPS"
    assert dj["landmarks"]["pairs"] == [["L_eye", "R_eye"]]
    assert dj["landmarks"]["ball_radius_mm"] == pytest.approx(1.5 * 1.3)  # 1.5 x coarsest spacing
    info = read_dataset_landmark_info(out)
    assert info["pairs"] == [("L_eye", "R_eye")] and info["ball_radius_mm"] == pytest.approx(1.95)

    lj = json.loads((out / "landmarks.json").read_text())
    assert lj["coordinate_system"] == "LPS" and lj["units"] == "mm" and lj["test_cases"] == ["t"]
    loaded = load_dataset_landmarks(out)
    assert set(loaded) == {"a", "b", "t"}
    for case, (img_path, lm_path) in two_plus_test.items():
        np.testing.assert_allclose(loaded[case].points_lps, read_landmarks(lm_path).points_lps, atol=1e-9)
    assert load_dataset_landmarks(out / "landmarks.json")["a"].names == NAMES

    src = sitk.ReadImage(str(two_plus_test["a"][0]))
    im = sitk.ReadImage(str(out / "imagesTr" / "a_0000.nii.gz"))
    lab = sitk.ReadImage(str(out / "labelsTr" / "a.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(im), sitk.GetArrayFromImage(src))
    for a in (im, lab):
        assert a.GetSize() == src.GetSize()
        np.testing.assert_allclose(a.GetOrigin(), src.GetOrigin(), atol=1e-5)
        np.testing.assert_allclose(a.GetSpacing(), src.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(a.GetDirection(), src.GetDirection(), atol=1e-6)
    arr = sitk.GetArrayFromImage(lab)
    assert arr.dtype == np.uint8 and set(np.unique(arr)) == {0, 1, 2, 3}
    assert com_error_vox(arr, ImageGeometry.from_sitk(lab), loaded["a"]).max() < 0.3


def test_names_order_reorders_every_case_and_absent_is_null(tmp_path):
    img = make_image()
    ls1 = centre_points(img, OFFS, NAMES)
    ls2 = LandmarkSet(["nose", "L_eye"], ls1.points_lps[[2, 0]], source="second")  # other order, R_eye absent
    out = convert_dataset({"c1": (img, ls1), "c2": (img, ls2)}, tmp_path / "D", names=["nose", "R_eye", "L_eye"],
                          pairs=[("L_eye", "R_eye")], progress=False)
    lj = json.loads((out / "landmarks.json").read_text())
    assert lj["names"] == ["nose", "R_eye", "L_eye"]
    assert lj["cases"]["c2"]["R_eye"] is None
    assert lj["cases"]["c2"]["nose"] == pytest.approx(ls1.points_lps[2].tolist())
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTr" / "c2.nii.gz")))
    assert set(np.unique(arr)) == {0, 1, 3}  # nose=1, L_eye=3, no R_eye ball


# ------------------------------------------------------------------------------ ball geometry
def test_ball_centre_of_mass_off_grid_anisotropic_rotated():
    """The drawn ball's centre of mass matches the exact point for sub-voxel offsets on a rotated grid."""
    rng = np.random.default_rng(3)
    img = make_image((30, 60, 60), spacing=(0.8, 0.8, 2.5), origin=(10.0, -20.0, 3.0), direction=rotation(0.3, -0.2, 0.9))
    geo = ImageGeometry.from_sitk(img)
    r = ball_radius_mm([geo.spacing])
    assert r == pytest.approx(3.75)
    errs = []
    for _ in range(40):
        pts = geo.itk_index_to_world(np.array([[30, 30, 15]]) + rng.uniform(-0.5, 0.5, (1, 3)))
        labels, balls = draw_balls(geo, pts, r)
        errs.append(com_error_vox(labels, geo, LandmarkSet(["p"], pts))[0])
        # every voxel within r is in the ball, none outside r
        idx = np.argwhere(labels == 1)[:, ::-1]
        assert np.linalg.norm(geo.itk_index_to_world(idx) - pts, axis=1).max() <= r + 1e-9
    assert np.max(errs) < 0.3, np.max(errs)
    assert np.mean(errs) < 0.15


def test_radius_rule_and_target_spacing():
    assert ball_radius_mm([(1, 1, 1), (0.5, 0.5, 0.5)]) == pytest.approx(1.5)
    assert ball_radius_mm([(1, 1, 1)], target_spacing=(2, 2, 2)) == pytest.approx(3.0)
    assert ball_radius_mm([(0.3, 0.3, 0.3)], min_voxels=2) == pytest.approx(0.6)
    # strongly anisotropic axis with few voxels: nnU-Net takes the 10th percentile on that axis
    sp = [(0.8, 0.8, 5.0)] * 5 + [(0.8, 0.8, 1.5)] * 5
    shapes = [(512, 512, 30)] * 10
    t = nnunet_target_spacing(sp, shapes)
    assert t[2] == pytest.approx(1.5) and t[0] == pytest.approx(0.8)
    assert nnunet_target_spacing(sp)[2] == pytest.approx(np.median([5.0] * 5 + [1.5] * 5))
    with pytest.raises(ValueError, match="invalid spacings"):
        ball_radius_mm([(1, 0, 1)])


# ------------------------------------------------------------------------------------ errors
def assert_fails(tmp_path, cases, match, **kw):
    out = tmp_path / "Dataset001_X"
    with pytest.raises(ConversionError, match=match):
        convert_dataset(cases, out, progress=False, **kw)
    assert not out.exists() and not list(tmp_path.glob(".Dataset001_X*")), "partial output left behind"


def test_error_unreadable_and_4d_image(tmp_path):
    img = make_image()
    ls = centre_points(img, OFFS, NAMES)
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not an image")
    assert_fails(tmp_path, {"a": (img, ls), "b": (bad, ls)}, r"broken\.nii\.gz: unreadable image")
    assert_fails(tmp_path, {"a": (img, ls), "b": (tmp_path / "nope.nii.gz", ls)}, r"nope\.nii\.gz: image file not found")
    img4 = sitk.JoinSeries([img, img])
    assert_fails(tmp_path, {"a": (img4, ls)}, r"expected a 3D single-component image, got 4D")
    vec = sitk.Compose([img, img])
    assert_fails(tmp_path, {"a": (vec, ls)}, r"2 component")


def test_error_landmark_file_problems(tmp_path):
    img = make_image()
    ls = centre_points(img, OFFS, NAMES)
    assert_fails(tmp_path, {"a": (img, ls), "b": (img, tmp_path / "missing.fcsv")}, r"missing\.fcsv: landmark file not found")
    dup = tmp_path / "dup.csv"
    dup.write_text("label,l,p,s,defined,selected,visible,locked,description\n"
                   "A,1,2,3,1,0,1,0,\nA,1,2,4,1,0,1,0,\n")
    assert_fails(tmp_path, {"a": (img, ls), "b": (img, dup)}, r"dup\.csv.*duplicate landmark names \['A'\]")
    other = LandmarkSet(["L_eye", "chin"], ls.points_lps[:2], source="/x/other.mrk.json")
    assert_fails(tmp_path, {"a": (img, ls), "b": (img, other)}, r"/x/other\.mrk\.json: unknown landmark names \['chin'\]")
    assert_fails(tmp_path, {"a": (img, ls)}, r"duplicate landmark names", names=["nose", "nose"])
    assert_fails(tmp_path, {"a": (img, ls)}, r"reserved", names=["background", "L_eye", "R_eye", "nose"])
    assert_fails(tmp_path, {"a": (img, ls)}, r"pair \(L_eye, chin\): unknown name", pairs=[("L_eye", "chin")])
    assert_fails(tmp_path, {"a": (img, ls)}, r"exclude_names \['chin'\] do not occur", exclude_names=["chin"])


def test_error_outside_and_nan(tmp_path):
    img = make_image()
    ls = centre_points(img, OFFS, NAMES)
    far = LandmarkSet(NAMES, ls.points_lps + [[0, 0, 0], [0, 0, 0], [500, 0, 0]], source="/x/far.fcsv")
    # one landmark outside is absent by default (tests/test_field_of_view.py); outside_fov="error" is strict
    assert_fails(tmp_path, {"a": (img, ls), "b": (img, far)},
                 r"/x/far\.fcsv: 1 of 3 landmark\(s\) outside the image.*nose", outside_fov="error")
    nan = sitk.GetArrayFromImage(img)
    nan[0, 0, 0] = np.nan
    nimg = sitk.GetImageFromArray(nan)
    nimg.CopyInformation(img)
    assert_fails(tmp_path, {"a": (img, ls), "n": (nimg, ls)}, r"n \(in-memory image\): image contains NaN")
    with pytest.raises(ConversionError, match="test cases \\['zz'\\] are not among"):
        convert_dataset({"a": (img, ls)}, tmp_path / "D", test_cases=["zz"], progress=False)


def test_close_border_and_cropped_landmarks_convert_exactly(tmp_path):
    """Landmarks 1 mm apart, on the image border, or in the zero region nnU-Net crops away are
    accepted: landmarks.json keeps them exactly; where balls meet, each voxel has the nearest label."""
    img = make_image()
    g = ImageGeometry.from_sitk(img)
    ls = centre_points(img, OFFS, NAMES)
    close = LandmarkSet(NAMES, ls.points_lps.copy(), source="close")
    close.points_lps[1] = close.points_lps[0] + [1.0, 0, 0]
    edge = LandmarkSet(NAMES, np.vstack([ls.points_lps[:2], g.itk_index_to_world([0.2, 12, 10])]), source="edge")
    zeroed = sitk.GetArrayFromImage(img)
    zeroed[:, :, :6] = 0  # nnU-Net crops these columns away
    zimg = sitk.GetImageFromArray(zeroed)
    zimg.CopyInformation(img)
    near = LandmarkSet(NAMES, np.vstack([ls.points_lps[:2], g.itk_index_to_world([3.5, 3, 10])]), source="near")
    out = convert_dataset({"c": (img, close), "e": (img, edge), "z": (zimg, near)}, tmp_path / "D",
                          ball_radius_mm=2.0, progress=False)
    lms = load_dataset_landmarks(out)
    for case, ref in {"c": close, "e": edge, "z": near}.items():
        np.testing.assert_allclose(lms[case].points_lps, ref.points_lps, atol=1e-9)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTr" / "c.nii.gz")))
    idx = np.argwhere(labels > 0)
    world = g.array_index_to_world(idx.astype(float))
    d = np.linalg.norm(world[:, None] - close.points_lps[None], axis=2)
    assert np.all(labels[tuple(idx.T)] == d.argmin(1) + 1)  # nearest landmark wins
    assert np.all(d.min(1) <= 2.0 + 1e-9)
    assert (labels == 1).sum() > 0 and (labels == 2).sum() > 0


def test_all_errors_reported_together_and_drop_mode(tmp_path):
    img = make_image()
    ls = centre_points(img, OFFS, NAMES)
    far = LandmarkSet(NAMES, ls.points_lps + 500, source="far1")
    with pytest.raises(ConversionError, match=r"2 case\(s\) cannot be converted.*\n.*far1.*\n.*far2"):
        convert_dataset({"a": (img, ls), "b": (img, far), "c": (img, LandmarkSet(NAMES, ls.points_lps - 500, source="far2"))},
                        tmp_path / "D", progress=False)
    nan = sitk.GetArrayFromImage(img)
    nan[1, 1, 1] = np.inf
    nimg = sitk.GetImageFromArray(nan)
    nimg.CopyInformation(img)
    with pytest.warns(ConversionWarning, match="dropping case") as rec:
        out = convert_dataset({"a": (img, ls), "b": (img, far), "n": (nimg, ls), "k": (img, ls)}, tmp_path / "D",
                              on_error="drop", progress=False)
    assert sorted(str(w.message)[:15] for w in rec) == ["dropping case b", "dropping case n"]
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 2
    assert sorted(load_dataset_landmarks(out)) == ["a", "k"]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == ["a.nii.gz", "k.nii.gz"]


def test_existing_output_overwrite_and_atomic_replace(tmp_path):
    img = make_image()
    ls = centre_points(img, OFFS, NAMES)
    out = convert_dataset({"a": (img, ls)}, tmp_path / "D", progress=False)
    with pytest.raises(ConversionError, match="already exists"):
        convert_dataset({"a": (img, ls)}, out, progress=False)
    nan = sitk.GetArrayFromImage(img)
    nan[1, 1, 1] = np.nan
    nimg = sitk.GetImageFromArray(nan)
    nimg.CopyInformation(img)
    # the failure happens while writing (pass 2): the old dataset must survive untouched
    with pytest.raises(ConversionError, match="NaN"):
        convert_dataset({"b": (img, ls), "n": (nimg, ls)}, out, overwrite=True, progress=False)
    assert sorted(load_dataset_landmarks(out)) == ["a"] and (out / "labelsTr" / "a.nii.gz").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["D"]
    convert_dataset({"b": (img, ls)}, out, overwrite=True, progress=False)
    assert sorted(load_dataset_landmarks(out)) == ["b"] and not (out / "labelsTr" / "a.nii.gz").exists()


def test_dataset_id_name_under_nnunet_raw(tmp_path, monkeypatch):
    img = make_image()
    ls = centre_points(img, OFFS, NAMES)
    monkeypatch.delenv("nnUNet_raw", raising=False)
    with pytest.raises(ConversionError, match="nnUNet_raw is not set"):
        convert_dataset({"a": (img, ls)}, dataset_id=5, dataset_name="X", progress=False)
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    out = convert_dataset({"a": (img, ls)}, (5, "X"), progress=False)
    assert out == tmp_path / "Dataset005_X"
    with pytest.raises(ConversionError, match=r"id 5 is already used by \['Dataset005_X'\]"):
        convert_dataset({"a": (img, ls)}, dataset_id=5, dataset_name="Y", progress=False)


def test_load_dataset_landmarks_errors(tmp_path):
    """landmarks.json is read in landmarks/ (no converter needed): a DatasetFileError, a LandmarkError like
    ConversionError, names the file and the problem."""
    with pytest.raises(DatasetFileError, match="landmarks file not found"):
        load_dataset_landmarks(tmp_path)
    f = tmp_path / "landmarks.json"
    f.write_text(json.dumps({"names": ["a"], "cases": {"c": {"a": [1, 2]}}}))
    with pytest.raises(DatasetFileError, match=r"case c\): landmark 'a' must be \[x, y, z\]"):
        load_dataset_landmarks(f)
    f.write_text(json.dumps({"names": ["a"], "cases": {"c": {"b": None}}}))
    with pytest.raises(DatasetFileError, match=r"unknown landmark names \['b'\]"):
        load_dataset_landmarks(f)
    with pytest.raises(DatasetFileError, match="no 'landmarks' block"):
        read_dataset_landmark_info({"labels": {"background": 0}})



def test_landmarks_json_readers_do_not_load_the_converter():
    """Training, inference and evaluation read landmarks.json through landmarks/, which must not pull
    in conversion/ (imports point down); conversion/ still re-exports the same reader."""
    code = ("import sys, nnlandmark_h3de.landmarks as L; L.load_dataset_landmarks; "
            "print(sorted(m for m in sys.modules if m.startswith('nnlandmark_h3de.conversion')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
    import nnlandmark_h3de.conversion as conversion
    assert conversion.load_dataset_landmarks is load_dataset_landmarks

# -------------------------------------------------------------------------------------- CLI
def test_cli_convert(tmp_path, two_plus_test, monkeypatch, capsys):
    from nnlandmark_h3de.cli.convert import main
    d = tmp_path / "in"
    monkeypatch.delenv("nnUNet_raw", raising=False)
    assert main(["-i", str(d / "images"), "-l", str(d / "landmarks"), "-d", "3", "-n", "Cli"]) == 1
    assert "nnUNet_raw is not set" in capsys.readouterr().err
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    (d / "landmarks" / "zz.fcsv").write_text((d / "landmarks" / "b.fcsv").read_text())
    sitk.WriteImage(make_image(), str(d / "images" / "orphan.nrrd"))
    assert main(["-i", str(d / "images"), "-l", str(d / "landmarks"), "-d", "3", "-n", "Cli"]) == 1
    err = capsys.readouterr().err
    assert "images without a landmark file" in err and "['orphan']" in err and "['zz']" in err
    assert not (tmp_path / "raw" / "Dataset003_Cli").exists()
    # drop unmatched, explicit names and pairs; test folder
    (d / "test_images").mkdir()
    (d / "test_lm").mkdir()
    (d / "images" / "t.nii.gz").rename(d / "test_images" / "t.nii.gz")
    (d / "landmarks" / "t.json").rename(d / "test_lm" / "t.json")
    names_file = tmp_path / "names.txt"
    names_file.write_text("# channel order\nnose\nL_eye\nR_eye\n")
    subjects_file = tmp_path / "subjects.csv"
    subjects_file.write_text("a,p1 p2\n")
    args = ["-i", str(d / "images"), "-l", str(d / "landmarks"), "-d", "3", "-n", "Cli", "--drop_bad_cases",
            "--names_file", str(names_file), "--pairs", "L_eye:R_eye", "--ball_radius_mm", "2.5",
            "--test_images", str(d / "test_images"), "--test_landmarks", str(d / "test_lm"),
            "--subjects", str(subjects_file)]
    subjects_file.write_text("case,subject\na,p1,extra\n")
    with pytest.raises(SystemExit, match="subjects.csv: expected 'case,subject' on every line, got 'a,p1,extra'"):
        main(args)
    subjects_file.write_text("case,subject\n# scans of one person\na,p1\nb,p1\n")
    with pytest.warns(ConversionWarning, match="orphan"):
        rc = main(args)
    assert rc == 0, capsys.readouterr().err
    out = tmp_path / "raw" / "Dataset003_Cli"
    dj = json.loads((out / "dataset.json").read_text())
    assert dj["landmarks"]["names"] == ["nose", "L_eye", "R_eye"] and dj["landmarks"]["ball_radius_mm"] == 2.5
    assert dj["numTraining"] == 2  # a and b; 'orphan' (no landmarks) and 'zz' (no image) dropped
    assert json.loads((out / "landmarks.json").read_text())["test_cases"] == ["t"]
    assert load_case_subjects(out) == {"a": "p1", "b": "p1"}


def test_console_script_runs(tmp_path, two_plus_test):
    exe = Path(sys.executable).with_name("nnLandmark_convert")
    d = tmp_path / "in"
    r = subprocess.run([str(exe), "-i", str(d / "images"), "-l", str(d / "landmarks"), "-d", "9", "-n", "Sub",
                        "-o", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Wrote" in r.stdout and (tmp_path / "o" / "Dataset009_Sub" / "dataset.json").is_file()


# ---------------------------------------------------------------------------------- scripts
def load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "dataset_conversion" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_convert_mml_script(tmp_path, monkeypatch):
    import nrrd
    from nnlandmark_h3de.landmarks import MML_NAMES
    root = tmp_path / "MML"
    rng = np.random.default_rng(0)
    truth = {}
    for split, ids in {"train": ["001", "002"], "val": ["003"], "test": ["004"]}.items():
        (root / split).mkdir(parents=True)
        for cid in ids:
            shape = (40, 36, 30)  # pynrrd (i, j, k)
            vol = rng.integers(1, 255, shape).astype(np.uint8)
            nrrd.write(str(root / split / f"{cid}_volume.nrrd"), vol)  # header without spacing
            sp = np.array([0.4, 0.5, 0.6])
            lab = np.array([[4 + (i % 7) * 5.5, 6 + (i // 7) * 20, 10 + 0.3 * i] for i in range(14)], float)
            lab += rng.uniform(-0.2, 0.2, lab.shape)
            if cid == "002":
                lab[3] = -1  # missing landmark
            np.save(root / split / f"{cid}_label.npy", lab)
            np.save(root / split / f"{cid}_spacing.npy", sp)
            truth[cid] = lab * sp  # origin 0, identity direction: world LPS = index * spacing
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    mod = load_script("convert_mml")
    with pytest.warns(ConversionWarning, match=r"ball radius 0\.8 mm is under 1\.5 voxels .*0\.9 mm advised"):
        assert mod.main(["-i", str(root), "-d", "11", "-o", str(tmp_path / "raw"), "--ball_radius_mm", "0.8"]) == 0
    out = tmp_path / "raw" / "Dataset011_MML"
    assert json.loads((out / "splits_final.json").read_text()) == [{"train": ["001", "002"], "val": ["003"]}]
    assert (tmp_path / "pre" / "Dataset011_MML" / "splits_final.json").read_text() == (out / "splits_final.json").read_text()
    dj = json.loads((out / "dataset.json").read_text())
    assert dj["numTraining"] == 3 and dj["landmarks"]["names"] == MML_NAMES
    assert ["L0", "R0"] in dj["landmarks"]["pairs"] and ["La", "Ra"] in dj["landmarks"]["pairs"]
    lms = load_dataset_landmarks(out)
    assert json.loads((out / "landmarks.json").read_text())["test_cases"] == ["004"]
    for cid, lab in truth.items():
        pts = lms[cid].points_lps
        if cid == "002":
            assert np.isnan(pts[3]).all()
            pts, lab = np.delete(pts, 3, 0), np.delete(lab, 3, 0)
        np.testing.assert_allclose(pts, lab, atol=1e-9)
    img = sitk.ReadImage(str(out / "imagesTr" / "001_0000.nii.gz"))
    assert img.GetSize() == (40, 36, 30) and img.GetSpacing() == pytest.approx((0.4, 0.5, 0.6))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTr" / "001.nii.gz")))
    assert com_error_vox(labels, ImageGeometry.from_sitk(img), lms["001"]).max() < 0.35
    # complete_only drops case 002 (and rewrites the split without it)
    with pytest.warns(ConversionWarning):
        mod.convert_mml(root, 12, output_root=tmp_path / "raw", complete_only=True, ball_radius_mm=0.8, progress=False)
    assert json.loads((tmp_path / "raw" / "Dataset012_MML" / "splits_final.json").read_text()) == \
        [{"train": ["001"], "val": ["003"]}]


FCSV_HEAD = ("# Markups fiducial file version = 4.10\n# CoordinateSystem = 0\n"
             "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n")


def write_afids_fcsv(path, img, offsets):
    g = ImageGeometry.from_sitk(img)
    lps = g.itk_index_to_world((np.asarray(g.shape_ijk) - 1) / 2 + np.asarray(offsets, float))
    rows = [f"vtkMRMLMarkupsFiducialNode_{i + 1},{-p[0]},{-p[1]},{p[2]},0,0,0,1,1,1,0,{i + 1},{d},vtkMRMLScalarVolumeNode1"
            for i, (p, d) in enumerate(zip(lps, ["AC", "R MB", "L MB"]))]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(FCSV_HEAD + "\n".join(rows) + "\n")
    return lps


def test_convert_afids_script_flat_and_bids(tmp_path):
    mod = load_script("convert_afids")
    flat, bids = tmp_path / "flat", tmp_path / "bids"
    truth = {}
    for i, case in enumerate(["tplA", "tplB"]):
        img = make_image(spacing=(2.0, 2.0, 2.0), direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1), seed=i)
        (flat / "images").mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(img, str(flat / "images" / f"{case}.nii.gz"))
        truth[case] = write_afids_fcsv(flat / "landmarks" / f"{case}.fcsv", img, [(0.2, 0, 0), (4, 3, 0), (-4, 3, 0.5)])
        write_afids_fcsv(flat / "landmarks" / f"{case}.second-raters.fcsv", img, [(1, 1, 1), (4, 3, 1), (-4, 3, 1)])
        sub = f"sub-0{i + 1}"
        (bids / sub / "anat").mkdir(parents=True)
        sitk.WriteImage(img, str(bids / sub / "anat" / f"{sub}_T1w.nii.gz"))
        write_afids_fcsv(bids / "derivatives" / "afids" / sub / f"{sub}_space-T1w_desc-groundtruth_afids.fcsv", img,
                         [(0.2, 0, 0), (4, 3, 0), (-4, 3, 0.5)])
    assert mod.main(["-i", str(flat), "-d", "21", "-o", str(tmp_path / "raw")]) == 0
    out = tmp_path / "raw" / "Dataset021_AFIDs"
    dj = json.loads((out / "dataset.json").read_text())
    assert dj["landmarks"]["names"] == ["AC", "R MB", "L MB"] and dj["landmarks"]["pairs"] == [["L MB", "R MB"]]
    assert dj["channel_names"] == {"0": "T1w"}
    lms = load_dataset_landmarks(out)
    assert sorted(lms) == ["tplA", "tplB"]  # the second-raters files are ignored
    for case, lps in truth.items():
        np.testing.assert_allclose(lms[case].points_lps, lps, atol=1e-6)  # RAS file -> LPS
    out2 = mod.convert_afids(bids, 22, output_root=tmp_path / "raw", number_names=True, exclude_names=["1"],
                             test_cases=["sub-02"], progress=False)
    lj = json.loads((out2 / "landmarks.json").read_text())
    assert lj["names"] == ["2", "3"] and sorted(lj["cases"]) == ["sub-01", "sub-02"] and lj["test_cases"] == ["sub-02"]
    # crowded landmarks (balls of 6 mm around points 4-8 mm apart) convert: targets are the exact points
    assert mod.main(["-i", str(flat), "-d", "23", "-o", str(tmp_path / "raw"), "--ball_radius_mm", "6"]) == 0
    lms = load_dataset_landmarks(tmp_path / "raw" / "Dataset023_AFIDs")
    for case, lps in truth.items():
        np.testing.assert_allclose(lms[case].points_lps, lps, atol=1e-6)
