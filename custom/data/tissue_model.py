"""The model of synthetic MRI both generators share: tissue classes, their intensity per modality, smooth fields.

Used by :mod:`custom.data.synthetic` (a synthetic head with blob tumours) and :mod:`custom.data.anatomy` (the MNI152
brain with grown tumours), so that a case of either kind has the same contrasts.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

DEFAULT_SHAPE = (240, 240, 155)
DEFAULT_SPACING = (1.0, 1.0, 1.0)

#: tissue classes of the intensity model (the first four are normal brain, WMH is unlabelled)
TISSUES = ("background", "csf", "gm", "wm", "wmh", "edema", "necrosis", "enhancing")
#: index of each tissue in ``TISSUES`` (columns of ``INTENSITY_TABLE``)
BG, CSF, GM, WM, WMH, ED, NCR, ET = range(len(TISSUES))

#: mean intensity of each tissue (columns, ``TISSUES`` order) per modality (rows, ``MODALITIES`` order),
#: relative to white matter in t1n. Chosen after the typical appearance of each tissue in BraTS; the
#: overlaps are deliberate (edema ~ GM in t1c/t1n, necrosis ~ CSF in t1c/t2w, WMH ~ edema in t2f).
INTENSITY_TABLE = np.array(
    [
        # bg    csf   gm    wm    wmh   ed    ncr   et
        [0.0, 0.30, 0.72, 0.92, 0.82, 0.70, 0.38, 1.80],  # t1c: enhancing rim bright, core dark
        [0.0, 0.28, 0.75, 1.00, 0.86, 0.72, 0.52, 0.80],  # t1n: tumour slightly dark
        [0.0, 0.25, 0.95, 0.70, 1.30, 1.45, 0.95, 1.15],  # t2f: edema bright, CSF suppressed
        [0.0, 1.70, 0.95, 0.60, 1.00, 1.40, 1.55, 1.05],  # t2w: edema and core bright
    ],
    dtype=np.float32,
)

#: "both": necrotic core inside an enhancing rim; "no_et": non-enhancing core only; "no_ncr": solid enhancing core
TUMOUR_TYPES = ("both", "no_et", "no_ncr")


def smooth_field(
    rng: np.random.Generator,
    shape: Sequence[int],
    spacing: Sequence[float],
    scale_mm: float,
) -> np.ndarray:
    """Smooth Gaussian random field, zero mean and unit standard deviation over the grid.

    White noise on a coarse grid (one control point per ``scale_mm``) is interpolated with Gaussian
    weights of width ``scale_mm`` along each axis in turn, so the cost is three matrix products.

    Args:
        rng: random generator (consumed deterministically).
        shape: ``(X, Y, Z)`` voxels.
        spacing: ``(sx, sy, sz)`` mm.
        scale_mm: correlation length in mm.

    Returns:
        float32 array ``(X, Y, Z)``.
    """
    mats = []
    for n, s in zip(shape, spacing):
        x = np.arange(n, dtype=np.float64) * s
        margin = 2.0 * scale_mm
        centres = np.arange(-margin, n * s + margin + 1e-9, scale_mm)
        w = np.exp(-0.5 * ((x[:, None] - centres[None, :]) / scale_mm) ** 2)
        mats.append(w.astype(np.float32))
    coarse = rng.standard_normal(tuple(m.shape[1] for m in mats), dtype=np.float32)
    # contract one coarse axis at a time: (a,b,c) -> (X,b,c) -> (X,Y,c) -> (X,Y,Z)
    field = np.tensordot(mats[0], coarse, axes=(1, 0))
    field = np.tensordot(field, mats[1], axes=(1, 1)).transpose(0, 2, 1)
    field = np.tensordot(field, mats[2], axes=(2, 1))
    field -= field.mean()
    std = field.std()
    if std > 0:
        field /= std
    return np.ascontiguousarray(field, dtype=np.float32)
