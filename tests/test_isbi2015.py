"""dataset_conversion/convert_isbi2015.py on tiny files generated in the ISBI 2015 layout.

The real data (1935 x 2400 BMPs) cannot be downloaded here: 48 x 40 grey BMPs, 3 training + 2 Test1
+ 1 Test2 cases, two doctors' annotation files each (19 lines `x,y`, then lines that are not
landmarks). Checked: the reference is the doctors' mean, names and split, test sets kept apart,
pixel -> mm -> pixel exact, and `--downscale` keeps the world landmarks where they are.
"""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnlandmark_h3de.conversion import ConversionError, ConversionWarning
from nnlandmark_h3de.landmarks import ImageGeometry, load_dataset_landmarks, load_dataset_test_sets

REPO = Path(__file__).resolve().parents[1]
SHAPE_YX = (40, 48)
SPLITS = {"TrainingData": ["001", "002", "003"], "Test1Data": ["004", "005"], "Test2Data": ["006"]}


def load_script():
    spec = importlib.util.spec_from_file_location("convert_isbi2015", REPO / "dataset_conversion" / "convert_isbi2015.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def senior_px(i):
    """19 integer pixel positions on a grid (disks never touch), shifted per case."""
    k = np.arange(19)
    return np.column_stack([4 + 9 * (k % 5) + (i % 2), 4 + 9 * (k // 5) + i % 3]).astype(float)


def junior_px(i):
    return senior_px(i) + np.array([1.0, -1.0]) * ((np.arange(19) % 3)[:, None] - 1)


def picture(i):
    return np.random.default_rng(i).integers(0, 256, SHAPE_YX).astype(np.uint8)


def write_annotation(path, xy, extra=("1", "3", "2")):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{int(x)},{int(y)}" for x, y in xy] + list(extra)  # the real files add classification lines
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def isbi_root(tmp_path):
    root = tmp_path / "ISBI2015"
    i = 0
    for folder, cases in SPLITS.items():
        (root / "RawImage" / folder).mkdir(parents=True)
        for case in cases:
            sitk.WriteImage(sitk.GetImageFromArray(picture(i)), str(root / "RawImage" / folder / f"{case}.bmp"))
            write_annotation(root / "AnnotationsByMD" / "400_senior" / f"{case}.txt", senior_px(i))
            write_annotation(root / "AnnotationsByMD" / "400_junior" / f"{case}.txt", junior_px(i))
            i += 1
    return root


def all_cases():
    return [c for cases in SPLITS.values() for c in cases]


def test_isbi_round_trip(tmp_path, isbi_root):
    mod = load_script()
    assert len(mod.ISBI_NAMES) == 19 and mod.ISBI_NAMES[0] == "sella" and mod.ISBI_NAMES[-1] == "articulare"
    assert mod.main(["-i", str(isbi_root), "-d", "503", "-o", str(tmp_path / "raw")]) == 0
    out = tmp_path / "raw" / "Dataset503_ISBI2015"
    dj = json.loads((out / "dataset.json").read_text())
    assert dj["landmarks"]["names"] == mod.ISBI_NAMES and dj["landmarks"]["pairs"] == []
    assert dj["labels"] == {"background": 0, **{n: i + 1 for i, n in enumerate(mod.ISBI_NAMES)}}
    assert dj["numTraining"] == 3 and dj["channel_names"] == {"0": "Xray"}
    assert dj["landmarks"]["ball_radius_mm"] == pytest.approx(0.15)  # 1.5 pixels of 0.1 mm
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [f"{c}_0000.nii.gz" for c in SPLITS["TrainingData"]]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == [f"{c}.nii.gz" for c in SPLITS["TrainingData"]]
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == [f"{c}_0000.nii.gz" for c in ["004", "005", "006"]]
    lj = json.loads((out / "landmarks.json").read_text())
    assert lj["test_cases"] == ["004", "005", "006"]
    assert load_dataset_test_sets(out) == {"test1": ["004", "005"], "test2": ["006"]}

    landmarks = load_dataset_landmarks(out)
    assert sorted(landmarks) == all_cases()
    for i, case in enumerate(all_cases()):
        sub = "imagesTr" if case in SPLITS["TrainingData"] else "imagesTs"
        path = out / sub / f"{case}_0000.nii.gz"
        im = sitk.ReadImage(str(path))
        assert im.GetDimension() == 2 and im.GetSize() == SHAPE_YX[::-1] and im.GetSpacing() == pytest.approx((0.1, 0.1))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(im), picture(i))  # palette BMP -> grey, exactly
        mean_px = (senior_px(i) + junior_px(i)) / 2
        ls = landmarks[case]
        assert ls.names == mod.ISBI_NAMES and ls.present.all()
        np.testing.assert_allclose(ls.points_lps[:, :2], 0.1 * mean_px, atol=1e-12)
        assert np.all(ls.points_lps[:, 2] == 0)
        back = ImageGeometry.from_file(path).world_to_itk_index(ls.points_lps)
        np.testing.assert_allclose(back[:, :2], mean_px, atol=1e-9)  # pixel -> mm -> pixel
        if sub == "imagesTr":
            lab = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTr" / f"{case}.nii.gz")))
            for k in range(19):
                vox = np.argwhere(lab == k + 1)
                assert len(vox) >= 4, f"{case}: disk {k + 1} too small"  # 2 x 2 at a pixel corner
                np.testing.assert_allclose(vox.mean(0)[::-1], mean_px[k], atol=0.35)


def test_isbi_reference_one_doctor_and_downscale(tmp_path, isbi_root):
    mod = load_script()
    out = mod.convert_isbi2015(isbi_root, 504, output_root=tmp_path, reference="senior", downscale=2, progress=False)
    landmarks = load_dataset_landmarks(out)
    for i, case in enumerate(all_cases()):
        np.testing.assert_allclose(landmarks[case].points_lps[:, :2], 0.1 * senior_px(i), atol=1e-12)
    path = out / "imagesTr" / "001_0000.nii.gz"
    im = sitk.ReadImage(str(path))
    assert im.GetSize() == (24, 20) and im.GetSpacing() == pytest.approx((0.2, 0.2))
    assert im.GetOrigin() == pytest.approx((0.05, 0.05))
    block = picture(0).reshape(20, 2, 24, 2).astype(float).mean(axis=(1, 3))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(im), np.rint(block).astype(np.uint8))
    back = ImageGeometry.from_file(path).world_to_itk_index(landmarks["001"].points_lps)[:, :2]
    np.testing.assert_allclose(back, (senior_px(0) - 0.5) / 2, atol=1e-9)  # old pixel centre p -> (p - 0.5) / 2
    assert json.loads((out / "dataset.json").read_text())["landmarks"]["ball_radius_mm"] == pytest.approx(0.3)


def test_isbi_bad_annotation_is_named(tmp_path, isbi_root):
    mod = load_script()
    bad = isbi_root / "AnnotationsByMD" / "400_junior" / "002.txt"
    lines = bad.read_text().splitlines()
    lines[4] = "12;x"
    bad.write_text("\n".join(lines))
    with pytest.raises(ConversionError, match=r"400_junior/002\.txt: line 5 \(subspinale\): expected 'x,y'"):
        mod.convert_isbi2015(isbi_root, 505, output_root=tmp_path, progress=False)
    assert not (tmp_path / "Dataset505_ISBI2015").exists()
    (isbi_root / "AnnotationsByMD" / "400_senior" / "005.txt").unlink()
    with pytest.warns(ConversionWarning) as record:
        out = mod.convert_isbi2015(isbi_root, 505, output_root=tmp_path, on_error="drop", progress=False)
    messages = " | ".join(str(w.message) for w in record)
    assert "dropping case 002" in messages and "dropping case 005" in messages and "400_senior/005.txt" in messages
    assert sorted(load_dataset_landmarks(out)) == ["001", "003", "004", "006"]
    assert load_dataset_test_sets(out) == {"test1": ["004"], "test2": ["006"]}
    bad.write_text("1,2\n3,4\n")
    assert mod.main(["-i", str(isbi_root), "-d", "506", "-o", str(tmp_path)]) == 1


def test_evaluate_one_test_set_in_mm_and_pixels(tmp_path, isbi_root):
    """nnLandmark_evaluate --test_set test1: only Test1's cases, errors in mm and in pixels of 0.1 mm."""
    from nnlandmark_h3de.cli.evaluate import main as evaluate
    from nnlandmark_h3de.landmarks import write_landmarks
    mod = load_script()
    assert mod.main(["-i", str(isbi_root), "-d", "503", "-o", str(tmp_path / "raw")]) == 0
    out = tmp_path / "raw" / "Dataset503_ISBI2015"
    landmarks = load_dataset_landmarks(out)
    pred = tmp_path / "pred"
    pred.mkdir()
    for case in ("004", "005", "006"):  # every point 0.3 mm = 3 pixels off along x
        ls = landmarks[case]
        write_landmarks(type(ls)(ls.names, ls.points_lps + [0.3, 0.0, 0.0]), pred / f"{case}.mrk.json")
    assert evaluate(["-ref", str(out / "landmarks.json"), "-pred", str(pred), "-o", str(tmp_path / "t1.json"),
                     "--test_set", "test1"]) == 0
    summary = json.loads((tmp_path / "t1.json").read_text())
    assert sorted(c["case"] for c in summary["metric_per_case"]) == ["004", "005"]
    assert summary["foreground_mean"]["micro"]["mean_radial_error_mm"] == pytest.approx(0.3)
    assert summary["pixel_errors"]["mean_radial_error_px"] == pytest.approx(3.0)
    assert evaluate(["-ref", str(out / "landmarks.json"), "-pred", str(pred), "-o", str(tmp_path / "t3.json"),
                     "--test_set", "test3"]) == 1
