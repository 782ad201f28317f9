"""Region/label conversion, case-coordinate channels and nnU-Net foreground-oversampled cropping.

Conventions (bundle/docs/DESIGN.md): arrays are channel-first ``(C, X, Y, Z)``; labels 0 bg, 1 NCR,
2 ED, 3 ET; regions WT = {1,2,3}, TC = {1,3}, ET = {3}; labels from regions follow nnU-Net's
``regions_class_order`` (2, 1, 3).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable, Transform

from custom.constants import REGION_LABELS, REGIONS, REGIONS_CLASS_ORDER

__all__ = [
    "labels_to_regions",
    "regions_to_labels",
    "LabelToRegions",
    "LabelToRegionsd",
    "RegionsToLabels",
    "RegionsToLabelsd",
    "make_case_coordinates",
    "AddCaseCoordinatesd",
    "ForegroundOversampledCropd",
]


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


class LabelToRegionsd(MapTransform):
    """Dict version of :class:`LabelToRegions`: label maps -> float32 ``(3,X,Y,Z)`` [WT, TC, ET]."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.converter = LabelToRegions()

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key])
        return d


class RegionsToLabels(Transform):
    """Array transform wrapping :func:`regions_to_labels`; output ``(1,X,Y,Z)`` if ``keepdim``."""

    def __init__(self, threshold: float = 0.5, keepdim: bool = False):
        self.threshold = float(threshold)
        self.keepdim = bool(keepdim)

    def __call__(self, probs):
        labels = regions_to_labels(probs, self.threshold)
        return labels[None] if self.keepdim else labels


class RegionsToLabelsd(MapTransform):
    """Dict version of :class:`RegionsToLabels`."""

    def __init__(self, keys: KeysCollection, threshold: float = 0.5, keepdim: bool = False,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.converter = RegionsToLabels(threshold, keepdim)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key])
        return d


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


class AddCaseCoordinatesd(MapTransform):
    """Add ``data[coords_key]``: float32 ``(3, X, Y, Z)`` case coordinates (index + 1) of ``data[ref_key]``.

    Carried through the spatial augmentation with the image, they tell the error-map store which case
    voxel each patch voxel came from. Spatial transforms must treat ``coords_key`` with ``mode="nearest"``
    and constant-0 padding (``padding_mode="zeros"``/``"constant"``) so padding reads as invalid (0).
    If the reference is a MetaTensor the coordinates share its metadata (affine), so MONAI spatial
    transforms treat both identically.
    """

    def __init__(self, ref_key: str = "image", coords_key: str = "coords"):
        super().__init__(keys=[ref_key])
        self.ref_key = ref_key
        self.coords_key = coords_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if self.ref_key not in d:
            raise KeyError(f"AddCaseCoordinatesd: key '{self.ref_key}' not found (keys: {list(d)})")
        ref = d[self.ref_key]
        if ref.ndim != 4:
            raise ValueError(f"AddCaseCoordinatesd: '{self.ref_key}' must be (C,X,Y,Z), got {tuple(ref.shape)}")
        coords = make_case_coordinates(ref.shape[1:])
        if isinstance(ref, MetaTensor):
            coords = MetaTensor(torch.from_numpy(coords), meta=dict(ref.meta),
                                applied_operations=list(ref.applied_operations))
        elif isinstance(ref, torch.Tensor):
            coords = torch.from_numpy(coords)
        d[self.coords_key] = coords
        return d


def _crop_and_pad(arr, starts, patch):
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


class ForegroundOversampledCropd(Randomizable, MapTransform):
    """nnU-Net style patch sampling: pad to the patch if needed (constant 0), then crop a ``patch_size`` box.

    If ``data[force_fg_key]`` is true and the label has foreground, the box is centred (clipped to the
    padded case) on a random foreground voxel; nnU-Net first draws a foreground class uniformly among
    those present, then a voxel of that class. Otherwise the box is drawn uniformly. All ``keys`` are
    cropped with the same box; areas outside the case are 0 in every key (coordinates: invalid).

    Args:
        keys: keys to crop, channel-first ``(C, X, Y, Z)`` numpy arrays (memmaps fine), tensors or MetaTensors.
        label_key: label used to find foreground: ``(1,X,Y,Z)``/``(X,Y,Z)`` labels (classes = values > 0)
            or ``(3,X,Y,Z)`` regions (classes = channels).
        patch_size: ``(px, py, pz)`` voxels.
        force_fg_key: boolean entry of the data dict; missing means False.
    """

    def __init__(self, keys: KeysCollection, label_key: str, patch_size: Sequence[int],
                 force_fg_key: str = "force_fg", allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        patch = tuple(int(p) for p in patch_size)
        if len(patch) != 3 or min(patch) < 1:
            raise ValueError(f"patch_size must be 3 positive ints, got {patch_size}")
        self.patch_size = patch
        self.label_key = label_key
        self.force_fg_key = force_fg_key
        self._starts = None

    def _foreground_voxel(self, label):
        lab = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
        if lab.ndim == 4 and lab.shape[0] > 1:
            classes = [c for c in range(lab.shape[0]) if lab[c].any()]
            if not classes:
                return None
            hit = lab[classes[self.R.randint(len(classes))]] > 0
        else:
            lab = lab.reshape(lab.shape[-3:])
            if np.issubdtype(lab.dtype, np.integer) and lab.size and lab.min() >= 0:
                present = np.flatnonzero(np.bincount(lab.ravel()))  # cheaper than np.unique on a whole case
            else:
                present = np.unique(lab)
            classes = [v for v in present if v > 0]
            if not classes:
                return None
            hit = lab == classes[self.R.randint(len(classes))]
        flat = np.flatnonzero(hit)
        return np.unravel_index(flat[self.R.randint(len(flat))], hit.shape)

    def randomize(self, shape: Sequence[int], label=None, force_fg: bool = False) -> None:
        pad_before = [max(p - n, 0) // 2 for p, n in zip(self.patch_size, shape)]
        padded = [max(p, n) for p, n in zip(self.patch_size, shape)]
        voxel = self._foreground_voxel(label) if (force_fg and label is not None) else None
        starts = []
        for axis in range(3):
            high = padded[axis] - self.patch_size[axis]
            if voxel is not None:
                start = int(np.clip(voxel[axis] + pad_before[axis] - self.patch_size[axis] // 2, 0, high))
            else:
                start = int(self.R.randint(high + 1))
            starts.append(start - pad_before[axis])
        self._starts = starts

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        shape = tuple(d[keys[0]].shape[1:])
        for key in keys:
            if d[key].ndim != 4 or tuple(d[key].shape[1:]) != shape:
                raise ValueError(f"ForegroundOversampledCropd: '{key}' has shape {tuple(d[key].shape)}, "
                                 f"expected (C,) + {shape} like '{keys[0]}'")
        force_fg = bool(d.get(self.force_fg_key, False))
        self.randomize(shape, d.get(self.label_key), force_fg)
        for key in keys:
            d[key] = _crop_and_pad(d[key], self._starts, self.patch_size)
        return d
