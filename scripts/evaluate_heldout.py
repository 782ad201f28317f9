"""Held-out evaluation of the self-assessment: each fold's FINAL model on its validation cases, every uncertainty
method by voxel type, calibrated out of fold, at case level, with its cost and bootstrap intervals.

    .venv/bin/python scripts/evaluate_heldout.py --work_dir W --out_dir R [--folds "[0,1]"] [--variant unc]
        [--mc_variant mcdropout] [--mc_samples 10] [--tta true] [--ensemble true] [--crosscheck true]
        [--max_cases_per_fold N] [--device cpu] [--n_boot 1000] [--seed 0]

The study is :mod:`custom.workflows.heldout`.
"""

from __future__ import annotations

import sys

import fire

from custom.core.cli import as_bool, as_list
from custom.core.errors import BraTSInputError
from custom.core.layout import ReportDir
from custom.workflows.heldout import evaluate_heldout, summary_line


def main(work_dir: str, out_dir: str, folds=None, variant: str = "unc", mc_variant: str = "mcdropout",
         mc_samples: int = 10, tta: bool = True, ensemble: bool = True, crosscheck: bool = True,
         max_cases_per_fold: int | None = None, device: str = "cpu", n_boot: int = 1000, seed: int = 0):
    """Score each fold's final model on its validation cases and every uncertainty method against its cost.

    Writes R/heldout.json (flat keys <method>.<metric>: AUROC/AUPRC by voxel type, calibrated ECE and Brier,
    Spearman of the predicted Dice, AURC, cost, each with a 95% bootstrap interval), R/heldout.md,
    R/reliability.png, R/risk_coverage.png, R/heldout_per_case.csv (segmentation per case and region),
    R/heldout_methods_per_case.csv, R/heldout/fold<k>/ (the predicted files and their evaluation), and replaces the
    held-out section of R/report.md when it exists. Each case is calibrated by an isotonic fit on the other folds'
    cases, so at least two folds must be finished. Prints a one-line summary; exit status 2 on a named error.

    Args:
        work_dir: the work directory W with finished runs (W/runs/<variant>/fold<k>/model_final.pt and FINISHED).
        out_dir: the report folder R (created; the same as scripts/report.py's --out_dir).
        folds: folds to evaluate, e.g. "[0,1]" (default: every fold of W/datalist.json that is finished).
        variant: the variant whose final models are evaluated (unc_output needs the uncertainty channel).
        mc_variant: the variant trained with dropout, run N times with dropout on for the MC-dropout row;
            "" leaves MC dropout out.
        mc_samples: MC-dropout passes N.
        tta: add the mirroring-TTA variance row (8 passes).
        ensemble: add the fold-ensemble variance row (all finished folds' final models; not held out for all
            members, marked with *).
        crosscheck: compare the segmentation metrics with the organisers' brats_evaluation where it is installed.
        max_cases_per_fold: evaluate only the first N validation cases of each fold (quick checks).
        device: "cpu" or "cuda".
        n_boot: bootstrap resamples of the cases for the 95% intervals.
        seed: seed of the bootstrap.
    """
    try:
        res = evaluate_heldout(work_dir, out_dir, folds=as_list(folds, "folds", cast=int),
                               variant=variant, mc_variant=mc_variant or None, mc_samples=int(mc_samples),
                               tta=as_bool(tta, "tta"), ensemble=as_bool(ensemble, "ensemble"),
                               crosscheck=as_bool(crosscheck, "crosscheck"),
                               max_cases_per_fold=max_cases_per_fold, device=device, n_boot=int(n_boot),
                               seed=int(seed))
    except BraTSInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(summary_line(res) + f" -> {ReportDir(out_dir).heldout}")


if __name__ == "__main__":
    fire.Fire(main)
