"""Validate a BraTS 2023 data set, write the datalist with folds, then plan and preprocess.

    .venv/bin/python scripts/prepare_data.py --dataset_dir RAW --work_dir W [--num_folds 5] [--seed 0] [--skip_invalid false]
        [--plan true] [--gpu_memory_gb 8] [--patch_size "[128,128,128]"] [--filters "[32,64,128,256,320,320]"]

Every problem of every case is reported in one message (file and problem) and the exit status is 1;
with --skip_invalid true the bad cases are left out, listed, and the datalist is still written.
"""

from __future__ import annotations

import sys
import time

import fire

from custom.core.cli import as_bool, as_list
from custom.core.errors import BraTSInputError
from custom.workflows.prepare import prepare_data


def main(
    dataset_dir: str,
    work_dir: str,
    num_folds: int = 5,
    seed: int = 0,
    skip_invalid=False,
    plan=True,
    gpu_memory_gb: float = 8,
    patch_size=None,
    filters=None,
    num_workers: int = 1,
):
    """Write WORK_DIR/datalist.json (and, with --plan, fingerprint.json, plans.json, preprocessed/).

    Args:
        dataset_dir: folder holding BraTS case folders BraTS-GLI-XXXXX-YYY/ (any depth).
        work_dir: output folder.
        num_folds: number of cross-validation folds.
        seed: seed of the fold split.
        skip_invalid: leave invalid cases out (listed in the datalist) instead of failing.
        plan: run planning and preprocessing after writing the datalist.
        gpu_memory_gb: GPU memory the plan targets.
        patch_size: override the planned patch size, e.g. "[32,32,32]".
        filters: override the planned filters per stage, e.g. "[8,16,32,64]".
        num_workers: worker processes for validation and preprocessing.
    """
    start = time.perf_counter()
    try:
        summary = prepare_data(
            dataset_dir,
            work_dir,
            num_folds=int(num_folds),
            seed=int(seed),
            skip_invalid=as_bool(skip_invalid, "skip_invalid"),
            plan=as_bool(plan, "plan"),
            gpu_memory_gb=float(gpu_memory_gb),
            patch_size=as_list(patch_size, "patch_size", length=3, cast=int),
            filters=as_list(filters, "filters", cast=int),
            num_workers=int(num_workers),
        )
    except (BraTSInputError, ValueError) as exc:
        print(f"prepare_data: error: {exc}", file=sys.stderr)
        sys.exit(1)
    for entry in summary["skipped"]:
        print(f"prepare_data: skipped invalid case {entry['case_id']}:", *entry["problems"], sep="\n  - ",
              file=sys.stderr)
    print(
        f"prepare_data: {summary['training']} training cases in {len(summary['fold_sizes'])} folds "
        f"(sizes {summary['fold_sizes']}), {summary['inference']} inference-only, "
        f"{summary['invalid']} invalid skipped -> {summary['datalist']}"
        + (f", plans {summary['plans']}" if "plans" in summary else "")
        + f" ({time.perf_counter() - start:.1f} s)"
    )


if __name__ == "__main__":
    fire.Fire(main)
