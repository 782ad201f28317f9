"""The dataset fingerprint: per-case nonzero box, shape, spacing and foreground intensity samples."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Mapping, Sequence

import numpy as np

from custom.core.constants import MODALITIES
from custom.core.errors import BraTSInputError
from custom.core.parallel import check_num_workers, map_cases
from custom.data.nifti import load_case_arrays

#: number of foreground voxels sampled per case for the intensity statistics (nnU-Net: 10k)
FINGERPRINT_SAMPLES_PER_CASE = 10_000

FINGERPRINT_SEED = 1234


# ----------------------------------------------------------------------------------------------- fingerprint
def compute_nonzero_bbox(image: np.ndarray, name: str = "image") -> list[list[int]]:
    """Bounding box of the voxels that are nonzero in any channel (the crop of fingerprint and preprocessing).

    Args:
        image: (C, X, Y, Z).
        name: file or case named in the error.

    Returns:
        ``[[x0, x1], [y0, y1], [z0, z1]]``, half-open (``x1`` exclusive), in voxels.

    Raises:
        BraTSInputError: when every voxel is 0.
    """
    nonzero = np.any(np.asarray(image) != 0, axis=0)
    bbox = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(nonzero.any(axis=other))
        if idx.size == 0:
            raise BraTSInputError(f"{name}: every voxel is 0 in all channels (empty image, nothing to crop)")
        bbox.append([int(idx[0]), int(idx[-1]) + 1])
    return bbox


def read_case(image_paths, label_path=None):
    """(image (4,X,Y,Z) float32, label (X,Y,Z) uint8 | None, affine (4,4), spacing (3,)), validated by custom.data."""

    return load_case_arrays(image_paths, label_path)


def compute_case_fingerprint(image, spacing, seg=None, case_id: str = "case",
                             num_samples: int = FINGERPRINT_SAMPLES_PER_CASE, seed: int = FINGERPRINT_SEED) -> dict:
    """Fingerprint of one case.

    Args:
        image: (C, X, Y, Z) intensities.
        spacing: (3,) voxel size in mm.
        seg: optional (X, Y, Z) labels; the intensity "foreground" is ``seg > 0`` (nnU-Net), or the nonzero
            mask when no label is given.
        num_samples: foreground voxels sampled per case (seeded by ``seed`` and the case id).

    Returns:
        ``{"case_id", "shape_before_crop", "shape_after_crop", "spacing", "relative_size_after_cropping",
        "foreground_samples": (C, n) list}``.
    """
    image = np.asarray(image)
    bbox = compute_nonzero_bbox(image, name=case_id)
    cropped = tuple(int(b - a) for a, b in bbox)
    fg = (seg > 0) if seg is not None else np.any(image != 0, axis=0)
    idx = np.flatnonzero(fg)
    # the seed mixes in the case id so that cases do not all draw the same voxel positions
    rng = np.random.default_rng([seed, int(hashlib.md5(case_id.encode()).hexdigest()[:8], 16)])
    if idx.size > num_samples:
        idx = np.sort(rng.choice(idx, num_samples, replace=False))
    flat = image.reshape(image.shape[0], -1)
    samples = flat[:, idx].astype(np.float32)
    return {
        "case_id": case_id,
        "shape_before_crop": [int(s) for s in image.shape[1:]],
        "shape_after_crop": list(cropped),
        "spacing": [float(s) for s in spacing],
        "relative_size_after_cropping": float(np.prod(cropped) / np.prod(image.shape[1:])),
        "foreground_samples": samples.tolist(),
    }


def _fingerprint_entry(entry: Mapping) -> dict:
    image, label, _affine, spacing = read_case(entry["image"], entry.get("label"))
    return compute_case_fingerprint(image, spacing, label, case_id=str(entry.get("case_id", entry["image"][0])))


def _channel_stats(values: np.ndarray) -> dict:
    if values.size == 0:
        return {k: None for k in ("mean", "std", "median", "min", "max", "percentile_00_5", "percentile_99_5")}
    return {
        "mean": float(np.mean(values)),
        "std": float(np.std(values)),
        "median": float(np.median(values)),
        "min": float(np.min(values)),
        "max": float(np.max(values)),
        "percentile_00_5": float(np.percentile(values, 0.5)),
        "percentile_99_5": float(np.percentile(values, 99.5)),
    }


def compute_fingerprint(datalist: Mapping | str | os.PathLike, num_workers: int = 1,
                        modalities: Sequence[str] = MODALITIES) -> dict:
    """Dataset fingerprint of the training cases of a datalist (dict or path to ``datalist.json``).

    Returns a JSON-serialisable dict: ``spacings`` and ``shapes_after_crop`` (one row per case), ``case_ids``,
    ``median_relative_size_after_cropping``, ``foreground_intensity_properties_per_channel`` (per modality:
    mean, std, median, min, max, percentile_00_5, percentile_99_5 over the pooled foreground samples).
    """
    if not isinstance(datalist, Mapping):
        with open(datalist) as fh:
            datalist = json.load(fh)
    cases = list(datalist.get("training", []))
    if not cases:
        raise BraTSInputError("datalist has no training cases: nothing to fingerprint")
    check_num_workers(num_workers)
    per_case = map_cases(_fingerprint_entry, cases, num_workers, "fingerprint")
    samples = [np.asarray(c.pop("foreground_samples"), dtype=np.float32).reshape(len(modalities), -1)
               for c in per_case]
    pooled = np.concatenate(samples, axis=1)
    return {
        "num_cases": len(per_case),
        "modalities": list(modalities),
        "case_ids": [c["case_id"] for c in per_case],
        "spacings": [c["spacing"] for c in per_case],
        "shapes_after_crop": [c["shape_after_crop"] for c in per_case],
        "shapes_before_crop": [c["shape_before_crop"] for c in per_case],
        "median_relative_size_after_cropping": float(np.median([c["relative_size_after_cropping"]
                                                                for c in per_case])),
        "foreground_intensity_properties_per_channel": {
            m: _channel_stats(pooled[i]) for i, m in enumerate(modalities)},
        "samples_per_case": FINGERPRINT_SAMPLES_PER_CASE,
        "seed": FINGERPRINT_SEED,
    }
