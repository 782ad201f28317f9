"""Segmentation and uncertainty evaluation: legacy and BraTS 2023 lesion-wise Dice/HD95, AUROC,
Spearman, expected calibration error and the QU-BraTS uncertainty score.

Definitions follow ``shared/brief/EVALUATION.md``:

- legacy (whole-volume) Dice and HD95 per region; both empty -> Dice 1, HD95 0; exactly one
  empty -> Dice 0, HD95 ``MAX_HD95_MM`` (374 mm, the diagonal of the 240x240x155 1 mm volume);
- BraTS 2023 GLI lesion-wise Dice/HD95: 26-connected components, ground truth dilated 3 iterations
  with the 26-neighbourhood, ground-truth components inside one dilated component merged into one
  lesion, each lesion scored against the union of predicted components touching its dilated mask,
  predicted components touching no lesion are false positives (Dice 0, HD95 374), lesions of
  ``<= 50`` voxels dropped, lesion-wise score = sum over lesions / (num lesions + num FP);
- uncertainty measures read an uncertainty map against a binary error map.

Everything is numpy/scipy only. Arrays are spatial ``(X, Y, Z)`` in NIfTI voxel order, spacing in
mm ``(sx, sy, sz)``.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Sequence

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata, spearmanr

from custom.constants import REGION_LABELS, REGIONS

__all__ = [
    "MAX_HD95_MM",
    "STRUCTURE_26",
    "region_mask",
    "region_masks",
    "dice",
    "hd95",
    "legacy_metrics",
    "lesionwise_metrics",
    "evaluate_segmentation",
    "dilate",
    "auroc",
    "spearman",
    "expected_calibration_error",
    "qubrats_score",
    "uncertainty_quality",
    "wt_error_roi",
    "nanmean",
    "to_json_safe",
    "find_ground_truth",
    "match_prediction_files",
    "evaluate_case_files",
    "summarize_rows",
    "write_rows_csv",
    "evaluate_folder",
    "official_crosscheck",
    "read_metrics_csv",
    "last_k_summary",
    "run_status",
    "collect_runs",
    "fold_average",
    "render_quality_vs_cost",
]

#: penalty HD95 of a missed/false-positive structure (the BraTS 2023 ranking code's value)
MAX_HD95_MM = 374.0
#: 3x3x3 neighbourhood: 26-connectivity for labelling and dilation
STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)
#: ground-truth lesions with this many voxels or fewer are dropped (BraTS 2023 GLI)
LESION_VOLUME_THRESHOLD = 50
#: dilation iterations used to merge ground-truth components and to find touching predictions
LESION_DILATION = 3


def region_mask(labels: np.ndarray, region: str) -> np.ndarray:
    """Binary mask ``(X, Y, Z)`` of one region (``WT``, ``TC`` or ``ET``) of a label map."""
    if region not in REGION_LABELS:
        raise ValueError(f"unknown region {region!r}; expected one of {REGIONS}")
    return np.isin(labels, REGION_LABELS[region])


def region_masks(labels: np.ndarray) -> dict:
    """``{"WT", "TC", "ET"} -> bool (X, Y, Z)`` masks of a label map with values 0..3."""
    return {r: region_mask(labels, r) for r in REGIONS}


def _check_pair(pred: np.ndarray, gt: np.ndarray, spacing=None):
    pred = np.asarray(pred).astype(bool, copy=False)
    gt = np.asarray(gt).astype(bool, copy=False)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}")
    if spacing is None:
        spacing = (1.0,) * gt.ndim
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != gt.ndim or any(not np.isfinite(s) or s <= 0 for s in spacing):
        raise ValueError(f"spacing must hold {gt.ndim} positive finite values in mm, got {spacing}")
    return pred, gt, spacing


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two binary masks; both empty -> 1.0."""
    pred, gt, _ = _check_pair(pred, gt)
    denom = int(pred.sum()) + int(gt.sum())
    if denom == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, gt).sum()) / denom


