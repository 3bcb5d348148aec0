"""Test helper: a rotation from three angles, for images with a non-identity direction."""
import numpy as np


def rotation_matrix(ax, ay, az) -> np.ndarray:
    """Rz @ Ry @ Rx (radians), 3x3."""
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def rotation(ax, ay, az) -> tuple:
    """The same as a row-major tuple, what sitk.Image.SetDirection takes."""
    return tuple(rotation_matrix(ax, ay, az).ravel())
