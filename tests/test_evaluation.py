"""Evaluation: hand-computed metrics, world-mm distances, files, CLI, plots and errors."""
import csv
import json

import numpy as np
import pytest

from nnlandmark_h3de.evaluation import evaluate_landmarks
from nnlandmark_h3de.evaluation.evaluate import evaluate_folders
from nnlandmark_h3de.evaluation.landmark_files import case_name
from nnlandmark_h3de.evaluation.radial_errors import success_detection_rate
from nnlandmark_h3de.landmarks import ImageGeometry, LandmarkError, LandmarkSet, write_landmarks

NAN = [np.nan] * 3


def small_sets():
    """Case a: A TP (2 mm), B TP (5 mm), C FP.  Case b: A TP (2.5 mm), B TN, C FN (name missing)."""
    reference = {"a": LandmarkSet(["A", "B", "C"], [[0, 0, 0], [10, 0, 0], NAN], source="ref/a"),
                 "b": LandmarkSet(["A", "B", "C"], [[0, 0, 0], NAN, [5, 5, 5]], source="ref/b")}
    prediction = {"a": LandmarkSet(["A", "B", "C"], [[0, 0, 2], [10, 3, 4], [1, 1, 1]], source="pred/a"),
                  "b": LandmarkSet(["A", "B"], [[0, 2.5, 0], NAN], source="pred/b")}
    return reference, prediction


def test_per_landmark_statistics_and_existence_by_hand():
    s = evaluate_landmarks(*small_sets())
    assert s["landmark_names"] == ["A", "B", "C"] and s["n_cases"] == 2
    a, b, c = (s["mean"][n] for n in "ABC")
    # A: errors 2 and 2.5
    assert (a["TP"], a["FP"], a["FN"], a["TN"]) == (2, 0, 0, 0)
    assert a["mean_radial_error_mm"] == pytest.approx(2.25)
    assert a["std_radial_error_mm"] == pytest.approx(0.25)
    assert a["median_radial_error_mm"] == pytest.approx(2.25) and a["max_radial_error_mm"] == pytest.approx(2.5)
    # the rule is error <= r: exactly 2.0 mm counts at r = 2, 2.5 mm does not
    assert a["SDR_2mm"] == 0.5 and a["SDR_2.5mm"] == 1.0 and a["SDR_4mm"] == 1.0
    # B: one TP (5 mm) and one TN, which adds no distance
    assert (b["TP"], b["FP"], b["FN"], b["TN"]) == (1, 0, 0, 1)
    assert b["mean_radial_error_mm"] == pytest.approx(5.0) and b["SDR_4mm"] == 0.0
    assert b["accuracy"] == 1.0 and b["precision"] == 1.0 and b["recall"] == 1.0
    # C: FP in a, FN in b (name missing from the prediction = predicted absent): no error at all
    assert (c["TP"], c["FP"], c["FN"], c["TN"]) == (0, 1, 1, 0)
    assert c["n_errors"] == 0 and c["mean_radial_error_mm"] is None and c["SDR_2mm"] is None
    assert (c["accuracy"], c["precision"], c["recall"], c["F1"]) == (0.0, 0.0, 0.0, 0.0)
    statuses = {e["case"]: {n: m["status"] for n, m in e["metrics"].items()} for e in s["metric_per_case"]}
    assert statuses == {"a": {"A": "TP", "B": "TP", "C": "FP"}, "b": {"A": "TP", "B": "TN", "C": "FN"}}
    case_a = s["metric_per_case"][0]
    assert case_a["reference_file"] == "ref/a" and case_a["prediction_file"] == "pred/a"
    assert case_a["metrics"]["C"]["radial_error_mm"] is None and case_a["metrics"]["C"]["prediction_lps"] == [1, 1, 1]


