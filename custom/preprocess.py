"""nnU-Net preprocessing of one case, and its exact inverse for predictions.

One function pair serves training (the ``W/preprocessed`` cache), bundle inference, Triton and MONAI Label, so
that every path sees identical network inputs:

``preprocess_case``: crop to the nonzero box (union over channels) -> z-score each channel over the nonzero
mask (holes filled, as nnU-Net does; voxels outside stay 0) -> resample to ``plans.target_spacing`` only if the
spacing differs (image: cubic spline, labels: linear on one-hot then argmax).

``restore_original_grid``: resample a prediction back to the cropped shape and paste it into the crop box of a
volume of the original shape. With equal spacing, restore(preprocess(x)) puts every cropped voxel back in
place exactly; with any spacing the restored shape is exactly the original one.

Resampling maps voxel centres (``x_in = (x_out + 0.5) * n_in / n_out - 0.5``), like ``align_corners=False``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from scipy import ndimage

from custom.constants import LABEL_VALUES, MODALITIES
from custom.data import load_datalist
from custom.errors import BraTSInputError
from custom.io_utils import atomic_save_npy, atomic_write_json
from custom.planning import (  # noqa: F401  (compute_nonzero_bbox, PREPROCESS_VERSION re-exported)
    PREPROCESS_VERSION,
    ExperimentPlanner,
    Plans,
    compute_fingerprint,
    compute_nonzero_bbox,
    load_plans,
)

__all__ = [
    "PREPROCESS_VERSION",
    "compute_nonzero_bbox",
    "zscore_nonzero",
    "resample_to_shape",
    "preprocess_case",
    "restore_original_grid",
    "plan_and_preprocess",
    "LoadPreprocessedd",
    "BraTSPreprocessd",
    "RestoreOriginalGridd",
]

_SPACING_RTOL = 1e-3
logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ building blocks
def _crop(array: np.ndarray, bbox) -> np.ndarray:
    return array[(..., *[slice(a, b) for a, b in bbox])]


def zscore_nonzero(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Z-score each channel over ``mask``; voxels outside the mask are 0.

    Args:
        image: (C, X, Y, Z) intensities.
        mask: (X, Y, Z) bool, the voxels that define the statistics and receive values.

    Returns:
        (C, X, Y, Z) float32; inside the mask each channel has mean 0 and standard deviation 1 (unless constant).
    """
    out = np.zeros(image.shape, dtype=np.float32)
    for c in range(image.shape[0]):
        values = image[c][mask].astype(np.float64)
        if values.size == 0:
            continue
        mean, std = values.mean(), values.std()
        out[c][mask] = ((values - mean) / max(std, 1e-8)).astype(np.float32)
    return out


def resample_to_shape(array, new_shape: Sequence[int], order: int = 1):
    """Resample a channel-first volume to ``new_shape`` (voxel centres aligned).

    Args:
        array: (C, X, Y, Z) numpy array or torch tensor.
        new_shape: (3,) output spatial shape.
        order: 0 nearest, 1 linear (torch, on the tensor's device), 3 cubic spline (scipy, CPU).

    Returns:
        (C, *new_shape): numpy float32 for numpy input, a tensor on the same device for tensor input;
        order 0 keeps the dtype.
    """
    new_shape = tuple(int(s) for s in new_shape)
    if order not in (0, 1, 3):
        raise ValueError(f"order must be 0 (nearest), 1 (linear) or 3 (cubic), got {order!r}")
    is_tensor = isinstance(array, torch.Tensor)
    if tuple(array.shape[1:]) == new_shape:
        return array
    if order == 3:
        src = array.detach().cpu().numpy() if is_tensor else np.asarray(array)
        zoom = [n / o for n, o in zip(new_shape, src.shape[1:])]
        out = np.stack([ndimage.zoom(src[c].astype(np.float32, copy=False), zoom, order=3, mode="nearest",
                                     grid_mode=True) for c in range(src.shape[0])])
        if out.shape[1:] != new_shape:  # zoom rounds the output shape; guard against a float off-by-one
            raise RuntimeError(f"cubic resampling produced {out.shape[1:]} instead of {new_shape}")
        return torch.as_tensor(out, device=array.device) if is_tensor else out
    t = torch.as_tensor(array) if not is_tensor else array
    dtype = t.dtype
    x = t[None].float()
    if order == 0:
        y = F.interpolate(x, size=new_shape, mode="nearest-exact")[0].to(dtype)
    else:
        y = F.interpolate(x, size=new_shape, mode="trilinear", align_corners=False)[0]
    if is_tensor:
        return y
    return y.numpy() if order == 0 else y.numpy().astype(np.float32, copy=False)


