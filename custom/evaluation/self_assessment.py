"""Self-assessment on unseen cases: does an uncertainty map say where, and how badly, a segmentation is wrong?

The evaluation of issue 13, built so that it cannot flatter a map:

- **Voxel types.** For a case, ``gt`` = true WT, ``seg`` = the predicted WT being judged, ``region`` = the reporting
  region (``seg`` dilated by 3 voxels in the 26-neighbourhood: where inference reports the map). Error =
  ``seg xor gt``; ``missed`` = gt & ~seg (inside or outside the region), ``tp`` = gt & seg, ``fp`` = ~gt & seg,
  ``tn_region`` = ~gt & ~seg & region. Three comparisons:
  ``missed_vs_tp`` (positives missed, negatives tp: ALL true-WT voxels, also missed ones outside the region, where a
  masked map is 0 and so ranks them as certain), ``fp_vs_tn`` (fp vs tn_region) and ``overall`` (errors vs correct
  voxels inside the region; the ring of correct background dominates it, so it mostly measures how low the ring is).
- **Ranking.** AUROC (Mann-Whitney, ties count 1/2) and AUPRC (average precision, step-wise, no interpolation; all
  voxels tied at a score are flagged together) per case, exact from the case's distinct map values. HEADLINE
  (``auroc_<comparison>``, ``auprc_<comparison>``): the mean over cases where both classes occur, so each case
  counts once and a map gains nothing from being higher in cases that hold many errors. ``pooled_*``: voxels of all
  cases pooled (big tumours dominate, between-case offsets count), from per-case histograms on the score grid of
  ``custom.evaluation.calibration`` (ties within one grid bin count 1/2).
- **Calibration.** Each map -> P(error) by ``IsotonicCalibrator`` fitted on OTHER cases (out-of-fold validation
  cases; scoring refuses a case the calibrator saw). ECE (10 equal-width bins) and Brier pooled over the reporting
  region's voxels of the held-out cases, for the raw map read as P(error) (``*_raw``) and the calibrated one
  (``*_calibrated``). Only the calibrated figures compare maps; a raw ECE mostly measures the map's scale.
- **Case level** (what a QC user acts on): predicted WT Dice from calibrated P(error): inside seg, E[TP] = sum(1-p),
  E[FP] = sum p; outside seg inside the region, E[FN] = sum p; Dice = 2E[TP] / (2E[TP] + E[FP] + E[FN]) (all zero
  -> 1). Spearman with the true Dice across cases; risk-coverage when cases are sent to review worst-first (see
  ``risk_coverage``); AURC, its oracle and random levels, and ``excess_aurc`` = AURC - oracle (the headline).
- **Paired.** Every map is also scored against the errors of one segmentation (the default model's), with that
  segmentation's region: ``<method>.paired_<metric>``.
- **Intervals.** 95 % percentile bootstrap over cases (the same resamples for every method and figure), from
  per-case sufficient statistics; calibrators stay fixed (they were fitted on other cases). ECE sums absolute
  gaps, so resampling noise only adds to it: for a well-calibrated map its interval can lie above the point.

Arrays are ``(X, Y, Z)``; the map is in [0, 1] (1 = most uncertain). numpy/scipy/matplotlib only.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
from scipy.stats import rankdata

from custom.core.atomic import atomic_write_bytes
from custom.evaluation.bootstrap import (CI_PERCENT, N_BOOT, bootstrap_indices, case_weights, nanmean_rows,
                                         percentile_interval)
from custom.evaluation.calibration import (ECE_BINS, SCORE_GRID_BINS, IsotonicCalibrator, calibration_sums,
                                           ece_from_sums, grid_bin)
from custom.evaluation.segmentation import STRUCTURE_26, dilate

#: voxels by which the predicted WT is dilated to form the reporting region (the segmenter's mask_dilation)
REPORT_DILATION = 3

#: voxel types of one case, in the row order of ``CaseSummary.grid_hist``
VOXEL_TYPES = ("missed_in_region", "missed_outside_region", "tp", "fp", "tn_region")
_T = {name: i for i, name in enumerate(VOXEL_TYPES)}

#: comparison -> (positive voxel types, negative voxel types)
COMPARISONS = {
    "missed_vs_tp": (("missed_in_region", "missed_outside_region"), ("tp",)),
    "fp_vs_tn": (("fp",), ("tn_region",)),
    "overall": (("missed_in_region", "fp"), ("tp", "tn_region")),
}

#: map values this far outside [0, 1] are clipped (float rounding); further is an error
_RANGE_TOLERANCE = 1e-6


# ------------------------------------------------------------------------------------------ ranking measures
def auroc_from_counts(pos, neg) -> np.ndarray:
    """AUROC from counts of positives and negatives per distinct score in ASCENDING score order ``(..., K)``.

    ``sum_k pos_k (neg below k + neg_k / 2) / (P N)``: a positive-negative tie counts 1/2. NaN unless P, N > 0.
    """
    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    n_pos, n_neg = pos.sum(-1), neg.sum(-1)
    below = np.cumsum(neg, axis=-1) - neg
    u = (pos * (below + 0.5 * neg)).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)


def average_precision_from_counts(pos, neg) -> np.ndarray:
    """Average precision from counts per distinct score in ASCENDING score order ``(..., K)``.

    Thresholds at each distinct score, from the highest down; at threshold t every voxel scoring >= t is flagged
    (ties together): ``AP = sum_t (R_t - R_t-1) * precision_t``, no interpolation (scikit-learn's definition).
    NaN unless both classes occur (as AUROC, so both average over the same cases).
    """
    pos = np.asarray(pos, dtype=np.float64)[..., ::-1]
    neg = np.asarray(neg, dtype=np.float64)[..., ::-1]
    n_pos, n_neg = pos.sum(-1), neg.sum(-1)
    tp, fp = np.cumsum(pos, axis=-1), np.cumsum(neg, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1e-300), 0.0)
        return np.where((n_pos > 0) & (n_neg > 0), (pos * precision).sum(-1) / n_pos, np.nan)


def auroc_and_average_precision(scores, labels) -> tuple[float, float]:
    """Exact AUROC and average precision of ``scores`` for bool ``labels`` (any shape), ties as above."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels, dtype=bool).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"scores hold {scores.size} values but labels {labels.size}")
    uniq, inv = np.unique(scores, return_inverse=True)
    pos = np.bincount(inv[labels], minlength=uniq.size)
    neg = np.bincount(inv[~labels], minlength=uniq.size)
    return float(auroc_from_counts(pos, neg)), float(average_precision_from_counts(pos, neg))


# ------------------------------------------------------------------------------------------ one case
def _crop_box(mask: np.ndarray, margin: int):
    nz = [np.nonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax)))[0] for ax in range(mask.ndim)]
    return tuple(slice(max(int(i[0]) - margin, 0), min(int(i[-1]) + 1 + margin, n)) for i, n in zip(nz, mask.shape))


