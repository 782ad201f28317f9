"""Score a folder of predictions (and uncertainty maps) against a BraTS data set: per-case CSV and summary."""

from __future__ import annotations

import numpy as np

from custom.core.atomic import atomic_write_bytes, atomic_write_json
from custom.core.constants import MODALITIES, REGIONS
from custom.core.errors import BraTSInputError
from custom.core.layout import label_prediction_case_id
from custom.core.numeric import nanmean
from custom.data.cases import find_label_files
from custom.data.nifti import BRATS2023, LABEL_CONVENTIONS, load_label_map, open_nifti, read_nifti
from custom.evaluation.crosscheck import official_crosscheck
from custom.evaluation.segmentation import HD95_DEFINITION, evaluate_segmentation
from custom.evaluation.uncertainty import uncertainty_quality

#: per_case.csv columns (issue 8), then the uncertainty columns when an uncertainty folder is given
SEG_COLUMNS = ("case_id", "region", "legacy_dice", "legacy_hd95", "lesionwise_dice", "lesionwise_hd95",
               "num_tp", "num_fp", "num_fn")

UNC_COLUMNS = ("auroc_wt_error", "spearman_wt_error", "ece_wt_error", "error_fraction_wt", "qubrats")

#: uncertainty measures that describe WT errors: written on the WT row only
WT_ONLY_UNC = ("auroc_wt_error", "spearman_wt_error", "ece_wt_error", "error_fraction_wt")


def match_prediction_files(pred_dir, gt_dir, unc_dir=None, case_ids=None) -> list:
    """Pair every ground-truth case with ``P/<id>.nii.gz`` (and ``U/<id>-unc.nii.gz``), checking headers.

    Returns a list of dicts ``{"case_id", "pred", "gt", "unc" (or None), "images"}`` (``images``: the
    modality files beside the seg, for the brain mask). Raises ``BraTSInputError`` naming every missing,
    extra, unreadable or mismatched (shape/affine) file, so nothing is skipped silently. Hidden files
    (unfinished atomic writes of a killed run) are not predictions.
    ``case_ids`` restricts the ground truth to those cases (each must exist).
    """
    from pathlib import Path

    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise BraTSInputError(f"{pred_dir}: prediction folder does not exist")
    if unc_dir is not None and not Path(unc_dir).is_dir():
        raise BraTSInputError(f"{unc_dir}: uncertainty folder does not exist")
    gts = find_label_files(gt_dir)
    problems = []
    if case_ids is not None:
        case_ids = list(case_ids)
        problems += [f"{gt_dir}: no ground truth '{c}-seg.nii.gz' for requested case {c}" for c in case_ids if c not in gts]
        gts = {c: gts[c] for c in case_ids if c in gts}
    # hidden names are never predictions (editors' files, unfinished atomic writes of a killed run), nor
    # the -unc/-ensvar maps: custom.core.layout.label_prediction_case_id
    preds = {c: p for p in pred_dir.glob("*.nii.gz") if (c := label_prediction_case_id(p.name)) is not None}
    for c in sorted(set(gts) - set(preds)):
        problems.append(f"{pred_dir / (c + '.nii.gz')}: prediction missing for ground-truth case {c} ({gts[c]})")
    if case_ids is None:
        for c in sorted(set(preds) - set(gts)):
            problems.append(f"{preds[c]}: prediction has no ground truth '{c}-seg.nii.gz' in {gt_dir}")

    pairs = []
    for c in sorted(set(gts) & set(preds)):
        item = {"case_id": c, "pred": preds[c], "gt": gts[c], "unc": None,
                "images": [p for p in (gts[c].with_name(f"{c}-{m}.nii.gz") for m in MODALITIES) if p.exists()]}
        if unc_dir is not None:
            u = Path(unc_dir) / f"{c}-unc.nii.gz"
            if not u.exists():
                problems.append(f"{u}: uncertainty map missing for case {c}")
            else:
                item["unc"] = u
        headers = {}
        for key in ("gt", "pred", "unc"):
            if item[key] is None:
                continue
            try:  # header, and whether the file can hold the voxels it declares
                headers[key] = open_nifti(item[key])
            except BraTSInputError as exc:
                problems.extend(exc.problems)
        for i, path in enumerate(item["images"]):
            try:
                headers[f"image{i}"] = open_nifti(path)
            except BraTSInputError as exc:
                problems.extend(exc.problems)
        if "gt" in headers:
            g = headers["gt"]
            for key, path in [("pred", item["pred"]), ("unc", item["unc"])] + [
                    (f"image{i}", p) for i, p in enumerate(item["images"])]:
                if key not in headers:
                    continue
                h = headers[key]
                if tuple(h.shape) != tuple(g.shape):
                    problems.append(f"{path}: shape {tuple(h.shape)} differs from ground truth "
                                    f"{item['gt']} shape {tuple(g.shape)}")
                elif not np.allclose(h.affine, g.affine, atol=1e-3):
                    problems.append(f"{path}: affine differs from ground truth {item['gt']}")
        pairs.append(item)
    if problems:
        raise BraTSInputError(problems, header="cannot evaluate these predictions")
    return pairs


