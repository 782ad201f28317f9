"""Evaluate label maps (ours or another tool's) against a BraTS dataset folder.

    .venv/bin/python scripts/evaluate.py --pred_dir P --gt_dir G --out_dir R [--unc_dir U] [--unc_max 1.0]
        [--crosscheck false] [--label_convention brats2023]

P holds ``<case_id>.nii.gz`` label maps (BraTS submission names), G a BraTS dataset folder (case
folders with ``-seg`` files), U ``<case_id>-unc.nii.gz`` maps in [0, unc_max]. Writes
``R/per_case.csv`` (one row per case and region), ``R/summary.json`` (means) and, with
``--crosscheck true``, ``R/crosscheck.csv`` (agreement with the organisers' newer ``brats_evaluation``
where its definitions coincide with ours; its HD95 is a pooled border-voxel percentile, compared with
that definition, not with our HD95).
Missing, extra or mismatched files stop the run with a message naming each of them.

Metrics are those of the BraTS 2023 ranking code: legacy Dice and HD95 (the robust Hausdorff distance,
surfel-area weighted, the larger of the two directed 95th percentiles) and lesion-wise Dice and HD95 (the
same HD95 per lesion). ``--label_convention brats2021`` reads predictions whose enhancing tumour is
label 4 (BraTS 2020/2021 models) and maps 4 -> 3; by default a label 4 stops the run, since it almost
always means the conventions were mixed up.
"""

from __future__ import annotations

import sys
from pathlib import Path

import fire

from custom.core.cli import as_bool, as_list
from custom.core.errors import BraTSInputError
from custom.data.nifti import BRATS2023
from custom.evaluation.folder import evaluate_folder


def main(pred_dir: str, gt_dir: str, out_dir: str, unc_dir: str | None = None, unc_max: float = 1.0,
         crosscheck: bool = False, cases=None, label_convention: str = BRATS2023):
    """Score label maps against ground truth: per_case.csv and summary.json into OUT_DIR, a one-line summary.

    Metrics of the BraTS 2023 ranking code (legacy and lesion-wise Dice and HD95 per region WT, TC, ET; with
    --unc_dir the quality of the uncertainty maps for the WT errors). Missing, extra or mismatched files stop
    the run with every one of them named (exit status 2).

    Args:
        pred_dir: folder of <case_id>.nii.gz label maps (labels 0-3; the -unc/-ensvar maps beside them are
            ignored), e.g. the bundle's inference output or a submission folder.
        gt_dir: BraTS data folder with the ground truth: case folders holding <case_id>-seg.nii.gz.
        out_dir: where per_case.csv and summary.json go (created).
        unc_dir: folder of <case_id>-unc.nii.gz uncertainty maps to score as well (default: none).
        unc_max: the value of full uncertainty in those maps (1.0 for this bundle's maps).
        crosscheck: also run the organisers' newer brats_evaluation and write crosscheck.csv.
        cases: score only these case ids, e.g. "[BraTS-GLI-00001-000]" (default: every ground-truth case).
        label_convention: "brats2023" (ET = 3; a label 4 stops the run) or "brats2021" (ET = 4, mapped to 3).
    """
    try:
        crosscheck = as_bool(crosscheck, "crosscheck")
        summary = evaluate_folder(pred_dir, gt_dir, out_dir, unc_dir=unc_dir,
                                  case_ids=as_list(cases, "cases", cast=str),
                                  unc_max=float(unc_max), crosscheck=crosscheck,
                                  label_convention=str(label_convention))
    except BraTSInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    m = summary["regions"]
    line = (f"{summary['num_cases']} cases | legacy Dice WT/TC/ET "
            + "/".join(f"{m[r]['legacy_dice']:.3f}" for r in ("WT", "TC", "ET"))
            + " | legacy HD95 (BraTS 2023) " + "/".join(f"{m[r]['legacy_hd95']:.2f}" for r in ("WT", "TC", "ET"))
            + " mm | lesion-wise Dice " + "/".join(f"{m[r]['lesionwise_dice']:.3f}" for r in ("WT", "TC", "ET")))
    if unc_dir is not None:
        line += f" | AUROC(WT error) {m['WT']['auroc_wt_error']:.3f}"
    if crosscheck and summary.get("crosscheck", {}).get("available"):
        a = summary["crosscheck"]["legacy_dice"]
        line += f" | brats_evaluation agrees on legacy Dice {a['agree']}/{a['compared']}"
    print(line + f" -> {Path(out_dir) / 'per_case.csv'}")


if __name__ == "__main__":
    fire.Fire(main)
