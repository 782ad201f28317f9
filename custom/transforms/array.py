"""Array transforms and functions: labels <-> regions, case-coordinate channels, crop-and-pad of a patch box."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Transform

from custom.core.constants import REGION_LABELS, REGIONS, REGIONS_CLASS_ORDER


def _squeeze_label(label):
    """Accept ``(X,Y,Z)`` or ``(1,X,Y,Z)`` label maps; return the 3-D map."""
    if label.ndim == 4:
        if label.shape[0] != 1:
            raise ValueError(f"label must have one channel, got shape {tuple(label.shape)}")
        return label[0]
    if label.ndim != 3:
        raise ValueError(f"label must be (X,Y,Z) or (1,X,Y,Z), got shape {tuple(label.shape)}")
    return label


def labels_to_regions(label):
    """BraTS labels ``(X,Y,Z)`` or ``(1,X,Y,Z)`` (values 0..3) -> float32 regions ``(3,X,Y,Z)`` [WT, TC, ET].

    Returns the same array type as the input (numpy or torch; MetaTensor metadata kept).
    """
    lab = _squeeze_label(label)
    if isinstance(lab, torch.Tensor):
        chans = [torch.isin(lab, torch.as_tensor(REGION_LABELS[r], device=lab.device)) for r in REGIONS]
        out = torch.stack(chans).to(torch.float32)
        if isinstance(label, MetaTensor):
            out = MetaTensor(out, meta=label.meta, applied_operations=label.applied_operations)
        return out
    lab = np.asarray(lab)
    return np.stack([np.isin(lab, REGION_LABELS[r]) for r in REGIONS]).astype(np.float32)


def regions_to_labels(probs, threshold: float = 0.5):
    """Region probabilities ``(3,X,Y,Z)`` [WT, TC, ET] -> uint8 labels ``(X,Y,Z)``.

    nnU-Net ``regions_class_order`` (2, 1, 3): start from 0, write 2 where p_WT > threshold, then 1
    where p_TC > threshold, then 3 where p_ET > threshold (later regions overwrite earlier ones).
    Extra channels (e.g. ``unc_output`` as channel 3) are ignored. Numpy in -> numpy out, torch -> torch.
    """
    if probs.ndim != 4 or probs.shape[0] < len(REGIONS):
        raise ValueError(f"probs must be (3 or more, X, Y, Z), got shape {tuple(probs.shape)}")
    if isinstance(probs, torch.Tensor):
        probs_t = probs.as_tensor() if isinstance(probs, MetaTensor) else probs
        labels = torch.zeros(probs_t.shape[1:], dtype=torch.uint8, device=probs_t.device)
        for channel, value in enumerate(REGIONS_CLASS_ORDER):
            labels[probs_t[channel] > threshold] = value
        return labels
    probs = np.asarray(probs)
    labels = np.zeros(probs.shape[1:], dtype=np.uint8)
    for channel, value in enumerate(REGIONS_CLASS_ORDER):
        labels[probs[channel] > threshold] = value
    return labels


class LabelToRegions(Transform):
    """Array transform wrapping :func:`labels_to_regions`."""

    def __call__(self, label):
        return labels_to_regions(label)


class RegionsToLabels(Transform):
    """Array transform wrapping :func:`regions_to_labels`; output ``(1,X,Y,Z)`` if ``keepdim``."""

    def __init__(self, threshold: float = 0.5, keepdim: bool = False):
        self.threshold = float(threshold)
        self.keepdim = bool(keepdim)

    def __call__(self, probs):
        labels = regions_to_labels(probs, self.threshold)
        return labels[None] if self.keepdim else labels


def make_case_coordinates(spatial_shape: Sequence[int]) -> np.ndarray:
    """float32 ``(3, X, Y, Z)`` holding ``index + 1`` of every voxel along each axis (0 means invalid).

    float32 represents integers exactly up to 2**24, far beyond any case edge.
    """
    shape = tuple(int(s) for s in spatial_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"spatial_shape must be 3 positive ints, got {spatial_shape}")
    if max(shape) >= 2**24:
        raise ValueError(f"spatial_shape {shape} too large for exact float32 coordinates")
    out = np.empty((3,) + shape, dtype=np.float32)
    for axis in range(3):
        view = [1, 1, 1]
        view[axis] = shape[axis]
        out[axis] = np.arange(1, shape[axis] + 1, dtype=np.float32).reshape(view)
    return out


def crop_and_pad(arr, starts, patch):
    """Crop ``arr[:, s:s+p]`` per axis where the box may extend past the array; outside is constant 0.

    Slices first (so a numpy memmap reads only the patch) and pads afterwards.
    """
    shape = arr.shape[1:]
    src = [slice(max(s, 0), min(s + p, n)) for s, p, n in zip(starts, patch, shape)]
    pads = [(max(-s, 0), max(s + p - n, 0)) for s, p, n in zip(starts, patch, shape)]
    cropped = arr[(slice(None),) + tuple(src)]
    if not any(b or a for b, a in pads):
        return cropped.copy() if isinstance(cropped, np.ndarray) else cropped.clone()
    if isinstance(cropped, torch.Tensor):
        flat = [v for b, a in reversed(pads) for v in (b, a)]
        out = torch.nn.functional.pad(cropped, flat, mode="constant", value=0)
        if isinstance(arr, MetaTensor) and not isinstance(out, MetaTensor):
            out = MetaTensor(out, meta=arr.meta)
        return out
    return np.pad(cropped, [(0, 0)] + pads, mode="constant", constant_values=0)