def evaluate_case_files(item: dict, unc_max: float = 1.0, label_convention: str = BRATS2023) -> list:
    """Rows (one per region, columns ``SEG_COLUMNS`` [+ ``UNC_COLUMNS``]) of one matched case.

    The prediction is read with ``label_convention`` (:func:`custom.data.nifti.load_label_map`), the
    ground truth always as BraTS 2023. The spacing is the prediction header's voxel size, as the BraTS
    2023 ranking code reads it (:func:`match_prediction_files` has checked its affine against the ground truth).
    """
    spacing = tuple(float(s) for s in open_nifti(item["pred"]).header.get_zooms()[:3])
    gt = load_label_map(item["gt"])
    pred = load_label_map(item["pred"], label_convention)
    seg = evaluate_segmentation(pred, gt, spacing)
    unc_metrics = None
    if item.get("unc") is not None:
        unc = read_nifti(item["unc"], dtype=np.float64)[0]
        if not np.all(np.isfinite(unc)):
            raise BraTSInputError(f"{item['unc']}: uncertainty holds NaN or infinite values")
        if unc.min() < 0 or unc.max() > unc_max * (1 + 1e-6):
            raise BraTSInputError(f"{item['unc']}: uncertainty must lie in [0, {unc_max}] "
                                  f"(set unc_max), got [{unc.min():.4g}, {unc.max():.4g}]")
        brain = None
        if item.get("images"):
            brain = np.zeros(gt.shape, dtype=bool)
            for p in item["images"]:
                brain |= read_nifti(p)[0] != 0
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
                    crosscheck: bool = False, label_convention: str = BRATS2023) -> dict:
    """Evaluate ``P/<id>.nii.gz`` (and ``U/<id>-unc.nii.gz``) against ``G``; write ``R/per_case.csv``
    and ``R/summary.json`` (atomically, only once every case has been evaluated); with ``crosscheck``
    also ``R/crosscheck.csv`` and the agreement in the summary. Returns the summary.

    ``label_convention``: labels of the predictions, ``"brats2023"`` (default; a label 4 is refused) or
    ``"brats2021"`` (ET written as 4, mapped to 3), see :func:`custom.data.nifti.load_label_map`.
    """
    from pathlib import Path

    if label_convention not in LABEL_CONVENTIONS:
        raise BraTSInputError(f"--label_convention: expected one of {', '.join(LABEL_CONVENTIONS)}, "
                              f"got {label_convention!r}", header="invalid command-line option")
    pairs = match_prediction_files(pred_dir, gt_dir, unc_dir, case_ids)
    rows = []
    for item in pairs:
        rows.extend(evaluate_case_files(item, unc_max=unc_max, label_convention=label_convention))
    columns = list(SEG_COLUMNS) + (list(UNC_COLUMNS) if unc_dir is not None else [])
    summary = summarize_rows(rows)
    summary.update({"pred_dir": str(pred_dir), "gt_dir": str(gt_dir),
                    "unc_dir": None if unc_dir is None else str(unc_dir),
                    "label_convention": label_convention, "hd95_definition": HD95_DEFINITION})
    out_dir = Path(out_dir)
    if crosscheck:
        cc = official_crosscheck([(p["case_id"], p["pred"], p["gt"]) for p in pairs], label_convention)
        if cc["rows"]:
            write_rows_csv(out_dir / "crosscheck.csv", cc["rows"])
        summary["crosscheck"] = cc["agreement"]
    write_rows_csv(out_dir / "per_case.csv", rows, columns)
    atomic_write_json(out_dir / "summary.json", to_json_safe(summary))
    return summary
