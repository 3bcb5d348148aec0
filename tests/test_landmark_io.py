"""Landmark files in and out: round trips, coordinate systems, Slicer schema fields, errors."""
import json
import math

import numpy as np
import pytest

from nnlandmark_h3de.landmarks import LandmarkError, LandmarkSet, read_landmarks, write_landmarks
from nnlandmark_h3de.landmarks.atomic import atomic_path, atomic_write_text
from nnlandmark_h3de.landmarks.io_mrk_json import MARKUPS_SCHEMA

NAN3 = [np.nan] * 3
FORMATS = ["mrk.json", "fcsv", "csv", "json"]
SCORE_FORMATS = {"mrk.json", "csv", "json"}  # formats that carry confidence / uncertainty


def _example():
    return LandmarkSet(["L0", "La", "R0", "Nasion, tip"],
                       [[10.25, -3.5, 7.125], NAN3, [-12.0, 40.0001, -0.3333333], [0.0, 0.0, 0.0]],
                       confidence=[0.93, 0.02, np.nan, 1.0], uncertainty_mm=[1.5, np.nan, 0.25, 3.0],
                       descriptions=["left zero", "", "right, zero", "a \"quoted\" name"])


def _same(a, b, scores=True):
    assert a.names == b.names
    np.testing.assert_array_equal(a.present, b.present)
    np.testing.assert_allclose(a.points_lps[a.present], b.points_lps[b.present], atol=1e-4)
    if scores:
        np.testing.assert_allclose(a.confidence, b.confidence, atol=1e-9, equal_nan=True)
        np.testing.assert_allclose(a.uncertainty_mm, b.uncertainty_mm, atol=1e-9, equal_nan=True)


# ------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("cs", ["LPS", "RAS"])
def test_round_trip_every_format(tmp_path, fmt, cs):
    ls = _example()
    path = write_landmarks(ls, tmp_path / f"case.{fmt}", coordinate_system=cs)
    back = read_landmarks(path)
    _same(ls, back, scores=fmt in SCORE_FORMATS)
    assert back.descriptions == ls.descriptions
    assert back.source == str(path)
    assert [p.name for p in tmp_path.iterdir()] == [f"case.{fmt}"]  # no temporary left behind


def test_format_argument_overrides_extension(tmp_path):
    path = write_landmarks(_example(), tmp_path / "points.txt", format="fcsv")
    assert path.read_text().startswith("# Markups fiducial file version = 4.11\n")
    with pytest.raises(LandmarkError, match="points.txt: unknown landmark file type"):
        read_landmarks(path)


def _raw_first_point(path, fmt):
    """The first point's numbers exactly as stored in the file, bypassing our readers."""
    text = path.read_text()
    if fmt == "mrk.json":
        return json.loads(text)["markups"][0]["controlPoints"][0]["position"]
    if fmt == "json":
        return json.loads(text)["landmarks"][0]["position"]
    row = [line for line in text.splitlines() if line and not line.startswith(("#", "label,"))][0].split(",")
    return [float(v) for v in row[1:4]]  # fcsv: id,x,y,z  csv: label,l|r,p|a,s


@pytest.mark.parametrize("fmt", FORMATS)
def test_ras_file_stores_negated_x_y_and_reads_back_as_lps(tmp_path, fmt):
    ls = LandmarkSet(["a"], [[1.0, 2.0, 3.0]])
    lps = write_landmarks(ls, tmp_path / f"lps.{fmt}", coordinate_system="LPS")
    ras = write_landmarks(ls, tmp_path / f"ras.{fmt}", coordinate_system="RAS")
    assert _raw_first_point(lps, fmt) == [1.0, 2.0, 3.0]
    assert _raw_first_point(ras, fmt) == [-1.0, -2.0, 3.0]
    np.testing.assert_allclose(read_landmarks(ras).points_lps, [[1.0, 2.0, 3.0]])


def test_hand_written_ras_files_read_as_lps(tmp_path):
    (tmp_path / "a.fcsv").write_text("# Markups fiducial file version = 4.6\n# CoordinateSystem = 0\n"
                                     "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
                                     "n1,1.5,-2,3,0,0,0,1,1,1,0,1,AC,vol\n")
    (tmp_path / "b.csv").write_text("label,r,a,s,defined,selected,visible,locked,description\nAC,1.5,-2,3,1,1,1,0,\n")
    (tmp_path / "c.mrk.json").write_text(json.dumps({"@schema": MARKUPS_SCHEMA, "markups": [
        {"type": "Fiducial", "coordinateSystem": "RAS", "controlPoints": [{"label": "AC", "position": [1.5, -2, 3]}]}]}))
    (tmp_path / "d.json").write_text('{"coordinate_system": "RAS", "landmarks": [{"name": "AC", "position": [1.5, -2, 3]}]}')
    for name in ("a.fcsv", "b.csv", "c.mrk.json", "d.json"):
        np.testing.assert_allclose(read_landmarks(tmp_path / name).points_lps, [[-1.5, 2.0, 3.0]], err_msg=name)


