"""The self-assessment study: candidate uncertainty heads vs var1shot, TTA, MC dropout and an ensemble, on unseen cases,
over several training seeds (issue 13; custom/workflows/study.py).

    .venv/bin/python scripts/study_uncertainty.py --out_dir R [--seeds "[0,1,2]"] [--anatomy mni152]
        [--variants "[baseline,paper,paper_proper_sg,mcdropout]"] [--num_epochs 70] [--parallel 2]

The default variants took 38 minutes on 2 idle CPU cores (bundle/docs/study/default_set). The table of
bundle/docs/study/ adds every other candidate head to the same folder (only the added runs train, only their maps
are scored):

    .venv/bin/python scripts/study_uncertainty.py --out_dir R \
        --variants "[baseline,paper,paper_sg,ring_sg,proper_sg,two_region_sg,paper_proper_sg,mcdropout]"

BraTS scale on a GPU (real data, nnU-Net's plan; hold out a folder of labelled cases as --test_dir):

    .venv/bin/python scripts/study_uncertainty.py --out_dir R --dataset_dir BRATS_TRAIN --test_dir BRATS_HELDOUT --plan real \
        --num_epochs 500 --iterations_per_epoch 250 --val_interval 5 --num_folds 5 --device cuda --parallel 1
"""

from __future__ import annotations

import sys

import fire

from custom.core.cli import as_bool, as_list
from custom.core.errors import BraTSInputError
from custom.workflows.study import DEFAULT_VARIANTS, study


def main(out_dir: str, seeds="[0,1,2]", variants=",".join(DEFAULT_VARIANTS), anatomy: str = "mni152",
         num_train: int = 24, num_test: int = 12, shape="[64,64,48]", spacing="[3,3,3]", label_noise: float = 0.5,
         data_seed: int = 0, num_folds: int = 4, plan: str = "tiny", patch_size="[32,32,32]",
         filters="[8,16,32,64]", num_epochs: int = 70, iterations_per_epoch: int = 25, val_interval: int = 10,
         mc_samples: int = 10, n_boot: int = 1000, parallel: int = 2, device: str = "cpu", dataset_dir=None,
         test_dir=None, train_only: bool = False):
    """Run or continue the study in OUT_DIR; prints a one-line summary and writes OUT_DIR/study.json and study.md.

    Args:
        out_dir: the study folder (raw/, work/, seed<k>/, study.json, study.md); an existing one is continued
            (finished steps are skipped) and refused if it was made with other settings.
        seeds: training seeds, e.g. "[0,1,2]".
        variants: runs per seed, among: baseline (no head), paper, ring, two_region, proper, paper_proper (unc_loss
            heads trained jointly), the same with _sg (trained on detached features), mcdropout. Variants or seeds
            added to a finished study train and score only what they add. paper is required (its segmentation is the
            paired figures' reference); without baseline there is no var1shot, TTA or ensemble, without mcdropout no
            MC dropout.
        anatomy: synthetic generator, "mni152" (real anatomy) or "blob".
        num_train, num_test: synthetic training cases and separately seeded unseen test cases.
        shape, spacing: synthetic grid (voxels, mm).
        label_noise: synthetic label boundary noise.
        data_seed: seed of the synthetic data and of the folds.
        num_folds: folds of the training set; fold 0 trains, its validation cases calibrate.
        plan: "tiny" (CPU: patch_size/filters below and tiny.json) or "real" (nnU-Net's plan, train.json alone).
        patch_size, filters: the tiny plan.
        num_epochs, iterations_per_epoch, val_interval: the schedule of every run.
        mc_samples: MC-dropout passes N.
        n_boot: bootstrap resamples of the cases for the 95% intervals.
        parallel: training runs at a time (each on one CPU thread on "cpu").
        device: "cpu" or "cuda".
        dataset_dir, test_dir: real labelled BraTS folders (training; held-out test) instead of synthetic data.
        train_only: stop after training.
    """
    try:
        result = study(out_dir, seeds=as_list(seeds, "seeds", cast=int), variants=as_list(variants, "variants"),
                       anatomy=anatomy, num_train=int(num_train), num_test=int(num_test),
                       shape=as_list(shape, "shape", length=3, cast=int),
                       spacing=as_list(spacing, "spacing", length=3, cast=float), label_noise=float(label_noise),
                       data_seed=int(data_seed), num_folds=int(num_folds), plan=plan,
                       patch_size=as_list(patch_size, "patch_size", length=3, cast=int),
                       filters=as_list(filters, "filters", cast=int), num_epochs=int(num_epochs),
                       iterations_per_epoch=int(iterations_per_epoch), val_interval=int(val_interval),
                       mc_samples=int(mc_samples), n_boot=int(n_boot), parallel=int(parallel), device=device,
                       dataset_dir=dataset_dir, test_dir=test_dir, train_only=as_bool(train_only, "train_only"))
    except BraTSInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    keys = [k for k in ("seed_mean.unc_paper.paired_auroc_missed_vs_tp", "seed_mean.var1shot.paired_auroc_missed_vs_tp")
            if k in result]
    print("study: " + ", ".join(f"{k} {result[k]:.3f}" for k in keys) + f" -> {out_dir}/study.md")


if __name__ == "__main__":
    fire.Fire(main)
