"""How well an uncertainty map predicts segmentation errors: AUROC, Spearman, ECE and the QU-BraTS score.

All maps and error masks are numpy arrays ``(X, Y, Z)``; a region of interest restricts the voxels scored.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata, spearmanr

from custom.core.constants import REGIONS
from custom.evaluation.segmentation import LESION_DILATION, STRUCTURE_26, check_pair, dilate, region_mask


def _flat_pair(scores, labels, roi=None):
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.shape != labels.shape:
        raise ValueError(f"scores shape {scores.shape} differs from labels shape {labels.shape}")
    if roi is not None:
        roi = np.asarray(roi, dtype=bool)
        if roi.shape != scores.shape:
            raise ValueError(f"roi shape {roi.shape} differs from scores shape {scores.shape}")
        scores, labels = scores[roi], labels[roi]
    scores, labels = scores.ravel(), labels.ravel()
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores hold NaN or infinite values")
    return scores, labels


def auroc(scores, labels, roi=None) -> float:
    """Area under the ROC curve of ``scores`` for detecting ``labels`` (bool), rank-based (Mann-Whitney U).

    Ties get average ranks (a tie between a positive and a negative counts 1/2). NaN when ``labels``
    holds only one class inside ``roi``.
    """
    scores, labels = _flat_pair(scores, labels, roi)
    labels = labels.astype(bool)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)  # average ranks for ties
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def spearman(x, y, roi=None) -> float:
    """Spearman rank correlation of two maps (inside ``roi``); NaN when either is constant."""
    x, y = _flat_pair(x, y, roi)
    y = y.astype(np.float64)
    if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")
    return float(spearmanr(x, y).statistic)


def expected_calibration_error(prob_error, errors, roi=None, n_bins: int = 10) -> float:
    """Expected calibration error of ``prob_error`` (in [0, 1]) read as the probability of ``errors``.

    Equal-width bins over [0, 1] (the last bin includes 1.0);
    ``ECE = sum_b (n_b / N) * |mean(prob_error in b) - fraction of errors in b|``. NaN for no voxel.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    p, e = _flat_pair(prob_error, errors, roi)
    if p.size == 0:
        return float("nan")
    if p.min() < 0 or p.max() > 1:
        raise ValueError(f"prob_error must lie in [0, 1], got range [{p.min():.4g}, {p.max():.4g}]")
    e = e.astype(np.float64)
    bins = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    sum_p = np.bincount(bins, weights=p, minlength=n_bins)
    sum_e = np.bincount(bins, weights=e, minlength=n_bins)
    nz = counts > 0
    return float(np.sum(np.abs(sum_p[nz] - sum_e[nz])) / p.size)


def _count_below(values: np.ndarray, ascending: np.ndarray) -> np.ndarray:
    """``np.searchsorted(ascending, values, side="left")`` for evenly spaced ``ascending``, in O(1) per voxel.

    The arithmetic guess ``ceil((v - a_0) / step)`` can be off by one at a boundary through rounding; the two
    comparisons below put it back on the exact definition (number of thresholds strictly below v).
    """
    n = ascending.size
    step = (ascending[-1] - ascending[0]) / (n - 1)
    idx = np.clip(np.ceil((values - ascending[0]) / step), 0, n).astype(np.int64)
    lower = np.maximum(idx - 1, 0)
    idx = np.where((idx > 0) & (values <= ascending[lower]), idx - 1, idx)
    upper = np.minimum(idx, n - 1)
    idx = np.where((idx < n) & (values > ascending[upper]), idx + 1, idx)
    return idx


