"""network_index_to_world / world_to_network_index against nnU-Net's real preprocessing.

The image intensity is a linear function of the world position. nnU-Net's cubic (in-plane) and
linear (z, separate-z route) resampling reproduce a linear function exactly away from the borders,
so the preprocessed value at a network index must equal the function at the mapped world point.
"""
import numpy as np
import pytest
import SimpleITK as sitk

from nnlandmark_h3de.inference.index_mapping import network_index_to_world, world_to_network_index
from nnlandmark_h3de.landmarks import ImageGeometry
from rotations import rotation_matrix

A = np.array([0.7, -0.4, 0.25])
B = 100.0


def _linear_image(path, size_ijk, spacing, origin, direction, zero_slab=3):
    geom = ImageGeometry(tuple(size_ijk), tuple(spacing), tuple(origin), tuple(np.asarray(direction).ravel()))
    zyx = np.stack(np.meshgrid(*[np.arange(s) for s in geom.shape_zyx], indexing="ij"), -1).reshape(-1, 3)
    world = geom.array_index_to_world(zyx)
    values = (world @ A + B).reshape(geom.shape_zyx)
    values[:zero_slab] = 0  # forces a real bounding-box crop along array axis 0
    values[:, :, -zero_slab:] = 0
    sitk.WriteImage(geom.to_sitk_image(values.astype(np.float32)), str(path))
    return geom


def _plans(transpose_forward, target_spacing, order_z=1):
    tb = list(np.argsort(transpose_forward))
    resampling_kwargs = {"is_seg": False, "order": 3, "order_z": order_z, "force_separate_z": None}
    return {
        "dataset_name": "Dataset999_Mapping", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": list(target_spacing),
        "original_median_shape_after_transp": [32, 32, 32],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": list(transpose_forward), "transpose_backward": tb,
        "configurations": {"3d_fullres": {
            "data_identifier": "x", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
            "patch_size": [16, 16, 16], "median_image_size_in_voxels": [32, 32, 32],
            "spacing": list(target_spacing), "normalization_schemes": ["NoNormalization"],
            "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_data_kwargs": resampling_kwargs,
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": resampling_kwargs,
            "batch_dice": False,
            "architecture": {"network_class_name": "x", "arch_kwargs": {"strides": [[1, 1, 1]]}, "_kw_requires_import": []},
        }},
        "foreground_intensity_properties_per_channel": {"0": {}},
    }


CASES = [
    # size (i,j,k), spacing (x,y,z), rotation, transpose_forward, target spacing (transposed order)
    ((30, 26, 20), (0.8, 0.9, 1.3), (0.0, 0.0, 0.0), (0, 1, 2), (1.1, 0.7, 1.0)),
    ((28, 24, 18), (0.7, 0.75, 2.6), (0.3, -0.2, 0.5), (2, 0, 1), (1.0, 2.0, 1.2)),
    ((24, 30, 12), (0.6, 0.6, 3.0), (0.1, 0.4, -0.3), (0, 2, 1), (3.0, 0.9, 1.1)),  # separate-z route
]


@pytest.mark.parametrize("size,spacing,angles,tf,target", CASES)
def test_mapping_matches_nnunet_preprocessing(tmp_path, size, spacing, angles, tf, target):
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    direction = rotation_matrix(*angles)
    _linear_image(tmp_path / "img_0000.nii.gz", size, spacing, (-12.0, 7.5, 3.0), direction)
    pm = PlansManager(_plans(tf, target))
    cm = pm.get_configuration("3d_fullres")
    data, _, props = DefaultPreprocessor(verbose=False).run_case(
        [str(tmp_path / "img_0000.nii.gz")], None, pm, cm, {"labels": {"background": 0, "a": 1}, "file_ending": ".nii.gz"})
    assert any(b[0] > 0 for b in props["bbox_used_for_cropping"]), "test must exercise the crop"
    net = data[0]

    rng = np.random.default_rng(0)
    n = np.asarray(net.shape)
    margin = 3
    idx = np.stack([rng.integers(margin, s - margin, 200) for s in n], 1)  # integer voxels: no interpolation by us
    world = network_index_to_world(idx, props, pm, cm, network_shape=net.shape)
    expected = world @ A + B
    got = net[tuple(idx.T)]
    assert np.max(np.abs(got - expected)) < 2e-3 * np.abs(expected).max(), np.max(np.abs(got - expected))

    # the default network shape equals nnU-Net's, and the inverse is exact
    np.testing.assert_allclose(network_index_to_world(idx, props, pm, cm), world, atol=1e-9)
    back = world_to_network_index(world, props, pm, cm)
    np.testing.assert_allclose(back, idx, atol=1e-9)


def test_nan_rows_stay_nan(tmp_path):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(_plans((0, 1, 2), (1.0, 1.0, 1.0)))
    cm = pm.get_configuration("3d_fullres")
    props = {"sitk_stuff": {"spacing": (1, 1, 1), "origin": (0, 0, 0), "direction": tuple(np.eye(3).ravel())},
             "spacing": [1, 1, 1], "shape_before_cropping": (10, 10, 10),
             "bbox_used_for_cropping": [[0, 10]] * 3, "shape_after_cropping_and_before_resampling": (10, 10, 10)}
    out = network_index_to_world(np.array([[1.0, 2.0, 3.0], [np.nan] * 3]), props, pm, cm)
    np.testing.assert_allclose(out[0], [3, 2, 1])
    assert np.isnan(out[1]).all()


def test_original_geometry_shape_undoes_transpose(tmp_path):
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnlandmark_h3de.inference.index_mapping import original_geometry

    geom = _linear_image(tmp_path / "img_0000.nii.gz", (28, 24, 18), (1.0, 1.0, 1.0), (0, 0, 0), np.eye(3))
    pm = PlansManager(_plans((2, 0, 1), (1.0, 1.0, 1.0)))
    _, _, props = DefaultPreprocessor(verbose=False).run_case(
        [str(tmp_path / "img_0000.nii.gz")], None, pm, pm.get_configuration("3d_fullres"),
        {"labels": {"background": 0, "a": 1}, "file_ending": ".nii.gz"})
    assert original_geometry(props, pm.transpose_forward).shape_zyx == geom.shape_zyx
