"""BraTS 2023 case folders: THE parser of their names, used by ingestion, inference, serving, evaluation and
the MONAI Label studies.

A case folder ``BraTS-GLI-XXXXX-YYY/`` holds ``BraTS-GLI-XXXXX-YYY-{t1c,t1n,t2f,t2w}.nii.gz`` and, for a
training case, ``BraTS-GLI-XXXXX-YYY-seg.nii.gz`` (names: :func:`custom.core.layout.case_file_name`; ``.nii``
is accepted too). A case without a seg file is an inference-only case.

- :func:`read_case_folder`: the files of one folder (missing, extra and duplicate files as problems);
- :func:`scan_dataset`: every case folder under a data set (ingestion, strict);
- :func:`list_case_folders` / :func:`find_case_files` / :func:`case_datalist`: the folders to predict and their
  images (inference, Triton, benchmarks; only missing images are errors);
- :func:`find_label_files`: ``case_id -> seg file`` of a ground-truth folder (evaluation).

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
from custom.core.layout import case_file_name
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


def _stem(case_id: str, kind: str) -> str:
    return _nifti_stem(case_file_name(case_id, kind))


def read_case_folder(case_dir) -> CaseFiles:
    """The files of one case folder ``<case_id>/<case_id>-<modality|seg>.nii[.gz]`` (nothing read yet).

    Hidden files (editors', and unfinished atomic writes) and non-NIfTI files are ignored. ``scan_problems``
    names each missing modality, unexpected or duplicated NIfTI file, and a folder name that is not a case id;
    of a duplicate, the ``.nii.gz`` file is used.

    Raises:
        BraTSInputError: ``case_dir`` is not a folder.
    """
    case_dir = Path(case_dir)
    case_id = case_dir.name
    if not case_dir.is_dir():
        raise BraTSInputError(f"{case_dir}: case folder not found")
    expected = {_stem(case_id, m): m for m in MODALITIES + (SEG_SUFFIX,)}
    found: dict[str, list[Path]] = {}
    problems = []
    for entry in sorted(case_dir.iterdir(), key=lambda e: (not e.name.endswith(NIFTI_SUFFIXES[0]), e.name)):
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
            problems.append(_missing_image(case_dir, case_id, m))
    label = found[SEG_SUFFIX][0] if SEG_SUFFIX in found else None
    if not CASE_ID_PATTERN.match(case_id):
        problems.insert(0, f"{case_dir}: folder holds NIfTI files but its name is not a BraTS case id "
                           "(BraTS-GLI-XXXXX-YYY)")
    return CaseFiles(case_id, case_dir, images, label, tuple(problems))


def _missing_image(case_dir: Path, case_id: str, modality: str) -> str:
    return f"{case_dir / case_file_name(case_id, modality)}: missing {modality} image"


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
            cases.append(read_case_folder(cur))
            dirs[:] = []  # a case folder's subfolders are not cases
        elif holds_nifti:
            cases.append(read_case_folder(cur))  # reported as misnamed; its subfolders are still scanned
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


def list_case_folders(input_dir, header: str = "cannot run inference", skip=None) -> list[Path]:
    """Case folders under ``input_dir`` (sorted); ``input_dir`` itself if it is one case folder (named like a
    case id, or holding its ``<name>-t1c`` image). Sub-folders without NIfTI files are skipped with a warning;
    ``skip`` (the output folder, when a user puts it inside the input folder) is never listed.

    Raises:
        BraTSInputError: ``input_dir`` is missing or holds no case folder (``header`` says what failed).
    """
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise BraTSInputError(f"{input_dir}: input folder not found", header=header)
    if CASE_ID_PATTERN.match(input_dir.name) or any(input_dir.glob(f"*-{MODALITIES[0]}.nii*")):
        return [input_dir]
    skip = Path(skip).resolve() if skip not in (None, "") else None
    cases = []
    for p in sorted(input_dir.iterdir()):
        if not p.is_dir() or p.name.startswith(".") or (skip is not None and p.resolve() == skip):
            continue
        if not any(p.glob("*.nii*")):  # not a case (e.g. an output or notes folder): a case has NIfTI files
            logger.warning("skipping %s: no NIfTI files inside", p)
            continue
        cases.append(p)
    if not cases:
        raise BraTSInputError(f"{input_dir}: no case folders inside (expected <case_id>/<case_id>-t1c.nii.gz ...)",
                              header=header)
    return cases


def find_case_files(case_dir) -> dict:
    """``{"case_id", "image": [4 paths in MODALITIES order], "label": path or None}`` of a case folder.

    Only the four images are required: extra files are ignored here (ingestion reports them).

    Raises:
        BraTSInputError: naming every missing image file.
    """
    case = read_case_folder(case_dir)
    missing = [_missing_image(case.case_dir, case.case_id, m) for m, p in zip(MODALITIES, case.image_paths) if p is None]
    if missing:
        raise BraTSInputError(missing, header=f"case {case.case_id}: incomplete case folder")
    return {"case_id": case.case_id, "image": [str(p) for p in case.image_paths],
            "label": str(case.label) if case.label is not None else None}


def case_datalist(input_dir, skip=None) -> list[dict]:
    """``[{"case_id", "case_dir"}]`` of the case folders of ``input_dir``: the bundle's inference ``dataset``
    (empty when no ``input_dir``; ``skip``, the output folder, is never a case). The files of a case are found
    when it is predicted (:func:`find_case_files`), so an incomplete case fails alone."""
    if input_dir in (None, ""):
        return []
    return [{"case_id": p.name, "case_dir": str(p)} for p in list_case_folders(input_dir, skip=skip)]


def find_label_files(dataset_dir) -> dict:
    """``case_id -> seg file`` of a ground-truth folder: case folders ``G/<id>/<id>-seg.nii.gz`` (any depth, as
    :func:`scan_dataset` finds them) or loose ``G/<id>-seg.nii.gz`` files.

    Raises:
        BraTSInputError: the folder is missing or holds no seg file.
    """
    root = Path(dataset_dir)
    if not root.is_dir():
        raise BraTSInputError(f"{root}: ground-truth folder does not exist")
    seg_suffix = case_file_name("X", SEG_SUFFIX)[1:]                     # "-seg.nii.gz"
    found = {p.name[: -len(seg_suffix)]: p for p in sorted(root.glob(f"*{seg_suffix}")) if not p.name.startswith(".")}
    for case in scan_dataset(root):
        if case.label is not None:
            found.setdefault(case.case_id, case.label)
    if not found:
        raise BraTSInputError(f"{root}: no '<case_id>{seg_suffix}' file in it or in its case folders")
    return found
