"""Report tables rendered from measured results."""

from __future__ import annotations

import numpy as np

from custom.core.constants import REGIONS

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
        lines += ["", "Metrics of the BraTS 2023 ranking code (BraTS-2023-Metrics). Legacy HD95: the robust Hausdorff "
                  "distance, the larger of the two directed 95th percentiles of surface distances weighted by surfel "
                  "area, in mm (374 when one mask is empty). Lesion-wise (GLI): the same HD95 per lesion; ground truth "
                  "dilated 3 times with the 18-neighbourhood, lesions of <= 50 mm^3 dropped, false positives Dice 0 / "
                  "HD95 374. TP/FP/FN are means per case.", ""]
    cc = heldout.get("crosscheck")
    if cc:
        if cc.get("available"):
            parts = []
            for key, name in (("legacy_dice", "legacy Dice"),
                              ("pooled_hd95", "HD95 pooled over both directions' border voxels (the tool's definition, "
                                              "not the BraTS 2023 HD95 of the table)"),
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
