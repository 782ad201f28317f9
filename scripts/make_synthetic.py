"""Write a synthetic BraTS 2023 GLI data set (case folders with t1c, t1n, t2f, t2w and seg NIfTI files).

    .venv/bin/python scripts/make_synthetic.py --out_dir DIR --num_cases N --shape "[64,64,48]" --spacing "[1,1,1]" --seed S
        [--anatomy blob|mni152] [--first_index I] [--id_offset K]

Defaults give BraTS-sized volumes (240x240x155 at 1 mm) of the blob generator. ``--anatomy mni152`` puts the
tumours into the MNI152 2009a brain (deformed per case; needs nilearn); for CPU work give it a coarser grid
that still holds a brain, e.g. ``--shape "[96,96,64]" --spacing "[2,2,2.4]"`` (a smaller field of view shrinks
the anatomy to fit). Same arguments, same bytes.
"""

from __future__ import annotations

import sys
import time

import fire

from custom.core.cli import as_list
from custom.data.synthetic import ANATOMIES, write_dataset
from custom.data.tissue_model import DEFAULT_SHAPE, DEFAULT_SPACING


def main(
    out_dir: str,
    num_cases: int = 10,
    shape=DEFAULT_SHAPE,
    spacing=DEFAULT_SPACING,
    seed: int = 0,
    label_noise: float = 0.5,
    first_index: int = 0,
    anatomy: str = "blob",
    id_offset: int = 0,
):
    """Generate ``num_cases`` cases ``BraTS-GLI-%05d-000`` under ``out_dir``.

    Args:
        out_dir: output folder (created); existing case folders of the same ids are overwritten.
        num_cases: number of cases.
        shape: volume size in voxels, e.g. "[64,64,48]" (default 240x240x155).
        spacing: voxel size in mm, e.g. "[1,1,1]".
        seed: random seed; case i depends only on (seed, i).
        label_noise: boundary displacement of the labels in voxels (aleatoric label noise); 0 disables.
        first_index: index i of the first case (its random stream (seed, i) and, with id_offset 0, its id).
        anatomy: "blob" (smooth synthetic head, the default) or "mni152" (real brain anatomy, needs nilearn).
        id_offset: added to i in the case ids only (the cases themselves stay the same), so a separately
            seeded set, e.g. unseen cases, can get ids that do not collide: --seed 1 --id_offset 1000.
    """
    try:
        shape = as_list(shape, "shape", length=3, cast=int)
        spacing = as_list(spacing, "spacing", length=3, cast=float)
        anatomy = str(anatomy).strip().lower()
        if anatomy not in ANATOMIES:
            raise ValueError(f"--anatomy must be one of {', '.join(ANATOMIES)}, got {anatomy!r}")
        start = time.perf_counter()
        ids = write_dataset(out_dir, int(num_cases), shape, spacing, int(seed), float(label_noise),
                            first_index=int(first_index), progress=True, anatomy=anatomy,
                            id_offset=int(id_offset))
    except ValueError as exc:
        print(f"make_synthetic: error: {exc}", file=sys.stderr)
        sys.exit(2)
    elapsed = time.perf_counter() - start
    print(f"make_synthetic: wrote {len(ids)} {anatomy} cases {ids[0]}..{ids[-1]} "
          f"shape {list(shape)} spacing {list(spacing)} seed {seed} to {out_dir} in {elapsed:.1f} s")


if __name__ == "__main__":
    fire.Fire(main)
