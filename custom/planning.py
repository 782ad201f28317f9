"""nnU-Net self-configuration: dataset fingerprint -> experiment plan (``W/fingerprint.json``, ``W/plans.json``).

The rules follow nnU-Net v2's default 3d_fullres planner (see ``shared/brief/NNUNET.md``):

- fingerprint: per case the shape after cropping to the nonzero region and the spacing; per channel the
  intensity statistics of (up to 10k, seeded) sampled foreground voxels.
- target spacing: the median spacing; when one axis is more than 3x coarser than the others *and* has 3x
  fewer voxels, that axis takes the 10th percentile of its spacings instead.
- initial patch: a 256^3 volume reshaped to the aspect ratio 1/spacing, clipped to the median shape.
- topology: pool an axis while its size stays >= 8 and its spacing is within 2x of the finest; kernel 3 on an
  axis once its spacing is within 2x of the finest (else 1); bottleneck kernel 3; patch padded to a multiple
  of 2^n_pool; features per stage min(32 * 2^i, 320).
- memory fit: while the estimated feature-map volume exceeds the budget (nnU-Net's reference value, for batch 2
  on 8 GB, scaled by ``gpu_memory_gb / 8``), shrink the axis that is largest relative to the median shape.
- batch size from the remaining headroom, capped so that one batch sees at most 5% of the data set, >= 2.

For BraTS (1 mm, median cropped shape ~140x170x140) this gives nnU-Net's plan: patch 128^3, batch 2, 6 stages,
filters [32, 64, 128, 256, 320, 320], kernels 3^3, strides [1, 2, 2, 2, 2, 2].

Axes are kept in NIfTI voxel order (no transpose as nnU-Net does for 2d configurations).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from custom.constants import MODALITIES, REGIONS, REGIONS_CLASS_ORDER
from custom.errors import BraTSInputError
from custom.io_utils import atomic_write_json

__all__ = [
    "PLANNER_VERSION",
    "PREPROCESS_VERSION",
    "compute_nonzero_bbox",
    "compute_case_fingerprint",
    "compute_fingerprint",
    "ExperimentPlanner",
    "Plans",
    "load_plans",
    "get_pool_and_conv_props",
    "estimate_feature_map_size",
    "validate_patch_size",
    "validate_filters",
]

PLANNER_VERSION = "nnunetv2-default-3d_fullres/1"
#: nnU-Net's reference feature-map volume that fits batch 2 on 8 GB (``UNet_reference_val_3d``).
REFERENCE_FEATURE_MAP_VOXELS = 560_000_000
REFERENCE_GPU_MEMORY_GB = 8.0
REFERENCE_BATCH_SIZE = 2
#: number of foreground voxels sampled per case for the intensity statistics (nnU-Net: 10k)
FINGERPRINT_SAMPLES_PER_CASE = 10_000
FINGERPRINT_SEED = 1234
ANISOTROPY_THRESHOLD = 3.0
#: version of custom.preprocess.preprocess_case's output; bump when it changes so that cached cases are redone
#: (kept here so that hashing a plan does not import torch)
PREPROCESS_VERSION = 1


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


def _read_case(image_paths, label_path=None):
    """(image (4,X,Y,Z) float32, label (X,Y,Z) uint8 | None, affine (4,4), spacing (3,)), validated by custom.data."""
    from custom.data import load_case_arrays  # local: keeps `import custom.planning` light for spawned workers

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
    image, label, _affine, spacing = _read_case(entry["image"], entry.get("label"))
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


def _worker_init():
    import sys

    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def _safe_call(fn, item):
    """Run ``fn(item)``; input errors come back as data (their problems), so that every case is reported."""
    try:
        return True, fn(item)
    except BraTSInputError as exc:
        return False, exc.problems


def _map_cases(fn, items, num_workers: int, desc: str):
    """Apply ``fn`` to every item, in worker processes when ``num_workers > 1``, with a progress bar.

    Raises:
        BraTSInputError: listing the problems of every item that failed (the others still ran).
    """
    from tqdm import tqdm

    call = partial(_safe_call, fn)
    if num_workers <= 1 or len(items) <= 1:
        results = [call(it) for it in tqdm(items, desc=desc, disable=None)]
    else:
        # fork where available (as torch's DataLoader does): spawned workers would re-import torch/monai, which
        # costs many seconds each; every worker gets one intra-op thread so that workers do not oversubscribe
        method = "fork" if "fork" in get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(max_workers=num_workers, mp_context=get_context(method),
                                 initializer=_worker_init) as pool:
            results = list(tqdm(pool.map(call, items), total=len(items), desc=desc, disable=None))
    problems = [p for ok, res in results if not ok for p in res]
    if problems:
        raise BraTSInputError(problems, header=f"{desc} failed")
    return [res for _, res in results]


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
    _check_num_workers(num_workers)
    per_case = _map_cases(_fingerprint_entry, cases, num_workers, "fingerprint")
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


# ------------------------------------------------------------------------------------------------ topology
def _check_num_workers(num_workers):
    if not isinstance(num_workers, (int, np.integer)) or isinstance(num_workers, bool) or num_workers < 1:
        raise ValueError(f"num_workers must be an integer >= 1, got {num_workers!r}")


def get_pool_and_conv_props(spacing: Sequence[float], patch_size: Sequence[int], min_feature_map_size: int = 4,
                            max_num_stages: int | None = None):
    """nnU-Net's pooling/kernel rule for a given patch and spacing.

    Each pooling step halves every axis that (a) still has at least ``2 * min_feature_map_size`` voxels and
    (b) has a spacing within 2x of the finest of those axes; when a single axis is left it must have
    ``3 * min_feature_map_size`` voxels. The kernel of a stage is 3 on axes whose current spacing is within 2x of
    the finest and 1 otherwise (once 3, always 3); the bottleneck kernel is 3 everywhere.

    Args:
        spacing: (3,) target spacing in mm.
        patch_size: (3,) patch in voxels.
        max_num_stages: stop after ``max_num_stages - 1`` pooling steps (used for a fixed ``filters`` override).

    Returns:
        ``(num_pool_per_axis (3,), strides (n_stages, 3), kernels (n_stages, 3), padded_patch (3,),
        must_be_divisible_by (3,))`` with ``strides[0] == [1, 1, 1]``.
    """
    dim = len(spacing)
    current_spacing = [float(s) for s in spacing]
    current_size = [int(s) for s in patch_size]
    strides = [[1] * dim]
    kernels = []
    num_pool = [0] * dim
    kernel = [1] * dim
    while max_num_stages is None or len(strides) < max_num_stages:
        valid = [i for i in range(dim) if current_size[i] >= 2 * min_feature_map_size]
        if not valid:
            break
        finest = min(current_spacing[i] for i in valid)
        valid = [i for i in valid if current_spacing[i] / finest < 2]
        if len(valid) == 1 and current_size[valid[0]] < 3 * min_feature_map_size:
            break
        if not valid:
            break
        finest_all = min(current_spacing)
        for d in range(dim):
            if kernel[d] != 3 and current_spacing[d] / finest_all < 2:
                kernel[d] = 3
        stride = [1] * dim
        for d in valid:
            stride[d] = 2
            num_pool[d] += 1
            current_spacing[d] *= 2
            current_size[d] = int(np.ceil(current_size[d] / 2))
        strides.append(stride)
        kernels.append(list(kernel))
    kernels.append([3] * dim)
    divisor = [2 ** n for n in num_pool]
    padded = [int(np.ceil(p / d) * d) for p, d in zip(patch_size, divisor)]
    return num_pool, strides, kernels, padded, divisor


def estimate_feature_map_size(patch_size: Sequence[int], strides: Sequence[Sequence[int]], filters: Sequence[int],
                              out_channels: int = 4, convs_per_stage: int = 2) -> int:
    """Feature-map voxels of one sample through a plain conv U-Net (nnU-Net's ``compute_conv_feature_map_size``).

    Counts every conv output: ``convs_per_stage`` per encoder stage, and per decoder stage the transposed conv
    plus ``convs_per_stage`` convs, plus the final segmentation head. Multiply by the batch size for a batch.
    """
    if len(strides) != len(filters):
        raise ValueError(f"one filter count per stage is needed: {len(strides)} strides, {len(filters)} filters")
    size = np.asarray(patch_size, dtype=np.int64)
    stage_sizes = []
    total = 0
    for s, f in zip(strides, filters):
        size = size // np.asarray(s, dtype=np.int64)
        stage_sizes.append(size)
        total += convs_per_stage * int(f) * int(np.prod(size))
    for s in range(len(filters) - 1):  # decoder: each stage works at the resolution of the skip it joins
        total += (convs_per_stage + 1) * int(filters[s]) * int(np.prod(stage_sizes[s]))
    total += int(out_channels) * int(np.prod(stage_sizes[0]))
    return int(total)


def _parse_int_list(value, name: str):
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"{name} must be a list of integers such as [32,32,32], got {value!r}") from None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        raise ValueError(f"{name} must be a list of integers, got the single number {value!r}")
    try:
        items = list(value)
    except TypeError:
        raise ValueError(f"{name} must be a list of integers, got {value!r}") from None
    out = []
    for v in items:
        if isinstance(v, bool) or not (isinstance(v, (int, np.integer)) or (isinstance(v, float) and v.is_integer())):
            raise ValueError(f"{name} must contain integers only, got {value!r}")
        out.append(int(v))
    return out


def validate_patch_size(patch_size) -> list[int]:
    """Check a patch-size override: 3 integers, each >= 8 (so one pooling step is possible)."""
    patch = _parse_int_list(patch_size, "patch_size")
    if len(patch) != 3:
        raise ValueError(f"patch_size must have 3 entries (x, y, z), got {len(patch)}: {patch}")
    if any(p < 8 for p in patch):
        raise ValueError(f"patch_size entries must be >= 8 voxels, got {patch}")
    return patch


def validate_filters(filters) -> list[int]:
    """Check a filters override: >= 3 positive integers (DynUNet needs at least 3 stages), non-decreasing."""
    filt = _parse_int_list(filters, "filters")
    if len(filt) < 3:
        raise ValueError(f"filters must have at least 3 entries (one per U-Net stage), got {filt}")
    if any(f < 1 for f in filt):
        raise ValueError(f"filters must be positive, got {filt}")
    return filt


# ------------------------------------------------------------------------------------------------- planner
class ExperimentPlanner:
    """nnU-Net v2's default 3d_fullres planner; each step is a method that a subclass may override.

    Args:
        base_num_features: features of the first stage (32); stage i has ``min(base * 2^i, max_num_features)``.
        max_num_features: 320.
        min_feature_map_size: smallest bottleneck edge (4).
        min_batch_size: 2.
        max_dataset_covered: a batch sees at most this fraction of the data set's voxels (0.05).
        out_channels: network outputs (3 regions + 1 uncertainty), used by the memory estimate.
        in_channels: network inputs (4 modalities).
    """

    def __init__(self, base_num_features: int = 32, max_num_features: int = 320, min_feature_map_size: int = 4,
                 min_batch_size: int = 2, max_dataset_covered: float = 0.05, out_channels: int = 4,
                 in_channels: int = len(MODALITIES), anisotropy_threshold: float = ANISOTROPY_THRESHOLD,
                 reference_feature_map_voxels: int = REFERENCE_FEATURE_MAP_VOXELS):
        self.base_num_features = base_num_features
        self.max_num_features = max_num_features
        self.min_feature_map_size = min_feature_map_size
        self.min_batch_size = min_batch_size
        self.max_dataset_covered = max_dataset_covered
        self.out_channels = out_channels
        self.in_channels = in_channels
        self.anisotropy_threshold = anisotropy_threshold
        self.reference_feature_map_voxels = reference_feature_map_voxels

    # -- step 1
    def determine_target_spacing(self, spacings: np.ndarray, shapes: np.ndarray) -> np.ndarray:
        """Median spacing; an axis > 3x coarser with 3x fewer voxels than the others takes its 10th percentile."""
        target = np.percentile(spacings, 50, axis=0)
        median_shape = np.percentile(shapes, 50, axis=0)
        worst = int(np.argmax(target))
        others = [i for i in range(3) if i != worst]
        aniso_spacing = target[worst] > self.anisotropy_threshold * max(target[i] for i in others)
        aniso_voxels = median_shape[worst] * self.anisotropy_threshold < min(median_shape[i] for i in others)
        if aniso_spacing and aniso_voxels:
            # the 10th percentile keeps the thin-slice cases from being blurred by the thick majority, but never
            # goes finer than the in-plane spacing
            z = float(np.percentile(spacings[:, worst], 10))
            target[worst] = max(z, max(target[i] for i in others) + 1e-5)
        return target

    # -- step 2
    def determine_patch_size(self, target_spacing: np.ndarray, median_shape: np.ndarray) -> list[int]:
        """256^3 voxels reshaped to the aspect ratio 1/spacing (isotropic in mm), clipped to the median shape."""
        tmp = 1.0 / np.asarray(target_spacing, dtype=float)
        initial = [round(float(v)) for v in tmp * (256 ** 3 / np.prod(tmp)) ** (1 / 3)]
        return [int(min(p, max(int(m), 1))) for p, m in zip(initial, median_shape)]

    # -- step 3
    def determine_topology(self, target_spacing, patch_size, num_stages: int | None = None) -> dict:
        """Strides/kernels for ``patch_size`` (padded to a multiple of 2^n_pool); see ``get_pool_and_conv_props``."""
        num_pool, strides, kernels, padded, divisor = get_pool_and_conv_props(
            target_spacing, patch_size, self.min_feature_map_size, max_num_stages=num_stages)
        return {"num_pool_per_axis": num_pool, "strides": strides, "kernels": kernels, "patch_size": padded,
                "must_be_divisible_by": divisor}

    def features_per_stage(self, num_stages: int) -> list[int]:
        return [int(min(self.base_num_features * 2 ** i, self.max_num_features)) for i in range(num_stages)]

    def memory_budget(self, gpu_memory_gb: float) -> float:
        """Feature-map voxels allowed for a batch of ``min_batch_size`` (nnU-Net's reference scaled to the GPU)."""
        return self.reference_feature_map_voxels * gpu_memory_gb / REFERENCE_GPU_MEMORY_GB

    def estimate(self, topology: dict, filters: Sequence[int]) -> int:
        return estimate_feature_map_size(topology["patch_size"], topology["strides"], filters, self.out_channels)

    # -- step 4
    def fit_memory(self, target_spacing, median_shape, topology: dict, gpu_memory_gb: float,
                   filters: Sequence[int] | None = None) -> dict:
        """Shrink the patch (axis largest relative to the median shape first) until the estimate fits."""
        budget = self.memory_budget(gpu_memory_gb)
        fixed_stages = len(filters) if filters is not None else None

        def filt(top):
            return list(filters) if filters is not None else self.features_per_stage(len(top["strides"]))

        estimate = self.estimate(topology, filt(topology))
        while estimate / REFERENCE_BATCH_SIZE * self.min_batch_size > budget:
            patch = list(topology["patch_size"])
            axis = int(np.argsort([p / m for p, m in zip(patch, median_shape)])[-1])
            # subtract the divisor of the *smaller* patch: subtracting the current one may skip valid sizes
            # (e.g. 256 -> 192 would skip 224)
            trial = list(patch)
            trial[axis] -= topology["must_be_divisible_by"][axis]
            if trial[axis] < 2 * self.min_feature_map_size:
                raise ValueError(f"cannot fit a patch into gpu_memory_gb={gpu_memory_gb} GB (the patch shrank to "
                                 f"{trial}); raise gpu_memory_gb or give a patch_size")
            divisor = self.determine_topology(target_spacing, trial, fixed_stages)["must_be_divisible_by"]
            patch[axis] -= divisor[axis]
            topology = self.determine_topology(target_spacing, patch, fixed_stages)
            self._check_num_stages(topology, filters)
            estimate = self.estimate(topology, filt(topology))
        topology["feature_map_voxels"] = estimate
        return topology

    # -- step 5
    def determine_batch_size(self, topology: dict, filters: Sequence[int], gpu_memory_gb: float,
                             dataset_voxels: float) -> int:
        """Batch from the memory headroom, at most 5% of the data set's voxels per batch, at least 2."""
        estimate = self.estimate(topology, filters)
        batch = round(self.memory_budget(gpu_memory_gb) / estimate * REFERENCE_BATCH_SIZE)
        cap = round(dataset_voxels * self.max_dataset_covered / float(np.prod(topology["patch_size"])))
        return int(max(min(batch, cap), self.min_batch_size))

    # -- all steps
    def plan(self, fingerprint: Mapping, gpu_memory_gb: float = 8, patch_size=None, filters=None) -> dict:
        """Plan from a fingerprint (needs ``spacings`` and ``shapes_after_crop``, one row per case).

        Args:
            gpu_memory_gb: GPU memory budget; nnU-Net's reference is 8.
            patch_size: optional (3,) override; the topology is derived from it (no memory fit), and it must be
                divisible by 2^n_pool on each axis.
            filters: optional override; ``len(filters)`` stages, strides/kernels follow from the rule.

        Returns:
            the plans.json dict (see ``Plans``).
        """
        if isinstance(gpu_memory_gb, bool) or not isinstance(gpu_memory_gb, (int, float)) or gpu_memory_gb <= 0:
            raise ValueError(f"gpu_memory_gb must be a positive number, got {gpu_memory_gb!r}")
        patch_override = validate_patch_size(patch_size) if patch_size is not None else None
        filters = validate_filters(filters) if filters is not None else None
        spacings, shapes = self._fingerprint_arrays(fingerprint)

        target_spacing = self.determine_target_spacing(spacings, shapes)
        new_shapes = np.round(shapes * spacings / target_spacing[None]).astype(int)
        median_shape = np.median(new_shapes, axis=0)
        num_stages = len(filters) if filters is not None else None

        if patch_override is not None:
            topology = self.determine_topology(target_spacing, patch_override, num_stages)
            self._check_override(patch_override, topology, filters)
        else:
            initial = self.determine_patch_size(target_spacing, median_shape)
            topology = self.determine_topology(target_spacing, initial, num_stages)
            # checked before the memory fit (the patch only shrinks there, so stages can only be lost) and after
            self._check_num_stages(topology, filters)
            topology = self.fit_memory(target_spacing, median_shape, topology, gpu_memory_gb, filters)
            self._check_num_stages(topology, filters)
        if len(topology["strides"]) < 3:
            raise ValueError(f"the plan has only {len(topology['strides'])} U-Net stages (patch "
                             f"{topology['patch_size']}); at least 3 are needed: raise gpu_memory_gb "
                             f"({gpu_memory_gb}) or give a larger patch_size")
        stage_filters = list(filters) if filters is not None else self.features_per_stage(len(topology["strides"]))
        dataset_voxels = float(np.prod(median_shape)) * len(spacings)
        batch_size = self.determine_batch_size(topology, stage_filters, gpu_memory_gb, dataset_voxels)

        return {
            "target_spacing": [float(s) for s in target_spacing],
            "patch_size": [int(p) for p in topology["patch_size"]],
            "batch_size": int(batch_size),
            "kernels": [[int(k) for k in ks] for ks in topology["kernels"]],
            "strides": [[int(s) for s in st] for st in topology["strides"]],
            "filters": [int(f) for f in stage_filters],
            "median_shape": [int(round(float(m))) for m in median_shape],
            "modalities": list(fingerprint.get("modalities", MODALITIES)),
            "regions": list(REGIONS),
            "regions_class_order": list(REGIONS_CLASS_ORDER),
            "normalization": "zscore_nonzero",
            "gpu_memory_gb": float(gpu_memory_gb),
            "planner_version": PLANNER_VERSION,
            "num_pool_per_axis": [int(n) for n in topology["num_pool_per_axis"]],
            "median_spacing": [float(s) for s in np.median(spacings, axis=0)],
            "feature_map_voxels": int(self.estimate(topology, stage_filters)),
            "num_training_cases": int(len(spacings)),
            "overrides": {"patch_size": patch_override, "filters": filters},
            "foreground_intensity_properties_per_channel":
                fingerprint.get("foreground_intensity_properties_per_channel"),
        }

    @staticmethod
    def _fingerprint_arrays(fingerprint: Mapping):
        missing = [k for k in ("spacings", "shapes_after_crop") if k not in fingerprint]
        if missing:
            raise ValueError(f"fingerprint lacks {missing}; compute it with compute_fingerprint()")
        spacings = np.asarray(fingerprint["spacings"], dtype=float)
        shapes = np.asarray(fingerprint["shapes_after_crop"], dtype=float)
        if spacings.ndim != 2 or spacings.shape[1] != 3 or spacings.shape != shapes.shape or len(spacings) == 0:
            raise ValueError(f"fingerprint needs one (3,) spacing and one (3,) shape per case, got spacings "
                             f"{spacings.shape} and shapes {shapes.shape}")
        if np.any(spacings <= 0) or np.any(shapes <= 0):
            raise ValueError("fingerprint spacings and shapes must be positive")
        return spacings, shapes

    @staticmethod
    def _check_num_stages(topology, filters):
        if filters is not None and len(topology["strides"]) != len(filters):
            raise ValueError(
                f"filters {filters} ask for {len(filters)} stages but the planned patch {topology['patch_size']} "
                f"allows only {len(topology['strides'])}; give fewer filters or a larger --patch_size")

    @staticmethod
    def _check_override(patch, topology, filters):
        n_stages = len(topology["strides"])
        if filters is not None and n_stages != len(filters):
            raise ValueError(
                f"filters {filters} ask for {len(filters)} stages but patch_size {patch} allows at most {n_stages} "
                f"(each pooling needs an axis of >= 8 voxels); give {n_stages} filters or a larger patch_size")
        if n_stages < 3:
            raise ValueError(f"patch_size {patch} allows only {n_stages} U-Net stages; at least 3 are needed")
        if list(topology["patch_size"]) != list(patch):
            raise ValueError(
                f"patch_size {patch} must be divisible by {topology['must_be_divisible_by']} "
                f"(2^number of poolings per axis); use {topology['patch_size']}")


# --------------------------------------------------------------------------------------------------- plans
class Plans:
    """Typed, read-only accessor over a plans.json dict (unknown extra keys are kept)."""

    REQUIRED = ("target_spacing", "patch_size", "batch_size", "kernels", "strides", "filters", "median_shape",
                "modalities", "regions", "regions_class_order", "normalization", "gpu_memory_gb",
                "planner_version")

    def __init__(self, data: Mapping, source: str = "plans"):
        missing = [k for k in self.REQUIRED if k not in data]
        if missing:
            raise BraTSInputError(f"{source}: missing keys {missing}", header="invalid plans")
        self._data = json.loads(json.dumps(dict(data)))  # deep copy, JSON types only
        self.source = source
        n = len(self._data["filters"])
        if len(self._data["kernels"]) != n or len(self._data["strides"]) != n:
            raise BraTSInputError(f"{source}: kernels, strides and filters must have one entry per stage "
                                  f"(got {len(self._data['kernels'])}, {len(self._data['strides'])}, {n})",
                                  header="invalid plans")

    @classmethod
    def load(cls, path) -> "Plans":
        path = Path(path)
        try:
            with open(path) as fh:
                data = json.load(fh)
        except FileNotFoundError:
            raise BraTSInputError(f"{path}: plans file not found (run scripts/prepare_data.py)",
                                  header="invalid plans") from None
        except json.JSONDecodeError as exc:
            raise BraTSInputError(f"{path}: not valid JSON ({exc})", header="invalid plans") from None
        return cls(data, source=str(path))

    def save(self, path) -> None:
        atomic_write_json(path, self._data)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(self._data))

    def __getitem__(self, key):
        return self._data[key]

    def get(self, key, default=None):
        return self._data.get(key, default)

    def __eq__(self, other):
        return isinstance(other, Plans) and self._data == other._data

    def __repr__(self):
        return (f"Plans(patch_size={self.patch_size}, target_spacing={self.target_spacing}, "
                f"filters={self.filters}, batch_size={self.batch_size})")

    @property
    def target_spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in self._data["target_spacing"])

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(int(p) for p in self._data["patch_size"])

    @property
    def kernels(self) -> list[list[int]]:
        return [list(map(int, k)) for k in self._data["kernels"]]

    @property
    def strides(self) -> list[list[int]]:
        return [list(map(int, s)) for s in self._data["strides"]]

    @property
    def filters(self) -> list[int]:
        return [int(f) for f in self._data["filters"]]

    @property
    def batch_size(self) -> int:
        return int(self._data["batch_size"])

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self._data["modalities"])

    @property
    def median_shape(self) -> tuple[int, int, int]:
        return tuple(int(m) for m in self._data["median_shape"])

    @property
    def regions(self) -> tuple[str, ...]:
        return tuple(self._data["regions"])

    @property
    def regions_class_order(self) -> tuple[int, ...]:
        return tuple(int(r) for r in self._data["regions_class_order"])

    @property
    def normalization(self) -> str:
        return str(self._data["normalization"])

    @property
    def num_stages(self) -> int:
        return len(self._data["filters"])

    def preprocessing_hash(self) -> str:
        """Hash of the fields that change the preprocessed cache (target spacing, normalization, modalities)."""
        key = {"target_spacing": [round(float(s), 8) for s in self._data["target_spacing"]],
               "normalization": self._data["normalization"], "modalities": list(self._data["modalities"]),
               "preprocess_version": PREPROCESS_VERSION}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def load_plans(path_or_dict) -> Plans:
    """A ``Plans`` from a path to plans.json, a dict, or a ``Plans`` (returned as is)."""
    if isinstance(path_or_dict, Plans):
        return path_or_dict
    if isinstance(path_or_dict, Mapping):
        return Plans(path_or_dict)
    if isinstance(path_or_dict, (str, os.PathLike)):
        return Plans.load(path_or_dict)
    raise TypeError(f"load_plans expects a path, a dict or a Plans, got {type(path_or_dict).__name__}")
