"""Learning check (``scripts/check_learning.py``): train the tiny config on synthetic data, read what it learned.

Trains ``train.json + tiny.json`` through ``python -m monai.bundle run training`` (a real run, as users start it)
on a synthetic set, then reads the run's ``metrics.csv``: validation Dice WT/TC/ET and the correlation of
``unc_output`` vs ``var1shot`` (and ``variance_stable``) with ``error_stable``, averaged over the last
``last_k`` validation rounds. Targets: Dice WT >= ``min_dice_wt`` and corr(unc_output) > corr(var1shot).
"""

from __future__ import annotations

import math
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Sequence

from custom.core.atomic import atomic_write_json
from custom.core.layout import CONFIG_DIR, REPO_ROOT
from custom.evaluation.runs import learning_summary
from custom.workflows.cross_validate import training_command
from custom.workflows.prepare import prepare_synthetic

#: the variant name of the check's run folder ``W/runs/check/fold0``
CHECK_VARIANT = "check"


class TrainingFailed(RuntimeError):
    """The training subprocess exited non-zero; ``cmd``, ``returncode``, ``stdout`` and ``stderr`` say how."""

    def __init__(self, cmd, proc):
        super().__init__(f"training failed ({proc.returncode}); command: {' '.join(map(str, cmd))}")
        self.cmd, self.returncode, self.stdout, self.stderr = cmd, proc.returncode, proc.stdout, proc.stderr


def check_learning(out, work_dir=None, num_cases: int = 16, shape: Sequence[int] = (64, 64, 48),
                   spacing: Sequence[float] = (1.0, 1.0, 1.0), label_noise: float = 0.5, anatomy: str = "blob",
                   patch_size: Sequence[int] = (32, 32, 32),
                   filters: Sequence[int] = (8, 16, 32, 64), num_epochs: int = 80, iterations_per_epoch: int = 25,
                   val_interval: int = 10, num_workers: int = 1, last_k: int = 2, seed: int = 0,
                   min_dice_wt: float = 0.85) -> dict:
    """Prepare (unless ``work_dir`` holds plans.json), train fold 0, write the summary JSON to ``out``; return it.

    ``last_k`` counts validation ROUNDS: the numbers average the rounds in the last ``last_k * val_interval``
    epochs (:func:`custom.evaluation.runs.last_k_summary`); ``averaged_epochs`` in the result names them.

    Raises:
        TrainingFailed: the training command failed (its output is attached).
    """
    start = time.perf_counter()
    work = prepare_synthetic(Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="check_learning_")),
                             num_cases, shape, patch_size=list(patch_size), filters=list(filters), seed=seed,
                             label_noise=label_noise, spacing=spacing, anatomy=anatomy)
    prep_s = time.perf_counter() - start
    run = work.run(CHECK_VARIANT, 0)
    cmd = training_command([CONFIG_DIR / "train.json", CONFIG_DIR / "tiny.json"], work.path, 0, {
        "output_dir": str(run.path), "num_epochs": int(num_epochs), "iterations_per_epoch": int(iterations_per_epoch),
        "val_interval": int(val_interval), "checkpoint_interval": int(val_interval), "num_workers": int(num_workers),
        "seed": int(seed), "progress_bar": "false"})
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True,
                          text=True)
    train_s = time.perf_counter() - t0
    if proc.returncode != 0:
        raise TrainingFailed(cmd, proc)
    summary = learning_summary(run.metrics_csv, last_k_epochs=int(last_k) * int(val_interval))
    corr_unc, corr_var = summary.get("val_corr_unc", math.nan), summary.get("val_corr_var1shot", math.nan)
    corr_stable = summary.get("val_corr_variance_stable", math.nan)
    result = {
        "work_dir": str(work.path),
        "run_dir": str(run.path),
        "num_cases": int(num_cases),
        "anatomy": str(anatomy),
        "num_epochs": int(num_epochs),
        "iterations_per_epoch": int(iterations_per_epoch),
        "last_k": int(last_k),
        "prepare_s": prep_s,
        "train_s": train_s,
        **summary,
        "target_dice_wt": float(min_dice_wt),
        "dice_wt_ok": bool(summary["val_dice_wt"] >= float(min_dice_wt)),
        "corr_unc_beats_var1shot": bool(corr_unc > corr_var),
        # the paper's ordering on GT WT: unc_output > variance_stable > var1shot
        "corr_ordering_ok": bool(corr_unc > corr_stable > corr_var),
    }
    result["passed"] = result["dice_wt_ok"] and result["corr_ordering_ok"]
    result = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in result.items()}
    atomic_write_json(out, result)
    return result
