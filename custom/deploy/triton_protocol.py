"""The volume model's request contract: what an IMAGE/SPACING pair must satisfy before any work is done."""

from __future__ import annotations

import numpy as np

from custom.core.errors import BraTSInputError

#: largest accepted edge of a volume, in voxels (BraTS volumes are 240x240x155)
MAX_VOLUME_EDGE = 256

NUM_CHANNELS = 4


# ----------------------------------------------------------------------------------------------- request checks
def validate_volume_request(image, spacing, max_edge: int = MAX_VOLUME_EDGE, source: str = "request"):
    """Check one volume request before any computation; return ``(image float32, spacing float64 (3,))``.

    Args:
        image: array ``(4, X, Y, Z)`` float32, channels in ``MODALITIES`` order.
        spacing: array ``(3,)`` voxel spacing in mm, or ``None`` when the client did not send it.
        max_edge: largest accepted ``X``, ``Y`` and ``Z`` (voxels).
        source: what to name in the error (the input tensor, a file...).

    Raises:
        BraTSInputError: listing every problem found, each naming ``source``.
    """
    problems = []
    if image is None:
        raise BraTSInputError([f"{source}: input IMAGE is missing"], header="rejected volume request")
    image = np.asarray(image)
    if image.dtype != np.float32:
        problems.append(f"{source}: IMAGE must be float32, got {image.dtype}")
    if image.ndim != 4:
        problems.append(f"{source}: IMAGE must have 4 dims (4, X, Y, Z), got shape {tuple(image.shape)}")
    else:
        if image.shape[0] != NUM_CHANNELS:
            problems.append(
                f"{source}: IMAGE must have {NUM_CHANNELS} channels (t1c, t1n, t2f, t2w), got {image.shape[0]}"
            )
        spatial = tuple(int(s) for s in image.shape[1:])
        if min(spatial) < 1:
            problems.append(f"{source}: IMAGE is empty (spatial shape {spatial})")
        elif max(spatial) > max_edge:
            problems.append(f"{source}: IMAGE spatial shape {spatial} exceeds the limit of {max_edge} voxels per axis")
    if spacing is None:
        problems.append(f"{source}: input SPACING (3 voxel sizes in mm) is missing")
    else:
        spacing = np.asarray(spacing, dtype=np.float64).reshape(-1)
        if spacing.shape != (3,):
            problems.append(f"{source}: SPACING must hold 3 values (mm), got {spacing.size}")
        elif not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
            problems.append(f"{source}: SPACING must be positive and finite, got {spacing.tolist()}")
    if not problems and image.size:
        # only after the shape checks: these read the whole volume
        if not np.all(np.isfinite(image)):
            problems.append(f"{source}: IMAGE contains NaN or infinite values")
        elif not np.any(image):
            problems.append(f"{source}: IMAGE is empty (every voxel is 0, no brain to segment)")
    if problems:
        raise BraTSInputError(problems, header="rejected volume request")
    return image, spacing
