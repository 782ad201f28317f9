"""An uncertainty map turned into P(error): isotonic regression fitted on validation cases, ECE and Brier.

Every map is read on one fixed grid of score bins (``SCORE_GRID_EDGES``) so that a case's voxels reduce to a
histogram per voxel type: the calibrator is fitted on those histograms summed over VALIDATION cases and is a step
function of the grid bin, so calibrated ECE, Brier and expected error counts of a scored case follow exactly from
its histograms (no voxel is kept).

Grid resolution: one bin ``[0, 1e-6)``, 40 geometric bins per decade from 1e-6 to 1e-2 (each 5.9 % wide,
relative), then 990 bins of width 0.001 up to 1 (the last one closed). Variances of confident voxels live far
below 0.01, hence the geometric part. Fitting isotonic regression on the binned pairs is the exact isotonic
regression of the voxels with map values quantised to the grid (ties pooled first), and it caps the fitting
points at ``SCORE_GRID_BINS`` however many voxels the validation cases hold.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from custom.core.atomic import atomic_write_json
from custom.core.errors import BraTSInputError

#: bin edges of the score grid over [0, 1] (see module docstring)
SCORE_GRID_EDGES = np.concatenate([[0.0], np.geomspace(1e-6, 1e-2, 161), np.linspace(1e-2, 1.0, 991)[1:]])

SCORE_GRID_BINS = SCORE_GRID_EDGES.size - 1

#: equal-width bins of expected calibration error
ECE_BINS = 10

#: ``format`` of a saved calibrator (``IsotonicCalibrator.save``); another value is refused on load
CALIBRATION_FORMAT = "brats-unc-isotonic-v1"


def grid_bin(values) -> np.ndarray:
    """Index ``0 .. SCORE_GRID_BINS - 1`` of the score-grid bin ``[e_i, e_i+1)`` holding each value (1.0 -> last)."""
    values = np.asarray(values, dtype=np.float64)
    return np.clip(np.searchsorted(SCORE_GRID_EDGES, values, side="right") - 1, 0, SCORE_GRID_BINS - 1)


def ece_bin(p, n_bins: int = ECE_BINS) -> np.ndarray:
    """Equal-width bin ``0 .. n_bins - 1`` of each probability; the last bin includes 1.0.

    Same binning as ``custom.evaluation.uncertainty.expected_calibration_error``.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    p = np.asarray(p, dtype=np.float64)
    return np.minimum((p * n_bins).astype(np.int64), n_bins - 1)


def calibration_sums(p, n_errors, n_voxels, n_bins: int = ECE_BINS) -> np.ndarray:
    """Per-bin sufficient statistics ``(3, n_bins)``: voxel count, sum of P(error), count of errors.

    ``p`` are probabilities, ``n_errors`` / ``n_voxels`` how many voxels hold each (so distinct values of a map,
    or grid bins, stand for all their voxels). Sums over cases add up; ``ece_from_sums`` reads them.
    """
    p = np.asarray(p, dtype=np.float64)
    n_voxels = np.asarray(n_voxels, dtype=np.float64)
    b = ece_bin(p, n_bins)
    return np.stack([np.bincount(b, weights=n_voxels, minlength=n_bins),
                     np.bincount(b, weights=n_voxels * p, minlength=n_bins),
                     np.bincount(b, weights=np.asarray(n_errors, dtype=np.float64), minlength=n_bins)])


def ece_from_sums(sums) -> np.ndarray:
    """``ECE = sum_b |sum of p in b - errors in b| / N`` from ``calibration_sums`` ``(..., 3, n_bins)``; NaN if N = 0."""
    sums = np.asarray(sums, dtype=np.float64)
    total = sums[..., 0, :].sum(-1)
    gap = np.abs(sums[..., 1, :] - sums[..., 2, :]).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, gap / np.maximum(total, 1e-300), np.nan)


