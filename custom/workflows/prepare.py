"""``scripts/prepare_data.py``: validate a BraTS folder, write the datalist with folds, plan and preprocess."""

from __future__ import annotations

from typing import Any, Sequence

from custom.core.layout import WorkDir
from custom.data.datalist import build_datalist, write_datalist
from custom.data.synthetic import write_dataset
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
        plan_and_preprocess(path.parent, gpu_memory_gb=gpu_memory_gb, patch_size=patch_size,
                            filters=filters, num_workers=num_workers)
        summary["plans"] = str(WorkDir(path.parent).plans)
    return summary


def prepare_synthetic(work_dir, num_cases: int, shape: Sequence[int], patch_size: Sequence[int] | None = None,
                      filters: Sequence[int] | None = None, seed: int = 0, label_noise: float = 0.5,
                      num_folds: int = 2, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                      anatomy: str = "blob") -> WorkDir:
    """A work directory on synthetic data (learning check, benchmarks): ``W/raw`` with ``num_cases`` cases of
    ``shape`` at ``spacing`` (mm) from the ``anatomy`` generator (:func:`custom.data.synthetic.write_dataset`), then
    :func:`prepare_data` with the given plan overrides. Kept when ``W/plans.json`` exists already (a prepared W
    is reused as is)."""
    work = WorkDir(work_dir)
    if not work.plans.is_file():
        write_dataset(work.path / "raw", int(num_cases), [int(s) for s in shape], [float(s) for s in spacing],
                      int(seed), float(label_noise), anatomy=str(anatomy))
        prepare_data(work.path / "raw", work.path, num_folds=int(num_folds), seed=int(seed), patch_size=patch_size,
                     filters=filters)
    return work