@pytest.mark.parametrize("header, expected_x", [("LPS", 1.5), ("1", 1.5), ("RAS", -1.5), ("0", -1.5), (None, -1.5)])
def test_fcsv_coordinate_system_header_values(tmp_path, header, expected_x):
    lines = ["# Markups fiducial file version = 4.11"] + ([f"# CoordinateSystem = {header}"] if header else [])
    lines += ["id1,1.5,2,3,0,0,0,1,1,1,0,P,,"]
    (tmp_path / "p.fcsv").write_text("\n".join(lines) + "\n")
    assert read_landmarks(tmp_path / "p.fcsv").points_lps[0, 0] == expected_x


def test_fcsv_absent_rows_from_status_or_nan(tmp_path):
    (tmp_path / "s.fcsv").write_text("# CoordinateSystem = LPS\n"
                                     "i1,1,2,3,0,0,0,1,1,1,0,A,,,2,0\n"     # Slicer 5: defined
                                     "i2,4,5,6,0,0,0,1,1,1,0,B,,,0,0\n"     # undefined
                                     "i3,nan,nan,nan,0,0,0,1,1,1,0,C,,\n"   # 14 fields, NaN
                                     "i4,7,8,9,0,0,0,1,1,1,0,D,,,2\n")      # 15 fields
    ls = read_landmarks(tmp_path / "s.fcsv")
    assert ls.names == ["A", "B", "C", "D"]
    assert ls.present.tolist() == [True, False, False, True]
    np.testing.assert_allclose(ls.points_lps[3], [7, 8, 9])


def test_written_fcsv_layout(tmp_path):
    text = write_landmarks(_example(), tmp_path / "w.fcsv", coordinate_system="RAS").read_text()
    lines = text.splitlines()
    assert lines[:3] == ["# Markups fiducial file version = 4.11", "# CoordinateSystem = RAS",
                         "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID"]
    rows = list(__import__("csv").reader(lines[3:]))
    assert [len(r) for r in rows] == [16] * 4
    assert [r[11] for r in rows] == ["L0", "La", "R0", "Nasion, tip"]
    assert [r[14] for r in rows] == ["2", "0", "2", "2"]  # Slicer position status: 2 defined, 0 undefined
    assert [float(v) for v in rows[0][1:4]] == [-10.25, 3.5, 7.125]


def test_bom_and_crlf_are_tolerated(tmp_path):
    p = tmp_path / "w.fcsv"
    p.write_bytes("\ufeff# CoordinateSystem = LPS\r\ni1,1,2,3,0,0,0,1,1,1,0,A,,\r\n".encode("utf-8"))
    np.testing.assert_allclose(read_landmarks(p).points_lps, [[1, 2, 3]])


def test_afids_fcsv_reads_32_numbered_landmarks(afids_dir):
    ls = read_landmarks(afids_dir / "landmarks" / "human_MNI152NLin2009cAsym_T1w_2mm.fcsv")
    assert ls.names == [str(i) for i in range(1, 33)]
    assert ls.present.all()
    # first row (RAS) -0.231, 2.93275, -4.899 -> LPS
    np.testing.assert_allclose(ls.points_lps[0], [0.231, -2.93275, -4.899], atol=1e-9)
    assert ls.descriptions[:2] == ["AC", "PC"]


def test_names_reorder_missing_become_absent(tmp_path):
    path = write_landmarks(_example(), tmp_path / "c.json")
    ls = read_landmarks(path, names=["R0", "extra", "L0", "La", "Nasion, tip"])
    assert ls.names == ["R0", "extra", "L0", "La", "Nasion, tip"]
    assert ls.present.tolist() == [True, False, True, False, True]
    np.testing.assert_allclose(ls.points_lps[2], [10.25, -3.5, 7.125])
    assert ls.confidence[2] == pytest.approx(0.93) and math.isnan(ls.confidence[1])