def _resample_labels(seg: np.ndarray, new_shape) -> np.ndarray:
    """Labels (X, Y, Z) -> ``new_shape`` by linear interpolation of the one-hot encoding, then argmax."""
    labels = np.asarray(LABEL_VALUES)
    onehot = torch.from_numpy(np.stack([seg == v for v in labels]).astype(np.float32))
    probs = F.interpolate(onehot[None], size=tuple(new_shape), mode="trilinear", align_corners=False)[0]
    return labels[probs.argmax(0).numpy()].astype(np.uint8)


def _spacing_from_affine(affine) -> np.ndarray:
    a = np.asarray(affine, dtype=float)
    return np.sqrt((a[:3, :3] ** 2).sum(axis=0))


def _validate_inputs(image, spacing, seg, n_channels: int, name: str):
    image = np.asarray(image)
    if image.ndim != 4 or image.shape[0] != n_channels:
        raise BraTSInputError(f"{name}: expected a channel-first image ({n_channels}, X, Y, Z), got shape "
                              f"{tuple(image.shape)}")
    if not np.issubdtype(image.dtype, np.number):
        raise BraTSInputError(f"{name}: image has non-numeric dtype {image.dtype}")
    if not np.all(np.isfinite(image)):
        raise BraTSInputError(f"{name}: image contains NaN or infinite values")
    try:
        spacing = np.asarray(spacing, dtype=float).reshape(-1)
    except (TypeError, ValueError):
        raise BraTSInputError(f"{name}: spacing must be 3 numbers in mm, got {spacing!r}") from None
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise BraTSInputError(f"{name}: spacing must be 3 positive numbers in mm, got {spacing.tolist()}")
    if seg is not None:
        seg = np.asarray(seg)
        if seg.ndim == 4 and seg.shape[0] == 1:
            seg = seg[0]
        if seg.shape != image.shape[1:]:
            raise BraTSInputError(f"{name}: segmentation shape {seg.shape} differs from the image {image.shape[1:]}")
        bad = np.setdiff1d(np.unique(seg), LABEL_VALUES)
        if bad.size:
            raise BraTSInputError(f"{name}: segmentation has labels {bad.tolist()} outside {list(LABEL_VALUES)}")
        seg = seg.astype(np.uint8)
    return image, spacing, seg


# ----------------------------------------------------------------------------------------------------- one case
def preprocess_case(image, spacing, plans, seg=None, affine=None, name: str = "image"):
    """Crop to nonzero, z-score over the nonzero mask, resample to the plan's spacing.

    Args:
        image: (4, X, Y, Z) raw intensities in ``plans.modalities`` order (numpy or CPU tensor).
        spacing: (3,) voxel size in mm.
        plans: ``Plans``, plans dict, or path to plans.json.
        seg: optional (X, Y, Z) labels in 0..3.
        affine: optional (4, 4) voxel-to-world matrix, kept in the properties for writing results.
        name: file or case named in error messages.

    Returns:
        ``(image_pp float32 (4, X', Y', Z'), seg_pp uint8 (X', Y', Z') or None, properties)`` with properties
        ``original_shape, original_spacing, bbox (half-open [[x0,x1],[y0,y1],[z0,z1]]), cropped_shape,
        preprocessed_shape, target_spacing, affine (4x4 list or None), resampled (bool), plan_hash``.

    Raises:
        BraTSInputError: wrong shape/channels, NaN, bad spacing, bad labels, or an all-zero image.
    """
    plans = load_plans(plans)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(seg, torch.Tensor):
        seg = seg.detach().cpu().numpy()
    image, spacing, seg = _validate_inputs(image, spacing, seg, len(plans.modalities), name)
    target = np.asarray(plans.target_spacing, dtype=float)

    bbox = compute_nonzero_bbox(image, name=name)
    cropped = _crop(image, bbox)
    # holes filled: a zero voxel enclosed by brain is brain, and is normalised with it
    mask = ndimage.binary_fill_holes(np.any(cropped != 0, axis=0))
    image_pp = zscore_nonzero(cropped, mask)
    seg_pp = _crop(seg, bbox) if seg is not None else None

    cropped_shape = list(image_pp.shape[1:])
    resampled = not np.allclose(spacing, target, rtol=_SPACING_RTOL, atol=0)
    if resampled:
        new_shape = [max(int(round(n * s / t)), 1) for n, s, t in zip(cropped_shape, spacing, target)]
        image_pp = resample_to_shape(image_pp, new_shape, order=3)
        if seg_pp is not None:
            seg_pp = _resample_labels(seg_pp, new_shape)
    if seg_pp is not None:
        seg_pp = np.ascontiguousarray(seg_pp, dtype=np.uint8)
    properties = {
        "original_shape": [int(s) for s in image.shape[1:]],
        "original_spacing": [float(s) for s in spacing],
        "bbox": bbox,
        "cropped_shape": cropped_shape,
        "preprocessed_shape": [int(s) for s in image_pp.shape[1:]],
        "target_spacing": [float(t) for t in target],
        "affine": np.asarray(affine, dtype=float).tolist() if affine is not None else None,
        "resampled": bool(resampled),
        "plan_hash": plans.preprocessing_hash(),
    }
    return np.ascontiguousarray(image_pp, dtype=np.float32), seg_pp, properties