def test_micro_and_macro_differ_as_computed_by_hand():
    fm = evaluate_landmarks(*small_sets())["foreground_mean"]
    micro, macro = fm["micro"], fm["macro"]
    # micro: errors 2, 2.5, 5 pooled; counts TP 3 FP 1 FN 1 TN 1
    assert micro["n_points"] == 6 and (micro["TP"], micro["FP"], micro["FN"], micro["TN"]) == (3, 1, 1, 1)
    assert micro["mean_radial_error_mm"] == pytest.approx(19 / 6)
    assert micro["std_radial_error_mm"] == pytest.approx(np.sqrt(35.25 / 3 - (19 / 6) ** 2))
    assert micro["median_radial_error_mm"] == pytest.approx(2.5) and micro["max_radial_error_mm"] == pytest.approx(5)
    assert micro["SDR_2mm"] == pytest.approx(1 / 3) and micro["SDR_2.5mm"] == pytest.approx(2 / 3)
    assert micro["accuracy"] == pytest.approx(4 / 6) and micro["precision"] == pytest.approx(0.75)
    assert micro["recall"] == pytest.approx(0.75) and micro["F1"] == pytest.approx(0.75)
    # macro: per-landmark values averaged; C has no error so MRE/SDR average over A and B only
    assert macro["n_landmarks"] == 3 and macro["n_landmarks_with_errors"] == 2
    assert macro["mean_radial_error_mm"] == pytest.approx((2.25 + 5) / 2)
    assert macro["SDR_2mm"] == pytest.approx(0.25) and macro["SDR_2.5mm"] == pytest.approx(0.5)
    assert macro["precision"] == pytest.approx(2 / 3) and macro["F1"] == pytest.approx(2 / 3)
    assert "max_radial_error_mm" not in macro


def test_sdr_rule_and_undefined_scores():
    assert success_detection_rate([2.0, np.nextafter(2.0, 3.0)], 2.0) == 0.5
    assert success_detection_rate([], 2.0) is None
    ref = {"x": LandmarkSet(["A"], [NAN])}
    s = evaluate_landmarks(ref, {"x": LandmarkSet(["A"], [NAN])}, sdr_radii=[3])
    a = s["mean"]["A"]  # a single TN: precision, recall and F1 have no denominator
    assert (a["TN"], a["accuracy"], a["precision"], a["recall"], a["F1"]) == (1, 1.0, None, None, None)
    assert "<=" in s["conventions"]["sdr_rule"] and s["sdr_radii_mm"] == [3.0]
    with pytest.raises(ValueError, match="positive"):
        evaluate_landmarks(ref, ref, sdr_radii=[2, -1])


def test_anisotropic_rotated_geometry_gives_world_mm():
    """One voxel along array z is 3 mm, two along array x are 1 mm, whatever the rotation."""
    c, s = np.cos(0.5), np.sin(0.5)
    rot = np.array([[c, -s, 0], [s * 0.6, c * 0.6, -0.8], [s * 0.8, c * 0.8, 0.6]])
    geo = ImageGeometry((40, 30, 20), (0.5, 1.0, 3.0), (12.0, -7.0, 3.0), tuple(rot.ravel()))
    ref_pts = geo.array_index_to_world(np.array([[10, 20, 30], [10, 20, 30]], float))
    pred_pts = geo.array_index_to_world(np.array([[11, 20, 30], [10, 20, 32]], float))
    s = evaluate_landmarks({"c": LandmarkSet(["z", "x"], ref_pts)}, {"c": LandmarkSet(["z", "x"], pred_pts)})
    errs = [s["metric_per_case"][0]["metrics"][n]["radial_error_mm"] for n in ("z", "x")]
    assert errs == pytest.approx([3.0, 1.0])


def test_unknown_names_and_cases_fail_or_are_skipped_with_chill():
    ref, pred = small_sets()
    pred["a"] = LandmarkSet(["A", "B", "C", "D"], [[0, 0, 2], [10, 3, 4], [1, 1, 1], [9, 9, 9]], source="pred/a")
    with pytest.raises(LandmarkError, match=r"pred/a.*\['D'\]"):
        evaluate_landmarks(ref, pred)
    s = evaluate_landmarks(ref, pred, chill=True)
    assert s["skipped"] == [{"case": "a", "file": "pred/a", "landmarks": ["D"],
                             "reason": "landmark names not in the reference"}]
    assert s["mean"]["A"]["mean_radial_error_mm"] == pytest.approx(2.25)  # the rest is unchanged
    pred["zz"] = LandmarkSet(["A"], [[0, 0, 0]], source="pred/zz")
    with pytest.raises(LandmarkError, match="pred/zz.*no reference"):
        evaluate_landmarks(ref, pred, chill=False)