def test_names_unknown_in_file_is_error_naming_file(tmp_path):
    path = write_landmarks(_example(), tmp_path / "c.mrk.json")
    with pytest.raises(LandmarkError, match=r"^.*c\.mrk\.json: unknown landmark names \['La', 'Nasion, tip'\]"):
        read_landmarks(path, names=["L0", "R0"])


# --------------------------------------------------------------- Slicer markups JSON
# Fields allowed by markups-schema-v1.0.3.json (Slicer/Slicer, Modules/Loadable/Markups/Resources/Schema).
SCHEMA_TOP = {"@schema", "markups"}
SCHEMA_MARKUP = {"type", "name", "coordinateSystem", "coordinateUnits", "locked", "fixedNumberOfControlPoints",
                 "labelFormat", "roiType", "planeType", "sizeMode", "autoScalingSizeFactor", "center", "normal",
                 "size", "planeBounds", "objectToBase", "baseToNode", "orientation", "controlPoints", "display",
                 "measurements"}
SCHEMA_CONTROL_POINT = {"id": str, "label": str, "description": str, "associatedNodeID": str, "position": list,
                        "orientation": list, "selected": bool, "locked": bool, "visibility": bool, "positionStatus": str}
SCHEMA_MEASUREMENT = {"name": str, "enabled": bool, "value": float, "units": str, "description": str,
                      "printFormat": str, "quantityCode": list, "derivationCode": list, "methodCode": list,
                      "controlPointValues": list}


def _check_against_schema(doc):
    assert set(doc) <= SCHEMA_TOP and set(doc) >= SCHEMA_TOP
    assert doc["@schema"].endswith("markups-schema-v1.0.3.json#")
    for markup in doc["markups"]:
        assert set(markup) <= SCHEMA_MARKUP, set(markup) - SCHEMA_MARKUP
        assert markup["type"] in ["Fiducial", "Line", "Angle", "Curve", "ClosedCurve", "Plane", "ROI"]
        assert markup["coordinateSystem"] in ("LPS", "RAS") and markup["coordinateUnits"] in ("mm", "um")
        for cp in markup["controlPoints"]:
            assert set(cp) <= set(SCHEMA_CONTROL_POINT), set(cp) - set(SCHEMA_CONTROL_POINT)
            for key, value in cp.items():
                assert isinstance(value, SCHEMA_CONTROL_POINT[key]), (key, value)
            assert cp["positionStatus"] in ("undefined", "preview", "defined")
            assert len(cp["orientation"]) == 9
            if "position" in cp:
                assert len(cp["position"]) == 3 and all(isinstance(v, float) for v in cp["position"])
        for m in markup.get("measurements", []):
            assert set(m) <= set(SCHEMA_MEASUREMENT), set(m) - set(SCHEMA_MEASUREMENT)
            for key, value in m.items():
                assert isinstance(value, SCHEMA_MEASUREMENT[key]), (key, value)
            assert all(isinstance(v, float) for v in m["controlPointValues"])


def test_written_mrk_json_matches_slicer_schema(tmp_path):
    ls = _example()
    path = write_landmarks(ls, tmp_path / "case.mrk.json")
    text = path.read_text()
    assert "NaN" not in text  # strict JSON: Slicer's parser rejects NaN
    doc = json.loads(text)
    _check_against_schema(doc)
    assert doc["@schema"] == ("https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
                              "Resources/Schema/markups-schema-v1.0.3.json#")
    (markup,) = doc["markups"]
    assert markup["type"] == "Fiducial" and markup["coordinateSystem"] == "LPS" and markup["coordinateUnits"] == "mm"
    cps = markup["controlPoints"]
    assert [cp["label"] for cp in cps] == ls.names
    assert cps[0]["position"] == [10.25, -3.5, 7.125] and cps[0]["positionStatus"] == "defined"
    assert cps[0]["orientation"] == [-1, 0, 0, 0, -1, 0, 0, 0, 1]
    assert cps[1]["positionStatus"] == "undefined" and "position" not in cps[1]
    by_name = {m["name"]: m for m in markup["measurements"]}
    assert by_name["confidence"]["controlPointValues"] == [0.93, 0.02, -1.0, 1.0]
    assert by_name["uncertainty"]["controlPointValues"] == [1.5, -1.0, 0.25, 3.0]
    assert by_name["uncertainty"]["units"] == "mm"


