"""The BraTS 2023 GLI submission: a folder (and its zip) of one label map per case, as the challenge checks it.

What the challenge's validation step accepts (Sage-Bionetworks-Challenges/brats2023,
``evaluation/lesionwise/validate.py``, the script that checks every uploaded archive): a zip or tarball of
``*.nii.gz`` files and nothing else, each named ``...<5 digits>-<3 digits>.nii.gz`` after its case
(``BraTS-GLI-00001-000.nii.gz``), one per case, each with shape 240x240x155 and the qform of the BraTS
images; the scoring reads labels 1 NCR, 2 ED, 3 ET (0 background). An ``<case_id>-unc.nii.gz`` beside them would
break the name pattern and fail the whole upload, so the submission holds the label maps only.

:func:`make_submission` takes the label maps of a prediction folder (``<case_id>.nii.gz``, the bundle's
inference output) and the case folders they were predicted from, refuses anything the challenge would refuse or
misread (a missing or extra case, a case id the pattern does not match, another shape or affine than the case's
images, labels other than 0-3, a label 4 of the BraTS 2021 convention), and writes uint8 copies with the case's
header geometry into a folder, plus ``<folder>.zip`` with the files at its top level. A grid other than
240x240x155 (synthetic data) is a warning: the files are right for their cases, the challenge would refuse them.
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

import numpy as np

from custom.core.atomic import atomic_path
from custom.core.constants import CASE_ID_PATTERN
from custom.core.errors import BraTSInputError
from custom.core.layout import is_temporary_name, label_prediction_case_id, prediction_paths
from custom.data.cases import find_case_files, list_case_folders
from custom.data.nifti import AFFINE_TOLERANCE, load_label_map, save_nifti

#: the BraTS 2023 image grid the challenge's validator requires of every file
BRATS_SHAPE = (240, 240, 155)
BRATS_QFORM = np.array([[-1.0, 0.0, 0.0, 0.0], [0.0, -1.0, 0.0, 239.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
#: the validator's file-name pattern (``--pred_pattern`` of validate.py)
SUBMISSION_NAME_PATTERN = re.compile(r"(\d{5}-\d{3})\.nii\.gz$")

_HEADER = "cannot write the submission"


def _check_case(case: dict, pred_path: Path) -> tuple[list[str], list[str]]:
    """``(problems, warnings)`` of one case's label map against its images."""
    import nibabel as nib

    problems, warnings = [], []
    cid = case["case_id"]
    if not CASE_ID_PATTERN.match(cid) or not SUBMISSION_NAME_PATTERN.search(f"{cid}.nii.gz"):
        problems.append(f"{case['image'][0]}: case id {cid!r} is not a BraTS id (BraTS-GLI-XXXXX-YYY): the "
                        "challenge matches files by the id at the end of their name")
    ref = nib.load(case["image"][0])
    try:
        pred = nib.load(str(pred_path))
    except Exception as exc:  # nibabel raises many types for corrupt files
        return problems + [f"{pred_path}: cannot be read as NIfTI ({type(exc).__name__}: {exc})"], warnings
    if tuple(pred.shape) != tuple(ref.shape):
        problems.append(f"{pred_path}: shape {tuple(pred.shape)} differs from its case's images {tuple(ref.shape)} "
                        f"({case['image'][0]})")
        return problems, warnings
    if not np.allclose(pred.affine, ref.affine, atol=AFFINE_TOLERANCE):
        problems.append(f"{pred_path}: affine differs from its case's images ({case['image'][0]})")
    try:
        load_label_map(pred_path)  # values 0..3 only; a label 4 named as the BraTS 2021 convention
    except BraTSInputError as exc:
        problems.extend(exc.problems)
    qform = ref.get_qform()
    if tuple(ref.shape) != BRATS_SHAPE or not np.allclose(qform, BRATS_QFORM, atol=AFFINE_TOLERANCE):
        warnings.append(f"{cid}: grid {tuple(ref.shape)} is not the BraTS 2023 grid {BRATS_SHAPE} with its qform; "
                        "right for this case, but the challenge refuses it")
    return problems, warnings


def make_submission(pred_dir, input_dir, out_dir, archive: bool = True) -> dict:
    """Write ``out_dir/<case_id>.nii.gz`` (uint8 labels, the case's geometry) for every case folder of
    ``input_dir`` from ``pred_dir/<case_id>.nii.gz``, and ``<out_dir>.zip`` when ``archive``.

    Every problem of every case is found before anything is written. ``out_dir`` may hold only files this call
    writes (a stale case from another submission would be uploaded with it).

    Returns:
        ``{"num_cases", "out_dir", "archive" (path or None), "warnings"}``.

    Raises:
        BraTSInputError: listing every problem (missing, extra or unreadable label maps, other shapes or
            affines, labels other than 0-3, case ids the challenge cannot match, other files in ``out_dir``).
    """
    pred_dir, out_dir = Path(pred_dir), Path(out_dir)
    if not pred_dir.is_dir():
        raise BraTSInputError(f"{pred_dir}: prediction folder not found", header=_HEADER)
    cases = [find_case_files(d) for d in list_case_folders(input_dir, header=_HEADER)]
    ids = [c["case_id"] for c in cases]
    problems, warnings = [], []
    predicted = {cid for p in pred_dir.iterdir() if (cid := label_prediction_case_id(p.name)) is not None}
    for cid in sorted(predicted - set(ids)):
        problems.append(f"{prediction_paths(pred_dir, cid)[0]}: no case folder {cid} in {input_dir} (a submission "
                        "holds exactly the cases given)")
    for case in cases:
        pred_path = prediction_paths(pred_dir, case["case_id"])[0]
        if not pred_path.is_file():
            problems.append(f"{pred_path}: label map missing for case {case['case_id']}")
            continue
        p, w = _check_case(case, pred_path)
        problems += p
        warnings += w
    names = {prediction_paths(out_dir, cid)[0].name for cid in ids}
    if out_dir.is_dir():
        others = sorted(p.name for p in out_dir.iterdir() if p.name not in names and not is_temporary_name(p.name))
        if others:
            problems.append(f"{out_dir}: holds other files ({', '.join(others[:5])}"
                            + (", ..." if len(others) > 5 else "") + "); give an empty or new folder")
    if problems:
        raise BraTSInputError(problems, header=_HEADER)
    import nibabel as nib

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for case in cases:
        ref = nib.load(case["image"][0])
        labels = load_label_map(prediction_paths(pred_dir, case["case_id"])[0])
        path = prediction_paths(out_dir, case["case_id"])[0]
        save_nifti(labels.astype(np.uint8), np.asarray(ref.affine, dtype=np.float64), ref.header, path)
        written.append(path)
    zip_path = None
    if archive:
        zip_path = out_dir.with_name(out_dir.name + ".zip")
        with atomic_path(zip_path) as tmp:
            # stored, not deflated: the members are gzip files already; flat, as the validator lists them
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
                for path in written:
                    zf.write(path, arcname=path.name)
    return {"num_cases": len(written), "out_dir": os.fspath(out_dir),
            "archive": os.fspath(zip_path) if zip_path else None, "warnings": warnings}
