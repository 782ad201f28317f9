"""Write a synthetic BraTS 2023 GLI data set (case folders with t1c, t1n, t2f, t2w and seg NIfTI files).

    python scripts/make_synthetic.py --out_dir DIR --num_cases N --shape "[64,64,48]" --spacing "[1,1,1]" --seed S

Defaults give BraTS-sized volumes (240x240x155 at 1 mm). Same arguments, same bytes.
"""

from __future__ import annotations

import sys
import time

import fire

from custom.core.cli import as_list
from custom.data.synthetic import DEFAULT_SHAPE, DEFAULT_SPACING, write_dataset


def main(
    out_dir: str,
    num_cases: int = 10,
    shape=DEFAULT_SHAPE,
    spacing=DEFAULT_SPACING,
    seed: int = 0,
    label_noise: float = 0.5,
    first_index: int = 0,
):
    """Generate ``num_cases`` cases ``BraTS-GLI-%05d-000`` under ``out_dir``.

    Args:
        out_dir: output folder (created); existing case folders of the same ids are overwritten.
        num_cases: number of cases.
        shape: volume size in voxels, e.g. "[64,64,48]" (default 240x240x155).
        spacing: voxel size in mm, e.g. "[1,1,1]".
        seed: random seed; case i depends only on (seed, i).
        label_noise: boundary displacement of the labels in voxels (aleatoric label noise); 0 disables.
        first_index: index of the first case id.
    """
    try:
        shape = as_list(shape, "shape", length=3, cast=int)
        spacing = as_list(spacing, "spacing", length=3, cast=float)
        start = time.perf_counter()
        ids = write_dataset(out_dir, int(num_cases), shape, spacing, int(seed), float(label_noise),
                            first_index=int(first_index), progress=True)
    except ValueError as exc:
        print(f"make_synthetic: error: {exc}", file=sys.stderr)
        sys.exit(2)
    elapsed = time.perf_counter() - start
    print(f"make_synthetic: wrote {len(ids)} cases {ids[0]}..{ids[-1]} "
          f"shape {list(shape)} spacing {list(spacing)} seed {seed} to {out_dir} in {elapsed:.1f} s")


if __name__ == "__main__":
    fire.Fire(main)
