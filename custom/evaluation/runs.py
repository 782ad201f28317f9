"""Training runs as data: read ``metrics.csv``, run status, last-K summaries and fold averages (the paper's tables)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from custom.core.errors import BraTSInputError
from custom.core.numeric import nanmean


def learning_summary(metrics_csv, last_k: int = 1) -> dict:
    """Validation metrics of a run from its ``metrics.csv``: the mean over the last ``last_k`` validated epochs.

    Returns ``{"val_dice_wt", …, "val_corr_var1shot", "ema_pseudo_dice", "epochs", "validated_epochs"}``;
    NaN-valued entries (e.g. an undefined correlation) are skipped by :func:`custom.evaluation.runs.last_k_mean`.
    """
    import csv

    with open(metrics_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    validated = [r for r in rows if r.get("val_dice_wt", "") != ""]
    if not validated:
        raise ValueError(f"{metrics_csv}: no validated epoch yet")
    out: dict = {"epochs": len(rows), "validated_epochs": [int(r["epoch"]) for r in validated]}
    for col in rows[0]:
        if col.startswith("val_") or col == "ema_pseudo_dice":
            values = [float(r[col]) if r[col] != "" else float("nan") for r in validated]
            out[col] = float(last_k_mean(values, int(last_k)))
    return out


def read_json(path) -> dict:
    with open(path) as fh:
        return json.load(fh)


def last_k_mean(values: Sequence, k: int) -> float:
    """Mean of the last ``k`` defined values (None/NaN entries, e.g. epochs without validation, skipped).

    The paper's protocol: metrics averaged over the last 30 validation epochs. NaN if nothing is defined.
    """
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    defined = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.mean(defined[-int(k):])) if defined else math.nan


#: metrics.csv validation columns (DESIGN.md) summarised by the report
DICE_COLUMNS = ("val_dice_wt", "val_dice_tc", "val_dice_et", "val_dice_mean")

UNC_METRIC_COLUMNS = ("val_rmsd_unc", "val_corr_unc", "val_rmsd_variance_stable", "val_corr_variance_stable",
                      "val_rmsd_var1shot", "val_corr_var1shot")

VAL_COLUMNS = DICE_COLUMNS + UNC_METRIC_COLUMNS

#: run states: only "finished" runs enter the fold averages
RUN_FINISHED, RUN_UNFINISHED, RUN_MISSING = "finished", "unfinished", "missing"


def read_metrics_csv(path) -> list:
    """Rows of a run's metrics.csv as dicts of floats (empty cell -> NaN); ``epoch`` as int.

    Raises ``BraTSInputError`` naming the file when it cannot be parsed or lacks ``epoch``.
    """
    import csv

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
    """Per column: value at the final validation epoch and mean over the last ``k`` validation epochs.

    Epochs without validation (empty cells) are skipped, so "last k" means the last k epochs that have
    a value. Returns ``{column: {"final", "last_k_mean", "final_epoch", "num_values"}}`` (NaN when the
    column never has a value); ``k`` must be >= 1.
    """
    if int(k) < 1:
        raise ValueError(f"k (last validation epochs to average) must be >= 1, got {k}")
    out = {}
    for c in columns:
        vals = [(r["epoch"], r.get(c, float("nan"))) for r in rows]
        vals = [(e, v) for e, v in vals if v is not None and np.isfinite(v)]
        if not vals:
            out[c] = {"final": float("nan"), "last_k_mean": float("nan"), "final_epoch": None, "num_values": 0}
            continue
        tail = [v for _, v in vals[-int(k):]]
        out[c] = {"final": float(vals[-1][1]), "last_k_mean": float(np.mean(tail)),
                  "final_epoch": int(vals[-1][0]), "num_values": len(vals)}
    return out


def run_status(run_dir) -> tuple:
    """``(status, reason)`` of a training run folder: finished (FINISHED marker and metrics.csv),
    unfinished (metrics.csv without FINISHED) or missing (no metrics.csv)."""

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return RUN_MISSING, f"{run_dir}: run folder does not exist"
    if not (run_dir / "metrics.csv").is_file():
        return RUN_MISSING, f"{run_dir / 'metrics.csv'}: missing"
    if not (run_dir / "FINISHED").exists():
        return RUN_UNFINISHED, f"{run_dir}: no FINISHED marker (training interrupted or still running)"
    return RUN_FINISHED, ""


def collect_runs(work_dir, variants=("unc", "baseline"), folds=None, k: int = 30) -> dict:
    """Status and last-K summary of every ``W/runs/<variant>/fold<k>``.

    ``folds`` defaults to ``range(num_folds)`` of ``W/datalist.json`` (else the folds found on disk).
    Returns ``{variant: {fold: {"status", "reason", "dir", "num_epochs", "summary" (None unless
    metrics.csv exists)}}}``. Unfinished runs keep their summary (shown, never averaged).
    """
    import json

    work_dir = Path(work_dir)
    if folds is None:
        dl = work_dir / "datalist.json"
        if dl.is_file():
            folds = list(range(int(json.loads(dl.read_text()).get("num_folds", 5))))
        else:
            found = {int(p.name[4:]) for v in variants for p in (work_dir / "runs" / v).glob("fold*")
                     if p.name[4:].isdigit()}
            folds = sorted(found)
    runs = {}
    for v in variants:
        runs[v] = {}
        for f in folds:
            d = work_dir / "runs" / v / f"fold{int(f)}"
            status, reason = run_status(d)
            entry = {"status": status, "reason": reason, "dir": str(d), "num_epochs": 0, "summary": None}
            if status != RUN_MISSING:
                rows = read_metrics_csv(d / "metrics.csv")
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
