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

import numpy as np
from scipy import ndimage

from custom.core.constants import REGION_LABELS, REGIONS

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


def check_pair(pred: np.ndarray, gt: np.ndarray, spacing=None):
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
    pred, gt, _ = check_pair(pred, gt)
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
    pred, gt, spacing = check_pair(pred, gt, spacing)
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
    pred, gt, spacing = check_pair(pred, gt, spacing)
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
