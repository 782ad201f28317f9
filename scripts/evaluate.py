"""Evaluate label maps (ours or another tool's) against a BraTS dataset folder.

    python scripts/evaluate.py --pred_dir P --gt_dir G --out_dir R [--unc_dir U] [--unc_max 1.0]
        [--crosscheck false]

P holds ``<case_id>.nii.gz`` label maps (BraTS submission names), G a BraTS dataset folder (case
folders with ``-seg`` files), U ``<case_id>-unc.nii.gz`` maps in [0, unc_max]. Writes
``R/per_case.csv`` (one row per case and region), ``R/summary.json`` (means) and, with
``--crosscheck true``, ``R/crosscheck.csv`` (agreement with the organisers' ``brats_evaluation``).
Missing, extra or mismatched files stop the run with a message naming each of them.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fire  # noqa: E402

from custom.core.cli import as_bool, as_list  # noqa: E402
from custom.core.errors import BraTSInputError  # noqa: E402
from custom.evaluation.folder import evaluate_folder  # noqa: E402


def main(pred_dir: str, gt_dir: str, out_dir: str, unc_dir: str | None = None, unc_max: float = 1.0,
         crosscheck: bool = False, cases=None):
    """Write per_case.csv and summary.json into ``out_dir``; print a one-line summary."""
    try:
        crosscheck = as_bool(crosscheck, "crosscheck")
        summary = evaluate_folder(pred_dir, gt_dir, out_dir, unc_dir=unc_dir,
                                  case_ids=as_list(cases, "cases", cast=str),
                                  unc_max=float(unc_max), crosscheck=crosscheck)
    except BraTSInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    m = summary["regions"]
    line = (f"{summary['num_cases']} cases | legacy Dice WT/TC/ET "
            + "/".join(f"{m[r]['legacy_dice']:.3f}" for r in ("WT", "TC", "ET"))
            + " | lesion-wise Dice " + "/".join(f"{m[r]['lesionwise_dice']:.3f}" for r in ("WT", "TC", "ET")))
    if unc_dir is not None:
        line += f" | AUROC(WT error) {m['WT']['auroc_wt_error']:.3f}"
    if crosscheck and summary.get("crosscheck", {}).get("available"):
        a = summary["crosscheck"]["legacy_dice"]
        line += f" | official evaluator agrees on legacy Dice {a['agree']}/{a['compared']}"
    print(line + f" -> {Path(out_dir) / 'per_case.csv'}")


if __name__ == "__main__":
    fire.Fire(main)
