"""BraTS case folder(s) -> MONAI Label studies: one 4-channel NIfTI per case, labels under labels/final.

    .venv/bin/python scripts/make_monailabel_studies.py --cases RAW --studies STUDIES [--labels true]
        [--unlabeled "['BraTS-GLI-00003-000']"] [--overwrite false]

``--cases`` is one case folder or a folder of case folders. Each study is ``STUDIES/<case_id>.nii.gz``,
shape ``(X, Y, Z, 4)`` float32 (channels last, t1c, t1n, t2f, t2w), with the case's affine; with
``--labels true`` a ``-seg`` file is copied to ``STUDIES/labels/final/<case_id>.nii.gz`` (cases listed in
``--unlabeled`` get none, so they are the ones MONAI Label scores and proposes for review).
"""

from __future__ import annotations

import sys
from pathlib import Path

import fire

sys.path.insert(0, str(Path(__file__).resolve().parent / "monailabel_app"))

from lib.studies import case_folder_to_study, find_case_folders  # noqa: E402

from custom.core.errors import BraTSInputError  # noqa: E402


def make_studies(cases, studies, labels: bool = True, unlabeled=(), overwrite: bool = False) -> list:
    """Convert every case under ``cases`` into ``studies``; returns one record per case.

    Raises ``BraTSInputError`` listing every case that failed; the studies of the others are written.
    """
    if isinstance(unlabeled, str):
        unlabeled = [u.strip() for u in unlabeled.split(",") if u.strip()]
    unlabeled = set(unlabeled or ())
    records, problems = [], []
    for case_dir in find_case_folders(cases):
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


def main(cases, studies, labels: bool = True, unlabeled=(), overwrite: bool = False):
    try:
        records = make_studies(cases, studies, labels=labels, unlabeled=unlabeled, overwrite=overwrite)
    except BraTSInputError as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)
    made = sum(not r["skipped"] for r in records)
    with_label = sum(r["label"] is not None for r in records)
    print(f"{len(records)} studies in {studies} ({made} written, {len(records) - made} kept), {with_label} with labels")


if __name__ == "__main__":
    fire.Fire(main)
