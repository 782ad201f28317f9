"""Segmentation metrics of the BraTS 2023 ranking code: legacy and lesion-wise Dice and HD95.

The definitions are those of the code the BraTS 2023 challenge scored with
(github.com/rachitsaluja/BraTS-2023-Metrics, ``metrics.py``, commit 43c9052), because users compare our
numbers with the leaderboard. Where ``shared/brief/EVALUATION.md`` says otherwise (26-neighbourhood
dilation, a 50-voxel threshold), the published code wins:

- regions: WT = labels {1, 2, 3}, TC = {1, 3}, ET = {3}; any other value is no region (label maps are
  checked on loading, :func:`custom.data.nifti.load_label_map`);
- legacy (whole-volume) Dice, and legacy HD95 = the robust Hausdorff distance at 95 %
  (:mod:`custom.evaluation.surface`: surfels on voxel corners weighted by their surface area, the 95th
  percentile of each directed distance, the larger of the two), in mm with the voxel spacing;
  both empty -> Dice 1, HD95 0; exactly one empty -> Dice 0, HD95 ``MAX_HD95_MM`` (374 mm);
- lesion-wise (challenge ``BraTS-GLI``): 26-connected components of prediction and ground truth; the
  ground truth is dilated 3 iterations with the 18-neighbourhood (``generate_binary_structure(3, 2)``)
  and ground-truth voxels inside one 26-connected dilated component form one lesion; each lesion is
  scored (Dice and the same HD95) against the union of the predicted components touching its dilated
  mask (no match: Dice 0, HD95 374); lesions of ``<= 50 mm^3`` (voxels x sx sy sz) are dropped;
  predicted components touching no lesion, dropped ones included, are false positives; lesion-wise
  Dice = sum over kept lesions / (kept lesions + false positives), lesion-wise HD95 = (sum over kept
  lesions + 374 x false positives) / the same; no kept lesion and no false positive -> Dice 1, HD95 0.

The pooled border-voxel HD95 of ``brats_evaluation`` lives with the cross-check
(:func:`custom.evaluation.crosscheck.pooled_border_hd95`), not here.

Everything is numpy/scipy only. Arrays are spatial ``(X, Y, Z)`` in NIfTI voxel order, spacing in mm
``(sx, sy, sz)`` (the ranking code reads it from the prediction's header, as float32).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from custom.core.constants import REGION_LABELS, REGIONS
from custom.evaluation.surface import robust_hausdorff

#: HD95 of a missed or false-positive structure, and of one empty mask: the BraTS 2023 ranking code
#: replaces the routine's ``inf`` by 374 mm (about the diagonal of the 240x240x155 1 mm volume)
MAX_HD95_MM = 374.0

#: percentile of the robust Hausdorff distance
HD_PERCENT = 95.0

#: what ``legacy_hd95`` and the per-lesion HD95 of ``lesionwise_hd95`` are (written into summaries)
HD95_DEFINITION = ("BraTS 2023 robust HD95 (BraTS-2023-Metrics / surface-distance compute_robust_hausdorff): "
                   "surfel-area-weighted 95th percentile of each directed surface distance, the larger of the two, "
                   "in mm; both empty 0, one empty 374")

#: 3x3x3 cube: 26-connectivity for labelling connected components
STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)

#: 18-neighbourhood (``generate_binary_structure(3, 2)``): the ranking code's dilation of ground-truth lesions
STRUCTURE_18 = ndimage.generate_binary_structure(3, 2)

#: ground-truth lesions of this volume in mm^3 or less are dropped (BraTS 2023 GLI)
LESION_VOLUME_THRESHOLD_MM3 = 50.0

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


def bounding_box(mask: np.ndarray, margin: int = 0):
    """Slices of the bounding box of ``mask`` grown by ``margin`` voxels (clipped), or None if empty."""
    if not mask.any():
        return None
    slices = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        nz = np.nonzero(mask.any(axis=other))[0]
        slices.append(slice(max(int(nz[0]) - margin, 0), min(int(nz[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(slices)


def hd95(pred: np.ndarray, gt: np.ndarray, spacing=None) -> float:
    """BraTS 2023 HD95 in mm of two binary masks ``(X, Y, Z)``: the robust Hausdorff distance at 95 %.

    ``max(P95(gt surfels -> pred surfels), P95(pred surfels -> gt surfels))`` with surfel-area-weighted
    percentiles (:func:`custom.evaluation.surface.robust_hausdorff`). Both empty -> 0; exactly one
    empty -> ``MAX_HD95_MM``.
    """
    pred, gt, spacing = check_pair(pred, gt, spacing)
    has_p, has_g = bool(pred.any()), bool(gt.any())
    if not has_p and not has_g:
        return 0.0
    if has_p != has_g:
        return MAX_HD95_MM
    return float(robust_hausdorff(gt, pred, spacing, HD_PERCENT))


def legacy_metrics(pred_labels: np.ndarray, gt_labels: np.ndarray, spacing=None) -> dict:
    """Whole-volume Dice and HD95 per region: ``{region: {"legacy_dice", "legacy_hd95"}}``."""
    out = {}
    for r in REGIONS:
        p, g = region_mask(pred_labels, r), region_mask(gt_labels, r)
        out[r] = {"legacy_dice": dice(p, g), "legacy_hd95": hd95(p, g, spacing)}
    return out


def dilate(mask: np.ndarray, iterations: int, structure: np.ndarray) -> np.ndarray:
    """Binary dilation of ``mask`` with ``structure``, ``iterations`` times (outside the array is background)."""
    mask = np.asarray(mask, dtype=bool)
    if iterations <= 0 or not mask.any():
        return mask.copy()
    return ndimage.binary_dilation(mask, structure=structure, iterations=int(iterations))


def lesionwise_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing=None,
    dilation: int = LESION_DILATION,
    volume_threshold_mm3: float = LESION_VOLUME_THRESHOLD_MM3,
) -> dict:
    """BraTS 2023 GLI lesion-wise Dice and HD95 of one region (binary masks ``(X, Y, Z)``, spacing in mm).

    Returns ``{"lesionwise_dice", "lesionwise_hd95", "num_tp", "num_fp", "num_fn", "lesions"}`` where
    ``lesions`` lists ``{"volume_voxels", "volume_mm3", "dice", "hd95", "num_pred_components"}`` of the
    kept lesions (``volume_mm3 > volume_threshold_mm3``). ``num_tp``: kept lesions touched by at least
    one predicted component; ``num_fn``: kept lesions touched by none; ``num_fp``: predicted components
    touching no ground-truth lesion (dropped small lesions included, as in the ranking code, so a
    prediction of a small lesion is not a false positive). If no lesion is kept and there is no false
    positive the region counts as both-empty (Dice 1, HD95 0).
    """
    pred, gt, spacing = check_pair(pred, gt, spacing)
    # everything happens within `dilation` voxels of either mask: work on that box only (a box edge on
    # the array edge stays the array edge, so the dilation sees the same background outside)
    box = bounding_box(pred | gt, margin=dilation + 1)
    if box is not None:
        pred, gt = pred[box], gt[box]
    pred_cc, n_pred = ndimage.label(pred, structure=STRUCTURE_26)
    dil_cc, n_dil = ndimage.label(dilate(gt, dilation, STRUCTURE_18), structure=STRUCTURE_26)

    # which predicted components touch which dilated lesion: unique (lesion, component) pairs
    both = (dil_cc > 0) & (pred_cc > 0)
    pairs = np.unique(np.stack([dil_cc[both], pred_cc[both]]), axis=1) if both.any() else np.zeros((2, 0), int)
    touching = {k: pairs[1, pairs[0] == k] for k in range(1, n_dil + 1)}
    matched_components = set(pairs[1].tolist())

    # lesion k = ground truth inside dilated component k (GT components merged by the dilation); the
    # dilation of lesion k alone is dilated component k, which is what the ranking code matches against
    lesion_ids = np.where(gt, dil_cc, 0)
    volumes = np.bincount(lesion_ids.ravel(), minlength=n_dil + 1)
    boxes = ndimage.find_objects(dil_cc)
    pred_boxes = ndimage.find_objects(pred_cc)

    lesions = []
    for k in range(1, n_dil + 1):
        # same product order as the ranking code (voxels * sx * sy * sz)
        volume_mm3 = int(volumes[k]) * spacing[0] * spacing[1] * spacing[2]
        if not volume_mm3 > volume_threshold_mm3:
            continue
        comps = touching[k]
        lesion_box = boxes[k - 1]
        if comps.size:
            # the union of touching components may reach outside the dilated lesion's box
            sl = [lesion_box] + [pred_boxes[c - 1] for c in comps]
            lesion_box = tuple(slice(min(s[a].start for s in sl), max(s[a].stop for s in sl)) for a in range(gt.ndim))
        g = lesion_ids[lesion_box] == k
        p = np.isin(pred_cc[lesion_box], comps) if comps.size else np.zeros_like(g)
        lesions.append({
            "volume_voxels": int(volumes[k]),
            "volume_mm3": float(volume_mm3),
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