def test_mrk_json_without_scores_has_no_measurements(tmp_path):
    path = write_landmarks(LandmarkSet(["a"], [[1, 2, 3]]), tmp_path / "a.mrk.json")
    doc = json.loads(path.read_text())
    _check_against_schema(doc)
    assert "measurements" not in doc["markups"][0]
    back = read_landmarks(path)
    assert back.confidence is None and back.uncertainty_mm is None


def test_mrk_json_reader_takes_first_fiducial_markup(tmp_path):
    doc = {"@schema": MARKUPS_SCHEMA, "markups": [
        {"type": "Line", "controlPoints": [{"label": "x", "position": [0, 0, 0]}]},
        {"type": "Fiducial", "controlPoints": [{"label": "A", "position": [1, 2, 3]},
                                               {"label": "B", "positionStatus": "undefined"},
                                               {"label": "C", "position": [4, 5, 6], "positionStatus": "preview"}]},
        {"type": "Fiducial", "controlPoints": [{"label": "Z", "position": [9, 9, 9]}]}]}
    (tmp_path / "m.mrk.json").write_text(json.dumps(doc))
    ls = read_landmarks(tmp_path / "m.mrk.json")
    assert ls.names == ["A", "B", "C"] and ls.present.tolist() == [True, False, False]
    np.testing.assert_allclose(ls.points_lps[0], [1, 2, 3])  # no coordinateSystem -> LPS, as Slicer


# ------------------------------------------------------------------------- errors
def _mrk(tmp_path, markups, schema=MARKUPS_SCHEMA):
    p = tmp_path / "bad.mrk.json"
    p.write_text(json.dumps({"@schema": schema, "markups": markups}))
    return p


@pytest.mark.parametrize("content, message", [
    ("{not json", "not a readable JSON file"),
    ("[]", "not a Slicer markups file"),
    ('{"@schema": "x"}', "not a Slicer markups file"),
])
def test_mrk_json_malformed(tmp_path, content, message):
    (tmp_path / "bad.mrk.json").write_text(content)
    with pytest.raises(LandmarkError, match=rf"^{tmp_path}/bad\.mrk\.json: {message}"):
        read_landmarks(tmp_path / "bad.mrk.json")


@pytest.mark.parametrize("markups, schema, message", [
    ([{"type": "Line", "controlPoints": []}], None, "no markup of type 'Fiducial'"),
    ([], "http://example.org/other.json#", "missing or unknown '@schema'"),
    ([{"type": "Fiducial", "controlPoints": [{"label": "A", "position": [1, None, 3]}]}], None,
     r"landmark 'A' position must be a list of 3 numbers"),
    ([{"type": "Fiducial", "controlPoints": [{"label": "A", "position": [1, 2]}]}], None,
     r"landmark 'A' position must be a list of 3 numbers"),
    ([{"type": "Fiducial", "controlPoints": [{"label": "A", "position": [1, 2, 3]},
                                             {"label": "A", "position": [1, 2, 3]}]}], None,
     r"duplicate landmark names \['A'\]"),
    ([{"type": "Fiducial", "coordinateUnits": "um", "controlPoints": []}], None, "coordinateUnits 'um' not supported"),
    ([{"type": "Fiducial", "controlPoints": [{"label": "A", "positionStatus": "maybe"}]}], None,
     "landmark 'A': invalid positionStatus 'maybe'"),
    ([{"type": "Fiducial", "controlPoints": [{"position": [1, 2, 3]}]}], None, "control point 1 has no label"),
    ([{"type": "Fiducial", "controlPoints": [{"label": "A", "position": [1, 2, 3]}],
       "measurements": [{"name": "confidence", "controlPointValues": [0.5, 0.5]}]}], None,
     "measurement 'confidence' controlPointValues must be a list of 1 numbers"),
])
def test_mrk_json_errors(tmp_path, markups, schema, message):
    path = _mrk(tmp_path, markups, schema or MARKUPS_SCHEMA)
    with pytest.raises(LandmarkError, match=rf"^{path}: {message}"):
        read_landmarks(path)


def test_json_nan_position_is_an_error(tmp_path):
    p = tmp_path / "n.json"
    p.write_text('{"landmarks": [{"name": "A", "position": [1, NaN, 3]}]}')
    with pytest.raises(LandmarkError, match=rf"^{p}: landmark 'A': non-finite position"):
        read_landmarks(p)