def reporting_region(seg_wt, dilation: int = REPORT_DILATION) -> np.ndarray:
    """Predicted WT dilated by ``dilation`` voxels in the 26-neighbourhood (bool, same shape): where the map is read."""
    seg = np.asarray(seg_wt, dtype=bool)
    if dilation < 0:
        raise ValueError(f"dilation must be >= 0, got {dilation}")
    if dilation == 0 or not seg.any():
        return seg.copy()
    box = _crop_box(seg, dilation)  # dilation cannot reach further: dilate the box only
    out = np.zeros_like(seg)
    out[box] = dilate(seg[box], dilation, STRUCTURE_26)
    return out


def voxel_types(gt_wt, seg_wt, region) -> dict:
    """``VOXEL_TYPES`` name -> bool mask (disjoint); voxels outside ``gt | region`` belong to none."""
    gt, seg, region = (np.asarray(a, dtype=bool) for a in (gt_wt, seg_wt, region))
    missed = gt & ~seg
    return {"missed_in_region": missed & region, "missed_outside_region": missed & ~region, "tp": gt & seg,
            "fp": ~gt & seg, "tn_region": ~gt & ~seg & region}


def _dice_from_counts(tp, fp, fn) -> float:
    denom = 2.0 * tp + fp + fn
    return 1.0 if denom <= 0 else float(2.0 * tp / denom)


def predicted_dice(p_error, seg_wt, region) -> float:
    """Expected WT Dice of ``seg_wt`` if each voxel is wrong with probability ``p_error`` (voxel-level form).

    Inside ``seg_wt``: E[TP] = sum(1 - p), E[FP] = sum p; inside ``region`` but outside ``seg_wt``: E[FN] = sum p.
    ``2 E[TP] / (2 E[TP] + E[FP] + E[FN])``; 1.0 when all three are 0. Voxels outside ``region`` do not count.
    """
    p = np.asarray(p_error, dtype=np.float64)
    seg, region = np.asarray(seg_wt, dtype=bool), np.asarray(region, dtype=bool)
    if not (p.shape == seg.shape == region.shape):
        raise ValueError(f"shapes differ: p_error {p.shape}, seg_wt {seg.shape}, region {region.shape}")
    inside = p[seg]
    return _dice_from_counts(float((1.0 - inside).sum()), float(inside.sum()), float(p[region & ~seg].sum()))


def error_probability_map(unc, seg_wt, calibrator: IsotonicCalibrator,
                          dilation: int = REPORT_DILATION) -> tuple[np.ndarray, float]:
    """A new case's calibrated P(error) map and its predicted WT Dice (what inference reports, section 4 of the
    self-assessment).

    Args:
        unc: ``(X, Y, Z)`` uncertainty map in [0, 1], of the kind ``calibrator`` was fitted on (e.g. ``unc_output``).
        seg_wt: ``(X, Y, Z)`` bool predicted whole tumour (the segmentation the map judges).
        calibrator: fitted on validation cases (``IsotonicCalibrator.fit`` / ``.load``).
        dilation: reporting region = ``seg_wt`` dilated by this many voxels (26-neighbourhood), as in the fit.

    Returns:
        ``(p_error, predicted_dice)``: float32 ``(X, Y, Z)`` P(this voxel's WT label is wrong) inside the reporting
        region and 0 outside it (the calibrator was fitted there only: no claim is made elsewhere), and the expected
        WT Dice of ``seg_wt`` under those probabilities (:func:`predicted_dice`).
    """
    unc = np.asarray(unc)
    seg = np.asarray(seg_wt, dtype=bool)
    if unc.shape != seg.shape:
        raise ValueError(f"shapes differ: unc {unc.shape}, seg_wt {seg.shape}")
    region = reporting_region(seg, dilation)
    p = np.zeros(unc.shape, dtype=np.float32)
    p[region] = calibrator.predict(np.clip(unc[region], 0.0, 1.0))
    return p, predicted_dice(p, seg, region)


