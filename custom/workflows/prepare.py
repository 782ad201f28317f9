"""``scripts/prepare_data.py``: validate a BraTS folder, write the datalist with folds, plan and preprocess."""

from __future__ import annotations

from typing import Any, Sequence

from custom.data.datalist import build_datalist, write_datalist
from custom.preprocessing.cache import plan_and_preprocess


def prepare_data(
    dataset_dir,
    work_dir,
    num_folds: int = 5,
    seed: int = 0,
    skip_invalid: bool = False,
    plan: bool = True,
    gpu_memory_gb: float = 8,
    patch_size: Sequence[int] | None = None,
    filters: Sequence[int] | None = None,
    num_workers: int = 1,
    progress: bool = True,
) -> dict:
    """Validate ``dataset_dir``, write ``work_dir/datalist.json`` and (``plan``) plan and preprocess.

    The datalist is written only after every case passed validation (or was skipped), atomically;
    a failing run leaves no new datalist behind.

    Returns:
        a summary dict: ``datalist`` path, counts of ``training``, ``inference`` and ``invalid`` cases,
        ``fold_sizes``, ``skipped`` (the datalist's ``invalid`` entries) and ``plans`` (plans.json path)
        when planned.
    """
    datalist = build_datalist(dataset_dir, num_folds, seed, skip_invalid, num_workers, progress)
    path = write_datalist(datalist, work_dir)
    fold_sizes = [0] * datalist["num_folds"]
    for e in datalist["training"]:
        fold_sizes[e["fold"]] += 1
    summary: dict[str, Any] = {
        "datalist": str(path),
        "training": len(datalist["training"]),
        "inference": len(datalist["inference"]),
        "invalid": len(datalist["invalid"]),
        "fold_sizes": fold_sizes,
        "skipped": datalist["invalid"],
    }
    if plan:
        # planning belongs to another module; imported here so that ingestion works without it

        plan_and_preprocess(path.parent, gpu_memory_gb=gpu_memory_gb, patch_size=patch_size,
                            filters=filters, num_workers=num_workers)
        summary["plans"] = str(path.parent / "plans.json")
    return summary
