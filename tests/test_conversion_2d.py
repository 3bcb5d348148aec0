"""2D conversion (X-rays): PNG + --spacing and 2D NIfTI -> a 2D raw dataset nnU-Net plans as `2d`.

Checked: the raw image is 2D with the right spacing and pixels, the label disks are exactly the pixels
within the ball radius of each point, landmarks.json holds world points with z = 0 that map back to
the given pixel indices, pixel-coordinate CSV files, the field-of-view rule in the image plane and off
it (z != 0), colour pictures become grey, and nnU-Net's SimpleITKIO reads the result as (1, 1, y, x).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnlandmark_h3de.conversion import (ConversionError, ConversionWarning, ball_radius_mm, convert_dataset,
                                        downscale_2d, downscaled_geometry, nnunet_target_spacing)
from nnlandmark_h3de.landmarks import (ImageGeometry, LandmarkSet, load_dataset_landmarks, load_dataset_test_sets,
                                       read_landmarks, write_landmarks)
from nnlandmark_h3de.landmarks.landmark_set import LandmarkError

NAMES = ["sella", "nasion", "menton"]
PX = np.array([[10.0, 8.0], [37.25, 12.5], [20.5, 31.0]])  # (x_px, y_px): column, row
SPACING = (0.25, 0.3)  # mm per pixel (x, y)
SHAPE_YX = (40, 48)


def grey_picture(seed=0, shape=SHAPE_YX):
    return np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)


def write_png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(arr, isVector=arr.ndim == 3), str(path))
    return path


def write_pixel_csv(path, px, names=NAMES):
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = ["label,x_px,y_px"] + [f"{n},{float(x)!r},{float(y)!r}" for n, (x, y) in zip(names, px)]
    path.write_text("\n".join(rows) + "\n")
    return path


def world(px, spacing=SPACING, origin=(0.0, 0.0)):
    """Pixel index -> world LPS (identity direction), z = 0."""
    px = np.asarray(px, dtype=float)
    return np.column_stack([origin[0] + px[:, 0] * spacing[0], origin[1] + px[:, 1] * spacing[1], np.zeros(len(px))])


def disk_pixels(shape_yx, centre_px, spacing, radius_mm):
    """Boolean (y, x) map of the pixels whose centre lies within radius_mm of a point (identity direction)."""
    yy, xx = np.mgrid[: shape_yx[0], : shape_yx[1]]
    d2 = ((xx - centre_px[0]) * spacing[0]) ** 2 + ((yy - centre_px[1]) * spacing[1]) ** 2
    return d2 <= radius_mm ** 2 * (1 + 1e-12)


@pytest.fixture
def png_folder(tmp_path):
    """Three grey PNG cases: pixel CSV, 2D world CSV (l,p only) and .mrk.json (z = 0)."""
    d = tmp_path / "in"
    px = {"c1": PX, "c2": PX + [1.5, -2.0], "c3": PX + [-3.0, 4.25]}
    for i, (case, p) in enumerate(px.items()):
        write_png(d / "images" / f"{case}.png", grey_picture(i))
    write_pixel_csv(d / "landmarks" / "c1.csv", px["c1"])
    w2 = world(px["c2"])
    (d / "landmarks" / "c2.csv").write_text("label,l,p\n" + "".join(f"{n},{float(x)!r},{float(y)!r}\n" for n, (x, y, _) in zip(NAMES, w2)))
    write_landmarks(LandmarkSet(NAMES, world(px["c3"])), d / "landmarks" / "c3.mrk.json")
    return d, px


# --------------------------------------------------------------------------------------- PNG
def test_png_with_spacing_cli(tmp_path, png_folder, capsys):
    from nnlandmark_h3de.cli.convert import main
    d, px = png_folder
    rc = main(["-i", str(d / "images"), "-l", str(d / "landmarks"), "-d", "11", "-n", "Xray", "-o", str(tmp_path / "raw"),
               "--spacing", str(SPACING[0]), str(SPACING[1])])
    assert rc == 0, capsys.readouterr().err
    out = tmp_path / "raw" / "Dataset011_Xray"
    dj = json.loads((out / "dataset.json").read_text())
    radius = dj["landmarks"]["ball_radius_mm"]
    assert radius == pytest.approx(1.5 * max(SPACING))  # in-plane spacings only (k is a placeholder)
    assert dj["description"].startswith("2D") and dj["labels"] == {"background": 0, **{n: i + 1 for i, n in enumerate(NAMES)}}
    loaded = load_dataset_landmarks(out)
    for i, case in enumerate(["c1", "c2", "c3"]):
        im = sitk.ReadImage(str(out / "imagesTr" / f"{case}_0000.nii.gz"))
        lab = sitk.ReadImage(str(out / "labelsTr" / f"{case}.nii.gz"))
        for a in (im, lab):
            assert a.GetDimension() == 2 and a.GetSize() == SHAPE_YX[::-1]
            assert a.GetSpacing() == pytest.approx(SPACING) and a.GetOrigin() == pytest.approx((0, 0))
            assert a.GetDirection() == pytest.approx((1, 0, 0, 1))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(im), grey_picture(i))
        assert sitk.GetArrayFromImage(im).dtype == np.uint8
        pts = loaded[case].points_lps
        np.testing.assert_allclose(pts, world(px[case]), atol=1e-9)
        assert np.all(pts[:, 2] == 0)
        geo = ImageGeometry.from_file(out / "imagesTr" / f"{case}_0000.nii.gz")
        assert geo.ndim == 2
        np.testing.assert_allclose(geo.world_to_itk_index(pts)[:, :2], px[case], atol=1e-6)
        assert np.all(np.abs(geo.world_to_itk_index(pts)[:, 2]) < 1e-12)
        arr = sitk.GetArrayFromImage(lab)
        for k in range(len(NAMES)):
            expected = disk_pixels(SHAPE_YX, px[case][k], SPACING, radius)
            np.testing.assert_array_equal(arr == k + 1, expected, err_msg=f"{case} {NAMES[k]}")
        assert set(np.unique(arr)) == {0, 1, 2, 3}


def test_png_without_spacing_is_an_error_naming_the_file(tmp_path, png_folder, capsys):
    from nnlandmark_h3de.cli.convert import main
    d, _ = png_folder
    rc = main(["-i", str(d / "images"), "-l", str(d / "landmarks"), "-d", "12", "-n", "NoSp", "-o", str(tmp_path / "raw")])
    err = capsys.readouterr().err
    assert rc == 1 and str(d / "images" / "c1.png") in err and "--spacing" in err and "pixel spacing" in err
    assert not (tmp_path / "raw" / "Dataset012_NoSp").exists()
    assert not list(tmp_path.rglob(".Dataset012*")), "temporary folder left behind"
    with pytest.raises(ConversionError, match=r"c2\.png: a PNG picture carries no pixel spacing"):
        convert_dataset({"c2": (d / "images" / "c2.png", d / "landmarks" / "c2.csv")}, tmp_path / "o", progress=False)
    with pytest.raises(ConversionError, match="spacing must be 1 or 2 positive numbers"):
        convert_dataset({"c2": (d / "images" / "c2.png", d / "landmarks" / "c2.csv")}, tmp_path / "o",
                        spacing=(0.1, -1), progress=False)
    with pytest.raises(SystemExit, match="--spacing takes 1 or 2 values"):
        main(["-i", str(d / "images"), "-l", str(d / "landmarks"), "-d", "12", "-n", "NoSp", "-o", str(tmp_path / "raw"),
              "--spacing", "1", "2", "3"])
    assert not (tmp_path / "o").exists()


def test_square_spacing_one_value_and_rgb_png_becomes_grey(tmp_path):
    rgb = np.random.default_rng(5).integers(0, 256, SHAPE_YX + (3,)).astype(np.uint8)
    rgba = np.concatenate([rgb, np.full(SHAPE_YX + (1,), 17, np.uint8)], axis=-1)
    img1 = write_png(tmp_path / "in" / "rgb.png", rgb)
    img2 = write_png(tmp_path / "in" / "rgba.png", rgba)
    lm = write_pixel_csv(tmp_path / "in" / "p.csv", PX)
    with pytest.warns(ConversionWarning, match=r"2 colour picture\(s\) converted to one grey channel"):
        out = convert_dataset({"rgb": (img1, lm), "rgba": (img2, lm)}, tmp_path / "D", spacing=0.2, progress=False)
    luma = np.rint(rgb.astype(float) @ [0.299, 0.587, 0.114]).astype(np.uint8)
    for case in ("rgb", "rgba"):
        im = sitk.ReadImage(str(out / "imagesTr" / f"{case}_0000.nii.gz"))
        assert im.GetNumberOfComponentsPerPixel() == 1 and im.GetSpacing() == pytest.approx((0.2, 0.2))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(im), luma)
    # a grey picture stored as colour stays exactly itself
    grey = grey_picture(3)
    img3 = write_png(tmp_path / "in" / "g3.png", np.repeat(grey[..., None], 3, axis=-1))
    with pytest.warns(ConversionWarning, match="colour picture"):
        out = convert_dataset({"g3": (img3, lm)}, tmp_path / "E", spacing=0.2, progress=False)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "imagesTr" / "g3_0000.nii.gz"))), grey)


# ---------------------------------------------------------------------------------- 2D NIfTI
def nifti_2d(path, arr, spacing, origin, direction=(1.0, 0.0, 0.0, 1.0)):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


def test_2d_nifti_keeps_file_geometry_and_spacing_override_warns(tmp_path):
    arr = np.random.default_rng(1).normal(100, 10, SHAPE_YX).astype(np.float32)
    rot = (0.0, -1.0, 1.0, 0.0)  # 90 degrees in-plane
    img = nifti_2d(tmp_path / "in" / "n.nii.gz", arr, (0.4, 0.5), (3.0, -7.0), rot)
    geo = ImageGeometry.from_file(img)
    px = PX
    ls = LandmarkSet(NAMES, geo.itk_index_to_world(np.column_stack([px, np.zeros(3)])))
    assert np.all(ls.points_lps[:, 2] == 0)
    lm = tmp_path / "in" / "n.fcsv"
    write_landmarks(ls, lm)
    out = convert_dataset({"n": (img, lm)}, tmp_path / "D", progress=False)
    im = sitk.ReadImage(str(out / "imagesTr" / "n_0000.nii.gz"))
    lab = sitk.ReadImage(str(out / "labelsTr" / "n.nii.gz"))
    for a in (im, lab):
        assert a.GetDimension() == 2 and a.GetSpacing() == pytest.approx((0.4, 0.5))
        assert a.GetOrigin() == pytest.approx((3.0, -7.0)) and a.GetDirection() == pytest.approx(rot)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(im), arr)
    got = load_dataset_landmarks(out)["n"].points_lps
    np.testing.assert_allclose(ImageGeometry.from_file(out / "imagesTr" / "n_0000.nii.gz").world_to_itk_index(got)[:, :2],
                               px, atol=1e-6)
    radius = json.loads((out / "dataset.json").read_text())["landmarks"]["ball_radius_mm"]
    assert radius == pytest.approx(0.75)
    labels = sitk.GetArrayFromImage(lab)
    for k in range(3):
        np.testing.assert_array_equal(labels == k + 1, disk_pixels(SHAPE_YX, px[k], (0.4, 0.5), radius))

    # --spacing overrides the file's spacing (origin, direction kept), with a warning naming the file
    lm_px = write_pixel_csv(tmp_path / "in" / "npx.csv", px)
    with pytest.warns(ConversionWarning, match=r"overrides the spacing of 1 2D image file\(s\): .*n\.nii\.gz"):
        out2 = convert_dataset({"n": (img, lm_px)}, tmp_path / "E", spacing=(0.2, 0.3), progress=False)
    im2 = sitk.ReadImage(str(out2 / "imagesTr" / "n_0000.nii.gz"))
    assert im2.GetSpacing() == pytest.approx((0.2, 0.3)) and im2.GetOrigin() == pytest.approx((3.0, -7.0))
    g2 = ImageGeometry.from_sitk(im2)
    np.testing.assert_allclose(g2.world_to_itk_index(load_dataset_landmarks(out2)["n"].points_lps)[:, :2], px, atol=1e-6)


def test_spacing_for_3d_images_and_mixed_2d_3d_are_errors(tmp_path):
    img3 = sitk.GetImageFromArray(np.zeros((5, 40, 48), np.float32))
    p3 = tmp_path / "in" / "v.nii.gz"
    p3.parent.mkdir(parents=True)
    sitk.WriteImage(img3, str(p3))
    lm3 = tmp_path / "in" / "v.mrk.json"
    write_landmarks(LandmarkSet(NAMES, world(PX, (1, 1)) + [0, 0, 2]), lm3)
    with pytest.raises(ConversionError, match=r"v\.nii\.gz: spacing=/--spacing is for 2D images only"):
        convert_dataset({"v": (p3, lm3)}, tmp_path / "D", spacing=0.5, progress=False)
    png = write_png(tmp_path / "in" / "p.png", grey_picture())
    lm = write_pixel_csv(tmp_path / "in" / "p.csv", PX)
    with pytest.raises(ConversionError, match="2D or 3D images, not both"):
        convert_dataset({"v": (img3, lm3), "p": (png, lm)}, tmp_path / "D", spacing=0.5, progress=False)
    assert not (tmp_path / "D").exists()


# ------------------------------------------------------------------------------- field of view
def test_field_of_view_in_plane_and_off_plane(tmp_path):
    png = write_png(tmp_path / "in" / "p.png", grey_picture())
    sp = (0.5, 0.5)
    names = ["a", "b", "c", "d", "e"]
    px = np.array([[5.0, 5.0], [20.0, 10.0], [30.0, 30.0], [40.0, 20.0], [10.0, 35.0]])
    pts = world(px, sp)

    def convert(points, **kw):
        lm = tmp_path / "in" / "p.mrk.json"
        write_landmarks(LandmarkSet(names, points), lm)
        out = tmp_path / "D"
        return convert_dataset({"p": (png, lm)}, out, spacing=sp, overwrite=True, progress=False, **kw)

    # one landmark half a pixel beyond the last column centre is still inside; further is cut off
    p = pts.copy()
    p[0, 0] = (SHAPE_YX[1] - 1 + 0.5) * sp[0]
    p[1, 1] = -0.6 * sp[1]
    with pytest.warns(ConversionWarning, match=r"landmark\(s\) b at LPS .* lie outside the image"):
        out = convert(p)
    got = load_dataset_landmarks(out)["p"]
    assert got.present.tolist() == [True, False, True, True, True]
    # off the image plane (z != 0): outside the field of view like any other landmark
    p = pts.copy()
    p[2, 2] = 0.4  # within the old half-voxel slab of the k axis, but not on the plane
    with pytest.warns(ConversionWarning, match=r"c at LPS .*plane z = 0"):
        out = convert(p)
    assert load_dataset_landmarks(out)["p"].present.tolist() == [True, True, False, True, True]
    # within the plane tolerance: kept, z set to exactly 0
    p = pts.copy()
    p[3, 2] = 1e-4
    out = convert(p)
    got = load_dataset_landmarks(out)["p"].points_lps
    assert np.all(got[:, 2] == 0)
    np.testing.assert_allclose(got[:, :2], pts[:, :2], atol=0)
    # most landmarks off the plane: an error (wrong file or frame), nothing written
    p = pts.copy()
    p[:, 2] = 12.0
    with pytest.raises(ConversionError, match=r"5 of 5 landmark\(s\) outside the image .*plane z = 0"):
        convert(p)
    # outside_fov="error": any landmark outside is an error
    p = pts.copy()
    p[4, 2] = -1.0
    with pytest.raises(ConversionError, match=r"1 of 5 landmark\(s\) outside"):
        convert(p, outside_fov="error")


# ------------------------------------------------------------------------------- CSV layouts
def test_csv_2d_layouts(tmp_path):
    geo = ImageGeometry.create((48, 40), (0.5, 0.25), (1.0, 2.0), (1.0, 0.0, 0.0, 1.0))
    f = tmp_path / "w.csv"
    f.write_text("label,r,a,defined\nx,1.5,-2.0,true\ny,,,false\n")
    ls = read_landmarks(f)
    np.testing.assert_array_equal(ls.points_lps[0], [-1.5, 2.0, 0.0])
    assert ls.present.tolist() == [True, False]
    f = tmp_path / "px.csv"
    f.write_text("label,x_px,y_px\nx,2,4\ny,,\n")
    with pytest.raises(LandmarkError, match=r"px\.csv: pixel coordinates .* need the image"):
        read_landmarks(f)
    ls = read_landmarks(f, geometry=geo)
    np.testing.assert_allclose(ls.points_lps[0], [2.0, 3.0, 0.0])
    assert ls.present.tolist() == [True, False]
    geo3 = ImageGeometry((48, 40, 10), (0.5, 0.25, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    with pytest.raises(LandmarkError, match="3D image need a z_px column"):
        read_landmarks(f, geometry=geo3)
    f3 = tmp_path / "px3.csv"
    f3.write_text("label,x_px,y_px,z_px\nx,2,4,1.5\n")
    np.testing.assert_allclose(read_landmarks(f3, geometry=geo3).points_lps[0], [1.0, 1.0, 3.0])
    both = tmp_path / "both.csv"
    both.write_text("label,l,p,x_px,y_px\nx,1,2,3,4\n")
    with pytest.raises(LandmarkError, match="both world"):
        read_landmarks(both, geometry=geo)


# ------------------------------------------------------------------------------ radius, test sets
def test_2d_radius_rule_and_test_sets(tmp_path):
    assert ball_radius_mm([(0.1, 0.1), (0.2, 0.1)]) == pytest.approx(0.3)
    np.testing.assert_allclose(nnunet_target_spacing([(0.1, 0.1)] * 3 + [(0.2, 0.1)] * 2, [(100, 90)] * 5), [0.1, 0.1])
    imgs = {c: write_png(tmp_path / "in" / f"{c}.png", grey_picture(i)) for i, c in enumerate("abcd")}
    lm = write_pixel_csv(tmp_path / "in" / "p.csv", PX)
    out = convert_dataset({c: (p, lm) for c, p in imgs.items()}, tmp_path / "D", spacing=0.1,
                          test_sets={"first": ["c"], "second": ["d"]}, subjects={"a": "p1", "b": "p1"}, progress=False)
    lj = json.loads((out / "landmarks.json").read_text())
    assert lj["subjects"] == {"a": "p1", "b": "p1"}
    assert lj["test_cases"] == ["c", "d"] and load_dataset_test_sets(out) == {"first": ["c"], "second": ["d"]}
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == ["c_0000.nii.gz", "d_0000.nii.gz"]
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 2
    with pytest.raises(ConversionError, match="also in test set"):
        convert_dataset({c: (p, lm) for c, p in imgs.items()}, tmp_path / "E", spacing=0.1,
                        test_sets={"first": ["c"], "second": ["c", "d"]}, progress=False)
    with pytest.raises(ConversionError, match=r"subjects: case\(s\) \['z'\] are not among the cases"):
        convert_dataset({c: (p, lm) for c, p in imgs.items()}, tmp_path / "E", spacing=0.1,
                        subjects={"a": "p1", "z": "p1"}, progress=False)
    with pytest.raises(ConversionError, match="target spacing must be 2 positive numbers"):
        convert_dataset({c: (p, lm) for c, p in imgs.items()}, tmp_path / "E", spacing=0.1,
                        target_spacing=(1, 1, 1), progress=False)


def test_downscale_geometry_is_exact():
    arr = np.arange(7 * 9, dtype=np.uint8).reshape(7, 9)  # (y, x)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.1, 0.2))
    img.SetOrigin((5.0, -1.0))
    small = downscale_2d(img, 2)
    assert small.GetSize() == (4, 3) and small.GetSpacing() == pytest.approx((0.2, 0.4))
    g, gs = ImageGeometry.from_sitk(img), ImageGeometry.from_sitk(small)
    assert gs == downscaled_geometry(g, 2)
    # each new pixel centre is the mean of its block's centres; its value the block mean (rounded)
    for j in range(3):
        for i in range(4):
            block = [(2 * i + a, 2 * j + b, 0) for a in (0, 1) for b in (0, 1)]
            np.testing.assert_allclose(gs.itk_index_to_world([i, j, 0]), g.itk_index_to_world(block).mean(0), atol=1e-12)
            assert sitk.GetArrayFromImage(small)[j, i] == np.rint(arr[2 * j: 2 * j + 2, 2 * i: 2 * i + 2].mean())
    with pytest.raises(ValueError, match="positive integer"):
        downscale_2d(img, 0)


# ------------------------------------------------------------------------------------ nnU-Net
def test_nnunet_reads_the_2d_dataset(tmp_path, png_folder):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    d, px = png_folder
    cases = {c: (d / "images" / f"{c}.png", next((d / "landmarks").glob(f"{c}.*"))) for c in ("c1", "c2", "c3")}
    out = convert_dataset(cases, tmp_path / "Dataset013_X", spacing=SPACING, progress=False)
    data, props = SimpleITKIO().read_images([str(out / "imagesTr" / "c1_0000.nii.gz")])
    assert data.shape == (1, 1) + SHAPE_YX
    assert list(props["spacing"]) == pytest.approx([999 * max(SPACING), SPACING[1], SPACING[0]])
    assert props["sitk_stuff"]["spacing"] == pytest.approx(SPACING)
    seg, sprops = SimpleITKIO().read_seg(str(out / "labelsTr" / "c1.nii.gz"))
    assert seg.shape == (1, 1) + SHAPE_YX and set(np.unique(seg)) == {0, 1, 2, 3}
    # the geometry nnU-Net keeps maps the exact points back to the pixels
    geo = ImageGeometry.from_sitk_stuff(props["sitk_stuff"], data.shape[1:])
    zyx = geo.world_to_array_index(load_dataset_landmarks(out)["c1"].points_lps)
    np.testing.assert_allclose(zyx[:, 0], 0, atol=1e-12)
    np.testing.assert_allclose(zyx[:, 1:][:, ::-1], px["c1"], atol=1e-6)


@pytest.mark.skipif(os.environ.get("NNLANDMARK_SLOW") != "1",
                    reason="the real nnUNetv2_plan_and_preprocess takes ~25 s on 2 shared cores; set NNLANDMARK_SLOW=1")
def test_nnunet_plans_a_2d_configuration(tmp_path, png_folder, nnunet_env):
    """The real `nnUNetv2_plan_and_preprocess -c 2d` on the converted PNGs: only a 2d configuration, at the
    pixel spacing, and each disk survives preprocessing (centre of mass within 0.3 px of the exact point)."""
    d, px = png_folder
    cases = {c: (d / "images" / f"{c}.png", next((d / "landmarks").glob(f"{c}.*"))) for c in ("c1", "c2", "c3")}
    convert_dataset(cases, dataset_id=14, dataset_name="Xray", spacing=SPACING, progress=False)
    exe = Path(sys.executable).with_name("nnUNetv2_plan_and_preprocess")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", nnUNet_n_proc_DA="1")
    r = subprocess.run([str(exe), "-d", "14", "-c", "2d", "--verify_dataset_integrity", "-np", "1", "-npfp", "1"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    pre = nnunet_env["nnUNet_preprocessed"] / "Dataset014_Xray"
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    assert set(plans["configurations"]) == {"2d"}
    assert plans["configurations"]["2d"]["spacing"] == pytest.approx([SPACING[1], SPACING[0]])
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    folder = pre / plans["configurations"]["2d"]["data_identifier"]
    ds = infer_dataset_class(str(folder))(str(folder))
    for case in ds.identifiers:
        _, seg, _, props = ds.load_case(case)
        seg = np.asarray(seg[0])
        assert seg.shape[0] == 1
        bbox = np.asarray(props["bbox_used_for_cropping"])[:, 0]
        for k in range(len(NAMES)):
            vox = np.argwhere(seg[0] == k + 1)
            assert len(vox), f"{case}: disk of {NAMES[k]} vanished"
            com_xy = (vox.mean(0) + bbox[1:])[::-1]
            assert np.abs(com_xy - px[case][k]).max() < 0.3
