"""BraTS 2023 ingestion: scan case folders, validate every file, assign folds, write and read the datalist.

A case folder ``BraTS-GLI-XXXXX-YYY/`` holds ``BraTS-GLI-XXXXX-YYY-{t1c,t1n,t2f,t2w}.nii.gz`` and, for a
training case, ``BraTS-GLI-XXXXX-YYY-seg.nii.gz``. A case without a seg file is an inference-only case.

Every problem is reported as ``"<file>: <what is wrong>"``; the checks of ``validate_case`` and
``load_case_arrays`` are the same, so a file that passes ingestion also loads at training, inference
and serving time, and a file that fails names itself there too (``custom.core.errors.BraTSInputError``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from custom.core.constants import CASE_ID_PATTERN, MODALITIES, SEG_SUFFIX
from custom.core.errors import BraTSInputError
from custom.data.nifti import check_file

logger = logging.getLogger(__name__)


NIFTI_SUFFIXES = (".nii.gz", ".nii")


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
        _, this_ref, file_problems = check_file(path, role, ref, keep=False)
        problems.extend(file_problems)
        if ref is None and this_ref is not None:
            ref = this_ref
    return problems


def list_case_folders(input_dir) -> list[Path]:
    """Case folders under ``input_dir`` (sorted); ``input_dir`` itself if it is one case folder."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise BraTSInputError(f"{input_dir}: input folder not found", header="cannot run inference")
    if any(input_dir.glob(f"*-{MODALITIES[0]}.nii*")):
        return [input_dir]
    cases = []
    for p in sorted(input_dir.iterdir()):
        if not p.is_dir() or p.name.startswith("."):
            continue
        if not any(p.glob("*.nii*")):  # not a case (e.g. an output or notes folder): a case has NIfTI files
            logger.warning("skipping %s: no NIfTI files inside", p)
            continue
        cases.append(p)
    if not cases:
        raise BraTSInputError(f"{input_dir}: no case folders inside (expected <case_id>/<case_id>-t1c.nii.gz ...)",
                              header="cannot run inference")
    return cases


def find_case_files(case_dir) -> dict:
    """``{"case_id", "image": [4 paths in MODALITIES order], "label": path or None}`` of a case folder.

    Files are ``<case_id>-<modality>.nii.gz`` (BraTS 2023); a missing one is a ``BraTSInputError`` naming it.
    """
    case_dir = Path(case_dir)
    case_id = case_dir.name
    images, missing = [], []
    for m in MODALITIES:
        candidates = [case_dir / f"{case_id}-{m}.nii.gz", case_dir / f"{case_id}-{m}.nii"]
        found = [c for c in candidates if c.is_file()]
        if not found:
            missing.append(f"{candidates[0]}: missing {m} image")
        else:
            images.append(found[0])
    if missing:
        raise BraTSInputError(missing, header=f"case {case_id}: incomplete case folder")
    seg = case_dir / f"{case_id}-{SEG_SUFFIX}.nii.gz"
    return {"case_id": case_id, "image": [str(p) for p in images], "label": str(seg) if seg.is_file() else None}


def case_datalist(input_dir) -> list[dict]:
    """``[{"case_id", "image": [4 paths]}]`` for the bundle's ``dataset`` (empty when no ``input_dir``)."""
    if input_dir in (None, ""):
        return []
    out = []
    for case_dir in list_case_folders(input_dir):
        case = find_case_files(case_dir)
        out.append({"case_id": case["case_id"], "image": case["image"]})
    return out
