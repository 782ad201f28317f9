"""Small numeric helpers shared by training-time metrics and evaluation."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def nanmean(values: Sequence[float]) -> float:
    """Mean ignoring NaN; NaN (not a warning) when nothing is finite."""
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else float("nan")
