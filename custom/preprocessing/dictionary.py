"""Dictionary transforms over :mod:`custom.preprocessing.functional` for the bundle configs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from custom.core.errors import BraTSInputError
from custom.data.nifti import spacing_from_affine
from custom.planning.plans import load_plans
from custom.preprocessing.functional import preprocess_case, restore_original_grid


# ---------------------------------------------------------------------------------------------- dict transforms
class LoadPreprocessedd(MapTransform):
    """Load a cached preprocessed case from a datalist entry.

    Reads ``data["pp_<key>"]`` for each key: ``image`` -> float32 tensor (4, X', Y', Z'),
    ``label`` -> uint8 tensor (1, X', Y', Z'). Adds ``case_id`` (from the entry, else the file name) and, when
    ``pp_properties`` is present and ``properties_key`` is set, the properties dict.

    Args:
        mmap: False (default) reads the whole case into a private tensor (~50 ms for a 4x176x213x128 BraTS case);
            True returns read-only memory-mapped numpy arrays instead, so that a following crop reads only the
            patch from disk (the crop must copy; nothing may write into them).
    """

    def __init__(self, keys: KeysCollection = ("image", "label"), properties_key: str | None = "image_properties",
                 mmap: bool = False, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.properties_key = properties_key
        self.mmap = mmap

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.keys:
            src = d.get(f"pp_{key}")
            if src is None:
                if self.allow_missing_keys:
                    continue
                raise KeyError(f"LoadPreprocessedd: entry {d.get('case_id', '?')} has no 'pp_{key}' path; "
                               f"run scripts/prepare_data.py with planning enabled")
            try:
                arr = np.load(src, mmap_mode="r")
                if not self.mmap:
                    arr = np.array(arr)
            except (OSError, ValueError) as exc:
                raise BraTSInputError(f"{src}: cannot load the preprocessed array ({exc})") from None
            if arr.ndim == 3:
                arr = arr[None]
            d[key] = arr if self.mmap else torch.from_numpy(arr)
            d.setdefault("case_id", Path(src).name.rsplit("_", 1)[0])
        if self.properties_key and d.get("pp_properties"):
            with open(d["pp_properties"]) as fh:
                d[self.properties_key] = json.load(fh)
        return d


def _preprocessed_affine(properties: Mapping):
    """Voxel-to-world matrix of the preprocessed grid (crop offset and resampling folded into the original)."""
    if properties.get("affine") is None:
        return None
    affine = np.asarray(properties["affine"], dtype=float)
    scale = np.asarray(properties["cropped_shape"], float) / np.asarray(properties["preprocessed_shape"], float)
    start = np.asarray([b[0] for b in properties["bbox"]], float)
    m = np.eye(4)
    m[:3, :3] = np.diag(scale)
    m[:3, 3] = start + (scale - 1) / 2  # voxel centres aligned, as in resample_to_shape
    return affine @ m


class BraTSPreprocessd(MapTransform):
    """``preprocess_case`` as a dict transform: raw (4, X, Y, Z) image -> preprocessed image.

    The spacing comes from ``data[spacing_key]`` when given, else from the MetaTensor affine (``LoadImaged`` +
    ``EnsureChannelFirstd``). The image becomes a float32 MetaTensor (4, X', Y', Z') whose affine describes the
    preprocessed grid; the properties go to ``data[properties_key]``. With ``label_key``, that label
    ((X, Y, Z) or (1, X, Y, Z)) is cropped/resampled the same way into a uint8 (1, X', Y', Z') tensor.
    """

    def __init__(self, keys: KeysCollection = "image", plans=None, spacing_key: str | None = None,
                 label_key: str | None = None, properties_key: str = "image_properties",
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        if plans is None:
            raise ValueError("BraTSPreprocessd needs plans (a Plans, a plans dict or a path to plans.json)")
        self.plans = load_plans(plans)
        self.spacing_key = spacing_key
        self.label_key = label_key
        self.properties_key = properties_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            name = _source_name(img, key)
            affine = None
            if isinstance(img, MetaTensor):
                affine = img.affine.detach().cpu().numpy()
            if self.spacing_key is not None:
                spacing = d[self.spacing_key]
                spacing = spacing.tolist() if isinstance(spacing, (torch.Tensor, np.ndarray)) else spacing
            elif affine is not None:
                spacing = spacing_from_affine(affine)
            else:
                raise BraTSInputError(f"{name}: no spacing: pass a MetaTensor (LoadImaged) or set spacing_key")
            seg = d.get(self.label_key) if self.label_key else None
            image_pp, seg_pp, props = preprocess_case(img, spacing, self.plans, seg=seg, affine=affine, name=name)
            d[key] = MetaTensor(torch.from_numpy(image_pp), affine=_maybe_tensor(_preprocessed_affine(props)))
            if seg_pp is not None:
                d[self.label_key] = MetaTensor(torch.from_numpy(seg_pp[None]),
                                               affine=_maybe_tensor(_preprocessed_affine(props)))
            d[self.properties_key] = props
        return d


def _maybe_tensor(affine):
    return torch.as_tensor(affine, dtype=torch.float64) if affine is not None else None


def _source_name(img, key) -> str:
    if isinstance(img, MetaTensor):
        src = img.meta.get("filename_or_obj")
        if src is not None:
            return str(src[0] if isinstance(src, (list, tuple)) and src else src)
    return str(key)


class RestoreOriginalGridd(MapTransform):
    """``restore_original_grid`` as a dict transform.

    Args:
        keys: arrays (C, X', Y', Z') on the preprocessed grid.
        properties_key: where ``BraTSPreprocessd`` put the properties.
        orders: interpolation order per key (int or one per key): 1 for probabilities, 0 for labels.
        fill: value outside the crop box.

    Tensor outputs become MetaTensors with the original affine (when known), ready for ``SaveImaged``.
    """

    def __init__(self, keys: KeysCollection, properties_key: str = "image_properties", orders=1, fill: float = 0.0,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        orders = [orders] * len(self.keys) if isinstance(orders, int) else list(orders)
        if len(orders) != len(self.keys):
            raise ValueError(f"orders must be one int or one per key ({len(self.keys)}), got {orders}")
        self.orders = orders
        self.properties_key = properties_key
        self.fill = fill

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        if self.properties_key not in d:
            raise KeyError(f"RestoreOriginalGridd: no '{self.properties_key}' in the data; "
                           f"run BraTSPreprocessd first")
        props = d[self.properties_key]
        for key, order in self.key_iterator(d, self.orders):
            arr = d[key]
            if isinstance(arr, MetaTensor):
                arr = arr.as_tensor()
            out = restore_original_grid(arr, props, order=order, fill=self.fill)
            if isinstance(out, torch.Tensor):
                affine = props.get("affine")
                out = MetaTensor(out, affine=_maybe_tensor(affine)) if affine is not None else MetaTensor(out)
            d[key] = out
        return d
