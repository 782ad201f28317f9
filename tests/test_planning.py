"""nnU-Net self-configuration: fingerprint -> plan (custom/planning/)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from custom.core.errors import BraTSInputError
from custom.planning.fingerprint import compute_fingerprint
from custom.planning.planner import (
    REFERENCE_FEATURE_MAP_VOXELS,
    ExperimentPlanner,
    estimate_feature_map_size,
    get_pool_and_conv_props,
)
from custom.planning.plans import Plans, load_plans


def brats_like_fingerprint(n=60, seed=0):
    rng = np.random.default_rng(seed)
    shapes = np.stack([rng.normal(140, 8, n), rng.normal(170, 8, n), rng.normal(138, 8, n)], 1).round()
    return {"spacings": [[1.0, 1.0, 1.0]] * n, "shapes_after_crop": shapes.tolist()}


def tiny_fingerprint(n=6):
    return {"spacings": [[1.0, 1.0, 1.0]] * n, "shapes_after_crop": [[50, 58, 40]] * n}


def test_brats_like_fingerprint_gives_nnunet_plan():
    plan = ExperimentPlanner().plan(brats_like_fingerprint(), gpu_memory_gb=8)
    assert plan["target_spacing"] == [1.0, 1.0, 1.0]
    assert plan["patch_size"] == [128, 128, 128]
    assert plan["batch_size"] == 2
    assert plan["filters"] == [32, 64, 128, 256, 320, 320]
    assert plan["kernels"] == [[3, 3, 3]] * 6
    assert plan["strides"] == [[1, 1, 1]] + [[2, 2, 2]] * 5
    assert plan["normalization"] == "zscore_nonzero"
    assert plan["regions"] == ["WT", "TC", "ET"] and plan["regions_class_order"] == [2, 1, 3]
    assert plan["modalities"] == ["t1c", "t1n", "t2f", "t2w"]
    assert plan["gpu_memory_gb"] == 8.0
    assert abs(plan["median_shape"][1] - 170) <= 5
    # the chosen patch fits the budget while the next larger candidate does not (the memory fit is active)
    strides = plan["strides"]
    assert estimate_feature_map_size([128, 128, 128], strides, plan["filters"]) <= REFERENCE_FEATURE_MAP_VOXELS
    assert estimate_feature_map_size([128, 160, 128], strides, plan["filters"]) > REFERENCE_FEATURE_MAP_VOXELS


def test_plan_follows_gpu_memory_budget():
    small = ExperimentPlanner().plan(brats_like_fingerprint(), gpu_memory_gb=4)
    large = ExperimentPlanner().plan(brats_like_fingerprint(), gpu_memory_gb=40)
    assert np.prod(small["patch_size"]) < 128 ** 3
    assert all(p % 2 ** n == 0 for p, n in zip(small["patch_size"], small["num_pool_per_axis"]))
    # with headroom the patch grows to the (padded) median shape, then the batch grows
    assert np.prod(large["patch_size"]) > 128 ** 3
    assert large["batch_size"] >= 2
    for plan, gb in ((small, 4), (large, 40)):
        budget = REFERENCE_FEATURE_MAP_VOXELS * gb / 8
        assert plan["feature_map_voxels"] <= budget


def test_anisotropic_plan():
    fp = {"spacings": [[0.8, 0.8, 4.0]] * 40, "shapes_after_crop": [[300, 300, 30]] * 40}
    plan = ExperimentPlanner().plan(fp)
    assert plan["target_spacing"] == pytest.approx([0.8, 0.8, 4.0])
    kernels, strides, patch = plan["kernels"], plan["strides"], plan["patch_size"]
    # thick slices: in-plane kernels first, no pooling along z until in-plane spacing caught up
    assert kernels[0] == [3, 3, 1] and kernels[1] == [3, 3, 1]
    assert strides[1] == [2, 2, 1] and strides[2] == [2, 2, 1]
    assert kernels[-1] == [3, 3, 3]
    assert any(s[2] == 2 for s in strides)  # z is pooled once spacings are comparable
    assert patch[2] <= 32 and patch[0] > 4 * patch[2]
    num_pool = plan["num_pool_per_axis"]
    assert num_pool[0] > num_pool[2]
    assert all(p % 2 ** n == 0 for p, n in zip(patch, num_pool))
    assert len(plan["filters"]) == len(strides) == len(kernels)
    assert plan["filters"] == [min(32 * 2 ** i, 320) for i in range(len(strides))]
    assert plan["batch_size"] >= 2


def test_anisotropic_target_spacing_takes_10th_percentile():
    spacings = [[0.8, 0.8, 4.0]] * 80 + [[0.8, 0.8, 2.5]] * 20
    shapes = [[300, 300, 30]] * 80 + [[300, 300, 48]] * 20
    plan = ExperimentPlanner().plan({"spacings": spacings, "shapes_after_crop": shapes})
    assert plan["target_spacing"] == pytest.approx([0.8, 0.8, 2.5])
    assert plan["median_shape"][2] == 48  # shapes are compared after resampling to the target spacing


def test_anisotropy_rule_needs_fewer_voxels_too():
    # thick slices but as many voxels along z: the median is kept
    spacings = [[0.8, 0.8, 4.0]] * 80 + [[0.8, 0.8, 2.5]] * 20
    shapes = [[200, 200, 200]] * 100
    target = ExperimentPlanner().determine_target_spacing(np.asarray(spacings), np.asarray(shapes, float))
    assert target.tolist() == pytest.approx([0.8, 0.8, 4.0])


def test_tiny_overrides():
    plan = ExperimentPlanner().plan(tiny_fingerprint(), patch_size=[32, 32, 32], filters=[8, 16, 32, 64])
    assert plan["patch_size"] == [32, 32, 32]
    assert plan["filters"] == [8, 16, 32, 64]
    assert plan["strides"] == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert plan["kernels"] == [[3, 3, 3]] * 4
    assert plan["batch_size"] == 2
    assert plan["overrides"] == {"patch_size": [32, 32, 32], "filters": [8, 16, 32, 64]}


def test_patch_override_derives_topology():
    plan = ExperimentPlanner().plan(brats_like_fingerprint(), patch_size="[64,64,64]")  # strings from the CLI
    assert plan["patch_size"] == [64, 64, 64]
    assert plan["strides"] == [[1, 1, 1]] + [[2, 2, 2]] * 4
    assert plan["filters"] == [32, 64, 128, 256, 320]


def test_filters_override_sets_number_of_stages():
    plan = ExperimentPlanner().plan(brats_like_fingerprint(), filters=[16, 32, 64, 128])
    assert len(plan["strides"]) == len(plan["kernels"]) == 4
    assert plan["filters"] == [16, 32, 64, 128]
    assert all(p % 8 == 0 for p in plan["patch_size"])
    # fewer features per stage leave room for a larger patch than nnU-Net's 128^3
    assert np.prod(plan["patch_size"]) >= 128 ** 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"patch_size": [36, 36, 36]}, "divisible"),
        ({"patch_size": [32, 32]}, "3 entries"),
        ({"patch_size": [32, 32, 4]}, ">= 8"),
        ({"patch_size": [32.5, 32, 32]}, "integers"),
        ({"patch_size": "not a list"}, "list of integers"),
        ({"patch_size": 32}, "single number"),
        ({"filters": [8, 16]}, "at least 3"),
        ({"filters": [8, -16, 32]}, "positive"),
        ({"patch_size": [32, 32, 32], "filters": [8, 16, 32, 64, 128, 256]}, "allows at most 4"),
        ({"filters": [8, 16, 32, 64, 128, 256]}, "allows only"),
        ({"gpu_memory_gb": 0}, "gpu_memory_gb"),
        ({"gpu_memory_gb": 0.001}, "raise gpu_memory_gb"),
        ({"gpu_memory_gb": 0.005}, "at least 3 are needed"),
        ({"gpu_memory_gb": "8"}, "gpu_memory_gb"),
    ],
)
def test_override_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ExperimentPlanner().plan(tiny_fingerprint(), **kwargs)


def test_bad_fingerprint_is_rejected():
    with pytest.raises(ValueError, match="lacks"):
        ExperimentPlanner().plan({"spacings": [[1, 1, 1]]})
    with pytest.raises(ValueError, match="positive"):
        ExperimentPlanner().plan({"spacings": [[1, 0, 1]], "shapes_after_crop": [[10, 10, 10]]})


def test_pool_and_conv_props_pads_to_divisor():
    num_pool, strides, kernels, padded, divisor = get_pool_and_conv_props([1, 1, 1], [140, 170, 140])
    assert num_pool == [5, 5, 5] and divisor == [32, 32, 32]
    assert padded == [160, 192, 160]
    assert len(strides) == len(kernels) == 6


def test_overridable_steps():
    class FixedSpacingPlanner(ExperimentPlanner):
        def determine_target_spacing(self, spacings, shapes):
            return np.array([2.0, 2.0, 2.0])

    plan = FixedSpacingPlanner().plan(brats_like_fingerprint())
    assert plan["target_spacing"] == [2.0, 2.0, 2.0]
    assert abs(plan["median_shape"][1] - 85) <= 3
    assert all(p <= 96 for p in plan["patch_size"])


def test_plans_accessor_roundtrip(tmp_path):
    plan = ExperimentPlanner().plan(tiny_fingerprint(), patch_size=[32, 32, 32], filters=[8, 16, 32, 64])
    plans = Plans(plan)
    path = tmp_path / "plans.json"
    plans.save(path)
    assert not [p for p in tmp_path.iterdir() if p.name != "plans.json"]  # no temporary left behind
    loaded = Plans.load(path)
    assert loaded == plans
    assert loaded.patch_size == (32, 32, 32)
    assert loaded.target_spacing == (1.0, 1.0, 1.0) and isinstance(loaded.target_spacing[0], float)
    assert loaded.filters == [8, 16, 32, 64]
    assert loaded.strides[1] == [2, 2, 2] and loaded.kernels[0] == [3, 3, 3]
    assert loaded.batch_size == 2 and loaded.num_stages == 4
    assert loaded.modalities == ("t1c", "t1n", "t2f", "t2w")
    assert loaded.median_shape == (50, 58, 40)
    assert load_plans(path) == plans and load_plans(plan) == plans and load_plans(plans) is plans
    assert loaded.to_dict() == json.loads(path.read_text())
    # the preprocessing hash ignores network-only fields
    other = dict(plan, patch_size=[64, 64, 64], filters=[8, 16, 32, 64, 128])
    other["strides"] = other["strides"] + [[2, 2, 2]]
    other["kernels"] = other["kernels"] + [[3, 3, 3]]
    assert Plans(other).preprocessing_hash() == plans.preprocessing_hash()
    assert Plans(dict(plan, target_spacing=[1, 1, 2])).preprocessing_hash() != plans.preprocessing_hash()


def test_plans_errors_name_the_file(tmp_path):
    with pytest.raises(BraTSInputError, match="not found"):
        Plans.load(tmp_path / "missing.json")
    bad = tmp_path / "plans.json"
    bad.write_text("{not json")
    with pytest.raises(BraTSInputError, match=str(bad)):
        load_plans(bad)
    bad.write_text(json.dumps({"patch_size": [32, 32, 32]}))
    with pytest.raises(BraTSInputError, match="missing keys"):
        load_plans(bad)
    with pytest.raises(TypeError):
        load_plans(42)


def _write_case(root, case_id, image, seg, spacing):
    affine = np.diag(list(spacing) + [1.0])
    paths = []
    for m, name in enumerate(("t1c", "t1n", "t2f", "t2w")):
        p = root / f"{case_id}-{name}.nii.gz"
        nib.save(nib.Nifti1Image(image[m].astype(np.int16), affine), str(p))
        paths.append(str(p))
    lp = root / f"{case_id}-seg.nii.gz"
    nib.save(nib.Nifti1Image(seg.astype(np.uint8), affine), str(lp))
    return {"case_id": case_id, "image": paths, "label": str(lp), "fold": 0}


def test_compute_fingerprint_on_nifti_files(tmp_path):
    rng = np.random.default_rng(0)
    entries, boxes = [], []
    spacings = [(1.0, 1.0, 1.0), (1.0, 1.0, 1.0), (0.9, 0.9, 1.5)]
    for i, spacing in enumerate(spacings):
        image = np.zeros((4, 30, 28, 20), np.float32)
        box = (slice(3 + i, 25), slice(2, 20 + i), slice(4, 16))
        image[(slice(None),) + box] = rng.integers(100, 200, (4,) + tuple(s.stop - s.start for s in box))
        seg = np.zeros(image.shape[1:], np.uint8)
        seg[10:14, 8:12, 6:10] = 2
        image[:, 10:14, 8:12, 6:10] = 1000 + 100 * np.arange(4)[:, None, None, None]  # tumour intensity
        entries.append(_write_case(tmp_path, f"BraTS-GLI-0000{i}-000", image, seg, spacing))
        boxes.append([s.stop - s.start for s in box])
    datalist = {"modalities": ["t1c", "t1n", "t2f", "t2w"], "training": entries}
    fp = compute_fingerprint(datalist)
    assert fp["num_cases"] == 3
    assert fp["shapes_after_crop"] == boxes
    assert np.allclose(fp["spacings"], spacings)
    # foreground = labelled voxels (nnU-Net): the statistics see only the tumour intensities
    stats = fp["foreground_intensity_properties_per_channel"]
    for m, name in enumerate(("t1c", "t1n", "t2f", "t2w")):
        assert stats[name]["mean"] == pytest.approx(1000 + 100 * m)
        assert stats[name]["std"] == pytest.approx(0, abs=1e-3)
        assert stats[name]["percentile_00_5"] == pytest.approx(1000 + 100 * m)
    expected_rel = np.median([np.prod(b) / (30 * 28 * 20) for b in boxes])
    assert fp["median_relative_size_after_cropping"] == pytest.approx(expected_rel)
    json.dumps(fp)  # JSON-serialisable
    # the planner accepts it
    plan = ExperimentPlanner().plan(fp, patch_size=[16, 16, 16], filters=[8, 16, 32])
    assert plan["patch_size"] == [16, 16, 16]


def test_fingerprint_sampling_is_seeded_and_parallel_matches(tmp_path):
    rng = np.random.default_rng(1)
    entries = []
    for i in range(2):
        image = rng.integers(1, 500, (4, 40, 40, 30)).astype(np.float32)
        seg = np.zeros((40, 40, 30), np.uint8)
        seg[5:35, 5:35, 5:25] = 1  # 18000 labelled voxels: more than the 10k sampled per case
        entries.append(_write_case(tmp_path, f"BraTS-GLI-0001{i}-000", image, seg, (1, 1, 1)))
    datalist = {"training": entries}
    a = compute_fingerprint(datalist)
    b = compute_fingerprint(datalist, num_workers=2)
    assert a == b
    with pytest.raises(ValueError, match="num_workers"):
        compute_fingerprint(datalist, num_workers=0)
    with pytest.raises(BraTSInputError, match="no training cases"):
        compute_fingerprint({"training": []})
