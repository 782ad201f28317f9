"""``datalist.json``: the validated cases of a data set and their seeded folds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from custom.core.atomic import atomic_write_json
from custom.core.constants import MODALITIES
from custom.core.errors import BraTSInputError
from custom.core.layout import DATALIST_NAME
from custom.data.cases import scan_dataset, validate_case


def assign_folds(case_ids: Iterable[str], num_folds: int, seed: int) -> dict:
    """Seeded fold index of every case, independent of the order of ``case_ids``.

    The ids are sorted, permuted with ``numpy.random.default_rng(seed)`` and dealt round-robin, so
    folds are disjoint, cover every case and differ in size by at most one.
    """
    ids = sorted(set(case_ids))
    num_folds = int(num_folds)
    if num_folds < 1:
        raise ValueError(f"num_folds must be >= 1, got {num_folds}")
    order = np.random.default_rng(int(seed)).permutation(len(ids))
    return {ids[j]: int(i % num_folds) for i, j in enumerate(order)}


def _validate_all(cases, num_workers: int, progress: bool) -> list[list[str]]:
    from tqdm import tqdm

    bar = dict(total=len(cases), desc="validating cases", unit="case", disable=None if progress else True)
    if num_workers > 1 and len(cases) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=num_workers) as pool:
            return list(tqdm(pool.map(validate_case, cases, chunksize=4), **bar))
    return [validate_case(c) for c in tqdm(cases, **bar)]


def build_datalist(dataset_dir, num_folds: int = 5, seed: int = 0, skip_invalid: bool = False,
                   num_workers: int = 1, progress: bool = True) -> dict:
    """Scan and validate ``dataset_dir`` and return the datalist (format in bundle/docs/DESIGN.md).

    Raises:
        BraTSInputError: no cases; invalid cases without ``skip_invalid`` (one message listing every
            problem of every case); fewer valid training cases than folds.
    """
    num_folds = int(num_folds)
    if num_folds < 2:
        raise BraTSInputError(f"num_folds must be >= 2 for cross-validation, got {num_folds}")
    root = Path(dataset_dir).expanduser().resolve()
    cases = scan_dataset(root)
    if not cases:
        raise BraTSInputError(f"{root}: no BraTS case folders (BraTS-GLI-XXXXX-YYY) found")
    all_problems = _validate_all(cases, max(1, int(num_workers)), progress)
    invalid = [{"case_id": c.case_id, "problems": p} for c, p in zip(cases, all_problems) if p]
    if invalid and not skip_invalid:
        raise BraTSInputError(
            [p for entry in invalid for p in entry["problems"]],
            header=f"{len(invalid)} of {len(cases)} cases in {root} are invalid "
                   f"(fix them, or pass --skip_invalid true to leave them out)",
        )
    valid = [c for c, p in zip(cases, all_problems) if not p]
    training = [c for c in valid if c.has_label]
    inference = [c for c in valid if not c.has_label]
    if len(training) < num_folds:
        raise BraTSInputError(
            f"{root}: {len(training)} valid training cases (with a seg file), "
            f"fewer than num_folds={num_folds}"
        )
    folds = assign_folds([c.case_id for c in training], num_folds, seed)
    return {
        "modalities": list(MODALITIES),
        "num_folds": num_folds,
        "seed": int(seed),
        "dataset_dir": str(root),
        "training": [
            {"case_id": c.case_id, "image": [str(p) for p in c.image_paths], "label": str(c.label),
             "fold": folds[c.case_id]}
            for c in training
        ],
        "inference": [{"case_id": c.case_id, "image": [str(p) for p in c.image_paths]} for c in inference],
        "invalid": invalid,
    }


def write_datalist(datalist: dict, work_dir) -> Path:
    """Write ``work_dir/datalist.json`` atomically (whole or not at all); returns its path."""

    path = Path(work_dir).expanduser().resolve() / DATALIST_NAME
    atomic_write_json(path, datalist)
    return path


def load_datalist(path) -> dict:
    """Read a datalist written by ``prepare_data`` (a file, or a work dir holding datalist.json).

    Raises:
        BraTSInputError: missing or unreadable file, or a datalist without the expected structure.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / DATALIST_NAME
    if not path.is_file():
        raise BraTSInputError(f"{path}: datalist not found (run scripts/prepare_data.py first)")
    try:
        datalist = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BraTSInputError(f"{path}: unreadable datalist ({type(exc).__name__}: {exc})") from None
    problems = []
    if not isinstance(datalist, dict):
        raise BraTSInputError(f"{path}: datalist must be a JSON object")
    for key in ("modalities", "num_folds", "training"):
        if key not in datalist:
            problems.append(f"{path}: missing key {key!r}")
    if problems:
        raise BraTSInputError(problems)
    if list(datalist["modalities"]) != list(MODALITIES):
        problems.append(f"{path}: modalities {datalist['modalities']} differ from {list(MODALITIES)}")
    num_folds = datalist["num_folds"]
    for i, entry in enumerate(datalist["training"]):
        where = f"{path}: training[{i}]"
        if not isinstance(entry, dict) or not {"case_id", "image", "label", "fold"} <= set(entry):
            problems.append(f"{where} needs case_id, image, label and fold")
        elif len(entry["image"]) != len(MODALITIES):
            problems.append(f"{where} ({entry['case_id']}) has {len(entry['image'])} images, expected {len(MODALITIES)}")
        elif not (isinstance(entry["fold"], int) and 0 <= entry["fold"] < num_folds):
            problems.append(f"{where} ({entry['case_id']}) has fold {entry['fold']!r} outside [0, {num_folds})")
    if problems:
        raise BraTSInputError(problems, header="invalid datalist")
    datalist.setdefault("inference", [])
    datalist.setdefault("invalid", [])
    return datalist


def fold_split(datalist, fold: int) -> tuple[list, list]:
    """``(train_list, val_list)`` of training entries: fold ``fold`` is validation, the others training.

    ``datalist`` is a dict from ``load_datalist``/``build_datalist`` or a path accepted by ``load_datalist``.
    """
    if not isinstance(datalist, Mapping):
        datalist = load_datalist(datalist)
    num_folds = int(datalist["num_folds"])
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or not 0 <= int(fold) < num_folds:
        raise ValueError(f"fold must be an integer in [0, {num_folds}), got {fold!r}")
    train = [dict(e) for e in datalist["training"] if e["fold"] != int(fold)]
    val = [dict(e) for e in datalist["training"] if e["fold"] == int(fold)]
    return train, val
