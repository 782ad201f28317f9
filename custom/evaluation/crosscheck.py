"""Cross-check of our segmentation metrics against the independent ``brats_evaluation`` package."""

from __future__ import annotations

import contextlib
import os
import warnings

import numpy as np
from scipy import ndimage

from custom.core.constants import REGIONS
from custom.data.nifti import load_label_map
from custom.evaluation.segmentation import STRUCTURE_26, dice, hd95, lesionwise_metrics, region_mask

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
        gt = load_label_map(gt_path)
        pred = load_label_map(pred_path)
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