def test_case_names_strip_the_landmark_extension():
    assert case_name("x/c1.mrk.json") == "c1" and case_name("c.2.fcsv") == "c.2" and case_name("c.csv") == "c"
    assert case_name("c.json") == "c" and case_name("c.nii.gz") is None


# ----------------------------------------------------------------- files and CLI
def _write_folders(tmp_path):
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    ref, pred = small_sets()
    write_landmarks(ref["a"], ref_dir / "a.fcsv")
    write_landmarks(ref["b"], ref_dir / "b.json")
    write_landmarks(pred["a"], pred_dir / "a.mrk.json")
    write_landmarks(pred["b"], pred_dir / "b.csv")
    (pred_dir / "dataset.json").write_text("{}")  # nnU-Net's files in a prediction folder are not cases
    (pred_dir / "plans.json").write_text("{}")
    return ref_dir, pred_dir


def test_cli_end_to_end(tmp_path, capsys):
    from nnlandmark_h3de.cli.evaluate import main
    ref_dir, pred_dir = _write_folders(tmp_path)
    assert main(["-ref", str(ref_dir), "-pred", str(pred_dir), "--sdr", "2", "3"]) == 0
    out = capsys.readouterr().out
    assert "micro (points)" in out and "macro (landmarks)" in out and "error <= r" in out
    summary = json.loads((pred_dir / "summary.json").read_text())
    assert summary["sdr_radii_mm"] == [2.0, 3.0] and summary["n_cases"] == 2
    assert summary["foreground_mean"]["micro"]["mean_radial_error_mm"] == pytest.approx(19 / 6)
    assert summary["metric_per_case"][0]["prediction_file"].endswith("a.mrk.json")
    assert set(summary["conventions"]) >= {"units", "sdr_rule", "micro", "macro", "existence"}
    rows = list(csv.DictReader((pred_dir / "summary.csv").open()))
    assert len(rows) == 6 and {r["status"] for r in rows} == {"TP", "FP", "FN", "TN"}
    row = next(r for r in rows if r["case"] == "b" and r["landmark"] == "A")
    assert float(row["radial_error_mm"]) == pytest.approx(2.5)
    assert not list(pred_dir.glob(".*tmp"))  # atomic writes leave no temp files
    # a second run must not take its own summary.csv / summary.json for cases
    assert main(["-ref", str(ref_dir), "-pred", str(pred_dir)]) == 0


def test_dataset_landmarks_json_reference_evaluates_the_predicted_cases(tmp_path):
    ref_dir, pred_dir = _write_folders(tmp_path)
    doc = {"coordinate_system": "LPS", "units": "mm", "names": ["A", "B", "C"],
           "cases": {"a": {"A": [0, 0, 0], "B": [10, 0, 0], "C": None},
                     "b": {"A": [0, 0, 0], "B": None, "C": [5, 5, 5]},
                     "unpredicted": {"A": [1, 1, 1], "B": None, "C": None}},
           "test_cases": []}
    (tmp_path / "landmarks.json").write_text(json.dumps(doc))
    s = evaluate_folders(tmp_path / "landmarks.json", pred_dir)
    assert [e["case"] for e in s["metric_per_case"]] == ["a", "b"]
    assert s["foreground_mean"]["micro"]["mean_radial_error_mm"] == pytest.approx(19 / 6)
    (tmp_path / "dataset.json").write_text("{}")  # a raw dataset folder holding landmarks.json also works
    assert evaluate_folders(tmp_path, pred_dir)["n_cases"] == 2
    write_landmarks(LandmarkSet(["A"], [[0, 0, 0]]), pred_dir / "stranger.json")
    with pytest.raises(LandmarkError, match=r"stranger\.json.*no reference"):
        evaluate_folders(tmp_path / "landmarks.json", pred_dir)