def _bbox(mask: np.ndarray, margin: int = 1):
    """Slices of the bounding box of ``mask`` grown by ``margin`` (clipped), or None if empty."""
    if not mask.any():
        return None
    slices = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        nz = np.nonzero(mask.any(axis=other))[0]
        slices.append(slice(max(int(nz[0]) - margin, 0), min(int(nz[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(slices)


def _surface(mask: np.ndarray) -> np.ndarray:
    # 6-neighbourhood erosion: the one-voxel border medpy, MONAI and panoptica use; voxels on the
    # array edge count as border (outside is background).
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1),
                                          border_value=0)


def hd95(pred: np.ndarray, gt: np.ndarray, spacing=None, pooled: bool = False) -> float:
    """95th-percentile Hausdorff distance in mm between the borders of two binary masks.

    Default: ``max(P95(d(pred border -> gt border)), P95(d(gt border -> pred border)))`` (the robust
    Hausdorff of the BraTS ranking code). ``pooled=True``: the 95th percentile of both directions'
    distances pooled together (panoptica's definition, used for the cross-check).
    Both empty -> 0; one empty -> ``MAX_HD95_MM``.
    """
    pred, gt, spacing = _check_pair(pred, gt, spacing)
    has_p, has_g = bool(pred.any()), bool(gt.any())
    if not has_p and not has_g:
        return 0.0
    if has_p != has_g:
        return MAX_HD95_MM
    # distances to the nearest border voxel only need the box holding both masks (+1 for the border)
    box = _bbox(pred | gt, margin=1)
    pred, gt = pred[box], gt[box]
    bp, bg = _surface(pred), _surface(gt)
    d_pg = ndimage.distance_transform_edt(~bg, sampling=spacing)[bp]
    d_gp = ndimage.distance_transform_edt(~bp, sampling=spacing)[bg]
    if pooled:
        return float(np.percentile(np.concatenate([d_pg, d_gp]), 95))
    return float(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)))


def legacy_metrics(pred_labels: np.ndarray, gt_labels: np.ndarray, spacing=None) -> dict:
    """Whole-volume Dice and HD95 per region: ``{region: {"legacy_dice", "legacy_hd95"}}``."""
    out = {}
    for r in REGIONS:
        p, g = region_mask(pred_labels, r), region_mask(gt_labels, r)
        out[r] = {"legacy_dice": dice(p, g), "legacy_hd95": hd95(p, g, spacing)}
    return out


def dilate(mask: np.ndarray, iterations: int = LESION_DILATION) -> np.ndarray:
    """Binary dilation with the 26-neighbourhood (3x3x3 cube), ``iterations`` times."""
    mask = np.asarray(mask, dtype=bool)
    if iterations <= 0 or not mask.any():
        return mask.copy()
    return ndimage.binary_dilation(mask, structure=STRUCTURE_26, iterations=int(iterations))


def lesionwise_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing=None,
    dilation: int = LESION_DILATION,
    volume_threshold: int = LESION_VOLUME_THRESHOLD,
) -> dict:
    """BraTS 2023 GLI lesion-wise Dice and HD95 of one region (binary masks ``(X, Y, Z)``).

    Returns ``{"lesionwise_dice", "lesionwise_hd95", "num_tp", "num_fp", "num_fn", "lesions"}`` where
    ``lesions`` lists ``{"volume_voxels", "dice", "hd95", "num_pred_components"}`` of the kept lesions.
    ``num_tp``: kept lesions touched by at least one predicted component; ``num_fn``: kept lesions
    touched by none; ``num_fp``: predicted components touching no ground-truth lesion (dropped small
    lesions included, as in the ranking code, so a prediction of a small lesion is not a false positive).
    If no lesion is kept and there is no false positive the region counts as both-empty (Dice 1, HD95 0).
    """
    pred, gt, spacing = _check_pair(pred, gt, spacing)
    # everything happens within `dilation` voxels of either mask: work on that box only
    box = _bbox(pred | gt, margin=dilation + 1)
    if box is not None:
        pred, gt = pred[box], gt[box]
    pred_cc, n_pred = ndimage.label(pred, structure=STRUCTURE_26)
    dil_cc, n_dil = ndimage.label(dilate(gt, dilation), structure=STRUCTURE_26)

    # which predicted components touch which dilated lesion: unique (lesion, component) pairs
    both = (dil_cc > 0) & (pred_cc > 0)
    pairs = np.unique(np.stack([dil_cc[both], pred_cc[both]]), axis=1) if both.any() else np.zeros((2, 0), int)
    touching = {k: pairs[1, pairs[0] == k] for k in range(1, n_dil + 1)}
    matched_components = set(pairs[1].tolist())

    # lesion k = ground truth inside dilated component k (GT components merged by the dilation)
    lesion_ids = np.where(gt, dil_cc, 0)
    volumes = np.bincount(lesion_ids.ravel(), minlength=n_dil + 1)
    boxes = ndimage.find_objects(dil_cc)
    pred_boxes = ndimage.find_objects(pred_cc)

    lesions = []
    for k in range(1, n_dil + 1):
        if volumes[k] <= volume_threshold:
            continue
        comps = touching[k]
        box = boxes[k - 1]
        if comps.size:
            # the union of touching components may reach outside the dilated lesion's box
            sl = [box] + [pred_boxes[c - 1] for c in comps]
            box = tuple(slice(min(s[a].start for s in sl), max(s[a].stop for s in sl)) for a in range(gt.ndim))
        g = lesion_ids[box] == k
        p = np.isin(pred_cc[box], comps) if comps.size else np.zeros_like(g)
        lesions.append({
            "volume_voxels": int(volumes[k]),
            "dice": dice(p, g),
            "hd95": hd95(p, g, spacing),
            "num_pred_components": int(comps.size),
        })

    num_fp = int(n_pred - len(matched_components))
    num_tp = sum(1 for les in lesions if les["num_pred_components"] > 0)
    num_fn = len(lesions) - num_tp
    denom = len(lesions) + num_fp
    if denom == 0:
        lw_dice, lw_hd95 = 1.0, 0.0
    else:
        lw_dice = sum(les["dice"] for les in lesions) / denom
        lw_hd95 = (sum(les["hd95"] for les in lesions) + MAX_HD95_MM * num_fp) / denom
    return {"lesionwise_dice": float(lw_dice), "lesionwise_hd95": float(lw_hd95),
            "num_tp": int(num_tp), "num_fp": num_fp, "num_fn": int(num_fn), "lesions": lesions}


