"""ImageGeometry against SimpleITK: anisotropic spacing, rotated + permuted direction, axis orders."""
import numpy as np
import pytest
import SimpleITK as sitk

from nnlandmark_h3de.landmarks import ImageGeometry

SIZE_IJK = (7, 5, 3)
SPACING = (0.7, 1.3, 2.9)
ORIGIN = (-12.5, 40.25, 3.0)


def _rotated_permuted_direction():
    """Axes permuted (i -> y, j -> z, k -> x) with a flip, then rotated 30 deg about z: no zero entries on x/y."""
    perm = np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], dtype=float)  # columns = axis directions
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    return tuple((rot @ perm).ravel())


@pytest.fixture
def image():
    arr = np.random.default_rng(0).integers(0, 1000, size=SIZE_IJK[::-1]).astype(np.int16)  # (z, y, x)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    img.SetDirection(_rotated_permuted_direction())
    return img


@pytest.fixture
def indices():
    return np.random.default_rng(1).uniform(-1, 6, size=(10, 3))


def test_from_sitk_fields(image):
    g = ImageGeometry.from_sitk(image)
    assert g.shape_ijk == SIZE_IJK and g.shape_zyx == SIZE_IJK[::-1]
    assert g.spacing == SPACING and g.spacing_zyx == SPACING[::-1]
    assert g.shape_zyx == sitk.GetArrayFromImage(image).shape
    np.testing.assert_allclose(g.direction, _rotated_permuted_direction())


def test_itk_index_to_world_matches_sitk(image, indices):
    g = ImageGeometry.from_sitk(image)
    expected = np.array([image.TransformContinuousIndexToPhysicalPoint(tuple(map(float, p))) for p in indices])
    np.testing.assert_allclose(g.itk_index_to_world(indices), expected, atol=1e-9)
    np.testing.assert_allclose(g.itk_index_to_world(indices[0]), expected[0], atol=1e-9)  # single point


def test_world_to_itk_index_matches_sitk(image, indices):
    g = ImageGeometry.from_sitk(image)
    world = g.itk_index_to_world(indices)
    expected = np.array([image.TransformPhysicalPointToContinuousIndex(tuple(map(float, p))) for p in world])
    np.testing.assert_allclose(g.world_to_itk_index(world), expected, atol=1e-9)
    np.testing.assert_allclose(expected, indices, atol=1e-9)


def test_batched_points_keep_their_shape(image, indices):
    g = ImageGeometry.from_sitk(image)
    batch = indices.reshape(2, 5, 3)
    world = g.itk_index_to_world(batch)
    assert world.shape == (2, 5, 3)
    np.testing.assert_allclose(g.world_to_itk_index(world), batch, atol=1e-9)
    np.testing.assert_allclose(g.world_to_array_index(world), batch[..., ::-1], atol=1e-9)


def test_array_index_is_reversed_itk_index(image):
    """arr[z, y, x] from GetArrayFromImage is the voxel at ITK index (x, y, z)."""
    g = ImageGeometry.from_sitk(image)
    arr = sitk.GetArrayFromImage(image)
    zyx = np.array([2, 4, 6])  # not symmetric: a missed reversal indexes a different voxel / out of range
    ijk = (6, 4, 2)
    assert arr[tuple(zyx)] == image[ijk]
    np.testing.assert_allclose(g.array_index_to_world(zyx), image.TransformIndexToPhysicalPoint(ijk), atol=1e-9)
    np.testing.assert_allclose(g.world_to_array_index(image.TransformIndexToPhysicalPoint(ijk)), zyx, atol=1e-9)
    # the argmax of the array, reversed, is the ITK index of the maximum
    flat = np.unravel_index(np.argmax(arr), arr.shape)
    assert image[tuple(int(v) for v in flat[::-1])] == arr.max()


