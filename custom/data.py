"""BraTS 2023 ingestion: scan case folders, validate every file, assign folds, write and read the datalist.

A case folder ``BraTS-GLI-XXXXX-YYY/`` holds ``BraTS-GLI-XXXXX-YYY-{t1c,t1n,t2f,t2w}.nii.gz`` and, for a
training case, ``BraTS-GLI-XXXXX-YYY-seg.nii.gz``. A case without a seg file is an inference-only case.

Every problem is reported as ``"<file>: <what is wrong>"``; the checks of ``validate_case`` and
``load_case_arrays`` are the same, so a file that passes ingestion also loads at training, inference
and serving time, and a file that fails names itself there too (``custom.errors.BraTSInputError``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from custom.constants import CASE_ID_PATTERN, LABEL_VALUES, MODALITIES, SEG_SUFFIX
from custom.errors import BraTSInputError

__all__ = [
    "AFFINE_TOLERANCE",
    "CaseFiles",
    "assign_folds",
    "build_datalist",
    "fold_split",
    "load_case_arrays",
    "load_datalist",
    "prepare_data",
    "scan_dataset",
    "validate_case",
    "write_datalist",
]

#: largest allowed absolute difference between the affines of a case's files
AFFINE_TOLERANCE = 1e-3
NIFTI_SUFFIXES = (".nii.gz", ".nii")
DATALIST_NAME = "datalist.json"


# ----------------------------------------------------------------------------------------- scanning


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case folder as found on disk (nothing read yet).

    ``images`` maps each modality to its path, or to None when the file is missing; ``label`` is the
    seg file or None (inference-only case); ``scan_problems`` lists what is wrong with the folder
    itself (missing, extra or duplicated files).
    """

    case_id: str
    case_dir: Path
    images: dict = field(default_factory=dict)
    label: Path | None = None
    scan_problems: tuple = ()

    @property
    def image_paths(self) -> list:
        return [self.images.get(m) for m in MODALITIES]

    @property
    def has_label(self) -> bool:
        return self.label is not None


def _nifti_stem(name: str) -> str | None:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _scan_case_dir(case_dir: Path) -> CaseFiles:
    case_id = case_dir.name
    expected = {f"{case_id}-{m}": m for m in MODALITIES + (SEG_SUFFIX,)}
    found: dict[str, list[Path]] = {}
    problems = []
    for entry in sorted(case_dir.iterdir()):
        # hidden files are editors' and our own temporary files (".name.tmp-<pid>.ext"), never data
        if entry.name.startswith(".") or not entry.is_file():
            continue
        stem = _nifti_stem(entry.name)
        if stem is None:
            continue
        role = expected.get(stem)
        if role is None:
            problems.append(
                f"{entry}: unexpected NIfTI file in case folder (expected {case_id}-<t1c|t1n|t2f|t2w|seg>.nii.gz)"
            )
            continue
        found.setdefault(role, []).append(entry)
    for role, paths in found.items():
        if len(paths) > 1:
            problems.append(f"{paths[0]}: duplicate {role} file (also {', '.join(p.name for p in paths[1:])})")
    images = {}
    for m in MODALITIES:
        if m in found:
            images[m] = found[m][0]
        else:
            images[m] = None
            problems.append(f"{case_dir / f'{case_id}-{m}.nii.gz'}: missing {m} modality file")
    label = found[SEG_SUFFIX][0] if SEG_SUFFIX in found else None
    if not CASE_ID_PATTERN.match(case_id):
        problems.insert(0, f"{case_dir}: folder holds NIfTI files but its name is not a BraTS case id "
                           "(BraTS-GLI-XXXXX-YYY)")
    return CaseFiles(case_id, case_dir, images, label, tuple(problems))


