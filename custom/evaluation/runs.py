"""Training runs as data: read ``metrics.csv``, last-K summaries and fold averages (the paper's tables).

"Last K" is the paper's protocol "metrics averaged over the last 30 epochs": the validation rounds whose epoch
falls in the last K epochs of the run (``epoch > last_epoch - K``). With validation every 5 epochs the last 30
epochs hold 6 rounds, not 30 (30 rounds would reach back 150 epochs). Every summary names the epochs it averaged.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from custom.core.errors import BraTSInputError
from custom.core.layout import RUN_FINISHED, RUN_MISSING, RUN_OTHER_CONFIG, RunDir, WorkDir
from custom.core.numeric import nanmean
from custom.core.run_config import config_differences, read_run_config

#: metrics.csv validation columns (DESIGN.md) summarised by the report
DICE_COLUMNS = ("val_dice_wt", "val_dice_tc", "val_dice_et", "val_dice_mean")

UNC_METRIC_COLUMNS = ("val_rmsd_unc", "val_corr_unc", "val_rmsd_variance_stable", "val_corr_variance_stable",
                      "val_rmsd_var1shot", "val_corr_var1shot")

VAL_COLUMNS = DICE_COLUMNS + UNC_METRIC_COLUMNS


def read_metrics_csv(path) -> list:
    """Rows of a run's metrics.csv as dicts of floats (empty cell -> NaN); ``epoch`` as int.

    Raises ``BraTSInputError`` naming the file when it cannot be parsed or lacks ``epoch``.
    """
    path = Path(path)
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or "epoch" not in reader.fieldnames:
                raise BraTSInputError(f"{path}: not a metrics.csv (no 'epoch' column; header {reader.fieldnames})")
            rows = []
            for i, raw in enumerate(reader, start=2):
                row = {}
                for k, v in raw.items():
                    if k is None:
                        continue
                    v = (v or "").strip()
                    try:
                        row[k] = float(v) if v not in ("", "nan", "None") else float("nan")
                    except ValueError:
                        raise BraTSInputError(f"{path}: line {i}: column {k!r} holds {v!r}, not a number") from None
                row["epoch"] = int(row["epoch"])
                rows.append(row)
    except OSError as exc:
        raise BraTSInputError(f"{path}: cannot be read ({exc})") from None
    return rows


def last_k_summary(rows: list, columns=VAL_COLUMNS, k: int = 30) -> dict:
    """Per column: the value at the final validation epoch and the mean over the last ``k`` EPOCHS.

    The window is ``epoch > last_epoch - k`` where ``last_epoch`` is the run's last row (the epochs trained so
    far); within it, the epochs with a value (validation rounds; NaN cells such as an undefined correlation are
    skipped) are averaged. A run shorter than ``k`` epochs is averaged over all its rounds.

    Returns:
        ``{column: {"final", "final_epoch", "last_k_mean", "last_k_epochs", "num_values"}}``: ``last_k_epochs``
        lists the epochs averaged (empty and ``last_k_mean`` NaN when no round falls in the window);
        ``num_values`` counts every round with a value. ``k`` must be >= 1.
    """
    if int(k) < 1:
        raise ValueError(f"k (last epochs to average) must be >= 1, got {k}")
    last_epoch = max((int(r["epoch"]) for r in rows), default=0)
    first_in_window = last_epoch - int(k) + 1
    out = {}
    for c in columns:
        vals = [(int(r["epoch"]), r.get(c, float("nan"))) for r in rows]
        vals = [(e, float(v)) for e, v in vals if v is not None and math.isfinite(v)]
        window = [(e, v) for e, v in vals if e >= first_in_window]
        out[c] = {"final": vals[-1][1] if vals else float("nan"),
                  "final_epoch": vals[-1][0] if vals else None,
                  "last_k_mean": float(np.mean([v for _, v in window])) if window else float("nan"),
                  "last_k_epochs": [e for e, _ in window],
                  "num_values": len(vals)}
    return out


def learning_summary(metrics_csv, last_k_epochs: int = 1) -> dict:
    """Validation metrics of a run (``scripts/check_learning.py``): each ``val_*`` column and ``ema_pseudo_dice``
    averaged over the validation rounds of the last ``last_k_epochs`` epochs (:func:`last_k_summary`).

    Returns ``{"val_dice_wt", …, "ema_pseudo_dice", "epochs", "validated_epochs", "averaged_epochs"}``.

    Raises:
        ValueError: no epoch has been validated yet.
    """
    rows = read_metrics_csv(metrics_csv)
    columns = [c for c in (rows[0] if rows else {}) if c.startswith("val_") or c == "ema_pseudo_dice"]
    validated = [r["epoch"] for r in rows if math.isfinite(r.get("val_dice_wt", float("nan")))]
    if not validated:
        raise ValueError(f"{metrics_csv}: no validated epoch yet")
    summary = last_k_summary(rows, columns, k=int(last_k_epochs))
    out: dict = {"epochs": len(rows), "validated_epochs": validated,
                 "averaged_epochs": summary["val_dice_wt"]["last_k_epochs"]}
    out.update({c: summary[c]["last_k_mean"] for c in columns})
    return out


def other_config_reason(run: RunDir, expected: Mapping) -> str:
    """Why ``run`` is not a run of the ``expected`` settings (:func:`custom.core.run_config.config_differences`
    on its ``train_config.json``), or "" when it is."""
    try:
        saved = read_run_config(run.train_config)
    except BraTSInputError as exc:
        return "; ".join(exc.problems)
    if saved is None:
        return f"{run.train_config}: missing, so its settings cannot be checked"
    differences = config_differences(saved, expected)
    return f"trained with other settings than expected: {'; '.join(differences)}" if differences else ""


def collect_runs(work_dir, variants=("unc", "baseline"), folds=None, k: int = 30,
                 expected: Callable[[str, int], Mapping] | None = None) -> dict:
    """Status and last-K summary of every ``W/runs/<variant>/fold<k>``.

    ``folds`` defaults to ``range(num_folds)`` of ``W/datalist.json`` (else the folds found on disk).
    ``expected(variant, fold)`` gives the settings the run should have been trained with (the resolved
    ``run_config`` of the cross-validation's configs): a run with a metrics.csv whose ``train_config.json``
    differs (:func:`other_config_reason`) gets the status ``other_config`` and is never averaged.
    Returns ``{variant: {fold: {"status", "reason", "dir", "num_epochs", "summary" (None unless
    metrics.csv exists)}}}``. Unfinished and other-settings runs keep their summary (shown, never averaged).
    """
    work = WorkDir(work_dir)
    if folds is None:
        if work.datalist.is_file():
            folds = list(range(int(json.loads(work.datalist.read_text()).get("num_folds", 5))))
        else:
            folds = sorted({f for v in variants for f in work.folds_of(v)})
    runs = {}
    for v in variants:
        runs[v] = {}
        for f in folds:
            run = work.run(v, f)
            status, reason = run.status()
            entry = {"status": status, "reason": reason, "dir": str(run.path), "num_epochs": 0, "summary": None}
            if status != RUN_MISSING and expected is not None:
                reason = other_config_reason(run, expected(v, int(f)))
                if reason:
                    entry["status"], entry["reason"] = RUN_OTHER_CONFIG, f"{run.path}: {reason}"
            if status != RUN_MISSING:
                rows = read_metrics_csv(run.metrics_csv)
                entry["num_epochs"] = len(rows)
                entry["summary"] = last_k_summary(rows, k=k)
            runs[v][int(f)] = entry
    return runs


def fold_average(fold_entries: dict, columns=VAL_COLUMNS) -> dict:
    """Mean over FINISHED folds of each column's ``final`` and ``last_k_mean``.

    Returns ``{"folds_used": [...], "folds_excluded": {fold: status}, column: {"final", "last_k_mean"}}``;
    every average says which folds it holds, so a missing fold can never pass unnoticed.
    """
    used = sorted(f for f, e in fold_entries.items() if e["status"] == RUN_FINISHED and e["summary"])
    out = {"folds_used": used,
           "folds_excluded": {int(f): e["status"] for f, e in fold_entries.items() if f not in used}}
    for c in columns:
        out[c] = {stat: nanmean([fold_entries[f]["summary"][c][stat] for f in used])
                  for stat in ("final", "last_k_mean")}
    return out

