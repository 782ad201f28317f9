"""The BraTS 2023 submission folder (and zip) from a prediction folder: label maps only, named and checked as the
challenge's validator requires.

    .venv/bin/python scripts/make_submission.py --pred_dir PRED --input_dir CASES --out_dir SUBMISSION
        [--archive true]

PRED holds the bundle's inference output (``<case_id>.nii.gz`` label maps; the ``-unc``/``-ensvar`` maps stay
out), CASES the case folders they were predicted from. Writes ``SUBMISSION/<case_id>.nii.gz`` (uint8, labels
0-3, the case's shape and affine) and ``SUBMISSION.zip`` to upload. See :mod:`custom.data.submission`.
"""

from __future__ import annotations

import sys

import fire

from custom.core.cli import as_bool
from custom.core.errors import BraTSInputError
from custom.data.submission import make_submission


def main(pred_dir: str, input_dir: str, out_dir: str, archive: bool = True):
    """Write the submission folder and its zip; print a one-line summary (exit status 2 on a named error).

    Every case folder of INPUT_DIR needs its label map in PRED_DIR and nothing else may be there: a missing or
    extra case, another shape or affine than the case's images, labels other than 0, 1, 2, 3 (a label 4 is the
    BraTS 2021 enhancing tumour) or a case id the challenge cannot match stop the run before anything is
    written, with every problem named. A grid other than BraTS's 240x240x155 (synthetic data) is a warning.

    Args:
        pred_dir: the prediction folder of the bundle's inference (<case_id>.nii.gz label maps).
        input_dir: the folder of case folders that was predicted (BraTS-GLI-XXXXX-YYY/...-t1c.nii.gz, ...).
        out_dir: the submission folder to write (new or empty, or holding an earlier submission of these cases).
        archive: also write <out_dir>.zip, the label maps at its top level (what the challenge's portal takes).
    """
    try:
        res = make_submission(pred_dir, input_dir, out_dir, archive=as_bool(archive, "archive"))
    except BraTSInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    for w in res["warnings"]:
        print(f"WARNING: {w}", file=sys.stderr)
    print(f"submission: {res['num_cases']} label maps in {res['out_dir']}"
          + (f" -> {res['archive']} (upload this file)" if res["archive"] else ""))


if __name__ == "__main__":
    fire.Fire(main)
