"""How a BraTS case is stored as a MONAI Label study, and back.

A study is ONE NIfTI file ``<STUDIES>/<case_id>.nii.gz`` holding the four modalities with the
channels LAST, shape ``(X, Y, Z, 4)`` float32, in ``MODALITIES`` order (t1c, t1n, t2f, t2w), with the
case's affine. Channels last is what ``LoadImaged`` + ``EnsureChannelFirstd`` read as ``(4, X, Y, Z)``;
channels first would be misread as a 4-voxel-wide volume. A reference segmentation, when there is
one, goes to ``<STUDIES>/labels/final/<case_id>.nii.gz`` (uint8, ``(X, Y, Z)``), where MONAI Label's
local datastore looks for finished labels.

Training from MONAI Label goes the other way (``study_to_case_folder``): the bundle's training reads
BraTS case folders through ``scripts/prepare_data.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from custom.core.atomic import atomic_save_nifti
from custom.core.constants import CASE_ID_PATTERN, LABEL_VALUES, MODALITIES, SEG_SUFFIX
from custom.core.errors import BraTSInputError

#: where MONAI Label's LocalDatastore keeps finished (reference) labels, relative to the studies folder
FINAL_LABELS_DIR = Path("labels") / "final"
STUDY_SUFFIX = ".nii.gz"


def voxel_spacing(affine) -> tuple:
    """Voxel size in mm ``(sx, sy, sz)`` from a 4x4 affine (column norms of its 3x3 part)."""
    affine = np.asarray(affine, dtype=np.float64)
    return tuple(float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))


def case_modality_paths(case_dir) -> tuple[list[Path], Optional[Path]]:
    """The four modality files of a BraTS case folder (MODALITIES order) and its ``-seg`` file or None."""
    case_dir = Path(case_dir)
    case_id = case_dir.name
    images = [case_dir / f"{case_id}-{m}.nii.gz" for m in MODALITIES]
    label = case_dir / f"{case_id}-{SEG_SUFFIX}.nii.gz"
    return images, (label if label.exists() else None)


def find_case_folders(path) -> list[Path]:
    """``path`` itself when it is a BraTS case folder, else its case sub-folders (sorted).

    Raises:
        BraTSInputError: when ``path`` does not exist or holds no case folder.
    """
    path = Path(path)
    if not path.is_dir():
        raise BraTSInputError([f"{path}: not a folder"], "cannot make MONAI Label studies")
    if CASE_ID_PATTERN.match(path.name):
        return [path]
    cases = sorted(p for p in path.iterdir() if p.is_dir() and CASE_ID_PATTERN.match(p.name))
    if not cases:
        raise BraTSInputError(
            [f"{path}: no BraTS case folder (named like BraTS-GLI-00000-000) inside"], "cannot make MONAI Label studies"
        )
    return cases


def case_folder_to_study(case_dir, studies_dir, with_label: bool = True, overwrite: bool = False) -> dict:
    """Write one BraTS case folder as a 4-channel study (and its label under ``labels/final``).

    Args:
        case_dir: ``.../<case_id>/`` holding ``<case_id>-{t1c,t1n,t2f,t2w}.nii.gz`` (and optionally ``-seg``).
        studies_dir: the MONAI Label studies folder.
        with_label: also copy the ``-seg`` file (when present) to ``labels/final/<case_id>.nii.gz``.
        overwrite: replace a study that already exists (otherwise it is kept and reported as skipped).

    Returns:
        ``{"case_id", "image": path, "label": path | None, "shape": [X, Y, Z], "skipped": bool}``.

    Raises:
        BraTSInputError: a missing modality, a shape/affine mismatch, bad labels (from ``load_case_arrays``).
    """
    import nibabel as nib

    from custom.data.nifti import load_case_arrays

    case_dir = Path(case_dir)
    case_id = case_dir.name
    studies_dir = Path(studies_dir)
    image_out = studies_dir / f"{case_id}{STUDY_SUFFIX}"
    label_out = studies_dir / FINAL_LABELS_DIR / f"{case_id}{STUDY_SUFFIX}"
    image_paths, label_path = case_modality_paths(case_dir)
    label_path = label_path if with_label else None

    if image_out.exists() and not overwrite:
        return {"case_id": case_id, "image": str(image_out),
                "label": str(label_out) if label_out.exists() else None, "shape": None, "skipped": True}

    image, label, affine, _ = load_case_arrays([str(p) for p in image_paths], str(label_path) if label_path else None)
    header = nib.load(str(image_paths[0])).header.copy()
    header.set_data_dtype(np.float32)
    # channels last: the layout LoadImaged + EnsureChannelFirstd turn into (4, X, Y, Z)
    data = np.ascontiguousarray(np.moveaxis(np.asarray(image, dtype=np.float32), 0, -1))
    study = nib.Nifti1Image(data, affine, header=header)
    atomic_save_nifti(study, image_out)
    result = {"case_id": case_id, "image": str(image_out), "label": None, "shape": list(data.shape[:3]), "skipped": False}
    if label is not None:
        seg = nib.Nifti1Image(np.asarray(label, dtype=np.uint8), affine)
        seg.header.set_data_dtype(np.uint8)
        atomic_save_nifti(seg, label_out)
        result["label"] = str(label_out)
    return result


def load_study(path) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Read a study file as ``(image (4, X, Y, Z) float32, affine (4, 4), spacing (3,))``.

    Raises:
        BraTSInputError: naming the file, when it cannot be read, is not ``(X, Y, Z, 4)`` or holds NaN/inf.
    """
    import nibabel as nib

    path = Path(path)
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises many types for truncated/corrupt files
        raise BraTSInputError([f"{path}: cannot be read as NIfTI ({exc.__class__.__name__}: {exc})"]) from None
    image = check_study_array(data, path, channel_dim=-1)
    return image, np.asarray(img.affine, dtype=np.float64), voxel_spacing(img.affine)