def evaluate_segmentation(pred_labels: np.ndarray, gt_labels: np.ndarray, spacing=None) -> dict:
    """Legacy and lesion-wise metrics of a label map against ground truth, per region.

    Returns ``{region: {"legacy_dice", "legacy_hd95", "lesionwise_dice", "lesionwise_hd95",
    "num_tp", "num_fp", "num_fn"}}`` for WT, TC, ET.
    """
    pred_labels = np.asarray(pred_labels)
    gt_labels = np.asarray(gt_labels)
    if pred_labels.shape != gt_labels.shape:
        raise ValueError(f"prediction shape {pred_labels.shape} differs from ground-truth shape {gt_labels.shape}")
    out = {}
    for r in REGIONS:
        p, g = region_mask(pred_labels, r), region_mask(gt_labels, r)
        lw = lesionwise_metrics(p, g, spacing)
        out[r] = {"legacy_dice": dice(p, g), "legacy_hd95": hd95(p, g, spacing),
                  **{k: v for k, v in lw.items() if k != "lesions"}}
    return out


# ---------------------------------------------------------------------------------------------
# uncertainty measures
# ---------------------------------------------------------------------------------------------

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
    pred, gt, _ = _check_pair(pred, gt)
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
    """Region where WT errors are scored: the union of predicted and true WT dilated (26-neighbourhood)."""
    return dilate(np.logical_or(pred_wt, gt_wt), dilation)


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


def nanmean(values: Sequence[float]) -> float:
    """Mean ignoring NaN; NaN (not a warning) when nothing is finite."""
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else float("nan")


# ---------------------------------------------------------------------------------------------
# folders of NIfTI files: predictions (+ uncertainty) against a BraTS dataset folder
# ---------------------------------------------------------------------------------------------

#: per_case.csv columns (issue 8), then the uncertainty columns when an uncertainty folder is given
SEG_COLUMNS = ("case_id", "region", "legacy_dice", "legacy_hd95", "lesionwise_dice", "lesionwise_hd95",
               "num_tp", "num_fp", "num_fn")
UNC_COLUMNS = ("auroc_wt_error", "spearman_wt_error", "ece_wt_error", "error_fraction_wt", "qubrats")
#: uncertainty measures that describe WT errors: written on the WT row only
WT_ONLY_UNC = ("auroc_wt_error", "spearman_wt_error", "ece_wt_error", "error_fraction_wt")


def find_ground_truth(gt_dir) -> dict:
    """``case_id -> seg path`` of a BraTS dataset folder (``G/<id>/<id>-seg.nii.gz`` or ``G/<id>-seg.nii.gz``)."""
    from pathlib import Path

    from custom.errors import BraTSInputError

    gt_dir = Path(gt_dir)
    if not gt_dir.is_dir():
        raise BraTSInputError(f"{gt_dir}: ground-truth folder does not exist")
    found = {}
    for p in sorted(gt_dir.glob("*-seg.nii.gz")) + sorted(gt_dir.glob("*/*-seg.nii.gz")):
        found.setdefault(p.name[: -len("-seg.nii.gz")], p)
    if not found:
        raise BraTSInputError(f"{gt_dir}: no '<case_id>-seg.nii.gz' file in it or in its case folders")
    return found


