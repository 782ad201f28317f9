"""NIfTI files in and out: the checks every case file passes, loading a case's arrays and spacing, writing outputs.

Every problem is reported as ``"<file>: <what is wrong>"``; ingestion (:mod:`custom.data.cases`) and every
later reader use the same checks, so a file that passes ingestion also loads at training, inference and
serving time, and a file that fails names itself there too (:class:`custom.core.errors.BraTSInputError`).

Every NIfTI file the project reads goes through :func:`open_nifti` (header) and :func:`read_nifti` (voxels), or
:func:`check_file` for a case's files: before any voxel is read, the voxel bytes the header declares are compared
with what the file can hold (:func:`declared_size_problem`), so a 66-byte file declaring a 512^3 volume is refused
instead of allocating half a gigabyte.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from custom.core.atomic import atomic_paths, atomic_save_nifti
from custom.core.constants import LABEL_VALUES, MODALITIES, SEG_SUFFIX
from custom.core.errors import BraTSInputError
from custom.core.layout import prediction_map_path, prediction_paths

#: largest allowed absolute difference between the affines of a case's files
AFFINE_TOLERANCE = 1e-3

#: deflate cannot shrink data by more than 1032:1 (a run of one byte value): a ``.nii.gz`` file cannot hold more
#: uncompressed bytes than this many times its own size
MAX_DEFLATE_RATIO = 1032

_GZIP_CHUNK = 1 << 20


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def _gzip_size_at_least(path: Path, needed: int) -> int:
    """Uncompressed bytes of a gzip file, counted by streaming it in 1 MiB pieces (nothing kept) and stopping at
    ``needed``: ``min(size, needed)``; the bytes before the end of a truncated stream count."""
    import gzip
    import zlib

    total = 0
    try:
        with gzip.open(path, "rb") as fh:
            while total < needed:
                block = fh.read(min(_GZIP_CHUNK, needed - total))
                if not block:
                    break
                total += len(block)
    except (EOFError, OSError, zlib.error):  # truncated or corrupt stream: what was read is all there is
        pass
    return total


def declared_size_problem(path, img) -> str | None:
    """Whether the file can hold the voxel data its header declares (checked before any voxel is read).

    ``.nii``: the file size against ``vox_offset + voxels x bytes per voxel``. ``.nii.gz``: the declared size
    against :data:`MAX_DEFLATE_RATIO` times the file size, then against the gzip trailer's ISIZE (the
    uncompressed size modulo 2^32, of the last gzip member); only when ISIZE says too few (a file over 4 GiB
    uncompressed, several gzip members, or a truncated file) is the stream counted (:func:`_gzip_size_at_least`).

    Returns:
        the problem as ``"<file>: ..."``, or None when the file can hold the declared data.
    """
    path = Path(path)
    proxy = img.dataobj
    shape = tuple(int(s) for s in img.shape)
    n_bytes = int(np.prod(shape, dtype=np.int64)) * int(img.get_data_dtype().itemsize)
    needed = int(getattr(proxy, "offset", 0)) + n_bytes
    declared = f"its header declares {shape} {img.get_data_dtype()} voxels ({_mib(n_bytes)})"
    file_size = path.stat().st_size
    if not path.name.endswith(".gz"):
        if file_size < needed:
            return (f"{path}: {declared} but the file holds {_mib(file_size)}: truncated file or wrong header; "
                    "refused before reading")
        return None
    if needed > file_size * MAX_DEFLATE_RATIO:
        return (f"{path}: {declared}, more than a {_mib(file_size)} gzip file can hold (at most "
                f"{MAX_DEFLATE_RATIO}:1): truncated file or wrong header; refused before reading")
    with open(path, "rb") as fh:
        fh.seek(max(file_size - 4, 0))
        isize = int.from_bytes(fh.read(4), "little")
    if needed < 2**32 and isize >= needed:
        return None
    available = _gzip_size_at_least(path, needed)
    if available < needed:
        return (f"{path}: {declared} but the file decompresses to {_mib(available)}: truncated file or wrong "
                "header; refused before reading")
    return None


def open_nifti(path):
    """The nibabel image of a NIfTI file (header read, no voxel data), checked that it can hold what it declares.

    Raises:
        BraTSInputError: the file is missing, unreadable, not NIfTI, or declares more voxel data than it holds.
    """
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise BraTSInputError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for bad headers; all mean "unreadable"
        raise BraTSInputError(f"{path}: unreadable or corrupt NIfTI file ({type(exc).__name__}: {exc})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise BraTSInputError(f"{path}: not a NIfTI image ({type(img).__name__})")
    problem = declared_size_problem(path, img)
    if problem:
        raise BraTSInputError(problem)
    return img


def read_nifti(path, dtype=None):
    """``(voxel array, nibabel image)`` of a NIfTI file through :func:`open_nifti` (the array as stored, or cast
    to ``dtype``).

    Raises:
        BraTSInputError: as :func:`open_nifti`, or the voxel data cannot be read (truncated, corrupt stream).
    """
    img = open_nifti(path)
    try:
        data = np.asanyarray(img.dataobj) if dtype is None else np.asarray(img.dataobj, dtype=dtype)
    except Exception as exc:  # truncated gzip (EOFError), bad zlib stream, short file (OSError/ValueError)
        raise BraTSInputError(f"{path}: unreadable or corrupt voxel data ({type(exc).__name__}: {exc})") from None
    return data, img


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
    size_problem = declared_size_problem(path, img)
    if size_problem:
        problems.append(size_problem)
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


def _nifti_image(array: np.ndarray, affine: np.ndarray, ref_header):
    """``array`` as a NIfTI image with the input's affine (sform and qform codes kept from the input)."""
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.set_data_dtype(array.dtype)
    if ref_header is not None:
        sform_code = int(ref_header["sform_code"]) or 1
        qform_code = int(ref_header["qform_code"]) or 1
        img.set_sform(affine, code=sform_code)
        img.set_qform(affine, code=qform_code)
        img.header.set_xyzt_units(*ref_header.get_xyzt_units())
    return img


