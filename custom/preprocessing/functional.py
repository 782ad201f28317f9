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

from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from custom.core.constants import LABEL_VALUES
from custom.core.errors import BraTSInputError
from custom.planning.fingerprint import compute_nonzero_bbox
from custom.planning.plans import load_plans

_SPACING_RTOL = 1e-3

#: largest preprocessed (resampled) volume a case may become, in voxels: 4x a BraTS case (240x240x155 at 1 mm with
#: the BraTS plan), far below what a bad SPACING could ask for (64^3 at 6 mm -> 56.6 M voxels, minutes of CPU)
MAX_PREPROCESSED_VOXELS = 4 * 240 * 240 * 155


# ---------------------------------------------------------------------------------------------- segmenter
def check_preprocessed_size(shape, spacing, target_spacing, max_voxels: int = MAX_PREPROCESSED_VOXELS,
                            name: str = "image") -> list[int]:
    """The resampled shape ``round(n * spacing / target)`` of a ``shape`` volume, refused above ``max_voxels``.

    Computed from the uncropped shape before any preprocessing work (an upper bound of what cropping and
    resampling produce), so that a hostile or mistaken spacing costs nothing.

    Raises:
        BraTSInputError: naming ``name``, the shape, the spacing, the resampled shape and the limit.
    """
    new_shape = [max(int(round(n * s / t)), 1) for n, s, t in zip(shape, spacing, target_spacing)]
    voxels = int(np.prod(new_shape, dtype=np.int64))
    if voxels > int(max_voxels):
        raise BraTSInputError(
            f"{name}: shape {list(shape)} at spacing {list(spacing)} mm resamples to {new_shape} at the plan's "
            f"{list(target_spacing)} mm = {voxels} voxels, above the limit of {int(max_voxels)} "
            f"(max_preprocessed_voxels); check the voxel spacing in the file header",
            header="input volume too large to process")
    return new_shape


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
def preprocess_case(image, spacing, plans, seg=None, affine=None, name: str = "image",
                    max_voxels: int = MAX_PREPROCESSED_VOXELS):
    """Crop to nonzero, z-score over the nonzero mask, resample to the plan's spacing.

    Args:
        image: (4, X, Y, Z) raw intensities in ``plans.modalities`` order (numpy or CPU tensor).
        spacing: (3,) voxel size in mm.
        plans: ``Plans``, plans dict, or path to plans.json.
        seg: optional (X, Y, Z) labels in 0..3.
        affine: optional (4, 4) voxel-to-world matrix, kept in the properties for writing results.
        name: file or case named in error messages.
        max_voxels: the largest resampled volume accepted (:func:`check_preprocessed_size`, checked before any
            work: every entry point, bundle run, Triton, MONAI Label and training, goes through here).

    Returns:
        ``(image_pp float32 (4, X', Y', Z'), seg_pp uint8 (X', Y', Z') or None, properties)`` with properties
        ``original_shape, original_spacing, bbox (half-open [[x0,x1],[y0,y1],[z0,z1]]), cropped_shape,
        preprocessed_shape, target_spacing, affine (4x4 list or None), resampled (bool), plan_hash``.

    Raises:
        BraTSInputError: wrong shape/channels, NaN, bad spacing, bad labels, an all-zero image, or a volume that
            would resample beyond ``max_voxels``.
    """
    plans = load_plans(plans)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(seg, torch.Tensor):
        seg = seg.detach().cpu().numpy()
    image, spacing, seg = _validate_inputs(image, spacing, seg, len(plans.modalities), name)
    target = np.asarray(plans.target_spacing, dtype=float)
    check_preprocessed_size(image.shape[1:], spacing, target, max_voxels, name)

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