def match_prediction_files(pred_dir, gt_dir, unc_dir=None, case_ids=None) -> list:
    """Pair every ground-truth case with ``P/<id>.nii.gz`` (and ``U/<id>-unc.nii.gz``), checking headers.

    Returns a list of dicts ``{"case_id", "pred", "gt", "unc" (or None), "images"}`` (``images``: the
    modality files beside the seg, for the brain mask). Raises ``BraTSInputError`` naming every missing,
    extra, unreadable or mismatched (shape/affine) file, so nothing is skipped silently.
    ``case_ids`` restricts the ground truth to those cases (each must exist).
    """
    from pathlib import Path

    import nibabel as nib

    from custom.constants import MODALITIES
    from custom.errors import BraTSInputError

    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise BraTSInputError(f"{pred_dir}: prediction folder does not exist")
    if unc_dir is not None and not Path(unc_dir).is_dir():
        raise BraTSInputError(f"{unc_dir}: uncertainty folder does not exist")
    gts = find_ground_truth(gt_dir)
    problems = []
    if case_ids is not None:
        case_ids = list(case_ids)
        problems += [f"{gt_dir}: no ground truth '{c}-seg.nii.gz' for requested case {c}" for c in case_ids if c not in gts]
        gts = {c: gts[c] for c in case_ids if c in gts}
    preds = {p.name[: -len(".nii.gz")]: p for p in pred_dir.glob("*.nii.gz") if not p.name.endswith("-unc.nii.gz")}
    for c in sorted(set(gts) - set(preds)):
        problems.append(f"{pred_dir / (c + '.nii.gz')}: prediction missing for ground-truth case {c} ({gts[c]})")
    if case_ids is None:
        for c in sorted(set(preds) - set(gts)):
            problems.append(f"{preds[c]}: prediction has no ground truth '{c}-seg.nii.gz' in {gt_dir}")

    pairs = []
    for c in sorted(set(gts) & set(preds)):
        item = {"case_id": c, "pred": preds[c], "gt": gts[c], "unc": None,
                "images": [p for p in (gts[c].with_name(f"{c}-{m}.nii.gz") for m in MODALITIES) if p.exists()]}
        headers = {}
        for key in ("gt", "pred"):
            try:
                headers[key] = nib.load(str(item[key]))
            except Exception as exc:  # nibabel raises many types for corrupt files
                problems.append(f"{item[key]}: cannot be read as NIfTI ({type(exc).__name__}: {exc})")
        if unc_dir is not None:
            u = Path(unc_dir) / f"{c}-unc.nii.gz"
            if not u.exists():
                problems.append(f"{u}: uncertainty map missing for case {c}")
            else:
                item["unc"] = u
                try:
                    headers["unc"] = nib.load(str(u))
                except Exception as exc:
                    problems.append(f"{u}: cannot be read as NIfTI ({type(exc).__name__}: {exc})")
        if "gt" in headers:
            g = headers["gt"]
            for key in ("pred", "unc"):
                if key not in headers:
                    continue
                h = headers[key]
                if tuple(h.shape) != tuple(g.shape):
                    problems.append(f"{item[key]}: shape {tuple(h.shape)} differs from ground truth "
                                    f"{item['gt']} shape {tuple(g.shape)}")
                elif not np.allclose(h.affine, g.affine, atol=1e-3):
                    problems.append(f"{item[key]}: affine differs from ground truth {item['gt']}")
        pairs.append(item)
    if problems:
        raise BraTSInputError(problems, header="cannot evaluate these predictions")
    return pairs


def _load_labels(path) -> np.ndarray:
    import nibabel as nib

    from custom.errors import BraTSInputError

    data = np.asanyarray(nib.load(str(path)).dataobj)
    if data.ndim != 3:
        raise BraTSInputError(f"{path}: label map must be 3-D, got shape {data.shape}")
    if not np.all(np.isfinite(data)) or not np.all(np.isin(data, (0, 1, 2, 3))):
        bad = np.unique(data[~np.isin(data, (0, 1, 2, 3))])[:10]
        raise BraTSInputError(f"{path}: label values must be 0, 1, 2 or 3, found {bad.tolist()}")
    return data.astype(np.uint8)


def evaluate_case_files(item: dict, unc_max: float = 1.0) -> list:
    """Rows (one per region, columns ``SEG_COLUMNS`` [+ ``UNC_COLUMNS``]) of one matched case."""
    import nibabel as nib

    from custom.errors import BraTSInputError

    gt_img = nib.load(str(item["gt"]))
    spacing = tuple(float(s) for s in gt_img.header.get_zooms()[:3])
    gt = _load_labels(item["gt"])
    pred = _load_labels(item["pred"])
    seg = evaluate_segmentation(pred, gt, spacing)
    unc_metrics = None
    if item.get("unc") is not None:
        unc = np.asanyarray(nib.load(str(item["unc"])).dataobj).astype(np.float64)
        if not np.all(np.isfinite(unc)):
            raise BraTSInputError(f"{item['unc']}: uncertainty holds NaN or infinite values")
        if unc.min() < 0 or unc.max() > unc_max * (1 + 1e-6):
            raise BraTSInputError(f"{item['unc']}: uncertainty must lie in [0, {unc_max}] "
                                  f"(set unc_max), got [{unc.min():.4g}, {unc.max():.4g}]")
        brain = None
        if item.get("images"):
            brain = np.zeros(gt.shape, dtype=bool)
            for p in item["images"]:
                brain |= np.asanyarray(nib.load(str(p)).dataobj) != 0
        unc_metrics = uncertainty_quality(unc, pred, gt, brain_mask=brain, unc_max=unc_max)
    rows = []
    for r in REGIONS:
        row = {"case_id": item["case_id"], "region": r, **seg[r]}
        if unc_metrics is not None:
            for k in WT_ONLY_UNC:
                row[k] = unc_metrics[k] if r == "WT" else float("nan")
            row["qubrats"] = unc_metrics[f"qubrats_{r}"]
        rows.append(row)
    return rows