def scan_dataset(dataset_dir) -> list[CaseFiles]:
    """Find every BraTS case folder under ``dataset_dir`` (any depth), sorted by case id.

    Folders named like a case id (``CASE_ID_PATTERN``) are cases (their subfolders are not scanned);
    other folders that directly hold NIfTI files are returned too, with a problem saying their name is
    not a case id. Duplicate case ids (the same case in two places) get a problem each.

    Raises:
        BraTSInputError: ``dataset_dir`` is not a folder.
    """
    root = Path(dataset_dir).expanduser().resolve()
    if not root.is_dir():
        raise BraTSInputError(f"{root}: dataset folder does not exist or is not a folder")
    cases = []
    for current, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        cur = Path(current)
        holds_nifti = any(_nifti_stem(f) is not None and not f.startswith(".") for f in files)
        if CASE_ID_PATTERN.match(cur.name):
            cases.append(_scan_case_dir(cur))
            dirs[:] = []  # a case folder's subfolders are not cases
        elif holds_nifti:
            cases.append(_scan_case_dir(cur))  # reported as misnamed; its subfolders are still scanned
    by_id: dict[str, list[CaseFiles]] = {}
    for case in cases:
        by_id.setdefault(case.case_id, []).append(case)
    result = []
    for case_id in sorted(by_id):
        group = by_id[case_id]
        for case in group:
            if len(group) > 1:
                others = ", ".join(str(c.case_dir) for c in group if c is not case)
                case = CaseFiles(case.case_id, case.case_dir, case.images, case.label,
                                 case.scan_problems + (f"{case.case_dir}: duplicate case id (also in {others})",))
            result.append(case)
    return result


# --------------------------------------------------------------------------------------- validation


@dataclass
class _Reference:
    path: Path
    shape: tuple
    affine: np.ndarray


def _check_file(path, role: str, ref: _Reference | None, keep: bool):
    """Read one NIfTI file once and check it.

    Header checks (3D, affine, shape/affine against ``ref``) come before the voxel data is read.

    Returns:
        ``(data or None, reference for the next files or None, problems)``; ``data`` only when ``keep``
        and the file was readable.
    """
    import nibabel as nib

    path = Path(path)
    problems: list[str] = []
    if not path.is_file():
        return None, None, [f"{path}: file not found"]
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for bad headers; all mean "unreadable"
        return None, None, [f"{path}: unreadable or corrupt NIfTI file ({type(exc).__name__}: {exc})"]
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        return None, None, [f"{path}: not a NIfTI image ({type(img).__name__})"]
    shape = tuple(int(s) for s in img.shape)
    if len(shape) != 3:
        return None, None, [f"{path}: volume is {len(shape)}D with shape {shape}, expected a 3D volume (X, Y, Z)"]
    affine = np.asarray(img.affine, dtype=np.float64)
    this_ref = None
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        problems.append(f"{path}: invalid affine (non-finite or singular)")
    else:
        this_ref = _Reference(path, shape, affine)
    if ref is not None:
        if shape != ref.shape:
            problems.append(f"{path}: shape {shape} differs from {ref.path.name} shape {ref.shape}")
        elif this_ref is not None:
            diff = float(np.abs(affine - ref.affine).max())
            if diff > AFFINE_TOLERANCE:
                problems.append(
                    f"{path}: affine differs from {ref.path.name} (max difference {diff:.4g} > {AFFINE_TOLERANCE:g})"
                )
    dtype = img.get_data_dtype()
    if dtype.kind not in "biuf":
        problems.append(f"{path}: unsupported voxel type {dtype} (expected integer or float)")
        return None, this_ref, problems
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # truncated gzip (EOFError), bad zlib stream, short file (OSError/ValueError)
        problems.append(f"{path}: unreadable or corrupt voxel data ({type(exc).__name__}: {exc})")
        return None, this_ref, problems
    problems.extend(_check_values(path, role, data))
    return (data if keep else None), this_ref, problems