def save_nifti(array: np.ndarray, affine: np.ndarray, ref_header, path: Path) -> None:
    """Write ``array`` with the input's affine (sform and qform codes kept from the input), atomically."""
    atomic_save_nifti(_nifti_image(array, affine, ref_header), path)


def save_prediction(labels: np.ndarray, unc: np.ndarray, affine: np.ndarray, ref_header, out_dir,
                    case_id: str, maps: Mapping[str, np.ndarray] | None = None) -> tuple[Path, Path]:
    """Write a case's label map, uncertainty map (:func:`custom.core.layout.prediction_paths`) and further float
    maps ``maps`` (``{suffix: (X, Y, Z)}``, e.g. the fold ensemble's ``ensvar``:
    :func:`custom.core.layout.prediction_map_path`) as one unit.

    All are written to temporary files first; then the maps are renamed and the label map last
    (:func:`custom.core.atomic.atomic_paths`): a label map on disk always has its maps from the same prediction,
    and a map alone is the remainder of an interrupted write, removed by the next run
    (:func:`custom.core.layout.remove_unfinished_predictions`). Returns ``(label path, unc path)``.
    """
    import nibabel as nib

    label_path, unc_path = prediction_paths(out_dir, case_id)
    extra = [(prediction_map_path(out_dir, case_id, suffix), np.asarray(values, dtype=np.float32))
             for suffix, values in (maps or {}).items()]
    with atomic_paths([p for p, _ in extra] + [unc_path, label_path]) as tmps:
        for tmp, (_, values) in zip(tmps, extra):
            nib.save(_nifti_image(values, affine, ref_header), str(tmp))
        nib.save(_nifti_image(unc, affine, ref_header), str(tmps[-2]))
        nib.save(_nifti_image(labels, affine, ref_header), str(tmps[-1]))
    return label_path, unc_path


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
    if label_convention not in LABEL_CONVENTIONS:
        raise BraTSInputError(f"label convention must be one of {', '.join(LABEL_CONVENTIONS)}, "
                              f"got {label_convention!r}")
    allowed = _CONVENTION_VALUES[label_convention]
    data, _ = read_nifti(path)
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
