"""The paper's tables and figures from the cross-validation runs of a work dir.

    .venv/bin/python scripts/report.py --work_dir W --out_dir R [--last_k 30] [--folds "[0,1]"]
        [--variants "[unc,baseline]"] [--config tiny] [--overrides '{"num_epochs": 4}'] [--num_cases 6]
        [--figures true]

What it writes is described in :mod:`custom.workflows.report`.
"""

from __future__ import annotations

import json
import sys

import fire

from custom.core.cli import as_bool, as_list
from custom.core.errors import BraTSInputError
from custom.core.layout import ReportDir
from custom.workflows.report import make_report, summary_line


def main(work_dir: str, out_dir: str, last_k: int = 30, folds=None, variants="unc,baseline",
         config: str | None = None, overrides=None, num_cases: int = 6, figures: bool = True):
    """Write Table 1/2 (table1.csv, table2.csv, tables.json), Figures 1/2 and report.md into OUT_DIR.

    Reads W/runs/<variant>/fold<k>/metrics.csv. Only FINISHED runs trained with the cross-validation's settings
    (--config and --overrides as given to scripts/cross_validate.py, checked against each run's
    train_config.json) enter the fold averages; missing, unfinished and other-settings runs are listed in
    report.md and on stderr. When OUT_DIR/heldout.json exists
    (scripts/evaluate_heldout.py) its quality-vs-cost table goes into report.md. Prints a one-line summary;
    exit status 2 when W has no runs.

    Args:
        work_dir: the work directory W whose runs/ the cross-validation filled.
        out_dir: where the tables, figures and report.md go (created).
        last_k: the 'last K' figures average the validation rounds in the last K epochs of each run
            (epoch > last epoch - K; with validation every 5 epochs, K=30 holds 6 rounds); the report lists the
            epochs each figure averages.
        folds: folds to report, e.g. "[0,1]" (default: every fold of W/datalist.json).
        variants: variants to report, e.g. "[unc,baseline]" ("unc" is needed for Table 2 and the figures).
        config: the extra config the cross-validation layered last ("tiny"), as given to cross_validate.py.
        overrides: the JSON object of bundle settings given to cross_validate.py, e.g. '{"num_epochs": 4}'.
        num_cases: fold-0 validation cases shown in Figure 2.
        figures: make Figure 1 (per-epoch RMSD/correlation, fold 0) and Figure 2 (maps of fold-0 cases; needs
            the run's store/ and model_final.pt or model.pt).
    """
    try:
        if isinstance(overrides, str):
            overrides = json.loads(overrides)
        if overrides is not None and not isinstance(overrides, dict):
            raise BraTSInputError(f"--overrides must be a JSON object of bundle settings, got {overrides!r}")
        res = make_report(work_dir, out_dir, last_k=last_k, folds=as_list(folds, "folds", cast=int),
                          variants=as_list(variants, "variants") or ("unc", "baseline"),
                          num_cases=num_cases, figures=as_bool(figures, "figures"), config=config,
                          overrides=overrides)
    except (BraTSInputError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(summary_line(res, last_k) + f" -> {ReportDir(out_dir).report}")


if __name__ == "__main__":
    fire.Fire(main)
