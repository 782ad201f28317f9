"""Bootstrap over cases: one seeded resampling shared by every figure, and percentile intervals.

Cases are the unit (a voxel's error is not independent of its neighbours'), so intervals resample case indices.
All methods of one evaluation get the SAME resamples, which keeps differences between methods paired.
"""

from __future__ import annotations

import numpy as np

#: bootstrap resamples by default
N_BOOT = 1000

#: two-sided interval, percent
CI_PERCENT = 95.0


def bootstrap_indices(n_cases: int, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """``(n_boot, n_cases)`` case indices drawn with replacement (numpy ``default_rng(seed)``)."""
    if n_cases < 1:
        raise ValueError(f"bootstrap needs at least one case, got {n_cases}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    return np.random.default_rng(seed).integers(0, n_cases, size=(n_boot, n_cases))


def case_weights(indices: np.ndarray, n_cases: int) -> np.ndarray:
    """``(n_boot, n_cases)`` float: how often each case is drawn in each resample.

    A pooled statistic of a resample is ``weights @ per_case_sums`` (sums over cases are all it needs).
    """
    n_boot = indices.shape[0]
    rows = np.repeat(np.arange(n_boot), indices.shape[1])
    return np.bincount(rows * n_cases + indices.ravel(), minlength=n_boot * n_cases).reshape(n_boot, n_cases) \
        .astype(np.float64)


def percentile_interval(samples, ci: float = CI_PERCENT) -> tuple[float, float]:
    """Percentile interval ``(P_(100-ci)/2, P_(100+ci)/2)`` of bootstrap ``samples``, NaN resamples left out.

    ``(nan, nan)`` when no resample gives a finite value.
    """
    if not 0 < ci < 100:
        raise ValueError(f"ci must lie in (0, 100), got {ci}")
    samples = np.asarray(samples, dtype=np.float64).ravel()
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return float("nan"), float("nan")
    tail = (100.0 - ci) / 2.0
    low, high = np.percentile(samples, [tail, 100.0 - tail])
    return float(low), float(high)


def nanmean_rows(values: np.ndarray) -> np.ndarray:
    """Mean of each row ignoring NaN; NaN (no warning) for a row without a finite value."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    n = finite.sum(-1)
    total = np.where(finite, values, 0.0).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, total / np.maximum(n, 1), np.nan)