def qubrats_score(
    unc,
    pred: np.ndarray,
    gt: np.ndarray,
    brain_mask=None,
    num_thresholds: int = 41,
) -> dict:
    """QU-BraTS uncertainty score of one region (BraTS 2020 uncertainty challenge).

    Args:
        unc: uncertainty ``(X, Y, Z)`` in [0, 100] (100 = most uncertain).
        pred, gt: binary masks of the region ``(X, Y, Z)``.
        brain_mask: voxels counted as true negatives (default: all voxels).
        num_thresholds: thresholds ``t`` from 100 down to 0, evenly spaced.

    For each ``t`` voxels with ``unc > t`` are filtered out; on the rest: Dice (both empty -> 1),
    the filtered-TP ratio ``(TP_100 - TP_t) / TP_100`` and filtered-TN ratio (inside the brain mask;
    a ratio with a zero denominator is 0). The AUC of each curve over t/100 in [0, 1] (trapezoid);
    ``score = (AUC_dice + (1 - AUC_ftp) + (1 - AUC_ftn)) / 3``.
    Returns ``{"score", "auc_dice", "auc_ftp", "auc_ftn"}``.
    """
    unc = np.asarray(unc, dtype=np.float64)
    pred, gt, _ = check_pair(pred, gt)
    if unc.shape != gt.shape:
        raise ValueError(f"uncertainty shape {unc.shape} differs from mask shape {gt.shape}")
    if not np.all(np.isfinite(unc)) or unc.min() < 0 or unc.max() > 100:
        raise ValueError("QU-BraTS uncertainty must be finite and lie in [0, 100]")
    if num_thresholds < 2:
        raise ValueError(f"num_thresholds must be >= 2, got {num_thresholds}")
    brain = np.ones_like(gt) if brain_mask is None else np.asarray(brain_mask, dtype=bool)
    thresholds = np.linspace(100.0, 0.0, num_thresholds)

    # a voxel is kept at threshold t iff unc <= t: with ascending thresholds a_j it is kept for every
    # j >= (number of thresholds below unc), so each count is a cumulative histogram of that index
    ascending = thresholds[::-1]
    first_kept = _count_below(unc, ascending)

    def kept_counts(mask):
        hist = np.bincount(first_kept[mask], minlength=num_thresholds + 1)[:num_thresholds]
        return np.cumsum(hist)[::-1].astype(np.float64)

    tp_t = kept_counts(pred & gt)
    p_t = kept_counts(pred)
    g_t = kept_counts(gt)
    tn_t = kept_counts(~pred & ~gt & brain)
    denom = p_t + g_t
    dice_t = np.where(denom > 0, 2 * tp_t / np.maximum(denom, 1), 1.0)
    tp0, tn0 = tp_t[0], tn_t[0]
    ftp_t = (tp0 - tp_t) / tp0 if tp0 > 0 else np.zeros_like(tp_t)
    ftn_t = (tn0 - tn_t) / tn0 if tn0 > 0 else np.zeros_like(tn_t)
    x = thresholds[::-1] / 100.0

    def auc(y):
        y = y[::-1]
        return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0)

    a_d, a_tp, a_tn = auc(dice_t), auc(ftp_t), auc(ftn_t)
    return {"score": (a_d + (1 - a_tp) + (1 - a_tn)) / 3.0, "auc_dice": a_d, "auc_ftp": a_tp, "auc_ftn": a_tn}


def wt_error_roi(pred_wt: np.ndarray, gt_wt: np.ndarray, dilation: int = LESION_DILATION) -> np.ndarray:
    """Region where WT errors are scored: the union of predicted and true WT dilated (26-neighbourhood).

    Not a BraTS 2023 definition (that one dilates lesions with the 18-neighbourhood): a region for
    the held-out uncertainty measures only.
    """
    return dilate(np.logical_or(pred_wt, gt_wt), dilation, STRUCTURE_26)


def uncertainty_quality(
    unc: np.ndarray,
    pred_labels: np.ndarray,
    gt_labels: np.ndarray,
    brain_mask=None,
    unc_max: float = 1.0,
    dilation: int = LESION_DILATION,
    n_bins: int = 10,
    num_thresholds: int = 41,
) -> dict:
    """How well an uncertainty map ``(X, Y, Z)`` in [0, unc_max] predicts where a segmentation is wrong.

    WT errors (``pred WT xor gt WT``) are scored inside the dilated union of predicted and true WT:
    ``auroc_wt_error``, ``spearman_wt_error``, ``ece_wt_error`` (unc / unc_max read as P(error)),
    plus ``error_fraction_wt`` and, per region R, ``qubrats_<R>`` (unc scaled to [0, 100]).
    """
    unc = np.asarray(unc, dtype=np.float64)
    if unc.shape != np.shape(gt_labels):
        raise ValueError(f"uncertainty shape {unc.shape} differs from label shape {np.shape(gt_labels)}")
    if unc_max <= 0:
        raise ValueError(f"unc_max must be > 0, got {unc_max}")
    if not np.all(np.isfinite(unc)):
        raise ValueError("uncertainty holds NaN or infinite values")
    if unc.min() < 0 or unc.max() > unc_max * (1 + 1e-6):
        raise ValueError(f"uncertainty must lie in [0, {unc_max}], got range [{unc.min():.4g}, {unc.max():.4g}]")
    prob = np.clip(unc / unc_max, 0.0, 1.0)
    p_wt, g_wt = region_mask(pred_labels, "WT"), region_mask(gt_labels, "WT")
    err = p_wt ^ g_wt
    roi = wt_error_roi(p_wt, g_wt, dilation)
    out = {
        "auroc_wt_error": auroc(prob, err, roi),
        "spearman_wt_error": spearman(prob, err, roi),
        "ece_wt_error": expected_calibration_error(prob, err, roi, n_bins=n_bins),
        "error_fraction_wt": float(err[roi].mean()) if roi.any() else float("nan"),
    }
    for r in REGIONS:
        q = qubrats_score(prob * 100.0, region_mask(pred_labels, r), region_mask(gt_labels, r),
                          brain_mask=brain_mask, num_thresholds=num_thresholds)
        out[f"qubrats_{r}"] = q["score"]
    return out
