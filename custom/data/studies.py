"""How a BraTS case is stored as a MONAI Label study, and back; what a study id may be.

A study is ONE NIfTI file ``<STUDIES>/<study_id>.nii.gz`` holding the four modalities with the channels
LAST, shape ``(X, Y, Z, 4)`` float32, in ``MODALITIES`` order (t1c, t1n, t2f, t2w), with the case's affine.
Channels last is what MONAI's ``LoadImaged`` + ``EnsureChannelFirstd`` read as ``(4, X, Y, Z)``; channels
first would be misread as a 4-voxel-wide volume. A reference segmentation, when there is one, goes to
``<STUDIES>/labels/final/<study_id>.nii.gz`` (uint8, ``(X, Y, Z)``), where MONAI Label's local datastore
looks for finished labels.

A study id names a file inside the studies folder, so it is a plain name (``check_study_id``): no path
separator, no ``..``, no NUL, nothing absolute. Training from MONAI Label goes the other way
(``study_to_case_folder``): the bundle's training reads BraTS case folders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from custom.core.atomic import atomic_save_nifti
from custom.core.constants import CASE_ID_PATTERN, LABEL_VALUES, MODALITIES, SEG_SUFFIX
from custom.core.errors import BraTSInputError
from custom.data.cases import find_case_files, list_case_folders
from custom.data.nifti import load_case_arrays, open_nifti, read_nifti, spacing_from_affine

#: where MONAI Label's LocalDatastore keeps finished (reference) labels, relative to the studies folder
FINAL_LABELS_DIR = Path("labels") / "final"
#: file name endings a study or a study label may have (NIfTI only: the training path reads NIfTI)
STUDY_SUFFIXES = (".nii.gz", ".nii")
STUDY_SUFFIX = STUDY_SUFFIXES[0]

#: longest study id or label tag accepted
MAX_STUDY_ID_LENGTH = 128


class StudyIdError(BraTSInputError):
    """A study id (or label tag) that is not a plain name: it would reach outside the studies folder."""


def check_study_id(value, what: str = "image id") -> str:
    """Return ``value`` when it is a plain file name stem, else raise ``StudyIdError`` saying what is wrong.

    Refused: non-strings; empty; path separators (``/``, ``\\``) or a drive colon (``:``); ``..``; NUL or other
    control characters; a leading ``.`` (hidden files such as the datastore's ``.lock``); leading or trailing
    blanks; more than ``MAX_STUDY_ID_LENGTH`` characters. An absolute path is refused by its separator.
    """
    if not isinstance(value, str):
        raise StudyIdError([f"{what} must be a string, got {type(value).__name__}"], "invalid study id")
    shown = repr(value[:80])
    checks = (
        (not value, f"{what} is empty"),
        ("/" in value or "\\" in value, f"{what} {shown} contains a path separator ('/' or '\\')"),
        (":" in value, f"{what} {shown} contains ':'"),
        (".." in value, f"{what} {shown} contains '..'"),
        (any(ord(c) < 32 or ord(c) == 127 for c in value), f"{what} {shown} contains NUL or control characters"),
        (value.startswith("."), f"{what} {shown} starts with '.'"),
        (value != value.strip(), f"{what} {shown} starts or ends with a blank"),
        (len(value) > MAX_STUDY_ID_LENGTH, f"{what} is {len(value)} characters long (at most {MAX_STUDY_ID_LENGTH})"),
    )
    problems = [message for failed, message in checks if failed]
    if problems:
        raise StudyIdError(problems, "invalid study id")
    return value


def study_suffix(file_name: str) -> Optional[str]:
    """The ``STUDY_SUFFIXES`` ending of ``file_name`` (case-insensitive), or None."""
    lower = file_name.lower()
    return next((s for s in STUDY_SUFFIXES if lower.endswith(s)), None)


def study_id_of(path) -> str:
    """``<STUDIES>/BraTS-GLI-00000-000.nii.gz`` -> ``BraTS-GLI-00000-000``."""
    name = Path(path).name
    suffix = study_suffix(name)
    return name[: -len(suffix)] if suffix else Path(name).stem


def case_folder_to_study(case_dir, studies_dir, with_label: bool = True, overwrite: bool = False) -> dict:
    """Write one BraTS case folder as a 4-channel study (and its label under ``labels/final``).

    Args:
        case_dir: ``.../<case_id>/`` holding ``<case_id>-{t1c,t1n,t2f,t2w}.nii.gz`` (and optionally ``-seg``).
        studies_dir: the MONAI Label studies folder.
        with_label: also copy the ``-seg`` file (when present) to ``labels/final/<case_id>.nii.gz``.
        overwrite: replace a study that already exists (otherwise it is kept and reported as skipped).

    Returns:
        ``{"case_id", "image": path, "label": path | None, "shape": [X, Y, Z] | None, "skipped": bool}``.

    Raises:
        BraTSInputError: a missing modality, a shape/affine mismatch, bad labels (from ``load_case_arrays``).
    """
    import nibabel as nib

    files = find_case_files(case_dir)
    case_id = files["case_id"]
    check_study_id(case_id, "case folder name")
    studies_dir = Path(studies_dir)
    image_out = studies_dir / f"{case_id}{STUDY_SUFFIX}"
    label_out = studies_dir / FINAL_LABELS_DIR / f"{case_id}{STUDY_SUFFIX}"
    label_path = files["label"] if with_label else None

    if image_out.exists() and not overwrite:
        return {"case_id": case_id, "image": str(image_out),
                "label": str(label_out) if label_out.exists() else None, "shape": None, "skipped": True}

    image, label, affine, _ = load_case_arrays(files["image"], label_path)
    header = nib.load(files["image"][0]).header.copy()
    header.set_data_dtype(np.float32)
    # channels last: the layout LoadImaged + EnsureChannelFirstd turn into (4, X, Y, Z)
    data = np.ascontiguousarray(np.moveaxis(np.asarray(image, dtype=np.float32), 0, -1))
    atomic_save_nifti(nib.Nifti1Image(data, affine, header=header), image_out)
    result = {"case_id": case_id, "image": str(image_out), "label": None, "shape": list(data.shape[:3]),
              "skipped": False}
    if label is not None:
        seg = nib.Nifti1Image(np.asarray(label, dtype=np.uint8), affine)
        seg.header.set_data_dtype(np.uint8)
        atomic_save_nifti(seg, label_out)
        result["label"] = str(label_out)
    return result


def make_studies(cases, studies, labels: bool = True, unlabeled: Iterable[str] = (),
                 overwrite: bool = False) -> list:
    """Convert every case folder under ``cases`` (or ``cases`` itself) into a study in ``studies``.

    Args:
        cases: one BraTS case folder or a folder of case folders.
        studies: the MONAI Label studies folder.
        labels: copy ``-seg`` files to ``labels/final`` (cases named in ``unlabeled`` get none).
        unlabeled: case ids to leave unlabeled (they are the ones MONAI Label scores and proposes for review).
        overwrite: replace existing studies.

    Returns:
        one ``case_folder_to_study`` record per case.

    Raises:
        BraTSInputError: listing every case that failed; the studies of the others are written.
    """
    unlabeled = set(unlabeled or ())
    try:
        case_dirs = list_case_folders(cases)
    except BraTSInputError as exc:
        raise BraTSInputError(exc.problems, "cannot make MONAI Label studies") from None
    records, problems = [], []
    for case_dir in case_dirs:
        try:
            records.append(case_folder_to_study(case_dir, studies, with_label=labels and case_dir.name not in unlabeled,
                                                overwrite=overwrite))
        except BraTSInputError as exc:
            problems.extend(exc.problems)
    unknown = unlabeled - {r["case_id"] for r in records}
    if unknown:
        problems.append(f"--unlabeled names cases not found under {cases}: {sorted(unknown)}")
    if problems:
        raise BraTSInputError(problems, f"{len(problems)} problem(s) making studies in {studies}")
    return records


def check_study_array(data, path, channel_dim: int = 0) -> np.ndarray:
    """Validate a study array and return it channel-first ``(4, X, Y, Z)`` float32.

    Args:
        data: the array as loaded, channels at ``channel_dim``.
        path: the file it came from (named in the error).
        channel_dim: 0 after ``EnsureChannelFirstd``, -1 straight from the NIfTI file.
    """
    data = np.asarray(data)
    if data.ndim != 4 or data.shape[channel_dim] != len(MODALITIES):
        raise BraTSInputError([f"{path}: {_study_shape_problem(tuple(data.shape))}"])
    image = np.moveaxis(data, channel_dim, 0).astype(np.float32, copy=False)
    if not np.isfinite(image).all():
        raise BraTSInputError([f"{path}: contains NaN or infinite values"])
    return np.ascontiguousarray(image)


def _study_shape_problem(shape: tuple) -> str:
    expected = f"(X, Y, Z, {len(MODALITIES)}) with channels last in {'/'.join(MODALITIES)} order"
    return (f"a study must be one 4-modality NIfTI of shape {expected}; got shape {shape} "
            f"(make studies with scripts/make_monailabel_studies.py)")


def check_study_header(path) -> tuple:
    """Check a study file from its header only (no voxel data read): NIfTI, shape ``(X, Y, Z, 4)``.

    Returns the spatial shape ``(X, Y, Z)``. Raises ``BraTSInputError`` naming the file otherwise.
    """
    img = open_nifti(path)  # refuses a header that declares more voxel data than the file holds
    shape = tuple(int(s) for s in img.shape)
    if len(shape) != 4 or shape[-1] != len(MODALITIES):
        raise BraTSInputError([f"{path}: {_study_shape_problem(shape)}"])
    return shape[:3]


def load_study(path) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Read a study file as ``(image (4, X, Y, Z) float32, affine (4, 4), spacing (3,) in mm)``.

    Raises:
        BraTSInputError: naming the file, when it cannot be read, is not ``(X, Y, Z, 4)`` or holds NaN/inf.
    """
    path = Path(path)
    data, img = read_nifti(path, dtype=np.float32)
    image = check_study_array(data, path, channel_dim=-1)
    affine = np.asarray(img.affine, dtype=np.float64)
    return image, affine, tuple(float(s) for s in spacing_from_affine(affine))


def load_study_label(path, spatial_shape: Sequence[int]) -> np.ndarray:
    """Read a study label ``(X, Y, Z)`` (a trailing axis of size 1 is dropped) and check it.

    Returns uint8 values in ``LABEL_VALUES``. Raises ``BraTSInputError`` naming the file when it cannot
    be read, its shape differs from ``spatial_shape`` or it holds other values (listed with voxel counts).
    """
    seg, _ = read_nifti(path)
    if seg.ndim == 4 and seg.shape[-1] == 1:
        seg = seg[..., 0]
    if tuple(seg.shape) != tuple(spatial_shape):
        raise BraTSInputError([f"{path}: label shape {tuple(seg.shape)} differs from the study's {tuple(spatial_shape)}"])
    bad = ~np.isin(seg, LABEL_VALUES)
    if bad.any():
        values, counts = np.unique(seg[bad], return_counts=True)
        found = ", ".join(f"{v:g} ({c} voxels)" for v, c in zip(values[:10].tolist(), counts[:10].tolist()))
        raise BraTSInputError([f"{path}: label values must be in {list(LABEL_VALUES)}; found {found}"])
    return seg.astype(np.uint8)


def study_to_case_folder(image_path, label_path, out_root, case_id: str) -> Path:
    """Write a study (and its label) as a BraTS case folder ``out_root/<case_id>/`` for prepare_data.

    Returns the case folder. Raises ``BraTSInputError`` when the study or label is invalid.
    """
    import nibabel as nib

    if not CASE_ID_PATTERN.match(case_id):
        raise BraTSInputError([f"{image_path}: case id {case_id!r} is not a BraTS id (BraTS-GLI-00000-000)"])
    image, affine, _ = load_study(image_path)
    case_dir = Path(out_root) / case_id
    for channel, modality in enumerate(MODALITIES):
        img = nib.Nifti1Image(image[channel], affine)
        img.header.set_data_dtype(np.float32)
        atomic_save_nifti(img, case_dir / f"{case_id}-{modality}.nii.gz")
    if label_path is not None:
        seg = load_study_label(label_path, image.shape[1:])
        out = nib.Nifti1Image(seg, affine)
        out.header.set_data_dtype(np.uint8)
        atomic_save_nifti(out, case_dir / f"{case_id}-{SEG_SUFFIX}.nii.gz")
    return case_dir


def study_case_id(study_id: str, index: int, used: Sequence[str] = ()) -> str:
    """The BraTS case id a study trains under: its own id when it is one, else ``BraTS-MLB-<index>-000``."""
    if CASE_ID_PATTERN.match(study_id) and study_id not in used:
        return study_id
    return f"BraTS-MLB-{index:05d}-000"