def check_study_array(data, path, channel_dim: int = 0) -> np.ndarray:
    """Validate a study array and return it channel-first ``(4, X, Y, Z)`` float32.

    Args:
        data: the array as loaded, channels at ``channel_dim``.
        path: the file it came from (named in the error).
        channel_dim: 0 after ``EnsureChannelFirstd``, -1 straight from the NIfTI file.
    """
    data = np.asarray(data)
    expected = f"(X, Y, Z, {len(MODALITIES)}) with channels last in {'/'.join(MODALITIES)} order"
    if data.ndim != 4 or data.shape[channel_dim] != len(MODALITIES):
        shape = tuple(data.shape)
        if channel_dim == 0 and data.ndim == 4:
            shape = shape[1:] + shape[:1]
        raise BraTSInputError(
            [f"{path}: a study must be one 4-modality NIfTI of shape {expected}; got shape {shape} "
             f"(make studies with scripts/make_monailabel_studies.py)"]
        )
    image = np.moveaxis(data, channel_dim, 0).astype(np.float32, copy=False)
    if not np.isfinite(image).all():
        raise BraTSInputError([f"{path}: contains NaN or infinite values"])
    return np.ascontiguousarray(image)


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
        seg_img = nib.load(str(label_path))
        seg = np.asarray(seg_img.dataobj)
        if seg.ndim == 4 and seg.shape[-1] == 1:
            seg = seg[..., 0]
        if seg.shape != image.shape[1:]:
            raise BraTSInputError([f"{label_path}: label shape {seg.shape} differs from study shape {image.shape[1:]}"])
        bad = sorted(set(np.unique(seg).tolist()) - set(LABEL_VALUES))
        if bad:
            raise BraTSInputError([f"{label_path}: label values {bad} are not BraTS labels {list(LABEL_VALUES)}"])
        out = nib.Nifti1Image(seg.astype(np.uint8), affine)
        out.header.set_data_dtype(np.uint8)
        atomic_save_nifti(out, case_dir / f"{case_id}-{SEG_SUFFIX}.nii.gz")
    return case_dir


def study_case_id(study_id: str, index: int, used: Sequence[str] = ()) -> str:
    """The BraTS case id a study trains under: its own id when it is one, else ``BraTS-MLB-<index>-000``."""
    if CASE_ID_PATTERN.match(study_id) and study_id not in used:
        return study_id
    return f"BraTS-MLB-{index:05d}-000"
