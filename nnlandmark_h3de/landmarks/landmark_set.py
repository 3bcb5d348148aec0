"""The one in-memory landmark model every stage passes around.

Ordered names, world coordinates in LPS millimetres (NaN row = absent) and an optional
per-landmark confidence / uncertainty. File formats convert to and from this type only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np


class LandmarkError(ValueError):
    """Bad landmark input: the message names the file and the problem."""


@dataclass
class LandmarkSet:
    names: List[str]
    points_lps: np.ndarray  # (L, 3) float64, NaN rows = absent
    confidence: Optional[np.ndarray] = None  # (L,) existence score/probability, NaN = unknown
    uncertainty_mm: Optional[np.ndarray] = None  # (L,) expected error in mm, NaN = unknown
    descriptions: Optional[List[str]] = None
    source: str = field(default="<memory>")

    def __post_init__(self):
        self.names = [str(n) for n in self.names]
        self.points_lps = np.asarray(self.points_lps, dtype=np.float64).reshape(-1, 3)
        if len(self.names) != self.points_lps.shape[0]:
            raise LandmarkError(f"{self.source}: {len(self.names)} names but {self.points_lps.shape[0]} points")
        dupes = sorted({n for n in self.names if self.names.count(n) > 1})
        if dupes:
            raise LandmarkError(f"{self.source}: duplicate landmark names {dupes}")
        bad = [n for n, p in zip(self.names, self.points_lps) if np.isnan(p).any() and not np.isnan(p).all()]
        if bad:
            raise LandmarkError(f"{self.source}: partially NaN coordinates for {bad}")
        inf = [n for n, p in zip(self.names, self.points_lps) if np.isinf(p).any()]
        if inf:
            raise LandmarkError(f"{self.source}: infinite coordinates for {inf}")
        for attr in ("confidence", "uncertainty_mm"):
            v = getattr(self, attr)
            if v is not None:
                v = np.asarray(v, dtype=np.float64).reshape(-1)
                if v.shape[0] != len(self.names):
                    raise LandmarkError(f"{self.source}: {attr} has {v.shape[0]} values for {len(self.names)} landmarks")
                setattr(self, attr, v)
        if self.descriptions is not None and len(self.descriptions) != len(self.names):
            raise LandmarkError(f"{self.source}: descriptions do not match names")

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self.names)

    @property
    def present(self) -> np.ndarray:
        """Boolean mask of landmarks with a defined position."""
        return ~np.isnan(self.points_lps).any(axis=1)

    def as_dict(self) -> Dict[str, Optional[List[float]]]:
        return {n: (None if np.isnan(p).any() else [float(x) for x in p]) for n, p in zip(self.names, self.points_lps)}

    def points_ras(self) -> np.ndarray:
        return lps_to_ras(self.points_lps)

    def reordered(self, names: Sequence[str], allow_missing: bool = True) -> "LandmarkSet":
        """Same landmarks in the given order; names not in this set become absent (or an error)."""
        unknown = [n for n in self.names if n not in names]
        if unknown:
            raise LandmarkError(f"{self.source}: unknown landmark names {unknown} (expected some of {list(names)})")
        index = {n: i for i, n in enumerate(self.names)}
        missing = [n for n in names if n not in index]
        if missing and not allow_missing:
            raise LandmarkError(f"{self.source}: missing landmarks {missing}")
        pts = np.full((len(names), 3), np.nan)
        conf = None if self.confidence is None else np.full(len(names), np.nan)
        unc = None if self.uncertainty_mm is None else np.full(len(names), np.nan)
        desc = None if self.descriptions is None else [""] * len(names)
        for j, n in enumerate(names):
            if n in index:
                i = index[n]
                pts[j] = self.points_lps[i]
                if conf is not None:
                    conf[j] = self.confidence[i]
                if unc is not None:
                    unc[j] = self.uncertainty_mm[i]
                if desc is not None:
                    desc[j] = self.descriptions[i]
        return LandmarkSet(list(names), pts, conf, unc, desc, self.source)

    @classmethod
    def from_dict(cls, d: Dict[str, Optional[Iterable[float]]], source: str = "<memory>") -> "LandmarkSet":
        names = list(d.keys())
        pts = np.array([[np.nan] * 3 if d[n] is None else [float(x) for x in d[n]] for n in names], dtype=np.float64)
        return cls(names, pts.reshape(-1, 3), source=source)


def lps_to_ras(points: np.ndarray) -> np.ndarray:
    """RAS <-> LPS: negate x and y (the map is its own inverse)."""
    p = np.array(points, dtype=np.float64, copy=True)
    p[..., 0] *= -1
    p[..., 1] *= -1
    return p


ras_to_lps = lps_to_ras
