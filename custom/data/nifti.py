"""NIfTI files in and out: the checks every case file passes, loading a case's arrays and spacing, writing outputs.

Every problem is reported as ``"<file>: <what is wrong>"``; ingestion (:mod:`custom.data.cases`) and every
later reader use the same checks, so a file that passes ingestion also loads at training, inference and
serving time, and a file that fails names itself there too (:class:`custom.core.errors.BraTSInputError`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from custom.core.atomic import atomic_save_nifti
from custom.core.constants import LABEL_VALUES, MODALITIES, SEG_SUFFIX
from custom.core.errors import BraTSInputError

#: largest allowed absolute difference between the affines of a case's files
AFFINE_TOLERANCE = 1e-3


@dataclass
class _Reference:
    path: Path
    shape: tuple
    affine: np.ndarray


def check_file(path, role: str, ref: _Reference | None, keep: bool):
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
        data, this_ref, file_problems = check_file(path, role, ref, keep=True)
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
    return image, label, ref.affine, spacing_from_affine(ref.affine)


def spacing_from_affine(affine) -> np.ndarray:
    """Voxel size in mm ``(sx, sy, sz)`` float64: the column norms of the affine's 3x3 part (rotation x zoom).

    THE spacing of a case everywhere (loading, preprocessing, MONAI Label studies): the affine, not the header's
    ``pixdim``, because the affine is what places the voxels (they differ when qform and sform disagree).
    """
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {a.shape}")
    return np.sqrt((a[:3, :3] ** 2).sum(axis=0))


def load_case(case: Mapping):
    """Validated arrays (``custom.data.nifti.load_case_arrays``) and the t1c header for the outputs."""
    import nibabel as nib

    image, _, affine, spacing = load_case_arrays(case["image"], None)
    header = nib.load(case["image"][0]).header
    return image, np.asarray(affine, dtype=np.float64), tuple(float(s) for s in spacing), header


def save_nifti(array: np.ndarray, affine: np.ndarray, ref_header, path: Path) -> None:
    """Write ``array`` with the input's affine (sform and qform codes kept from the input)."""
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.set_data_dtype(array.dtype)
    if ref_header is not None:
        sform_code = int(ref_header["sform_code"]) or 1
        qform_code = int(ref_header["qform_code"]) or 1
        img.set_sform(affine, code=sform_code)
        img.set_qform(affine, code=qform_code)
        img.header.set_xyzt_units(*ref_header.get_xyzt_units())
    atomic_save_nifti(img, path)


#: label conventions of label maps to evaluate: BraTS 2023 (ET = 3) and BraTS 2020/2021 (ET = 4)
BRATS2023 = "brats2023"
BRATS2021 = "brats2021"
LABEL_CONVENTIONS = (BRATS2023, BRATS2021)

#: the values a label map of each convention may hold
_CONVENTION_VALUES = {BRATS2023: (0, 1, 2, 3), BRATS2021: (0, 1, 2, 4)}


def _voxels(mask: np.ndarray) -> str:
    n = int(mask.sum())
    return f"{n} voxel" + ("" if n == 1 else "s")


def load_label_map(path, label_convention: str = BRATS2023) -> np.ndarray:
    """A BraTS 2023 label map ``(X, Y, Z)`` uint8 with values 0..3 (0 background, 1 NCR, 2 ED, 3 ET).

    ``label_convention``: ``"brats2023"`` (default) accepts 0..3 and refuses label 4, the BraTS
    2020/2021 enhancing-tumour label, because a 4 in a BraTS 2023 evaluation almost always means the
    two conventions were mixed up (the 2023 ranking code would silently score it as no region, so ET
    would count as missed). ``"brats2021"`` accepts 0, 1, 2, 4 (a prediction of a model trained on
    BraTS 2021 labels) and maps 4 -> 3; a 3 there is refused. Anything else is a ``BraTSInputError``
    naming the file.
    """
    import nibabel as nib

    if label_convention not in LABEL_CONVENTIONS:
        raise BraTSInputError(f"label convention must be one of {', '.join(LABEL_CONVENTIONS)}, "
                              f"got {label_convention!r}")
    allowed = _CONVENTION_VALUES[label_convention]
    data = np.asanyarray(nib.load(str(path)).dataobj)
    if data.ndim != 3:
        raise BraTSInputError(f"{path}: label map must be 3-D, got shape {data.shape}")
    ok = np.isin(data, allowed)
    if not ok.all():
        bad = np.unique(data[~ok])
        shown = ", ".join(f"{v:g}" for v in bad[:10].tolist()) + (", ..." if len(bad) > 10 else "")
        if label_convention == BRATS2023 and set(bad.tolist()) == {4}:
            raise BraTSInputError(
                f"{path}: holds label 4 in {_voxels(data == 4)}, the enhancing-tumour label of "
                f"BraTS 2020/2021; BraTS 2023 label maps use 0, 1, 2, 3 (ET = 3). If this prediction comes "
                f"from a model trained on BraTS 2021 labels, evaluate with --label_convention {BRATS2021} "
                f"(maps 4 -> 3)")
        if label_convention == BRATS2021 and set(bad.tolist()) == {3}:
            raise BraTSInputError(
                f"{path}: holds label 3 in {_voxels(data == 3)}, which the BraTS 2021 convention "
                f"(0, 1, 2, 4; ET = 4) does not use: this looks like a BraTS 2023 label map, evaluate it "
                f"with --label_convention {BRATS2023}")
        raise BraTSInputError(f"{path}: label values must be {', '.join(map(str, allowed))} "
                              f"({label_convention} convention), found [{shown}]")
    labels = data.astype(np.uint8)
    if label_convention == BRATS2021:
        labels[labels == 4] = 3
    return labels
