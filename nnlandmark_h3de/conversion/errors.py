"""Errors and warnings of the conversion stage (messages name the file or case and the problem)."""
from nnlandmark_h3de.landmarks.landmark_set import LandmarkError


class ConversionError(LandmarkError):
    """A dataset cannot be converted; the message names the file or case and the problem."""


class ConversionWarning(UserWarning):
    """A case or landmark was dropped, or a chosen option weakens a guarantee."""
