"""Dictionary transforms of the training and validation pipelines (wrapping :mod:`custom.transforms.array`)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable

from custom.transforms.array import LabelToRegions, RegionsToLabels, crop_and_pad, make_case_coordinates


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


class AddCaseCoordinatesd(MapTransform):
    """Add ``data[coords_key]``: float32 ``(3, X, Y, Z)`` case coordinates (index + 1) of ``data[ref_key]``.

    Carried through the spatial augmentation with the image, they tell the error-map store which case
    voxel each patch voxel came from. Spatial transforms must move ``coords_key`` (and the label) with a nearest
    mode on the SAME sampling grid as the image's linear mode: ``"nearest"`` for grid-sample transforms
    (rotation), ``"nearest-exact"`` for resize transforms (zoom; legacy ``"nearest"`` is half a voxel off), and
    constant-0 padding (``padding_mode="zeros"``/``"constant"``) so padding reads as invalid (0).
    tests/test_augmentation_alignment.py checks train.json for this.
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
            d[key] = crop_and_pad(d[key], self._starts, self.patch_size)
        return d