def pool_adjacent_violators(y, w) -> np.ndarray:
    """Non-decreasing ``f`` minimising ``sum w (f - y)^2`` (weighted pool-adjacent-violators; weights > 0)."""
    y = np.asarray(y, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    if y.shape != w.shape or y.ndim != 1:
        raise ValueError(f"y and w must be 1-D of one length, got {y.shape} and {w.shape}")
    if np.any(w <= 0) or not np.all(np.isfinite(y)):
        raise ValueError("weights must be > 0 and values finite")
    means, weights, lengths = [], [], []
    for yi, wi in zip(y, w):
        means.append(yi)
        weights.append(wi)
        lengths.append(1)
        while len(means) > 1 and means[-2] > means[-1]:
            m2, w2, l2 = means.pop(), weights.pop(), lengths.pop()
            wsum = weights[-1] + w2
            means[-1] = (means[-1] * weights[-1] + m2 * w2) / wsum
            weights[-1] = wsum
            lengths[-1] += l2
    return np.repeat(means, lengths)


class IsotonicCalibrator:
    """P(error) as a non-decreasing step function of the score-grid bin of a map value.

    Build it with ``IsotonicCalibrator.fit(validation)`` from the case summaries of VALIDATION cases only; it
    remembers their ids (``fitted_case_ids``) and ``check_unseen`` refuses to score any of them. Fitting voxels:
    the reporting region (errors = missed + false positive there, correct = TP + TN there). Bins without a
    fitting voxel get the linear interpolation of their non-empty neighbours (constant beyond the ends).
    """

    def __init__(self, table, fitted_case_ids: Iterable[str], n_fit_voxels: int):
        table = np.asarray(table, dtype=np.float64)
        if table.shape != (SCORE_GRID_BINS,):
            raise ValueError(f"calibration table must hold {SCORE_GRID_BINS} values, got shape {table.shape}")
        if not np.all(np.isfinite(table)) or table.min() < 0 or table.max() > 1 or np.any(np.diff(table) < 0):
            raise ValueError("calibration table must be finite, in [0, 1] and non-decreasing")
        self.table = table
        self.fitted_case_ids = frozenset(str(c) for c in fitted_case_ids)
        self.n_fit_voxels = int(n_fit_voxels)

    @classmethod
    def fit(cls, validation: Sequence) -> "IsotonicCalibrator":
        """Fit on validation case summaries (objects with ``case_id`` and ``calibration_counts() -> (errors, voxels)``
        per score-grid bin, e.g. ``custom.evaluation.self_assessment.CaseSummary``)."""
        validation = list(validation)
        if not validation:
            raise ValueError("the calibrator needs at least one validation case")
        ids = [c.case_id for c in validation]
        if len(set(ids)) != len(ids):
            raise ValueError(f"validation cases repeat: {sorted({i for i in ids if ids.count(i) > 1})}")
        errors = np.zeros(SCORE_GRID_BINS)
        voxels = np.zeros(SCORE_GRID_BINS)
        for c in validation:
            e, v = c.calibration_counts()
            errors += e
            voxels += v
        filled = voxels > 0
        if not filled.any():
            raise ValueError(f"the validation cases {ids} hold no voxel in their reporting regions")
        fitted = pool_adjacent_violators(errors[filled] / voxels[filled], voxels[filled])
        bins = np.arange(SCORE_GRID_BINS)
        table = np.clip(np.interp(bins, bins[filled], fitted), 0.0, 1.0)
        return cls(table, ids, int(voxels.sum()))

    def predict(self, values) -> np.ndarray:
        """Calibrated P(error) of map values in [0, 1] (same shape)."""
        return self.table[grid_bin(values)]

    def check_unseen(self, case_ids: Iterable[str]) -> None:
        """Raise ``ValueError`` if any of ``case_ids`` was among the cases this calibrator was fitted on."""
        seen = sorted(self.fitted_case_ids.intersection(str(c) for c in case_ids))
        if seen:
            raise ValueError(f"calibrator was fitted on case(s) it is asked to score: {seen[:5]}"
                             f"{' ...' if len(seen) > 5 else ''}; fit it on out-of-fold validation cases")

    def as_dict(self) -> dict:
        """JSON-ready description: grid edges, table, fitted case ids and voxel count."""
        return {"grid_edges": SCORE_GRID_EDGES.tolist(), "p_error": self.table.tolist(),
                "fitted_case_ids": sorted(self.fitted_case_ids), "n_fit_voxels": self.n_fit_voxels}

    def save(self, path, **provenance) -> Path:
        """Write the calibrator as JSON (atomically): ``format``, ``as_dict()`` and ``provenance`` (e.g. the map it
        calibrates, the model file and the reporting-region dilation it was fitted with), for inference to load."""
        path = Path(path)
        atomic_write_json(path, {"format": CALIBRATION_FORMAT, **self.as_dict(), "provenance": dict(provenance)})
        return path

    @classmethod
    def load(cls, path) -> "IsotonicCalibrator":
        """Read a file written by ``save``; ``BraTSInputError`` naming the file and the problem otherwise (not JSON,
        another format, another score grid, a table that is not finite, in [0, 1] and non-decreasing)."""
        path = Path(path)
        header = f"{path}: not a usable calibration file"
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise BraTSInputError(["file not found"], header=header) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BraTSInputError([f"cannot read it as JSON ({exc})"], header=header) from None
        if not isinstance(doc, dict) or doc.get("format") != CALIBRATION_FORMAT:
            got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            raise BraTSInputError([f"format must be {CALIBRATION_FORMAT!r}, got {got!r}"], header=header)
        edges = np.asarray(doc.get("grid_edges", []), dtype=np.float64)
        if edges.shape != SCORE_GRID_EDGES.shape or not np.allclose(edges, SCORE_GRID_EDGES, rtol=1e-9, atol=0):
            raise BraTSInputError([f"its score grid ({edges.size} edges) is not this version's "
                                   f"({SCORE_GRID_EDGES.size} edges); fit the calibration again"], header=header)
        try:
            return cls(np.asarray(doc.get("p_error"), dtype=np.float64), doc.get("fitted_case_ids", []),
                       int(doc.get("n_fit_voxels", 0)))
        except (TypeError, ValueError) as exc:
            raise BraTSInputError([str(exc)], header=header) from None


def cross_fit_calibrators(summaries: Sequence, group_of_case) -> dict:
    """Out-of-fold calibrators: ``case_id -> IsotonicCalibrator`` fitted on the cases of every OTHER group.

    ``group_of_case`` maps each case id to its group (e.g. the cross-validation fold whose model predicted it as a
    validation case); a case is thus calibrated by a fit that never saw it. Needs at least two groups.
    """
    summaries = list(summaries)
    missing = sorted(c.case_id for c in summaries if c.case_id not in group_of_case)
    if missing:
        raise ValueError(f"no group for case(s) {missing[:5]}")
    groups = sorted({group_of_case[c.case_id] for c in summaries}, key=str)
    if len(groups) < 2:
        raise ValueError(f"out-of-fold calibration needs cases from >= 2 groups, got {groups}")
    fitted = {g: IsotonicCalibrator.fit([c for c in summaries if group_of_case[c.case_id] != g]) for g in groups}
    return {c.case_id: fitted[group_of_case[c.case_id]] for c in summaries}