def _check_values(path: Path, role: str, data: np.ndarray) -> list[str]:
    problems = []
    is_float = data.dtype.kind == "f"
    if is_float and not np.isfinite(data).all():
        n_nan = int(np.isnan(data).sum())
        n_inf = int(np.isinf(data).sum())
        if n_nan:
            problems.append(f"{path}: contains {n_nan} NaN values")
        if n_inf:
            problems.append(f"{path}: contains {n_inf} infinite values")
        data = np.where(np.isfinite(data), data, 0)
    if role == SEG_SUFFIX:
        lo, hi = min(LABEL_VALUES), max(LABEL_VALUES)
        bad = (data < lo) | (data > hi)
        if is_float:
            bad |= data != np.round(data)
        n_bad = int(bad.sum())
        if n_bad:
            values = np.unique(data[bad])
            shown = ", ".join(f"{v:g}" for v in values[:10]) + (", ..." if len(values) > 10 else "")
            problems.append(
                f"{path}: labels outside {{{', '.join(map(str, LABEL_VALUES))}}}: values [{shown}] in {n_bad} voxels"
            )
    elif not data.any():
        problems.append(f"{path}: image is all zero")
    return problems


def _case_files(case: CaseFiles):
    files = [(m, p) for m, p in zip(MODALITIES, case.image_paths) if p is not None]
    if case.label is not None:
        files.append((SEG_SUFFIX, case.label))
    return files


def validate_case(case: CaseFiles) -> list[str]:
    """Every problem of one case, each as ``"<file>: <problem>"``; empty when the case is valid.

    Checks: missing, extra or duplicate files (from the scan), unreadable/corrupt files, non-3D volumes,
    shape or affine (tolerance ``AFFINE_TOLERANCE``) mismatch with the case's first readable file,
    NaN or infinite values, all-zero images, labels outside ``LABEL_VALUES``. Each file is read once.
    """
    problems = list(case.scan_problems)
    ref = None
    for role, path in _case_files(case):
        _, this_ref, file_problems = _check_file(path, role, ref, keep=False)
        problems.extend(file_problems)
        if ref is None and this_ref is not None:
            ref = this_ref
    return problems


def load_case_arrays(image_paths, label_path=None):
    """Load and validate one case.

    Args:
        image_paths: four paths in ``MODALITIES`` order (t1c, t1n, t2f, t2w), or a mapping modality -> path.
        label_path: seg file or None.

    Returns:
        ``(image float32 (4, X, Y, Z), label uint8 (X, Y, Z) or None, affine float64 (4, 4), spacing (3,) mm)``;
        affine and spacing are those of the first image.

    Raises:
        BraTSInputError: listing every problem of every file (same checks as ``validate_case``).
    """
    if isinstance(image_paths, Mapping):
        missing = [m for m in MODALITIES if m not in image_paths]
        if missing:
            raise BraTSInputError(f"image paths lack modalities {missing} (need {list(MODALITIES)})")
        image_paths = [image_paths[m] for m in MODALITIES]
    if isinstance(image_paths, (str, os.PathLike)) or len(image_paths) != len(MODALITIES):
        raise BraTSInputError(
            f"expected {len(MODALITIES)} image paths in order {list(MODALITIES)}, got {image_paths!r}"
        )
    files = list(zip(MODALITIES, image_paths))
    if label_path is not None:
        files.append((SEG_SUFFIX, label_path))
    problems: list[str] = []
    arrays = {}
    ref = None
    for role, path in files:
        data, this_ref, file_problems = _check_file(path, role, ref, keep=True)
        problems.extend(file_problems)
        if ref is None and this_ref is not None:
            ref = this_ref
        arrays[role] = data
    if problems:
        raise BraTSInputError(problems, header="cannot load case")
    image = np.empty((len(MODALITIES),) + ref.shape, dtype=np.float32)
    for c, m in enumerate(MODALITIES):
        image[c] = arrays.pop(m)
    label = None
    if label_path is not None:
        label = np.asarray(arrays.pop(SEG_SUFFIX)).astype(np.uint8)
    affine = ref.affine
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    return image, label, affine, spacing


# -------------------------------------------------------------------------------------------- folds


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


# ------------------------------------------------------------------------------------------ datalist


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
    from custom.io_utils import atomic_write_json

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


# ------------------------------------------------------------------------------------ command logic


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
        from custom.preprocess import plan_and_preprocess

        plan_and_preprocess(path.parent, gpu_memory_gb=gpu_memory_gb, patch_size=patch_size,
                            filters=filters, num_workers=num_workers)
        summary["plans"] = str(path.parent / "plans.json")
    return summary