def test_fcsv_errors(tmp_path):
    p = tmp_path / "bad.fcsv"
    p.write_text("# CoordinateSystem = LPS\ni1,1,2,3,0,0,0,1,1,1,0,A,,\ni2,1,2,3,0,0,0,1,1,1\n")
    with pytest.raises(LandmarkError, match=rf"^{p}: line 3: expected 14 to 16 comma-separated fields, got 10"):
        read_landmarks(p)
    p.write_text("# CoordinateSystem = LPS\ni1,1,x,3,0,0,0,1,1,1,0,A,,\n")
    with pytest.raises(LandmarkError, match=rf"^{p}: line 2: landmark 'A': coordinates"):
        read_landmarks(p)
    p.write_text("# CoordinateSystem = XYZ\n")
    with pytest.raises(LandmarkError, match=rf"^{p}: unknown CoordinateSystem 'XYZ'"):
        read_landmarks(p)
    p.write_text("i1,1,2,3,0,0,0,1,1,1,0,A,,\ni2,4,5,6,0,0,0,1,1,1,0,A,,\n")
    with pytest.raises(LandmarkError, match=rf"^{p}: duplicate landmark names \['A'\]"):
        read_landmarks(p)


def test_csv_errors(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("name,x,y,z\nA,1,2,3\n")
    with pytest.raises(LandmarkError, match=rf"^{p}: header must contain 'label' and l,p,s or r,a,s"):
        read_landmarks(p)
    p.write_text("label,l,p,s,defined\nA,1,2,3,true\nB,1,2\n")
    with pytest.raises(LandmarkError, match=rf"^{p}: line 3: expected 5 fields like the header, got 3"):
        read_landmarks(p)
    p.write_text("label,l,p,s,defined\nA,1,,3,true\n")
    with pytest.raises(LandmarkError, match=rf"^{p}: line 2: landmark 'A' is defined but its coordinates"):
        read_landmarks(p)
    p.write_text("label,l,p,s,defined\nA,1,2,3,perhaps\n")
    with pytest.raises(LandmarkError, match=rf"^{p}: line 2: column 'defined' must be true/false"):
        read_landmarks(p)


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(LandmarkError, match=rf"^{tmp_path}/nope\.fcsv: landmark file not found"):
        read_landmarks(tmp_path / "nope.fcsv")
    with pytest.raises(LandmarkError, match=r"nope\.txt: unknown landmark file type"):
        read_landmarks(tmp_path / "nope.txt")
    with pytest.raises(LandmarkError, match=r"out\.txt: cannot tell the landmark format"):
        write_landmarks(_example(), tmp_path / "out.txt")
    with pytest.raises(LandmarkError, match=r"coordinate system must be LPS or RAS, got 'XYZ'"):
        write_landmarks(_example(), tmp_path / "out.json", coordinate_system="XYZ")
    assert not (tmp_path / "out.json").exists()


# ---------------------------------------------------------------------- atomic writes
def test_atomic_write_replaces_and_failed_write_leaves_old_file(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    atomic_write_text(target, "first")
    assert target.read_text() == "first"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.parent == target.parent and tmp.name.endswith("out.txt") and tmp != target
            tmp.write_text("half")
            raise RuntimeError("writer crashed")
    assert target.read_text() == "first"
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]


# ------------------------------------------------------------------------------ MML
def _write_mml_case(folder, shape=(6, 5, 4), spacing=(0.5, 0.75, 2.0), labels=None):
    import nrrd

    arr = np.arange(np.prod(shape), dtype=np.uint8).reshape(shape)  # arr[i, j, k]
    nrrd.write(str(folder / "c_volume.nrrd"), arr)  # pynrrd default index_order 'F'
    if labels is None:
        labels = np.full((14, 3), -1.0)
        labels[0] = [1, 2, 3]
        labels[7] = [5.5, 0, 0.25]
        labels[8] = [2, np.nan, 1]
    np.save(folder / "c_label.npy", np.asarray(labels))
    np.save(folder / "c_spacing.npy", np.asarray(spacing))
    return arr, folder / "c_volume.nrrd", folder / "c_label.npy", folder / "c_spacing.npy"


def test_mml_case_geometry_and_landmarks(tmp_path):
    from nnlandmark_h3de.landmarks import MML_NAMES, read_mml_case

    arr, vol, lab, spc = _write_mml_case(tmp_path)
    image, ls = read_mml_case(vol, lab, spc)
    assert image.GetSize() == (6, 5, 4)
    assert image.GetSpacing() == (0.5, 0.75, 2.0) and image.GetOrigin() == (0.0, 0.0, 0.0)
    assert image.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    # voxel (i, j, k) of the pynrrd array is the ITK index (i, j, k) of the image
    assert image[4, 3, 2] == arr[4, 3, 2] and image[1, 0, 3] == arr[1, 0, 3]
    assert ls.names == MML_NAMES
    assert ls.present.tolist() == [True] + [False] * 6 + [True] + [False] * 6
    np.testing.assert_allclose(ls.points_lps[0], [0.5, 1.5, 6.0])
    np.testing.assert_allclose(ls.points_lps[7], image.TransformContinuousIndexToPhysicalPoint((5.5, 0, 0.25)))
    assert image[1, 2, 3] == arr[1, 2, 3]  # the voxel under landmark L0


def test_mml_landmarks_round_trip_through_mrk_json(tmp_path):
    from nnlandmark_h3de.landmarks import read_mml_case

    _, vol, lab, spc = _write_mml_case(tmp_path)
    _, ls = read_mml_case(vol, lab, spc)
    back = read_landmarks(write_landmarks(ls, tmp_path / "c.mrk.json"))
    _same(ls, back, scores=False)


@pytest.mark.parametrize("broken, message", [
    ("label_shape", r"c_label\.npy: expected a numeric \(14, 3\) array of voxel indices, got float64 \(13, 3\)"),
    ("spacing_shape", r"c_spacing\.npy: spacing must be 3 positive finite numbers"),
    ("spacing_zero", r"c_spacing\.npy: spacing must be 3 positive finite numbers, got \[0\.5, 0\.0, 2\.0\]"),
    ("no_volume", r"c_volume\.nrrd: MML volume file not found"),
    ("bad_volume", r"c_volume\.nrrd: unreadable nrrd volume"),
    ("no_label", r"c_label\.npy: MML label file not found"),
])
def test_mml_errors(tmp_path, broken, message):
    from nnlandmark_h3de.landmarks import read_mml_case

    _, vol, lab, spc = _write_mml_case(tmp_path)
    if broken == "label_shape":
        np.save(lab, np.zeros((13, 3)))
    elif broken == "spacing_shape":
        np.save(spc, np.ones(2))
    elif broken == "spacing_zero":
        np.save(spc, np.array([0.5, 0.0, 2.0]))
    elif broken == "no_volume":
        vol.unlink()
    elif broken == "bad_volume":
        vol.write_bytes(b"this is not nrrd\n")
    elif broken == "no_label":
        lab.unlink()
    with pytest.raises(LandmarkError, match=rf"^{tmp_path}/{message}"):
        read_mml_case(vol, lab, spc)


# ---------------------------------------------------------------------------- pairs
def test_mml_pairs():
    from nnlandmark_h3de.landmarks import MML_NAMES, find_lr_pairs

    assert find_lr_pairs(MML_NAMES) == [("L0", "R0"), ("La", "Ra"), ("Lb", "Rb"), ("Lc", "Rc"),
                                        ("Ld", "Rd"), ("Le", "Re"), ("Lf", "Rf")]


@pytest.mark.parametrize("names, expected", [
    (["Left Eye", "right Eye"], [("Left Eye", "right Eye")]),
    (["right_orbit", "left_orbit"], [("left_orbit", "right_orbit")]),
    (["Orbit_L", "Orbit_R"], [("Orbit_L", "Orbit_R")]),
    (["lh.hippo", "rh.hippo", "Hippo_lh", "Hippo_rh"], [("lh.hippo", "rh.hippo"), ("Hippo_lh", "Hippo_rh")]),
    (["LeftEar", "RightEar", "EarLeft", "EarRight"], [("LeftEar", "RightEar"), ("EarLeft", "EarRight")]),
    (["left X", "Right x"], []),  # the rest of the name must be identical
    ([str(i) for i in range(1, 33)], []),
    (["AC", "PC", "Nasion", "Lateral_L", "Lateral_R"], [("Lateral_L", "Lateral_R")]),
    (["La", "Ra", "Ra2", "Lb"], [("La", "Ra")]),
])
def test_find_lr_pairs_patterns(names, expected):
    from nnlandmark_h3de.landmarks import find_lr_pairs

    assert find_lr_pairs(names) == expected


def test_find_lr_pairs_never_pairs_a_name_twice():
    from nnlandmark_h3de.landmarks import find_lr_pairs

    pairs = find_lr_pairs(["La", "Ra", "La_L", "La_R", "Ra_L"])
    flat = [n for p in pairs for n in p]
    assert len(flat) == len(set(flat))
    assert ("La", "Ra") in pairs and ("La_L", "La_R") in pairs