def test_contains_array_index(image):
    g = ImageGeometry.from_sitk(image)
    z, y, x = g.shape_zyx
    inside = g.contains_array_index(np.array([[0, 0, 0], [z - 1, y - 1, x - 1], [z - 0.4, 0, 0], [0, 0, x - 0.5], [0, -0.6, 0]]))
    assert inside.tolist() == [True, True, False, True, False]


def test_to_sitk_image_round_trip(image):
    g = ImageGeometry.from_sitk(image)
    back = g.to_sitk_image(sitk.GetArrayFromImage(image))
    assert ImageGeometry.from_sitk(back) == g
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


def test_from_file_reads_header_only(tmp_path, image, monkeypatch):
    path = tmp_path / "img.nii.gz"
    sitk.WriteImage(image, str(path))
    expected = ImageGeometry.from_sitk(sitk.ReadImage(str(path)))

    def no_pixels(*args, **kwargs):
        raise AssertionError("from_file must not read the pixel data")

    monkeypatch.setattr(sitk, "ReadImage", no_pixels)
    monkeypatch.setattr(sitk.ImageFileReader, "Execute", no_pixels)
    g = ImageGeometry.from_file(path)
    assert g.shape_ijk == expected.shape_ijk
    np.testing.assert_allclose(g.spacing, expected.spacing, atol=1e-6)
    np.testing.assert_allclose(g.origin, expected.origin, atol=1e-5)
    np.testing.assert_allclose(g.direction, expected.direction, atol=1e-6)


def test_from_file_unreadable_names_file(tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=rf"^{bad}: unreadable image"):
        ImageGeometry.from_file(bad)


def test_from_sitk_stuff_matches_nnunet_properties(image):
    """nnU-Net keeps spacing/origin/direction in sitk (x, y, z) order and the array shape in (z, y, x)."""
    stuff = {"spacing": image.GetSpacing(), "origin": image.GetOrigin(), "direction": image.GetDirection()}
    g = ImageGeometry.from_sitk_stuff(stuff, sitk.GetArrayFromImage(image).shape)
    assert g == ImageGeometry.from_sitk(image)


def test_2d_image_is_the_z0_slice_of_a_3d_geometry(tmp_path):
    """A 2D image (X-ray) maps like nnU-Net's (1, y, x) array: world z = 0, ITK's 2D geometry exact,
    from the image, its header and nnU-Net's sitk_stuff alike; written back as a 2D image."""
    import SimpleITK as sitk
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    img = sitk.GetImageFromArray(np.random.default_rng(0).random((30, 40)).astype(np.float32))
    img.SetSpacing((0.1, 0.2))
    img.SetOrigin((5.0, -6.0))
    c, s = np.cos(0.3), np.sin(0.3)
    img.SetDirection((c, -s, s, c))
    path = tmp_path / "xray.nii.gz"
    sitk.WriteImage(img, str(path))
    _, props = SimpleITKIO().read_images([str(path)])
    geometries = [ImageGeometry.from_sitk(img), ImageGeometry.from_file(path),
                  ImageGeometry.from_sitk_stuff(props["sitk_stuff"], (1, 30, 40))]
    for g in geometries:
        assert g.ndim == 2 and g.shape_zyx == (1, 30, 40)
        for idx in ([0, 0, 0], [0, 12.5, 7.25], [0, 29, 39]):
            world = g.array_index_to_world(idx)
            expected = img.TransformContinuousIndexToPhysicalPoint((idx[2], idx[1]))
            np.testing.assert_allclose(world, [*expected, 0.0], atol=1e-9)
            np.testing.assert_allclose(g.world_to_array_index(world), idx, atol=1e-9)
    back = geometries[0].to_sitk_image(sitk.GetArrayFromImage(img)[None])
    assert back.GetDimension() == 2 and back.GetSpacing() == img.GetSpacing()
    np.testing.assert_allclose(back.GetDirection(), img.GetDirection())
    with pytest.raises(ValueError, match="1, y, x"):
        geometries[0].to_sitk_image(np.zeros((2, 30, 40)))