def test_missing_and_unreadable_predictions(tmp_path):
    ref_dir, pred_dir = _write_folders(tmp_path)
    (pred_dir / "b.csv").unlink()
    with pytest.raises(LandmarkError, match=r"no prediction for case 'b'"):
        evaluate_folders(ref_dir, pred_dir)
    (pred_dir / "b.fcsv").write_text("garbage, not a markups file\n")
    with pytest.raises(LandmarkError, match=r"b\.fcsv"):
        evaluate_folders(ref_dir, pred_dir)
    s = evaluate_folders(ref_dir, pred_dir, tmp_path / "out" / "summary.json", chill=True)
    assert [e["case"] for e in s["metric_per_case"]] == ["a"]
    assert len(s["skipped"]) == 1 and s["skipped"][0]["case"] == "b" and "b.fcsv" in s["skipped"][0]["reason"]
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert written["skipped"] == s["skipped"]


def test_cli_reports_errors_with_the_path(tmp_path, capsys):
    from nnlandmark_h3de.cli.evaluate import main
    assert main(["-ref", str(tmp_path / "nowhere"), "-pred", str(tmp_path)]) == 1
    assert "nowhere" in capsys.readouterr().err


def test_plots_are_written(tmp_path):
    import SimpleITK as sitk
    ref_dir, pred_dir = _write_folders(tmp_path)
    # an anisotropic image around the case-a landmarks (A at 0,0,0 and B at 10,0,0 mm)
    geo = ImageGeometry((16, 12, 8), (1.0, 1.5, 2.5), (-3.0, -6.0, -8.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    z, y, x = np.mgrid[:8, :12, :16]
    image = tmp_path / "a.nii.gz"
    sitk.WriteImage(geo.to_sitk_image((x + 2 * y + 3 * z).astype(np.float32)), str(image))
    out = tmp_path / "eval" / "summary.json"
    s = evaluate_folders(ref_dir, pred_dir, out, plots=True, plot_case="a", plot_image=image)
    names = sorted(p.split("/")[-1] for p in s["plots"])
    assert names == ["a_slices_01.png", "cumulative_error.png", "error_boxplot.png"]
    for p in s["plots"]:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert (tmp_path / "eval" / "plots" / p.split("/")[-1]).stat().st_size > 10_000
    with pytest.raises(ValueError, match="'zz' is not among"):
        evaluate_folders(ref_dir, pred_dir, out, plots=True, plot_case="zz", plot_image=image)


def test_landmark_order_follows_the_fullest_reference_and_missing_reference_names_are_absent():
    ref = {"a": LandmarkSet(["B"], [[0, 0, 0]]), "b": LandmarkSet(["A", "B", "C"], [[0, 0, 0]] * 3)}
    pred = {"a": LandmarkSet(["A", "B"], [[1, 0, 0], [0, 0, 1]]), "b": LandmarkSet(["A", "B", "C"], [[0, 0, 0]] * 3)}
    s = evaluate_landmarks(ref, pred)
    assert s["landmark_names"] == ["A", "B", "C"]
    assert [s["metric_per_case"][0]["metrics"][n]["status"] for n in "ABC"] == ["FP", "TP", "TN"]


def test_uncertainty_is_rank_correlated_with_errors_over_true_positives():
    names = ["a", "b", "c", "d"]
    ref = {f"c{i}": LandmarkSet(names, np.zeros((4, 3))) for i in range(2)}
    # errors 1, 2, 3, 4 (case 0) and 5, 6, 7, absent (case 1); uncertainty ranks them exactly,
    # except the FN whose (huge) uncertainty must not count
    pts0 = np.array([[1.0, 0, 0], [2, 0, 0], [3, 0, 0], [4, 0, 0]])
    pts1 = np.array([[5.0, 0, 0], [6, 0, 0], [7, 0, 0], [np.nan] * 3])
    pred = {"c0": LandmarkSet(names, pts0, uncertainty_mm=[0.1, 0.2, 0.3, 0.4]),
            "c1": LandmarkSet(names, pts1, uncertainty_mm=[0.5, 0.6, 0.7, 100.0])}
    s = evaluate_landmarks(ref, pred)
    assert s["uncertainty_vs_error"]["n_points"] == 7
    assert s["uncertainty_vs_error"]["spearman_rho"] == pytest.approx(1.0)
    assert s["metric_per_case"][0]["metrics"]["b"]["uncertainty_mm"] == pytest.approx(0.2)
    # reversed ranking -> -1; no uncertainty at all -> None
    pred["c0"].uncertainty_mm = np.array([0.7, 0.6, 0.5, 0.4])
    pred["c1"].uncertainty_mm = np.array([0.3, 0.2, 0.1, 0.0])
    assert evaluate_landmarks(ref, pred)["uncertainty_vs_error"]["spearman_rho"] == pytest.approx(-1.0)
    plain = {k: LandmarkSet(names, v.points_lps) for k, v in pred.items()}
    assert evaluate_landmarks(ref, plain)["uncertainty_vs_error"] is None


def test_errors_in_pixels_of_2d_and_anisotropic_3d_images(tmp_path):
    """MRE in pixels (the ISBI 2015 convention) in each case's own grid: a 2D X-ray at 0.1 mm, an
    anisotropic rotated 3D volume; a case without its image has no pixel error (and says so)."""
    import SimpleITK as sitk
    images, ref_dir, pred_dir = tmp_path / "images", tmp_path / "ref", tmp_path / "pred"
    for d in (images, ref_dir, pred_dir):
        d.mkdir()
    xray = sitk.GetImageFromArray(np.zeros((30, 40), np.float32))
    xray.SetSpacing((0.1, 0.1))
    xray.SetOrigin((5.0, -3.0))
    sitk.WriteImage(xray, str(images / "xray_0000.nii.gz"))
    rot = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    geo = ImageGeometry((20, 20, 10), (0.5, 1.0, 3.0), (1.0, 2.0, 3.0), tuple(rot.ravel()))
    sitk.WriteImage(geo.to_sitk_image(np.zeros((10, 20, 20), np.float32)), str(images / "vol_0000.nii.gz"))
    g2 = ImageGeometry.from_sitk(xray)
    ref = {"xray": g2.array_index_to_world([[0, 10, 10], [0, 20, 5]]),
           "vol": geo.array_index_to_world([[5, 10, 10], [2, 3, 4]]),
           "noimage": np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])}
    pred = {"xray": g2.array_index_to_world([[0, 13, 14], [0, 20, 5]]),  # 5 px = 0.5 mm, then 0
            "vol": geo.array_index_to_world([[6, 10, 10], [2, 3, 6]]),  # 1 slice (3 mm) and 2 px along x
            "noimage": np.array([[0.0, 0.0, 1.0], [1.0, 1.0, 1.0]])}
    for case in ref:
        write_landmarks(LandmarkSet(["A", "B"], ref[case]), ref_dir / f"{case}.mrk.json")
        write_landmarks(LandmarkSet(["A", "B"], pred[case]), pred_dir / f"{case}.mrk.json")
    s = evaluate_folders(ref_dir, pred_dir, tmp_path / "summary.json", images=images)
    per_case = {c["case"]: c["metrics"] for c in s["metric_per_case"]}
    assert per_case["xray"]["A"]["radial_error_px"] == pytest.approx(5.0)
    assert per_case["xray"]["A"]["radial_error_mm"] == pytest.approx(0.5)
    assert per_case["vol"]["A"]["radial_error_px"] == pytest.approx(1.0)
    assert per_case["vol"]["B"]["radial_error_px"] == pytest.approx(2.0)
    assert "radial_error_px" not in per_case["noimage"]["A"]
    px = s["pixel_errors"]
    assert px["n_cases_with_image"] == 2 and px["n_cases"] == 3
    assert px["mean_radial_error_px"] == pytest.approx((5 + 0 + 1 + 2) / 4)
    assert px["per_landmark_mean_px"]["A"] == pytest.approx(3.0)
    with pytest.raises(FileNotFoundError, match="images folder"):
        evaluate_folders(ref_dir, pred_dir, None, images=tmp_path / "nowhere")
