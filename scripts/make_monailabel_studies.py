"""BraTS case folder(s) -> MONAI Label studies: one 4-channel NIfTI per case, labels under labels/final.

    .venv/bin/python scripts/make_monailabel_studies.py --cases CASES --studies STUDIES [--labels true]
        [--unlabeled "['BraTS-GLI-00003-000']"] [--overwrite false]

``--cases`` is one case folder or a folder of case folders. Each study is ``STUDIES/<case_id>.nii.gz``,
shape ``(X, Y, Z, 4)`` float32 (channels last, t1c, t1n, t2f, t2w), with the case's affine; with
``--labels true`` a ``-seg`` file is copied to ``STUDIES/labels/final/<case_id>.nii.gz`` (cases listed in
``--unlabeled`` get none, so they are the ones MONAI Label scores and proposes for review).
See ``custom.data.studies``.
"""

from __future__ import annotations

import sys

import fire

from custom.core.cli import as_bool, as_list
from custom.core.errors import BraTSInputError
from custom.data.studies import make_studies


def main(cases, studies, labels=True, unlabeled=(), overwrite=False):
    """Write one MONAI Label study per BraTS case; print how many were written, kept and labelled.

    Exit status 1 with every problem named when a case folder is incomplete or unreadable.

    Args:
        cases: one BraTS case folder, or a folder of case folders (BraTS-GLI-XXXXX-YYY/...-t1c.nii.gz, ...).
        studies: the MONAI Label studies folder to fill (created): STUDIES/<case_id>.nii.gz, 4 channels last.
        labels: copy each case's -seg file to STUDIES/labels/final/<case_id>.nii.gz.
        unlabeled: case ids that get no label, e.g. "['BraTS-GLI-00003-000']" (the ones MONAI Label scores and
            proposes for review).
        overwrite: rewrite studies that exist already (default: keep them).
    """
    try:
        records = make_studies(cases, studies, labels=as_bool(labels, "labels"),
                               unlabeled=as_list(unlabeled, "unlabeled", cast=str) or (),
                               overwrite=as_bool(overwrite, "overwrite"))
    except BraTSInputError as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)
    made = sum(not r["skipped"] for r in records)
    with_label = sum(r["label"] is not None for r in records)
    print(f"{len(records)} studies in {studies} ({made} written, {len(records) - made} kept), {with_label} with labels")


if __name__ == "__main__":
    fire.Fire(main)
