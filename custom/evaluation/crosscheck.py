"""Cross-check of our segmentation metrics against the independent ``brats_evaluation`` package.

``brats_evaluation`` (the organisers' evaluator for BraTS 2025+, built on panoptica) is not the BraTS
2023 ranking code: its HD95 pools both directions' border-voxel distances into one percentile. The
cross-check compares it with :func:`pooled_border_hd95`, which computes that definition; the HD95 the
project reports is the BraTS 2023 one (:func:`custom.evaluation.segmentation.hd95`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings

import numpy as np
from scipy import ndimage

from custom.core.constants import REGIONS
from custom.data.nifti import BRATS2023, load_label_map
from custom.evaluation.segmentation import (
    MAX_HD95_MM,
    STRUCTURE_26,
    bounding_box,
    check_pair,
    dice,
    lesionwise_metrics,
    region_mask,
)

#: tolerances for "agree": Dice is a ratio of counts (exact); HD95 percentiles of the same distances
DICE_TOL = 1e-6

HD95_TOL_MM = 1e-3


def _border_voxels(mask: np.ndarray) -> np.ndarray:
    # 6-neighbourhood erosion: the one-voxel border medpy, MONAI and panoptica use; voxels on the
    # array edge count as border (outside is background)
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1),
                                          border_value=0)


def pooled_border_hd95(pred: np.ndarray, gt: np.ndarray, spacing=None) -> float:
    """HD95 as ``brats_evaluation``/panoptica define it (``global_bin_hd95``), NOT the BraTS 2023 one.

    The 95th percentile (numpy's linear interpolation) of the distances in mm from each border voxel
    (a voxel of the mask with a 6-neighbour outside it) to the other mask's nearest border voxel, both
    directions pooled into one set. The project's HD95 (:func:`custom.evaluation.segmentation.hd95`)
    is the BraTS 2023 robust Hausdorff distance; this one exists only to compare with that tool.
    Both empty -> 0; one empty -> ``MAX_HD95_MM``.
    """
    pred, gt, spacing = check_pair(pred, gt, spacing)
    has_p, has_g = bool(pred.any()), bool(gt.any())
    if not has_p and not has_g:
        return 0.0
    if has_p != has_g:
        return MAX_HD95_MM
    # distances to the nearest border voxel only need the box holding both masks (+1 for the border)
    box = bounding_box(pred | gt, margin=1)
    pred, gt = pred[box], gt[box]
    bp, bg = _border_voxels(pred), _border_voxels(gt)
    d_pg = ndimage.distance_transform_edt(~bg, sampling=spacing)[bp]
    d_gp = ndimage.distance_transform_edt(~bp, sampling=spacing)[bg]
    return float(np.percentile(np.concatenate([d_pg, d_gp]), 95))


@contextlib.contextmanager
def _quiet():
    # panoptica prints banners and config notes on stdout/warnings; keep the CLI summary readable
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def official_crosscheck(cases, label_convention: str = BRATS2023) -> dict:
    """Run ``brats_evaluation`` (panoptica, GLI config) on the same files and compare where the
    definitions coincide.

    Args:
        cases: ``[(case_id, pred_path, gt_path)]``.
        label_convention: of the predictions (:func:`custom.data.nifti.load_label_map`); a prediction
            that needs mapping is handed to the tool as a mapped temporary copy.

    Coinciding definitions compared (per case and region): legacy Dice vs panoptica ``global_bin_dsc``
    (skipped for empty-vs-empty, NaN there), :func:`pooled_border_hd95` vs ``global_bin_hd95`` (both
    non-empty; the tool's HD95 is not the BraTS 2023 HD95 we report, so this checks distances and
    spacing handling, not our HD95 definition), and, when every kept lesion is one ground-truth
    component matched by exactly one predicted component and nothing is dropped or false-positive
    (panoptica neither dilates nor drops small lesions), lesion counts and the mean Dice of matched
    lesions vs ``tp`` and ``sq_dsc``.
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
    with tempfile.TemporaryDirectory(prefix="brats_crosscheck_") as tmp:
        for case_id, pred_path, gt_path in cases:
            gt_img = nib.load(str(gt_path))
            spacing = tuple(float(s) for s in gt_img.header.get_zooms()[:3])
            gt = load_label_map(gt_path)
            pred = load_label_map(pred_path, label_convention)
            tool_pred = pred_path
            if label_convention != BRATS2023:  # the tool reads files: give it the labels we score
                pred_img = nib.load(str(pred_path))
                tool_pred = os.path.join(tmp, f"{case_id}.nii.gz")
                nib.save(nib.Nifti1Image(pred, pred_img.affine, pred_img.header), tool_pred)
            with _quiet():
                off = evaluate_single_exam(str(tool_pred), str(gt_path), case_id, evaluator)
            if "error" in off:
                rows.append({"case_id": case_id, "region": "", "official_error": off["error"]})
                continue
            rows.extend(_compare_case(case_id, off, pred, gt, spacing))

    def frac(key):
        vals = [r[key] for r in rows if isinstance(r.get(key), (bool, np.bool_))]
        return {"compared": len(vals), "agree": int(sum(vals)),
                "max_abs_diff": None}

    agreement = {"available": True, "tool": "brats_evaluation (panoptica, config_gli)"}
    for key, a, b in (("legacy_dice_agree", "ours_legacy_dice", "official_global_dsc"),
                      ("pooled_hd95_agree", "ours_pooled_border_hd95", "official_global_hd95"),
                      ("lesions_agree", "ours_matched_lesion_dice", "official_sq_dsc")):
        stat = frac(key)
        diffs = [abs(r[a] - r[b]) for r in rows if isinstance(r.get(key), (bool, np.bool_))
                 and np.isfinite(r[a]) and np.isfinite(r[b])]
        stat["max_abs_diff"] = float(max(diffs)) if diffs else None
        agreement[key[: -len("_agree")]] = stat
    agreement["errors"] = [r for r in rows if "official_error" in r]
    return {"available": True, "rows": [r for r in rows if "official_error" not in r], "agreement": agreement}


def _compare_case(case_id: str, off: dict, pred: np.ndarray, gt: np.ndarray, spacing) -> list:
    """Rows (one per region) comparing our figures with ``evaluate_single_exam``'s output ``off``."""
    rows = []
    for r in REGIONS:
        o = off.get(r.lower(), {})
        p, g = region_mask(pred, r), region_mask(gt, r)
        ours = dice(p, g)
        ours_hd = pooled_border_hd95(p, g, spacing)
        lw = lesionwise_metrics(p, g, spacing)
        off_dsc = o.get("global_bin_dsc", float("nan"))
        off_hd = o.get("global_bin_hd95", float("nan"))
        both_nonempty = bool(p.any() and g.any())
        _, n_gt_cc = ndimage.label(g, structure=STRUCTURE_26)
        simple = (lw["num_fp"] == 0 and lw["num_fn"] == 0 and n_gt_cc == len(lw["lesions"]) > 0
                  and all(les["num_pred_components"] == 1 for les in lw["lesions"]))
        matched = [les["dice"] for les in lw["lesions"] if les["num_pred_components"] > 0]
        ours_matched = float(np.mean(matched)) if matched else float("nan")
        rows.append({
            "case_id": case_id, "region": r,
            "ours_legacy_dice": ours, "official_global_dsc": off_dsc,
            "legacy_dice_agree": (abs(ours - off_dsc) <= DICE_TOL) if np.isfinite(off_dsc) else "",
            "ours_pooled_border_hd95": ours_hd if both_nonempty else float("nan"),
            "official_global_hd95": off_hd if both_nonempty and np.isfinite(off_hd) else float("nan"),
            "pooled_hd95_agree": ((abs(ours_hd - off_hd) <= HD95_TOL_MM) if both_nonempty and np.isfinite(off_hd)
                                  else ""),
            "ours_num_tp": lw["num_tp"], "official_tp": o.get("tp"),
            "ours_matched_lesion_dice": ours_matched, "official_sq_dsc": o.get("sq_dsc", float("nan")),
            "lesions_comparable": simple,
            "lesions_agree": (simple and o.get("tp") == lw["num_tp"]
                              and abs(ours_matched - o.get("sq_dsc", np.nan)) <= DICE_TOL) if simple else "",
        })
    return rows
