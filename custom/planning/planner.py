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

import json
from typing import Mapping, Sequence

import numpy as np

from custom.core.constants import MODALITIES, REGIONS, REGIONS_CLASS_ORDER

PLANNER_VERSION = "nnunetv2-default-3d_fullres/1"

#: nnU-Net's reference feature-map volume that fits batch 2 on 8 GB (``UNet_reference_val_3d``).
REFERENCE_FEATURE_MAP_VOXELS = 560_000_000

REFERENCE_GPU_MEMORY_GB = 8.0

REFERENCE_BATCH_SIZE = 2

ANISOTROPY_THRESHOLD = 3.0


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
