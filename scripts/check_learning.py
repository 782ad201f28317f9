"""Learning check: train the tiny config on synthetic data and report what the network learned.

    .venv/bin/python scripts/check_learning.py --out check_learning.json
    .venv/bin/python scripts/check_learning.py --out check_learning_mni152.json --anatomy mni152   # real brain anatomy

Sized for about 10 minutes on 2 CPU cores; the procedure is :mod:`custom.workflows.learning_check`.
"""

from __future__ import annotations

import math
import sys

import fire

from custom.core.cli import as_list
from custom.workflows.learning_check import TrainingFailed, check_learning


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

    Trains train.json + tiny.json through `.venv/bin/python -m monai.bundle run training` and reads the run's metrics.csv:
    validation Dice WT/TC/ET and the correlation of unc_output, variance_stable and var1shot with error_stable.
    Targets: Dice WT >= MIN_DICE_WT and corr(unc_output) > corr(variance_stable) > corr(var1shot) (the paper's
    ordering); exit status 0 when both hold, 1 when not, 2 when training fails.

    Args:
        out: JSON summary path.
        work_dir: work directory (default: a new temporary folder); the run goes to WORK_DIR/runs/check/fold0.
        num_cases: synthetic cases (2 folds: half the cases validate).
        shape: synthetic volume size in voxels, e.g. "[64,64,48]".
        spacing: synthetic voxel size in mm, e.g. "[1,1,1]".
        label_noise: boundary displacement of the synthetic labels in voxels.
        anatomy: synthetic generator, "blob" (smooth head) or "mni152" (MNI152 brain deformed per case; a
            64x64x48 mm field of view shrinks it to fit, e.g. --shape "[64,80,64]" --spacing "[2.4,2.4,2.4]"
            keeps it at its real size).
        patch_size: plan override for CPU, e.g. "[32,32,32]".
        filters: plan override for CPU, e.g. "[8,16,32,64]".
        num_epochs: training epochs.
        iterations_per_epoch: iterations per epoch.
        val_interval: epochs between validation rounds (also the checkpoint interval).
        num_workers: DataLoader workers.
        last_k: validation rounds averaged for the reported numbers (the last LAST_K * VAL_INTERVAL epochs).
        seed: seed of the data, the fold split and training.
        min_dice_wt: the Dice WT target.
    """
    try:
        result = check_learning(out, work_dir=work_dir, num_cases=int(num_cases),
                                shape=as_list(shape, "shape", length=3, cast=int),
                                spacing=as_list(spacing, "spacing", length=3, cast=float),
                                label_noise=float(label_noise), anatomy=str(anatomy),
                                patch_size=as_list(patch_size, "patch_size", length=3, cast=int),
                                filters=as_list(filters, "filters", cast=int), num_epochs=int(num_epochs),
                                iterations_per_epoch=int(iterations_per_epoch), val_interval=int(val_interval),
                                num_workers=int(num_workers), last_k=int(last_k), seed=int(seed),
                                min_dice_wt=float(min_dice_wt))
    except TrainingFailed as exc:
        print(exc.stdout[-4000:], exc.stderr[-4000:], sep="\n", file=sys.stderr)
        print(f"check_learning: {exc}", file=sys.stderr)
        sys.exit(2)

    def num(key):
        return math.nan if result.get(key) is None else result[key]

    print(f"check_learning: Dice WT/TC/ET {num('val_dice_wt'):.3f}/{num('val_dice_tc'):.3f}/"
          f"{num('val_dice_et'):.3f}, corr unc {num('val_corr_unc'):.3f} vs var1shot {num('val_corr_var1shot'):.3f} "
          f"(variance_stable {num('val_corr_variance_stable'):.3f}), "
          f"train {result['train_s']:.0f} s -> {'PASS' if result['passed'] else 'FAIL'} ({out})")
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    fire.Fire(main)