def restore_original_grid(array, properties: Mapping, order: int = 1, fill: float = 0.0):
    """Put a prediction on the preprocessed grid back on the original image grid.

    Args:
        array: (C, X', Y', Z') numpy array or tensor on the preprocessed grid (``properties["preprocessed_shape"]``).
        properties: the dict returned by ``preprocess_case``.
        order: interpolation back to the cropped shape: 0 nearest (required for integer labels), 1 linear,
            3 cubic. Unused when the case was not resampled.
        fill: value outside the crop box (0: background / zero probability).

    Returns:
        (C, X, Y, Z) on ``properties["original_shape"]``, same array type, dtype and device as the input.
    """
    is_tensor = isinstance(array, torch.Tensor)
    if array.ndim != 4:
        raise ValueError(f"restore_original_grid expects a channel-first (C, X', Y', Z') array, got shape "
                         f"{tuple(array.shape)}")
    expected = tuple(properties["preprocessed_shape"])
    if tuple(array.shape[1:]) != expected:
        raise ValueError(f"array spatial shape {tuple(array.shape[1:])} does not match the preprocessed shape "
                         f"{expected} of these properties")
    is_int = (not array.dtype.is_floating_point) if is_tensor else not np.issubdtype(array.dtype, np.floating)
    cropped_shape = tuple(properties["cropped_shape"])
    if expected != cropped_shape:
        if is_int and order != 0:
            raise ValueError(f"integer arrays (labels) must be restored with order=0, got order={order}")
        array = resample_to_shape(array, cropped_shape, order=order)
    shape = (array.shape[0], *properties["original_shape"])
    region = (slice(None), *[slice(a, b) for a, b in properties["bbox"]])
    if is_tensor:
        out = torch.full(shape, fill, dtype=array.dtype, device=array.device)
    else:
        out = np.full(shape, fill, dtype=array.dtype)
    out[region] = array
    return out


