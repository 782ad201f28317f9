"""Learning check: train the tiny config on synthetic data and report what the network learned.

Trains ``train.json + tiny.json`` through ``python -m monai.bundle run training`` (a real run, as users start it)
on a synthetic set, then reads the run's ``metrics.csv``: validation Dice WT/TC/ET and the correlation of
``unc_output`` vs ``var1shot`` (and ``variance_stable``) with ``error_stable``. Targets: Dice WT >= 0.85 and
corr(unc_output) > corr(var1shot). Sized for about 10 minutes on 2 CPU cores.

    python scripts/check_learning.py --out check_learning.json
    python scripts/check_learning.py --out check_learning_mni152.json --anatomy mni152   # real brain anatomy
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fire

REPO_ROOT = Path(__file__).resolve().parents[1]


def main(
    out: str = "check_learning.json",
    work_dir: str | None = None,
    num_cases: int = 16,
    shape="[64,64,48]",
    spacing="[1,1,1]",
    label_noise: float = 0.5,
    anatomy: str = "blob",
    patch_size="[32,32,32]",
    filters="[8,16,32,64]",
    num_epochs: int = 80,
    iterations_per_epoch: int = 25,
    val_interval: int = 10,
    num_workers: int = 1,
    last_k: int = 2,
    seed: int = 0,
    min_dice_wt: float = 0.85,
):
    """Prepare a synthetic set (unless WORK_DIR already holds plans.json), train, write ONE JSON summary to OUT.

    Args:
        out: JSON summary path.
        work_dir: work directory (default: a new temporary folder); the run goes to WORK_DIR/runs/check/fold0.
        num_cases, shape, spacing, label_noise: synthetic data (2 folds: half the cases validate).
        anatomy: synthetic generator, "blob" (smooth head) or "mni152" (MNI152 brain deformed per case; a
            64x64x48 mm field of view shrinks it to fit, e.g. --shape "[64,80,64]" --spacing "[2.4,2.4,2.4]"
            keeps it at its real size).
        patch_size, filters: plan overrides for CPU.
        num_epochs, iterations_per_epoch, val_interval, num_workers: training length (tiny.json otherwise).
        last_k: validation rounds averaged for the reported numbers.
        min_dice_wt: the Dice WT target.
    """
    from custom.core.atomic import atomic_write_json
    from custom.core.cli import as_list
    from custom.data.synthetic import write_dataset
    from custom.evaluation.runs import learning_summary
    from custom.workflows.prepare import prepare_data

    start = time.perf_counter()
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="check_learning_"))
    if not (work / "plans.json").is_file():
        write_dataset(work / "raw", int(num_cases), as_list(shape, "shape", length=3, cast=int),
                      as_list(spacing, "spacing", length=3, cast=float), int(seed), float(label_noise),
                      anatomy=str(anatomy))
        prepare_data(work / "raw", work, num_folds=2, seed=int(seed),
                     patch_size=as_list(patch_size, "patch_size", length=3, cast=int),
                     filters=as_list(filters, "filters", cast=int))
    prep_s = time.perf_counter() - start
    run_dir = work / "runs" / "check" / "fold0"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--bundle_root", "bundle", "--config_file",
           "['bundle/configs/train.json','bundle/configs/tiny.json']", "--work_dir", str(work), "--fold", "0",
           "--output_dir", str(run_dir), "--num_epochs", str(int(num_epochs)),
           "--iterations_per_epoch", str(int(iterations_per_epoch)), "--val_interval", str(int(val_interval)),
           "--checkpoint_interval", str(int(val_interval)), "--num_workers", str(int(num_workers)),
           "--seed", str(int(seed)), "--progress_bar", "false"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True,
                          text=True)
    train_s = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n", file=sys.stderr)
        print(f"check_learning: training failed ({proc.returncode}); command: {' '.join(cmd)}", file=sys.stderr)
        sys.exit(2)
    summary = learning_summary(run_dir / "metrics.csv", last_k=int(last_k))
    corr_unc, corr_var = summary.get("val_corr_unc", math.nan), summary.get("val_corr_var1shot", math.nan)
    result = {
        "work_dir": str(work),
        "run_dir": str(run_dir),
        "num_cases": int(num_cases),
        "anatomy": str(anatomy),
        "num_epochs": int(num_epochs),
        "iterations_per_epoch": int(iterations_per_epoch),
        "last_k": int(last_k),
        "prepare_s": prep_s,
        "train_s": train_s,
        **{k: v for k, v in summary.items()},
        "target_dice_wt": float(min_dice_wt),
        "dice_wt_ok": bool(summary["val_dice_wt"] >= float(min_dice_wt)),
        "corr_unc_beats_var1shot": bool(corr_unc > corr_var),
    }
    result["passed"] = result["dice_wt_ok"] and result["corr_unc_beats_var1shot"]
    result = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in result.items()}
    atomic_write_json(out, result)
    print(f"check_learning: Dice WT/TC/ET {summary['val_dice_wt']:.3f}/{summary['val_dice_tc']:.3f}/"
          f"{summary['val_dice_et']:.3f}, corr unc {corr_unc:.3f} vs var1shot {corr_var:.3f} "
          f"(variance_stable {summary.get('val_corr_variance_stable', math.nan):.3f}), "
          f"train {train_s:.0f} s -> {'PASS' if result['passed'] else 'FAIL'} ({out})")
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    fire.Fire(main)
