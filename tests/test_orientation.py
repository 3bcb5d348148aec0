"""One voxel-axis orientation for every 3D image: conversion writes it, prediction gives its inputs the same.

Why it matters: an RAS and an LAS scan of the same head have mirrored arrays. With mirroring augmentation
the network's left/right channels then get contradictory targets (seen on AFIDs: MNI152NLin2009cAsym is
stored RAS, MNI305 and MNI152NLin6Asym LAS)."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnlandmark_h3de.conversion import convert_dataset
from nnlandmark_h3de.inference.oriented_inputs import InputHeaderError, inputs_in_orientation
from nnlandmark_h3de.landmarks import ImageGeometry
from nnlandmark_h3de.utilities.orientation import (CANONICAL_ORIENTATION, dataset_orientation, orientation_code,
                                                   to_orientation)
from test_conversion import NAMES, OFFS, centre_points, com_error_vox, make_image, write_case

RAS = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
PERMUTED = (0.0, 0.0, 1.0, -1.0, 0.0, 0.0, 0.0, -1.0, 0.0)  # voxel axes along world z, -x, -y


def value_at_world(image, point):
    return image.GetPixel(image.TransformPhysicalPointToIndex([float(v) for v in point]))


@pytest.mark.parametrize("direction", [RAS, PERMUTED])
def test_reorienting_moves_no_voxel_in_the_world(direction):
    image = make_image(shape_zyx=(9, 11, 13), spacing=(1.0, 1.5, 2.0), origin=(3.0, -4.0, 5.0), direction=direction)
    out = to_orientation(image)
    assert orientation_code(out.GetDirection()) == CANONICAL_ORIENTATION == "LPS"
    assert np.allclose(np.reshape(out.GetDirection(), (3, 3)), np.eye(3))
    assert sorted(out.GetSize()) == sorted(image.GetSize())
    rng = np.random.default_rng(0)
    for _ in range(20):
        index = [int(rng.integers(0, n)) for n in image.GetSize()]
        world = image.TransformIndexToPhysicalPoint(index)
        assert value_at_world(out, world) == image.GetPixel(index)
    assert to_orientation(out) is out  # already canonical: the same image, no copy


def test_conversion_writes_every_3d_case_in_one_orientation(tmp_path):
    cases, points = {}, {}
    # the same anatomy in world space: an RAS grid runs its first two voxel axes the other way
    for case, direction, flip in (("lps", None, (1, 1, 1)), ("ras", RAS, (-1, -1, 1)), ("perm", PERMUTED, (1, 1, 1))):
        img = make_image(spacing=(1.0, 1.0, 1.3), direction=direction, seed=len(cases))
        points[case] = centre_points(img, np.asarray(OFFS) * flip, NAMES)
        cases[case] = write_case(tmp_path / "in", case, img, points[case])
    out = convert_dataset(cases, tmp_path / "Dataset009_Oriented", test_cases=["perm"], progress=False)
    assert json.loads((out / "dataset.json").read_text())["landmarks"]["image_orientation"] == "LPS"
    assert dataset_orientation(json.loads((out / "dataset.json").read_text())) == "LPS"
    for case, folder in (("lps", "imagesTr"), ("ras", "imagesTr"), ("perm", "imagesTs")):
        source = sitk.ReadImage(str(cases[case][0]))
        written = sitk.ReadImage(str(out / folder / f"{case}_0000.nii.gz"))
        assert np.allclose(np.reshape(written.GetDirection(), (3, 3)), np.eye(3)), case
        landmarks = points[case]
        for index in ((0, 0, 0), (3, 17, 11), (27, 23, 19)):  # every voxel keeps its world position
            assert value_at_world(written, source.TransformIndexToPhysicalPoint(index)) == source.GetPixel(index)
        if folder == "imagesTr":  # label balls drawn on the written grid, centred on the exact points
            labels = sitk.ReadImage(str(out / "labelsTr" / f"{case}.nii.gz"))
            assert labels.GetDirection() == written.GetDirection()
            assert com_error_vox(sitk.GetArrayFromImage(labels), ImageGeometry.from_sitk(labels), landmarks).max() < 0.5
    # the left landmark lies on the same side of the array in both training cases (what the network sees)
    sides = []
    for case in ("lps", "ras"):
        written = sitk.ReadImage(str(out / "imagesTr" / f"{case}_0000.nii.gz"))
        g = ImageGeometry.from_sitk(written)
        pts = points[case].points_lps
        sides.append(np.sign(g.world_to_array_index(pts[0])[2] - g.world_to_array_index(pts[1])[2]))
    assert sides[0] == sides[1] != 0


def test_prediction_inputs_take_the_models_orientation(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    lps, ras = make_image(seed=1), make_image(direction=RAS, seed=2)
    sitk.WriteImage(lps, str(folder / "a_0000.nii.gz"))
    sitk.WriteImage(ras, str(folder / "b_0000.nii.gz"))
    with inputs_in_orientation(folder, ".nii.gz", None) as staged:  # a model converted before: inputs as stored
        assert staged == str(folder)
    with inputs_in_orientation(folder, ".nii.gz", "LPS") as staged:
        assert staged != str(folder)
        assert sorted(p.name for p in (tmp_path / staged).iterdir()) == ["a_0000.nii.gz", "b_0000.nii.gz"]
        copy = sitk.ReadImage(str(tmp_path / staged / "b_0000.nii.gz"))
        assert orientation_code(copy.GetDirection()) == "LPS"
        for index in ((0, 0, 0), (5, 7, 3), (27, 23, 19)):
            assert value_at_world(copy, ras.TransformIndexToPhysicalPoint(index)) == ras.GetPixel(index)
    assert not (tmp_path / staged).exists()
    assert "1 input image(s) stored in another orientation" in capsys.readouterr().out
    (folder / "b_0000.nii.gz").unlink()
    with inputs_in_orientation(folder, ".nii.gz", "LPS") as staged:  # all in the model's orientation
        assert staged == str(folder)
    (folder / "c_0000.nii.gz").write_bytes(b"not an image")
    with pytest.raises(InputHeaderError, match="c_0000.nii.gz"):
        with inputs_in_orientation(folder, ".nii.gz", "LPS"):
            pass


def test_dataset_orientation_of_older_datasets_is_none():
    assert dataset_orientation(None) is None
    assert dataset_orientation({"landmarks": {"names": ["a"]}}) is None


def test_training_warns_when_cases_are_stored_in_different_orientations():
    from nnlandmark_h3de.utilities.orientation import mixed_orientations_message
    identity = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    assert mixed_orientations_message({"a": identity, "b": identity}) is None
    assert mixed_orientations_message({"a": (1.0, 0.0, 0.0, 1.0), "b": (-1.0, 0.0, 0.0, 1.0)}) is None  # 2D: no check
    msg = mixed_orientations_message({"a": identity, "b": RAS, "c": RAS})
    assert "2 voxel-axis orientations (LPS: 1 (e.g. a); RAS: 2 (e.g. b))" in msg and "nnLandmark_convert" in msg