@dataclass(frozen=True)
class CaseSummary:
    """Everything the evaluation needs of one (case, map, judged segmentation), without the voxels.

    ``counts``: voxels per type; ``auroc`` / ``auprc``: exact per-case figures per comparison (NaN without both
    classes); ``grid_hist``: ``(len(VOXEL_TYPES), SCORE_GRID_BINS)`` voxel counts of each type per score-grid bin;
    ``raw_calibration``: ``calibration_sums`` ``(3, ece_bins)`` of the raw map over the region's voxels;
    ``raw_brier_sum``: sum of (map - error)^2 over them.
    """

    case_id: str
    counts: dict
    auroc: dict
    auprc: dict
    grid_hist: np.ndarray = field(repr=False)
    raw_calibration: np.ndarray = field(repr=False)
    raw_brier_sum: float
    ece_bins: int

    @property
    def n_region(self) -> int:
        return sum(self.counts[t] for t in ("missed_in_region", "tp", "fp", "tn_region"))

    @property
    def n_missed(self) -> int:
        return self.counts["missed_in_region"] + self.counts["missed_outside_region"]

    @property
    def true_dice(self) -> float:
        """WT Dice of the judged segmentation (both empty -> 1)."""
        return _dice_from_counts(self.counts["tp"], self.counts["fp"], self.n_missed)

    def prevalence(self, comparison: str) -> float:
        """Fraction of positives among the voxels of a comparison (the AUPRC of a random map); NaN if none."""
        pos, neg = COMPARISONS[comparison]
        n_pos, n_neg = sum(self.counts[t] for t in pos), sum(self.counts[t] for t in neg)
        return n_pos / (n_pos + n_neg) if n_pos > 0 and n_neg > 0 else float("nan")

    def calibration_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Per score-grid bin: (errors, voxels) inside the reporting region (what a calibrator is fitted on)."""
        h = self.grid_hist.astype(np.float64)
        errors = h[_T["missed_in_region"]] + h[_T["fp"]]
        return errors, errors + h[_T["tp"]] + h[_T["tn_region"]]


def summarize_case(case_id: str, gt_wt, seg_wt, uncertainty, region=None, *, dilation: int = REPORT_DILATION,
                   ece_bins: int = ECE_BINS) -> CaseSummary:
    """Reduce one case to a ``CaseSummary``.

    Args:
        case_id: the case's id (calibration leakage is checked by it).
        gt_wt, seg_wt: bool ``(X, Y, Z)`` true and judged predicted WT (``seg_wt`` = the method's own segmentation,
            or the reference one for the paired score).
        uncertainty: float ``(X, Y, Z)`` in [0, 1], the map as the method reports it.
        region: bool ``(X, Y, Z)`` reporting region; default ``reporting_region(seg_wt, dilation)``. Must
            contain ``seg_wt``. Pass it when several maps share one segmentation (computed once).
    """
    gt = np.asarray(gt_wt, dtype=bool)
    seg = np.asarray(seg_wt, dtype=bool)
    unc = np.asarray(uncertainty)
    if not (gt.shape == seg.shape == unc.shape):
        raise ValueError(f"case {case_id}: shapes differ: gt_wt {gt.shape}, seg_wt {seg.shape}, "
                         f"uncertainty {unc.shape}")
    region = reporting_region(seg, dilation) if region is None else np.asarray(region, dtype=bool)
    if region.shape != gt.shape:
        raise ValueError(f"case {case_id}: region shape {region.shape} differs from {gt.shape}")
    if np.any(seg & ~region):
        raise ValueError(f"case {case_id}: the reporting region must contain the predicted WT")
    keep = gt | region
    vals = unc[keep].astype(np.float64)
    if not np.all(np.isfinite(vals)):
        raise ValueError(f"case {case_id}: uncertainty holds NaN or infinite values")
    if vals.size and (vals.min() < -_RANGE_TOLERANCE or vals.max() > 1 + _RANGE_TOLERANCE):
        raise ValueError(f"case {case_id}: uncertainty must lie in [0, 1], got [{vals.min():.4g}, {vals.max():.4g}]")
    vals = np.clip(vals, 0.0, 1.0)
    g, s, r = gt[keep], seg[keep], region[keep]
    code = np.full(vals.size, _T["tn_region"], dtype=np.int64)
    code[g & ~s & r] = _T["missed_in_region"]
    code[g & ~s & ~r] = _T["missed_outside_region"]
    code[g & s] = _T["tp"]
    code[~g & s] = _T["fp"]
    # one sort per case: counts of every voxel type per distinct map value
    uniq, inv = np.unique(vals, return_inverse=True)
    n_types, n_uniq = len(VOXEL_TYPES), uniq.size
    cnt = np.bincount(code * n_uniq + inv, minlength=n_types * n_uniq).reshape(n_types, n_uniq)
    counts = {t: int(cnt[i].sum()) for i, t in enumerate(VOXEL_TYPES)}
    auroc, auprc = {}, {}
    for name, (pos_types, neg_types) in COMPARISONS.items():
        pos = sum(cnt[_T[t]] for t in pos_types)
        neg = sum(cnt[_T[t]] for t in neg_types)
        auroc[name] = float(auroc_from_counts(pos, neg))
        auprc[name] = float(average_precision_from_counts(pos, neg))
    gidx = grid_bin(uniq)
    grid_hist = np.stack([np.bincount(gidx, weights=cnt[i], minlength=SCORE_GRID_BINS) for i in range(n_types)])
    errors = (cnt[_T["missed_in_region"]] + cnt[_T["fp"]]).astype(np.float64)
    correct = (cnt[_T["tp"]] + cnt[_T["tn_region"]]).astype(np.float64)
    return CaseSummary(
        case_id=str(case_id), counts=counts, auroc=auroc, auprc=auprc,
        grid_hist=np.rint(grid_hist).astype(np.int32),
        raw_calibration=calibration_sums(uniq, errors, errors + correct, ece_bins),
        raw_brier_sum=float((errors * (1.0 - uniq) ** 2 + correct * uniq ** 2).sum()),
        ece_bins=int(ece_bins),
    )


def summarize_method_case(case_id: str, gt_wt, seg_wt, reference_seg_wt, uncertainty, region=None,
                          reference_region=None, *, dilation: int = REPORT_DILATION,
                          ece_bins: int = ECE_BINS) -> tuple[CaseSummary, CaseSummary]:
    """``(own, paired)`` summaries of one method's map on one case.

    ``own`` judges the method's own predicted WT ``seg_wt`` inside its region; ``paired`` judges the reference
    (default model's) ``reference_seg_wt`` inside the REFERENCE region, with the same map. Regions default to the
    segmentation dilated by ``dilation``; pass them when computed once for several maps.
    """
    own = summarize_case(case_id, gt_wt, seg_wt, uncertainty, region, dilation=dilation, ece_bins=ece_bins)
    paired = summarize_case(case_id, gt_wt, reference_seg_wt, uncertainty, reference_region, dilation=dilation,
                            ece_bins=ece_bins)
    return own, paired


@dataclass(frozen=True)
class CalibratedCase:
    """A scored case read through its calibrator: ECE sums, Brier sum and the predicted Dice."""

    case_id: str
    calibration: np.ndarray
    brier_sum: float
    predicted_dice: float


def calibrate_case(summary: CaseSummary, calibrator: IsotonicCalibrator) -> CalibratedCase:
    """Apply an out-of-fold calibrator to a held-out case (raises if the calibrator was fitted on this case)."""
    calibrator.check_unseen([summary.case_id])
    p = calibrator.table
    h = summary.grid_hist.astype(np.float64)
    errors, voxels = summary.calibration_counts()
    in_seg = h[_T["tp"]] + h[_T["fp"]]
    out_seg = h[_T["missed_in_region"]] + h[_T["tn_region"]]
    return CalibratedCase(
        case_id=summary.case_id,
        calibration=calibration_sums(p, errors, voxels, summary.ece_bins),
        brier_sum=float((errors * (1.0 - p) ** 2 + (voxels - errors) * p ** 2).sum()),
        predicted_dice=_dice_from_counts(float((in_seg * (1.0 - p)).sum()), float((in_seg * p).sum()),
                                         float((out_seg * p).sum())),
    )


# ------------------------------------------------------------------------------------------ case level
def _rank_rows(x: np.ndarray) -> np.ndarray:
    return rankdata(x, axis=-1)


def spearman_rows(x, y) -> np.ndarray:
    """Spearman correlation of each row pair ``(..., n)`` (average ranks); NaN where a row is constant."""
    rx, ry = _rank_rows(np.asarray(x, dtype=np.float64)), _rank_rows(np.asarray(y, dtype=np.float64))
    rx = rx - rx.mean(-1, keepdims=True)
    ry = ry - ry.mean(-1, keepdims=True)
    den = np.sqrt((rx ** 2).sum(-1) * (ry ** 2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rx * ry).sum(-1) / np.maximum(den, 1e-300), np.nan)


def _selective_risk_rows(predicted: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """``(B, n)`` risk of the m best-predicted cases kept, m = 1..n; tied predictions share their mean loss."""
    b, n = predicted.shape
    order = np.argsort(-predicted, axis=1, kind="stable")
    pred_sorted = np.take_along_axis(predicted, order, axis=1)
    loss_sorted = np.take_along_axis(loss, order, axis=1)
    new_group = np.ones((b, n), dtype=bool)
    new_group[:, 1:] = pred_sorted[:, 1:] != pred_sorted[:, :-1]
    group = (np.cumsum(new_group, axis=1) - 1) + np.arange(b)[:, None] * n
    sums = np.bincount(group.ravel(), weights=loss_sorted.ravel(), minlength=b * n)
    sizes = np.bincount(group.ravel(), minlength=b * n)
    expected = (sums / np.maximum(sizes, 1))[group]  # the expectation over random orders of tied cases
    return np.cumsum(expected, axis=1) / np.arange(1, n + 1)


def risk_coverage(predicted_dice, true_dice) -> tuple[np.ndarray, np.ndarray]:
    """Risk-coverage curve of sending cases to review worst-predicted first.

    Cases are kept (not reviewed) best-predicted first; with m of n kept, coverage = m / n and risk = mean
    (1 - true Dice) of the kept cases, for m = 1..n. Cases with equal predicted Dice are kept in random order:
    their risk is its expectation (they share their mean loss). Returns ``(coverage, risk)``, each ``(n,)``.
    """
    pred = np.asarray(predicted_dice, dtype=np.float64).ravel()
    true = np.asarray(true_dice, dtype=np.float64).ravel()
    if pred.shape != true.shape or pred.size == 0:
        raise ValueError(f"need one predicted and one true Dice per case, got {pred.size} and {true.size}")
    n = pred.size
    return np.arange(1, n + 1) / n, _selective_risk_rows(pred[None], 1.0 - true[None])[0]


def aurc(predicted_dice, true_dice) -> float:
    """Area under the risk-coverage curve: the mean of the n selective risks at coverage 1/n, 2/n, ..., 1.

    Lower is better. ``aurc(true, true)`` is the oracle (review the truly worst first); a random order has
    expectation mean(1 - true Dice) (the risk at full coverage).
    """
    return float(risk_coverage(predicted_dice, true_dice)[1].mean())


# ------------------------------------------------------------------------------------------ one map, many cases
def _calibrator_of(calibrators, case_id: str) -> IsotonicCalibrator:
    if isinstance(calibrators, IsotonicCalibrator):
        return calibrators
    if case_id not in calibrators:
        raise ValueError(f"no calibrator for case {case_id}")
    return calibrators[case_id]


class _Figures:
    """Point estimates and bootstrap intervals, written as flat ``name``, ``name_ci_low``, ``name_ci_high``."""

    def __init__(self, ci: float):
        self.ci, self.out = ci, {}

    def add(self, name: str, point, boot=None):
        self.out[name] = float(point)
        if boot is not None:
            self.out[f"{name}_ci_low"], self.out[f"{name}_ci_high"] = percentile_interval(boot, self.ci)


def _pooled_counts(summaries, types) -> np.ndarray:
    return np.stack([sum(s.grid_hist[_T[t]].astype(np.float64) for t in types) for s in summaries])


def score_cases(summaries: Sequence[CaseSummary], calibrators, indices: np.ndarray, ci: float = CI_PERCENT):
    """Every figure of one map against one segmentation's errors, over held-out cases.

    Args:
        summaries: one ``CaseSummary`` per held-out case, in the order ``indices`` refers to.
        calibrators: one ``IsotonicCalibrator`` or ``case_id -> calibrator``, fitted on other cases.
        indices: ``(B, n)`` bootstrap case indices (``bootstrap_indices``), shared across maps.
    Returns ``(figures, details)``: flat ``{metric: value}`` (with ``_ci_low`` / ``_ci_high``) and
    ``{"reliability": {"raw", "calibrated"}: (3, bins) sums, "risk_coverage": {...}, "per_case": [...]}``.
    """
    summaries = list(summaries)
    n = len(summaries)
    if indices.ndim != 2 or indices.shape[1] != n:
        raise ValueError(f"bootstrap indices {indices.shape} do not match {n} cases")
    bins = {s.ece_bins for s in summaries}
    if len(bins) != 1:
        raise ValueError(f"cases were summarised with different ECE bin counts {sorted(bins)}")
    calibrated = [calibrate_case(s, _calibrator_of(calibrators, s.case_id)) for s in summaries]
    weights = case_weights(indices, n)
    f = _Figures(ci)

    f.out["n_cases"] = n
    for t in VOXEL_TYPES:
        f.out[f"n_{t}"] = int(sum(s.counts[t] for s in summaries))
    f.out["n_missed"] = f.out["n_missed_in_region"] + f.out["n_missed_outside_region"]
    del f.out["n_missed_in_region"]

    for name, (pos_types, neg_types) in COMPARISONS.items():
        for measure in ("auroc", "auprc"):
            per_case = np.array([getattr(s, measure)[name] for s in summaries])
            f.add(f"{measure}_{name}", nanmean_rows(per_case), nanmean_rows(per_case[indices]))
        prevalence = np.array([s.prevalence(name) for s in summaries])
        f.add(f"auprc_{name}_chance", nanmean_rows(prevalence), nanmean_rows(prevalence[indices]))
        f.out[f"n_cases_{name}"] = int(np.isfinite(prevalence).sum())
        pos, neg = _pooled_counts(summaries, pos_types), _pooled_counts(summaries, neg_types)
        pos_b, neg_b = weights @ pos, weights @ neg
        f.add(f"pooled_auroc_{name}", auroc_from_counts(pos.sum(0), neg.sum(0)), auroc_from_counts(pos_b, neg_b))
        f.add(f"pooled_auprc_{name}", average_precision_from_counts(pos.sum(0), neg.sum(0)),
              average_precision_from_counts(pos_b, neg_b))

    n_region = np.array([s.n_region for s in summaries], dtype=np.float64)
    n_error = np.array([s.counts["missed_in_region"] + s.counts["fp"] for s in summaries], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        f.add("error_fraction_region", n_error.sum() / n_region.sum(), (weights @ n_error) / (weights @ n_region))
        for kind, sums, brier in (
            ("raw", np.stack([s.raw_calibration for s in summaries]), np.array([s.raw_brier_sum for s in summaries])),
            ("calibrated", np.stack([c.calibration for c in calibrated]), np.array([c.brier_sum for c in calibrated])),
        ):
            flat = sums.reshape(n, -1)
            f.add(f"ece_{kind}", ece_from_sums(sums.sum(0)), ece_from_sums((weights @ flat).reshape(-1, *sums.shape[1:])))
            f.add(f"brier_{kind}", brier.sum() / n_region.sum(), (weights @ brier) / (weights @ n_region))

    true = np.array([s.true_dice for s in summaries])
    pred = np.array([c.predicted_dice for c in calibrated])
    true_b, pred_b = true[indices], pred[indices]
    f.add("dice_true_mean", true.mean(), true_b.mean(1))
    f.add("dice_pred_mean", pred.mean(), pred_b.mean(1))
    f.add("mae_pred_dice", np.abs(pred - true).mean(), np.abs(pred_b - true_b).mean(1))
    f.add("spearman_pred_dice", spearman_rows(pred, true), spearman_rows(pred_b, true_b))
    risk = _selective_risk_rows(pred[None], 1.0 - true[None])[0]
    risk_oracle = _selective_risk_rows(true[None], 1.0 - true[None])[0]
    aurc_b = _selective_risk_rows(pred_b, 1.0 - true_b).mean(1)
    oracle_b = _selective_risk_rows(true_b, 1.0 - true_b).mean(1)
    f.add("aurc", risk.mean(), aurc_b)
    f.add("aurc_oracle", risk_oracle.mean(), oracle_b)
    f.add("aurc_random", (1.0 - true).mean(), (1.0 - true_b).mean(1))
    f.add("excess_aurc", risk.mean() - risk_oracle.mean(), aurc_b - oracle_b)

    per_case = [{"case_id": s.case_id, "true_dice": s.true_dice, "predicted_dice": c.predicted_dice,
                 **{f"auroc_{k}": v for k, v in s.auroc.items()}, **{f"auprc_{k}": v for k, v in s.auprc.items()},
                 **{f"n_{t}": v for t, v in s.counts.items()}} for s, c in zip(summaries, calibrated)]
    details = {
        "reliability": {"raw": sum(s.raw_calibration for s in summaries),
                        "calibrated": sum(c.calibration for c in calibrated)},
        "risk_coverage": {"coverage": np.arange(1, n + 1) / n, "risk": risk, "risk_oracle": risk_oracle,
                          "risk_random": float((1.0 - true).mean())},
        "per_case": per_case,
    }
    return f.out, details


# ------------------------------------------------------------------------------------------ many maps
@dataclass
class MethodCases:
    """One method's held-out material.

    ``own``: summaries against the method's own segmentation; ``paired``: against the reference (default model's)
    segmentation, same cases. Calibrators: one ``IsotonicCalibrator`` or ``case_id -> calibrator`` (e.g.
    ``cross_fit_calibrators``), fitted on the SAME kind of summaries (own or paired) of other cases.
    ``seconds_per_case``: ``case_id -> measured seconds`` for this method's maps (and segmentation).
    """

    own: Sequence[CaseSummary]
    own_calibrators: object
    paired: Sequence[CaseSummary] | None = None
    paired_calibrators: object = None
    forward_passes: int | None = None
    seconds_per_case: Mapping[str, float] | None = None


@dataclass
class SelfAssessment:
    """``flat``: ``<method>.<metric>`` -> float (``paired_`` metrics against the reference segmentation);
    ``reliability`` / ``risk_coverage``: ``<method>`` and ``<method>.paired`` -> curve data;
    ``per_case``: rows ``{"method", "target", "case_id", ...}``; ``case_ids``: the scored cases in order."""

    flat: dict
    reliability: dict
    risk_coverage: dict
    per_case: list
    case_ids: list


def evaluate_methods(methods: Mapping[str, MethodCases], n_boot: int = N_BOOT, seed: int = 0,
                     ci: float = CI_PERCENT) -> SelfAssessment:
    """Score every method on the same held-out cases with the same bootstrap resamples (see module docstring)."""
    if not methods:
        raise ValueError("no method to evaluate")
    case_ids = None
    for name, m in methods.items():
        if not name or "." in name or name.startswith("seed"):
            raise ValueError(f"method name {name!r} must be non-empty, hold no '.' (keys are '<method>.<metric>') "
                             f"and not start with 'seed' (kept for combine_seeds)")
        for target, summaries in (("own", m.own), ("paired", m.paired)):
            if summaries is None:
                continue
            ids = sorted(s.case_id for s in summaries)
            if len(set(ids)) != len(ids):
                raise ValueError(f"{name} ({target}): a case is summarised twice")
            if case_ids is None:
                case_ids = ids
            elif ids != case_ids:
                raise ValueError(f"{name} ({target}) covers other cases than the first method: all methods must be "
                                 f"scored on the same held-out cases ({sorted(set(ids) ^ set(case_ids))[:5]} differ)")
    indices = bootstrap_indices(len(case_ids), n_boot, seed)
    flat, reliability, curves, per_case = {}, {}, {}, []
    for name, m in methods.items():
        for target, summaries, calibrators in (("own", m.own, m.own_calibrators),
                                               ("paired", m.paired, m.paired_calibrators)):
            if summaries is None:
                continue
            if calibrators is None:
                raise ValueError(f"{name} ({target}): no calibrator")
            ordered = sorted(summaries, key=lambda s: s.case_id)
            figures, details = score_cases(ordered, calibrators, indices, ci)
            prefix = f"{name}." if target == "own" else f"{name}.paired_"
            flat.update({prefix + k: v for k, v in figures.items()})
            key = name if target == "own" else f"{name}.paired"
            reliability[key] = details["reliability"]
            curves[key] = details["risk_coverage"]
            per_case += [{"method": name, "target": target, **row} for row in details["per_case"]]
        if m.forward_passes is not None:
            flat[f"{name}.forward_passes"] = int(m.forward_passes)
        if m.seconds_per_case is not None:
            missing = sorted(set(case_ids) - set(m.seconds_per_case))
            if missing:
                raise ValueError(f"{name}: no measured seconds for case(s) {missing[:5]}")
            secs = np.array([float(m.seconds_per_case[c]) for c in case_ids])
            flat[f"{name}.seconds_per_case"] = float(secs.mean())
            flat[f"{name}.seconds_per_case_ci_low"], flat[f"{name}.seconds_per_case_ci_high"] = \
                percentile_interval(secs[indices].mean(1), ci)
    flat["n_boot"], flat["bootstrap_seed"], flat["ci_percent"] = int(n_boot), int(seed), float(ci)
    return SelfAssessment(flat, reliability, curves, per_case, list(case_ids))


# ------------------------------------------------------------------------------------------ seeds
def combine_seeds(per_seed: Mapping) -> dict:
    """``{seed: flat dict}`` -> ``seed<k>.<key>`` for every key, and for each point figure (no ``_ci_`` suffix)
    present in every seed ``seed_mean.<key>`` and ``seed_sd.<key>`` (sample sd, ddof 1; NaN with one seed);
    ``n_seeds``."""
    if not per_seed:
        raise ValueError("no seed to combine")
    out = {}
    for seed, flat in per_seed.items():
        out.update({f"seed{seed}.{k}": v for k, v in flat.items()})
    common = set.intersection(*(set(flat) for flat in per_seed.values()))
    for key in sorted(common):
        if key.endswith(("_ci_low", "_ci_high")) or "." not in key:
            continue
        values = np.array([float(flat[key]) for flat in per_seed.values()], dtype=np.float64)
        finite = values[np.isfinite(values)]
        out[f"seed_mean.{key}"] = float(finite.mean()) if finite.size else float("nan")
        out[f"seed_sd.{key}"] = float(finite.std(ddof=1)) if finite.size > 1 else float("nan")
    out["n_seeds"] = len(per_seed)
    return out


# ------------------------------------------------------------------------------------------ report
#: (metric, label, decimals) rows of the readable table, by section; ``{p}`` is "" (own) or "paired_"
_SECTIONS = (
    ("Where the errors are: the method's own segmentation (mean over cases)", "", (
        ("auroc_missed_vs_tp", "AUROC missed vs correctly segmented tumour", 3),
        ("auprc_missed_vs_tp", "AUPRC missed vs TP", 3),
        ("auprc_missed_vs_tp_chance", "  chance level (missed fraction)", 3),
        ("auroc_fp_vs_tn", "AUROC false positive vs background (region)", 3),
        ("auprc_fp_vs_tn", "AUPRC FP vs TN", 3),
        ("auprc_fp_vs_tn_chance", "  chance level (FP fraction)", 3),
        ("auroc_overall", "AUROC errors vs correct (region)", 3),
        ("auprc_overall", "AUPRC errors vs correct", 3),
        ("auprc_overall_chance", "  chance level (error fraction)", 3),
        ("pooled_auroc_missed_vs_tp", "pooled voxels: AUROC missed vs TP", 3),
        ("pooled_auroc_fp_vs_tn", "pooled voxels: AUROC FP vs TN", 3),
        ("pooled_auroc_overall", "pooled voxels: AUROC overall", 3),
    )),
    ("Same errors for every map: the reference segmentation (mean over cases)", "paired_", (
        ("auroc_missed_vs_tp", "AUROC missed vs TP", 3),
        ("auroc_fp_vs_tn", "AUROC FP vs TN", 3),
        ("auroc_overall", "AUROC overall", 3),
        ("auprc_missed_vs_tp", "AUPRC missed vs TP", 3),
        ("auprc_fp_vs_tn", "AUPRC FP vs TN", 3),
        ("auprc_overall", "AUPRC overall", 3),
    )),
    ("Calibration of P(error) in the reporting region (pooled voxels)", "", (
        ("ece_calibrated", "ECE, calibrated (10 bins)", 4),
        ("brier_calibrated", "Brier, calibrated", 4),
        ("ece_raw", "ECE, raw map read as P(error)", 4),
        ("brier_raw", "Brier, raw map", 4),
        ("error_fraction_region", "error fraction", 4),
    )),
    ("Case level: predicted WT Dice of the own segmentation", "", (
        ("spearman_pred_dice", "Spearman(predicted, true Dice)", 3),
        ("mae_pred_dice", "mean |predicted - true Dice|", 3),
        ("excess_aurc", "excess AURC (AURC - oracle; lower is better)", 4),
        ("aurc", "AURC", 4),
        ("aurc_oracle", "  oracle AURC", 4),
        ("aurc_random", "  random AURC (mean 1 - Dice)", 4),
        ("dice_true_mean", "mean true Dice", 3),
        ("dice_pred_mean", "mean predicted Dice", 3),
    )),
    ("Case level: predicted WT Dice of the reference segmentation", "paired_", (
        ("spearman_pred_dice", "Spearman(predicted, true Dice)", 3),
        ("excess_aurc", "excess AURC", 4),
        ("aurc", "AURC", 4),
        ("aurc_oracle", "  oracle AURC", 4),
    )),
    ("Cost", "", (
        ("forward_passes", "forward passes per case", 0),
        ("seconds_per_case", "seconds per case", 2),
    )),
    ("Voxels scored (all held-out cases)", "", (
        ("n_cases", "cases", 0),
        ("n_missed", "missed (GT WT, not segmented)", 0),
        ("n_missed_outside_region", "  of which outside the region", 0),
        ("n_tp", "correctly segmented tumour (TP)", 0),
        ("n_fp", "false positive", 0),
        ("n_tn_region", "correct background in the region", 0),
        ("n_cases_missed_vs_tp", "cases with missed and TP voxels", 0),
        ("n_cases_fp_vs_tn", "cases with FP and TN voxels", 0),
    )),
)

READING_GUIDE = """\
**How to read this.** Rows are figures, columns the uncertainty maps; brackets hold 95 % bootstrap intervals
over cases (the same resamples for every map, so differences are paired). Voxel types: *missed* = true WT the
segmentation left out (all of them, also outside the reporting region, where a masked map is 0), *TP* = true WT
segmented, *FP* = segmented but not WT, *TN* = correct background inside the reporting region (the predicted WT
dilated by 3 voxels, where the map is reported). AUROC/AUPRC are computed per case and averaged over cases, so
every case counts once; "pooled" rows pool the voxels of all cases instead (large tumours dominate). The overall
AUROC mixes both error kinds with a large ring of correct background, so it mostly measures how low the map is on
that ring; read the split rows. "Paired" rows score every map against the errors of one and the same
segmentation (the reference model's). Calibration: each map is turned into P(error) by isotonic regression fitted
on out-of-fold validation cases (never the cases scored here); ECE (10 equal-width bins) and Brier are over the
reporting region's voxels. Raw ECE reads the map itself as P(error) and mostly reflects its scale; compare maps by
the calibrated rows: after recalibration ECE is small for any map, and the calibrated Brier score (lower is
better) is what separates an informative map from a flat one. Case level: a predicted WT Dice per case from calibrated P(error)
(2E[TP] / (2E[TP] + E[FP] + E[FN])); Spearman with the true Dice; when cases are sent to review worst-predicted
first, risk = mean (1 - Dice) of the cases kept, AURC = mean risk over coverages 1/n .. 1 (lower is better), the
oracle sorts by the true Dice, a random order gives the mean (1 - Dice); excess AURC = AURC - oracle."""


def _methods_of(flat: Mapping) -> list:
    seen = []
    for key in flat:
        if "." in key and not key.startswith(("seed", "seed_mean.", "seed_sd.")):
            method = key.split(".", 1)[0]
            if method not in seen:
                seen.append(method)
    return seen


def _cell(flat: Mapping, key: str, decimals: int) -> str:
    v = flat.get(key)
    if v is None or not np.isfinite(v):
        return "n/a" if v is not None else ""
    text = f"{v:.{decimals}f}" if decimals else f"{int(round(v))}"
    lo, hi = flat.get(f"{key}_ci_low"), flat.get(f"{key}_ci_high")
    if lo is not None and hi is not None and np.isfinite(lo) and np.isfinite(hi):
        text += f" [{lo:.{decimals}f}, {hi:.{decimals}f}]"
    return text


def render_markdown(flat: Mapping, methods: Sequence[str] | None = None,
                    title: str = "Self-assessment on held-out cases") -> str:
    """Readable tables of ``evaluate_methods(...).flat``: one column per method, 95 % intervals in brackets."""
    methods = list(methods) if methods is not None else _methods_of(flat)
    lines = [f"## {title}", ""]
    if "n_boot" in flat:
        lines += [f"{int(flat.get('ci_percent', CI_PERCENT))} % percentile bootstrap over cases, "
                  f"{int(flat['n_boot'])} resamples, seed {int(flat.get('bootstrap_seed', 0))}.", ""]
    for heading, prefix, rows in _SECTIONS:
        present = [(m, label, d) for m, label, d in rows if any(f"{x}.{prefix}{m}" in flat for x in methods)]
        if not present:
            continue
        lines += [f"### {heading}", "", "| | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        for metric, label, d in present:
            lines.append(f"| {label} | " + " | ".join(_cell(flat, f"{x}.{prefix}{metric}", d) for x in methods) + " |")
        lines.append("")
    lines += [READING_GUIDE, ""]
    return "\n".join(lines)


#: figures shown seed by seed
HEADLINE_METRICS = ("auroc_missed_vs_tp", "auroc_fp_vs_tn", "paired_auroc_missed_vs_tp", "ece_calibrated",
                    "spearman_pred_dice", "excess_aurc")


def render_seed_markdown(combined: Mapping, metrics: Sequence[str] = HEADLINE_METRICS, decimals: int = 3) -> str:
    """Seeds side by side (from ``combine_seeds``): per metric a table, methods as rows, seeds and mean +- sd."""
    seeds = sorted({k.split(".", 1)[0][4:] for k in combined if k.startswith("seed") and
                    not k.startswith(("seed_mean.", "seed_sd.")) and "." in k}, key=lambda s: (len(s), s))
    methods = _methods_of({k.split(".", 1)[1]: v for k, v in combined.items() if k.startswith("seed_mean.")})
    lines = [f"### Training seeds side by side ({len(seeds)} seeds)", ""]
    for metric in metrics:
        if not any(f"seed_mean.{m}.{metric}" in combined for m in methods):
            continue
        lines += [f"**{metric}**", "", "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean +- sd |",
                  "|---|" + "---|" * (len(seeds) + 1)]
        for m in methods:
            cells = [_cell(combined, f"seed{s}.{m}.{metric}", decimals) for s in seeds]
            mean, sd = combined.get(f"seed_mean.{m}.{metric}"), combined.get(f"seed_sd.{m}.{metric}")
            summary = "" if mean is None else (f"{mean:.{decimals}f}" + (f" +- {sd:.{decimals}f}"
                                                                          if sd is not None and np.isfinite(sd) else ""))
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {summary} |")
        lines.append("")
    return "\n".join(lines)


def _save_figure(fig, path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(path, buf.getvalue())


def render_reliability_diagram(reliability: Mapping, path, title: str = "Reliability on held-out cases") -> None:
    """PNG at ``path``: observed error fraction vs mean P(error) per ECE bin, raw map and calibrated, one line per
    method (``SelfAssessment.reliability``, keys as given). Marker area grows with the bin's voxel count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    try:
        for ax, kind in zip(axes, ("raw", "calibrated")):
            ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfect calibration")
            for name, sums in reliability.items():
                sums = np.asarray(sums[kind], dtype=np.float64)
                filled = sums[0] > 0
                if not filled.any():
                    continue
                mean_p = sums[1, filled] / sums[0, filled]
                observed = sums[2, filled] / sums[0, filled]
                size = 10 + 60 * np.sqrt(sums[0, filled] / sums[0, filled].max())
                line, = ax.plot(mean_p, observed, lw=1.2, label=name)
                ax.scatter(mean_p, observed, s=size, color=line.get_color(), alpha=0.8)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.set_xlabel("mean P(error) in bin")
            ax.set_ylabel("observed error fraction")
            ax.set_title("raw map read as P(error)" if kind == "raw" else "isotonic, fitted out of fold")
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=8)
        fig.suptitle(title)
        fig.tight_layout()
        _save_figure(fig, path)
    finally:
        plt.close(fig)


def render_risk_coverage(curves: Mapping, path, title: str = "Cases sent to review worst-predicted first") -> None:
    """PNG at ``path``: risk (mean 1 - Dice of kept cases) vs coverage per method, with the oracle and random
    levels of the first curve (``SelfAssessment.risk_coverage``). Pass the ``.paired`` curves to compare maps on one
    segmentation: they share the oracle; curves of different segmentations each have their own."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 5))
    try:
        for i, (name, c) in enumerate(curves.items()):
            ax.plot(c["coverage"], c["risk"], marker=".", ms=3, label=name)
            if i == 0:
                ax.plot(c["coverage"], c["risk_oracle"], color="k", ls=":", label=f"oracle ({name})")
                ax.axhline(c["risk_random"], color="0.6", ls="--", label=f"random ({name})")
        ax.set_xlabel("coverage (fraction of cases kept without review)")
        ax.set_ylabel("risk (mean 1 - WT Dice of kept cases)")
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(title)
        fig.tight_layout()
        _save_figure(fig, path)
    finally:
        plt.close(fig)