def summarize_rows(rows: list) -> dict:
    """Means per region and over regions of every numeric column of per-case rows (NaN ignored)."""
    if not rows:
        return {"num_cases": 0, "regions": {}, "mean_over_regions": {}}
    cols = [k for k in rows[0] if k not in ("case_id", "region")]
    regions = {}
    for r in REGIONS:
        rr = [row for row in rows if row["region"] == r]
        regions[r] = {c: nanmean([row.get(c) for row in rr]) for c in cols}
    over = {c: nanmean([regions[r][c] for r in REGIONS]) for c in cols}
    return {"num_cases": len({row["case_id"] for row in rows}), "regions": regions, "mean_over_regions": over}


def write_rows_csv(path, rows: list, columns=None) -> None:
    """Write rows as CSV atomically (NaN written as an empty cell)."""
    import csv
    import io

    from custom.io_utils import atomic_write_bytes

    columns = list(columns or (rows[0].keys() if rows else SEG_COLUMNS))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: ("" if isinstance(v, float) and not np.isfinite(v) else v) for k, v in row.items()})
    atomic_write_bytes(path, buf.getvalue().encode())


def to_json_safe(obj):
    """Recursively convert numpy scalars to Python and non-finite floats to None (valid JSON)."""
    if isinstance(obj, dict):
        return {str(k): to_json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def evaluate_folder(pred_dir, gt_dir, out_dir, unc_dir=None, case_ids=None, unc_max: float = 1.0,
                    crosscheck: bool = False) -> dict:
    """Evaluate ``P/<id>.nii.gz`` (and ``U/<id>-unc.nii.gz``) against ``G``; write ``R/per_case.csv``
    and ``R/summary.json`` (atomically, only once every case has been evaluated); with ``crosscheck``
    also ``R/crosscheck.csv`` and the agreement in the summary. Returns the summary.
    """
    from pathlib import Path

    from custom.io_utils import atomic_write_json

    pairs = match_prediction_files(pred_dir, gt_dir, unc_dir, case_ids)
    rows = []
    for item in pairs:
        rows.extend(evaluate_case_files(item, unc_max=unc_max))
    columns = list(SEG_COLUMNS) + (list(UNC_COLUMNS) if unc_dir is not None else [])
    summary = summarize_rows(rows)
    summary.update({"pred_dir": str(pred_dir), "gt_dir": str(gt_dir),
                    "unc_dir": None if unc_dir is None else str(unc_dir)})
    out_dir = Path(out_dir)
    if crosscheck:
        cc = official_crosscheck([(p["case_id"], p["pred"], p["gt"]) for p in pairs])
        if cc["rows"]:
            write_rows_csv(out_dir / "crosscheck.csv", cc["rows"])
        summary["crosscheck"] = cc["agreement"]
    write_rows_csv(out_dir / "per_case.csv", rows, columns)
    atomic_write_json(out_dir / "summary.json", to_json_safe(summary))
    return summary


# ---------------------------------------------------------------------------------------------
# cross-check against the organisers' PyPI evaluator (brats_evaluation / panoptica)
# ---------------------------------------------------------------------------------------------

#: tolerances for "agree": Dice is a ratio of counts (exact); HD95 percentiles of the same distances
DICE_TOL = 1e-6
HD95_TOL_MM = 1e-3


@contextlib.contextmanager
def _quiet():
    # panoptica prints banners and config notes on stdout/warnings; keep the CLI summary readable
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def official_crosscheck(cases) -> dict:
    """Run ``brats_evaluation`` (panoptica, GLI config) on the same files and compare where the
    definitions coincide.

    Args:
        cases: ``[(case_id, pred_path, gt_path)]``.

    Coinciding definitions compared (per case and region): legacy Dice vs panoptica ``global_bin_dsc``
    (skipped for empty-vs-empty, NaN there), our HD95 with ``pooled=True`` vs ``global_bin_hd95``
    (both non-empty), and, when every kept lesion is one ground-truth component matched by exactly one
    predicted component and nothing is dropped or false-positive (panoptica neither dilates nor drops
    small lesions), lesion counts and the mean Dice of matched lesions vs ``tp`` and ``sq_dsc``.
    Returns ``{"available": bool, "rows": [...], "agreement": {...}}``; never raises for a broken
    or missing package (``available`` False and ``error`` instead).
    """
    import nibabel as nib

    try:
        from brats_evaluation import config_path, evaluate_single_exam
        from panoptica import Panoptica_Evaluator

        with _quiet():
            evaluator = Panoptica_Evaluator.load_from_config(str(config_path("gli")))
    except Exception as exc:  # an optional, independent tool: report why it could not run
        return {"available": False, "rows": [], "agreement": {"available": False, "error": f"{type(exc).__name__}: {exc}"}}

    rows = []
    for case_id, pred_path, gt_path in cases:
        with _quiet():
            off = evaluate_single_exam(str(pred_path), str(gt_path), case_id, evaluator)
        if "error" in off:
            rows.append({"case_id": case_id, "region": "", "official_error": off["error"]})
            continue
        gt_img = nib.load(str(gt_path))
        spacing = tuple(float(s) for s in gt_img.header.get_zooms()[:3])
        gt = _load_labels(gt_path)
        pred = _load_labels(pred_path)
        for r in REGIONS:
            o = off.get(r.lower(), {})
            p, g = region_mask(pred, r), region_mask(gt, r)
            ours = dice(p, g)
            ours_hd = hd95(p, g, spacing, pooled=True)
            lw = lesionwise_metrics(p, g, spacing)
            off_dsc = o.get("global_bin_dsc", float("nan"))
            off_hd = o.get("global_bin_hd95", float("nan"))
            both_nonempty = bool(p.any() and g.any())
            _, n_gt_cc = ndimage.label(g, structure=STRUCTURE_26)
            simple = (lw["num_fp"] == 0 and lw["num_fn"] == 0 and n_gt_cc == len(lw["lesions"]) > 0
                      and all(les["num_pred_components"] == 1 for les in lw["lesions"]))
            matched = [les["dice"] for les in lw["lesions"] if les["num_pred_components"] > 0]
            ours_matched = float(np.mean(matched)) if matched else float("nan")
            row = {
                "case_id": case_id, "region": r,
                "ours_legacy_dice": ours, "official_global_dsc": off_dsc,
                "legacy_dice_agree": (abs(ours - off_dsc) <= DICE_TOL) if np.isfinite(off_dsc) else "",
                "ours_hd95_pooled": ours_hd if both_nonempty else float("nan"),
                "official_global_hd95": off_hd if both_nonempty and np.isfinite(off_hd) else float("nan"),
                "hd95_agree": (abs(ours_hd - off_hd) <= HD95_TOL_MM) if both_nonempty and np.isfinite(off_hd) else "",
                "ours_num_tp": lw["num_tp"], "official_tp": o.get("tp"),
                "ours_matched_lesion_dice": ours_matched, "official_sq_dsc": o.get("sq_dsc", float("nan")),
                "lesions_comparable": simple,
                "lesions_agree": (simple and o.get("tp") == lw["num_tp"]
                                  and abs(ours_matched - o.get("sq_dsc", np.nan)) <= DICE_TOL) if simple else "",
            }
            rows.append(row)

    def frac(key):
        vals = [r[key] for r in rows if isinstance(r.get(key), (bool, np.bool_))]
        return {"compared": len(vals), "agree": int(sum(vals)),
                "max_abs_diff": None}

    agreement = {"available": True, "tool": "brats_evaluation (panoptica, config_gli)"}
    for key, a, b in (("legacy_dice_agree", "ours_legacy_dice", "official_global_dsc"),
                      ("hd95_agree", "ours_hd95_pooled", "official_global_hd95"),
                      ("lesions_agree", "ours_matched_lesion_dice", "official_sq_dsc")):
        stat = frac(key)
        diffs = [abs(r[a] - r[b]) for r in rows if isinstance(r.get(key), (bool, np.bool_))
                 and np.isfinite(r[a]) and np.isfinite(r[b])]
        stat["max_abs_diff"] = float(max(diffs)) if diffs else None
        agreement[key[: -len("_agree")]] = stat
    agreement["errors"] = [r for r in rows if "official_error" in r]
    return {"available": True, "rows": [r for r in rows if "official_error" not in r], "agreement": agreement}


# ---------------------------------------------------------------------------------------------
# the paper's protocol over training runs: W/runs/<variant>/fold<k>/metrics.csv
# ---------------------------------------------------------------------------------------------

#: metrics.csv validation columns (DESIGN.md) summarised by the report
DICE_COLUMNS = ("val_dice_wt", "val_dice_tc", "val_dice_et", "val_dice_mean")
UNC_METRIC_COLUMNS = ("val_rmsd_unc", "val_corr_unc", "val_rmsd_variance_stable", "val_corr_variance_stable",
                      "val_rmsd_var1shot", "val_corr_var1shot")
VAL_COLUMNS = DICE_COLUMNS + UNC_METRIC_COLUMNS
#: run states: only "finished" runs enter the fold averages
RUN_FINISHED, RUN_UNFINISHED, RUN_MISSING = "finished", "unfinished", "missing"


def read_metrics_csv(path) -> list:
    """Rows of a run's metrics.csv as dicts of floats (empty cell -> NaN); ``epoch`` as int.

    Raises ``BraTSInputError`` naming the file when it cannot be parsed or lacks ``epoch``.
    """
    import csv
    from pathlib import Path

    from custom.errors import BraTSInputError

    path = Path(path)
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or "epoch" not in reader.fieldnames:
                raise BraTSInputError(f"{path}: not a metrics.csv (no 'epoch' column; header {reader.fieldnames})")
            rows = []
            for i, raw in enumerate(reader, start=2):
                row = {}
                for k, v in raw.items():
                    if k is None:
                        continue
                    v = (v or "").strip()
                    try:
                        row[k] = float(v) if v not in ("", "nan", "None") else float("nan")
                    except ValueError:
                        raise BraTSInputError(f"{path}: line {i}: column {k!r} holds {v!r}, not a number") from None
                row["epoch"] = int(row["epoch"])
                rows.append(row)
    except OSError as exc:
        raise BraTSInputError(f"{path}: cannot be read ({exc})") from None
    return rows


def last_k_summary(rows: list, columns=VAL_COLUMNS, k: int = 30) -> dict:
    """Per column: value at the final validation epoch and mean over the last ``k`` validation epochs.

    Epochs without validation (empty cells) are skipped, so "last k" means the last k epochs that have
    a value. Returns ``{column: {"final", "last_k_mean", "final_epoch", "num_values"}}`` (NaN when the
    column never has a value); ``k`` must be >= 1.
    """
    if int(k) < 1:
        raise ValueError(f"k (last validation epochs to average) must be >= 1, got {k}")
    out = {}
    for c in columns:
        vals = [(r["epoch"], r.get(c, float("nan"))) for r in rows]
        vals = [(e, v) for e, v in vals if v is not None and np.isfinite(v)]
        if not vals:
            out[c] = {"final": float("nan"), "last_k_mean": float("nan"), "final_epoch": None, "num_values": 0}
            continue
        tail = [v for _, v in vals[-int(k):]]
        out[c] = {"final": float(vals[-1][1]), "last_k_mean": float(np.mean(tail)),
                  "final_epoch": int(vals[-1][0]), "num_values": len(vals)}
    return out


def run_status(run_dir) -> tuple:
    """``(status, reason)`` of a training run folder: finished (FINISHED marker and metrics.csv),
    unfinished (metrics.csv without FINISHED) or missing (no metrics.csv)."""
    from pathlib import Path

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return RUN_MISSING, f"{run_dir}: run folder does not exist"
    if not (run_dir / "metrics.csv").is_file():
        return RUN_MISSING, f"{run_dir / 'metrics.csv'}: missing"
    if not (run_dir / "FINISHED").exists():
        return RUN_UNFINISHED, f"{run_dir}: no FINISHED marker (training interrupted or still running)"
    return RUN_FINISHED, ""


def collect_runs(work_dir, variants=("unc", "baseline"), folds=None, k: int = 30) -> dict:
    """Status and last-K summary of every ``W/runs/<variant>/fold<k>``.

    ``folds`` defaults to ``range(num_folds)`` of ``W/datalist.json`` (else the folds found on disk).
    Returns ``{variant: {fold: {"status", "reason", "dir", "num_epochs", "summary" (None unless
    metrics.csv exists)}}}``. Unfinished runs keep their summary (shown, never averaged).
    """
    import json
    from pathlib import Path

    work_dir = Path(work_dir)
    if folds is None:
        dl = work_dir / "datalist.json"
        if dl.is_file():
            folds = list(range(int(json.loads(dl.read_text()).get("num_folds", 5))))
        else:
            found = {int(p.name[4:]) for v in variants for p in (work_dir / "runs" / v).glob("fold*")
                     if p.name[4:].isdigit()}
            folds = sorted(found)
    runs = {}
    for v in variants:
        runs[v] = {}
        for f in folds:
            d = work_dir / "runs" / v / f"fold{int(f)}"
            status, reason = run_status(d)
            entry = {"status": status, "reason": reason, "dir": str(d), "num_epochs": 0, "summary": None}
            if status != RUN_MISSING:
                rows = read_metrics_csv(d / "metrics.csv")
                entry["num_epochs"] = len(rows)
                entry["summary"] = last_k_summary(rows, k=k)
            runs[v][int(f)] = entry
    return runs


def fold_average(fold_entries: dict, columns=VAL_COLUMNS) -> dict:
    """Mean over FINISHED folds of each column's ``final`` and ``last_k_mean``.

    Returns ``{"folds_used": [...], "folds_excluded": {fold: status}, column: {"final", "last_k_mean"}}``;
    every average says which folds it holds, so a missing fold can never pass unnoticed.
    """
    used = sorted(f for f, e in fold_entries.items() if e["status"] == RUN_FINISHED and e["summary"])
    out = {"folds_used": used,
           "folds_excluded": {int(f): e["status"] for f, e in fold_entries.items() if f not in used}}
    for c in columns:
        out[c] = {stat: nanmean([fold_entries[f]["summary"][c][stat] for f in used])
                  for stat in ("final", "last_k_mean")}
    return out


# ---------------------------------------------------------------------------------------------
# held-out "quality vs cost" table (written by scripts/evaluate_heldout.py, shown by scripts/report.py)
# ---------------------------------------------------------------------------------------------

QUALITY_COLUMNS = ("auroc_wt_error", "spearman_wt_error", "ece_wt_error", "qubrats_WT", "qubrats_TC", "qubrats_ET")


def render_quality_vs_cost(heldout: dict) -> str:
    """Markdown section of a ``heldout.json``: segmentation, cross-check and the quality-vs-cost table."""

    def f(v, nd=3):
        return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{nd}f}"

    lines = ["## Held-out evaluation (final models on their validation cases)", ""]
    seg = heldout.get("segmentation", {}).get("regions", {})
    if seg:
        lines += [f"Cases: {heldout.get('num_cases', '?')} (folds {heldout.get('folds', [])}).", "",
                  "| region | legacy Dice | legacy HD95 (mm) | lesion-wise Dice | lesion-wise HD95 (mm) | TP | FP | FN |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in REGIONS:
            s = seg.get(r, {})
            lines.append(f"| {r} | {f(s.get('legacy_dice'))} | {f(s.get('legacy_hd95'), 2)} | {f(s.get('lesionwise_dice'))} "
                         f"| {f(s.get('lesionwise_hd95'), 2)} | {f(s.get('num_tp'), 2)} | {f(s.get('num_fp'), 2)} "
                         f"| {f(s.get('num_fn'), 2)} |")
        lines += ["", "TP/FP/FN are means per case; lesion-wise as BraTS 2023 GLI (dilation 3, lesions <= 50 voxels "
                  "dropped, FP Dice 0 / HD95 374).", ""]
    cc = heldout.get("crosscheck")
    if cc:
        if cc.get("available"):
            parts = []
            for key, name in (("legacy_dice", "legacy Dice"), ("hd95", "HD95 (pooled percentile)"),
                              ("lesions", "matched-lesion Dice and TP count")):
                s = cc.get(key, {})
                parts.append(f"{name}: {s.get('agree', 0)}/{s.get('compared', 0)} agree "
                             f"(max |diff| {f(s.get('max_abs_diff'), 6)})")
            lines += [f"Cross-check against {cc.get('tool')}: " + "; ".join(parts) + ". Compared only where the "
                      "definitions coincide (lesions: one GT component per lesion, one matching prediction, nothing "
                      "dropped or false-positive).", ""]
        else:
            lines += [f"Cross-check against brats_evaluation not available: {cc.get('error')}", ""]
    methods = heldout.get("methods", [])
    if methods:
        lines += ["### Quality vs cost", "",
                  "Each map is scored against the WT errors of the segmentation that comes with it, inside the "
                  "dilated union of predicted and true WT (AUROC, Spearman; ECE reads the map as P(error), 10 bins); "
                  "QU-BraTS per region with the map scaled to [0, 100]. Every map is bounded by the same cancer mask "
                  "(predicted WT dilated by 3 voxels). Seconds per case = preprocessing + forward passes + "
                  "postprocessing, measured side by side in one run on this machine.", "",
                  "| method | forward passes | s / case | Dice WT | AUROC | Spearman | ECE | QU-BraTS WT | TC | ET |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for m in methods:
            lines.append(f"| {m['method']} | {m.get('forward_passes', '–')} | {f(m.get('seconds_per_case'), 2)} "
                         f"| {f(m.get('dice_wt'))} | " + " | ".join(f(m.get(c)) for c in QUALITY_COLUMNS) + " |")
        lines.append("")
    for name, why in (heldout.get("unavailable") or {}).items():
        lines.append(f"- {name}: not measured — {why}")
    return "\n".join(lines).rstrip() + "\n"