# ----------------------------------------------------------------------------------------------- whole data set
def _file_signature(paths) -> str:
    """Cheap identity of the raw files (size and mtime) so that a changed case is preprocessed again."""
    items = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError as exc:
            raise BraTSInputError(f"{p}: cannot be read ({exc.strerror or exc}); re-run scripts/prepare_data.py "
                                  f"if the data set moved") from None
        items.append([str(p), st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def _case_paths(pp_dir: Path, case_id: str) -> dict:
    return {"pp_image": str(pp_dir / f"{case_id}_image.npy"), "pp_label": str(pp_dir / f"{case_id}_seg.npy"),
            "pp_properties": str(pp_dir / f"{case_id}.json")}


def _is_cached(paths: Mapping, plan_hash: str, source: str) -> bool:
    if not all(os.path.exists(p) for p in paths.values()):
        return False
    try:
        with open(paths["pp_properties"]) as fh:
            props = json.load(fh)
    except (OSError, json.JSONDecodeError):
        return False
    return props.get("plan_hash") == plan_hash and props.get("source_signature") == source


def _preprocess_entry(args) -> tuple[str, bool]:
    """Worker: preprocess one datalist entry into the cache (skipped when cached with the same plan)."""
    entry, plans_dict, pp_dir = args
    from custom.planning import _read_case

    plans = Plans(plans_dict)
    case_id = entry["case_id"]
    paths = _case_paths(Path(pp_dir), case_id)
    source = _file_signature(list(entry["image"]) + [entry["label"]])
    if _is_cached(paths, plans.preprocessing_hash(), source):
        return case_id, False
    image, label, affine, spacing = _read_case(entry["image"], entry["label"])
    image_pp, seg_pp, props = preprocess_case(image, spacing, plans, seg=label, affine=affine,
                                              name=str(entry["image"][0]))
    props.update(case_id=case_id, source_signature=source)
    atomic_save_npy(paths["pp_image"], image_pp)
    atomic_save_npy(paths["pp_label"], seg_pp)
    atomic_write_json(paths["pp_properties"], props)  # written last: marks the case complete
    return case_id, True


def _cached_fingerprint(path: Path, signature: str):
    try:
        with open(path) as fh:
            fp = json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None
    return fp if fp.get("source_signature") == signature else None


def plan_and_preprocess(work_dir, gpu_memory_gb: float = 8, patch_size=None, filters=None,
                        num_workers: int = 1) -> Plans:
    """Fingerprint -> ``W/plans.json`` -> ``W/preprocessed/*`` for every training case -> datalist ``pp_*`` keys.

    Reads ``W/datalist.json``; writes ``W/fingerprint.json``, ``W/plans.json``, ``W/preprocessed/<id>_image.npy``
    (float32 (4, X', Y', Z')), ``<id>_seg.npy`` (uint8 (X', Y', Z')), ``<id>.json`` (properties) and rewrites
    ``W/datalist.json`` with absolute ``pp_image``, ``pp_label``, ``pp_properties`` on each training entry.
    Every write is atomic. Idempotent: the fingerprint is reused while the raw files are unchanged, and a case
    already cached with the same preprocessing (plan hash) and the same raw files is skipped.

    Args:
        work_dir: the work directory ``W``.
        gpu_memory_gb, patch_size, filters: see ``ExperimentPlanner.plan``.
        num_workers: processes for the fingerprint and the preprocessing (1: in this process).

    Returns:
        the ``Plans`` written to ``W/plans.json``.
    """
    work_dir = Path(work_dir).resolve()
    datalist_path = work_dir / "datalist.json"
    datalist = load_datalist(datalist_path)
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 1:
        raise ValueError(f"num_workers must be an integer >= 1, got {num_workers!r}")
    training = datalist.get("training", [])
    if not training:
        raise BraTSInputError(f"{datalist_path}: no valid training case to plan from")
    for entry in training:
        if not entry.get("label"):
            raise BraTSInputError(f"{datalist_path}: training case {entry.get('case_id')} has no label")

    # fingerprint (reused when the same raw files are listed)
    signature = hashlib.sha256(json.dumps(
        [[e["case_id"], _file_signature(list(e["image"]) + [e["label"]])] for e in training]).encode()).hexdigest()
    fp_path = work_dir / "fingerprint.json"
    fingerprint = _cached_fingerprint(fp_path, signature)
    if fingerprint is None:
        fingerprint = compute_fingerprint(datalist, num_workers=num_workers,
                                          modalities=datalist.get("modalities") or MODALITIES)
        fingerprint["source_signature"] = signature
        atomic_write_json(fp_path, fingerprint)

    plans = Plans(ExperimentPlanner().plan(fingerprint, gpu_memory_gb=gpu_memory_gb, patch_size=patch_size,
                                           filters=filters))

    pp_dir = work_dir / "preprocessed"
    pp_dir.mkdir(parents=True, exist_ok=True)
    from custom.planning import _map_cases

    jobs = [(entry, plans.to_dict(), str(pp_dir)) for entry in training]
    done = _map_cases(_preprocess_entry, jobs, num_workers, "preprocess")
    logger.info("preprocessed %d cases into %s (%d already cached with plan hash %s)",
                sum(new for _, new in done), pp_dir, sum(not new for _, new in done), plans.preprocessing_hash())
    # plans.json and the datalist's pp_* keys appear only once every case is cached, so that an interrupted or
    # failed run never leaves a plan that points at a half-built cache
    plans.save(work_dir / "plans.json")

    new_training = []
    for entry in training:
        entry = dict(entry)
        entry.update(_case_paths(pp_dir, entry["case_id"]))
        new_training.append(entry)
    datalist = dict(datalist)
    datalist["training"] = new_training
    atomic_write_json(datalist_path, datalist)
    return plans


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
                spacing = _spacing_from_affine(affine)
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
