"""nnU-Net preprocessing and its inverse (custom/preprocessing/)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

from custom.core.errors import BraTSInputError
from custom.data.synthetic import make_case, write_dataset
from custom.planning.fingerprint import compute_nonzero_bbox
from custom.planning.planner import ExperimentPlanner
from custom.planning.plans import Plans
from custom.preprocessing.cache import plan_and_preprocess
from custom.preprocessing.dictionary import BraTSPreprocessd, LoadPreprocessedd, RestoreOriginalGridd
from custom.preprocessing.functional import preprocess_case, restore_original_grid, zscore_nonzero

TINY = {"patch_size": [32, 32, 32], "filters": [8, 16, 32, 64]}


def tiny_plans(target_spacing=(1.0, 1.0, 1.0)):
    fp = {"spacings": [list(target_spacing)] * 4, "shapes_after_crop": [[48, 56, 40]] * 4}
    return Plans(ExperimentPlanner().plan(fp, **TINY))


@pytest.fixture(scope="module")
def case():
    image, seg = make_case(np.random.default_rng(3), (64, 64, 48), (1.0, 1.0, 1.0))
    return image, seg


def _crop(a, bbox):
    return a[(..., *[slice(x0, x1) for x0, x1 in bbox])]


def test_crop_bbox_is_union_over_channels():
    image = np.zeros((4, 20, 22, 24), np.float32)
    image[0, 3:5, 4:6, 5:7] = 1
    image[2, 10:12, 15:18, 2:3] = -2  # negative intensities count as nonzero too
    assert compute_nonzero_bbox(image) == [[3, 12], [4, 18], [2, 7]]
    plans = tiny_plans()
    image_pp, _, props = preprocess_case(image, (1, 1, 1), plans)
    assert props["bbox"] == [[3, 12], [4, 18], [2, 7]]
    assert props["cropped_shape"] == props["preprocessed_shape"] == [9, 14, 5] and image_pp.shape == (4, 9, 14, 5)
    assert props["original_shape"] == [20, 22, 24] and props["resampled"] is False


def test_zscore_over_nonzero_mask(case):
    image, seg = case
    image_pp, seg_pp, props = preprocess_case(image, (1, 1, 1), tiny_plans(), seg=seg)
    mask = _crop(np.any(image != 0, axis=0), props["bbox"])
    assert image_pp.dtype == np.float32 and seg_pp.dtype == np.uint8
    for c in range(4):
        inside = image_pp[c][mask].astype(np.float64)
        assert abs(inside.mean()) < 1e-4 and abs(inside.std() - 1) < 1e-4
        raw = _crop(image[c], props["bbox"])[mask].astype(np.float64)
        np.testing.assert_allclose(inside, (raw - raw.mean()) / raw.std(), atol=1e-4)
    assert np.all(image_pp[:, ~mask] == 0)  # outside the brain stays exactly 0
    np.testing.assert_array_equal(seg_pp, _crop(seg, props["bbox"]))
    # zscore_nonzero on its own: constant channels do not divide by zero
    z = zscore_nonzero(np.full((1, 3, 3, 3), 5.0), np.ones((3, 3, 3), bool))
    assert np.all(z == 0)


def test_roundtrip_equal_spacing_is_exact(case):
    image, seg = case
    image_pp, seg_pp, props = preprocess_case(image, (1, 1, 1), tiny_plans(), seg=seg)
    restored = restore_original_grid(image_pp, props)
    assert restored.shape == image.shape and restored.dtype == np.float32
    np.testing.assert_array_equal(_crop(restored, props["bbox"]), image_pp)
    outside = np.ones(image.shape[1:], bool)
    outside[tuple(slice(a, b) for a, b in props["bbox"])] = False
    assert np.all(restored[:, outside] == 0)
    # every voxel is back in place: the restored volume is the z-scored original
    brain = np.any(image != 0, axis=0)
    for c in range(4):
        raw = image[c][brain].astype(np.float64)
        np.testing.assert_allclose(restored[c][brain], (raw - raw.mean()) / raw.std(), atol=1e-4)
    labels = restore_original_grid(seg_pp[None], props, order=0)
    np.testing.assert_array_equal(labels[0], seg)
    # tensors come back as tensors, fill value respected
    t = restore_original_grid(torch.from_numpy(image_pp), props, fill=-1.0)
    assert isinstance(t, torch.Tensor) and t.shape == image.shape and float(t[0, 0, 0, 0]) == -1.0


def test_roundtrip_anisotropic_spacing(case):
    image, seg = case
    spacing = (1.2, 0.9, 2.0)
    image_pp, seg_pp, props = preprocess_case(image, spacing, tiny_plans(), seg=seg, affine=np.diag([*spacing, 1]))
    assert props["resampled"] is True
    expected = [round(n * s) for n, s in zip(props["cropped_shape"], spacing)]
    assert props["preprocessed_shape"] == expected == list(image_pp.shape[1:]) == list(seg_pp.shape)
    assert set(np.unique(seg_pp)) <= set(np.unique(seg))
    assert np.isclose(props["affine"][2][2], 2.0)
    for order in (0, 1, 3):
        restored = restore_original_grid(image_pp, props, order=order)
        assert restored.shape == image.shape
    labels = restore_original_grid(seg_pp[None], props, order=0)[0]
    assert labels.shape == seg.shape and labels.dtype == np.uint8
    agree = (labels == seg).mean()
    assert agree > 0.98
    for lab in (1, 2, 3):  # tumour regions survive the round trip
        a, b = labels == lab, seg == lab
        if b.sum() > 50:
            assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.8
    # the restored intensities are close to the z-scored original inside the brain (cubic both ways)
    restored = restore_original_grid(image_pp, props, order=3)
    brain = np.any(image != 0, axis=0)
    raw = image[0][brain].astype(np.float64)
    ref = (raw - raw.mean()) / raw.std()
    assert np.corrcoef(restored[0][brain], ref)[0, 1] > 0.95


def test_restore_validates_input(case):
    image, seg = case
    image_pp, seg_pp, props = preprocess_case(image, (1.2, 0.9, 2.0), tiny_plans(), seg=seg)
    with pytest.raises(ValueError, match="does not match the preprocessed shape"):
        restore_original_grid(image_pp[:, 1:], props)
    with pytest.raises(ValueError, match="channel-first"):
        restore_original_grid(image_pp[0], props)
    with pytest.raises(ValueError, match="order=0"):
        restore_original_grid(seg_pp[None], props, order=1)
    with pytest.raises(ValueError, match="order"):
        restore_original_grid(image_pp, props, order=2)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda im, sp, sg: (im[:3], sp, sg), r"expected a channel-first image \(4, X, Y, Z\)"),
        (lambda im, sp, sg: (np.where(im > 0, np.nan, im), sp, sg), "NaN"),
        (lambda im, sp, sg: (np.zeros_like(im), sp, sg), "every voxel is 0"),
        (lambda im, sp, sg: (im, (1, 0, 1), sg), "spacing must be 3 positive"),
        (lambda im, sp, sg: (im, (1, 1), sg), "spacing must be 3 positive"),
        (lambda im, sp, sg: (im, sp, np.where(sg > 0, 5, sg).astype(np.uint8)), r"labels \[5\]"),
        (lambda im, sp, sg: (im, sp, sg[1:]), "segmentation shape"),
    ],
)
def test_bad_input_raises_named_error(case, mutate, message):
    image, seg = case
    im, sp, sg = mutate(image.copy(), (1, 1, 1), seg.copy())
    with pytest.raises(BraTSInputError, match=message) as info:
        preprocess_case(im, sp, tiny_plans(), seg=sg, name="/data/BraTS-GLI-00001-000-t1c.nii.gz")
    assert "BraTS-GLI-00001-000" in str(info.value)


def _datalist(raw, work, ids):
    training = []
    for i, cid in enumerate(ids):
        files = [str(raw / cid / f"{cid}-{m}.nii.gz") for m in ("t1c", "t1n", "t2f", "t2w")]
        training.append({"case_id": cid, "image": files, "label": str(raw / cid / f"{cid}-seg.nii.gz"),
                         "fold": i % 2})
    dl = {"modalities": ["t1c", "t1n", "t2f", "t2w"], "num_folds": 2, "seed": 0, "dataset_dir": str(raw),
          "training": training, "inference": [], "invalid": []}
    work.mkdir(parents=True, exist_ok=True)
    (work / "datalist.json").write_text(json.dumps(dl))
    return dl


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Three synthetic cases planned and preprocessed with the tiny overrides: two 48x48x32 at 1 mm (the
    median, so the target spacing) and one 40x52x24 at 1.2x0.9x2.0 mm, which is resampled."""
    raw = tmp_path_factory.mktemp("raw_pp")
    work = tmp_path_factory.mktemp("work_pp")
    ids = write_dataset(raw, num_cases=2, shape=(48, 48, 32), spacing=(1.0, 1.0, 1.0), seed=5)
    ids += write_dataset(raw, num_cases=1, shape=(40, 52, 24), spacing=(1.2, 0.9, 2.0), seed=5, first_index=2)
    _datalist(raw, work, ids)
    plans = plan_and_preprocess(work, gpu_memory_gb=8, **TINY)
    return work, ids, plans


def test_plan_and_preprocess_writes_everything(prepared):
    work, ids, plans = prepared
    assert isinstance(plans, Plans) and plans.patch_size == (32, 32, 32) and plans.filters == [8, 16, 32, 64]
    assert Plans.load(work / "plans.json") == plans
    fp = json.loads((work / "fingerprint.json").read_text())
    assert fp["num_cases"] == 3 and len(fp["shapes_after_crop"]) == 3
    assert set(fp["foreground_intensity_properties_per_channel"]) == {"t1c", "t1n", "t2f", "t2w"}
    dl = json.loads((work / "datalist.json").read_text())
    assert [e["case_id"] for e in dl["training"]] == ids
    for entry in dl["training"]:
        for key in ("pp_image", "pp_label", "pp_properties"):
            assert os.path.isabs(entry[key]) and os.path.exists(entry[key])
        img = np.load(entry["pp_image"])
        seg = np.load(entry["pp_label"])
        props = json.loads(open(entry["pp_properties"]).read())
        assert img.dtype == np.float32 and img.shape[0] == 4 and seg.dtype == np.uint8
        assert seg.shape == img.shape[1:] == tuple(props["preprocessed_shape"])
        assert props["case_id"] == entry["case_id"] and props["plan_hash"] == plans.preprocessing_hash()
        assert props["affine"] is not None and seg.max() > 0
        if entry["case_id"] == ids[2]:
            assert props["original_shape"] == [40, 52, 24] and props["resampled"] is True
            assert props["preprocessed_shape"] == [round(n * s) for n, s in
                                                   zip(props["cropped_shape"], (1.2, 0.9, 2.0))]
        else:
            assert props["original_shape"] == [48, 48, 32] and props["resampled"] is False
    leftovers = [p for p in (work / "preprocessed").iterdir() if ".tmp" in p.name]
    assert not leftovers


def test_plan_and_preprocess_is_idempotent(prepared):
    work, ids, plans = prepared
    pp = work / "preprocessed"
    before = {p.name: p.stat().st_mtime_ns for p in pp.iterdir()}
    datalist_before = (work / "datalist.json").read_text()
    fp_before = (work / "fingerprint.json").stat().st_mtime_ns
    again = plan_and_preprocess(work, gpu_memory_gb=8, **TINY)
    assert again == plans
    assert {p.name: p.stat().st_mtime_ns for p in pp.iterdir()} == before  # nothing rewritten
    assert (work / "fingerprint.json").stat().st_mtime_ns == fp_before  # fingerprint reused
    assert (work / "datalist.json").read_text() == datalist_before
    # a case cached by another plan (different hash) is preprocessed again, the others are kept
    props_path = pp / f"{ids[0]}.json"
    props = json.loads(props_path.read_text())
    props["plan_hash"] = "something-else"
    props_path.write_text(json.dumps(props))
    plan_and_preprocess(work, gpu_memory_gb=8, **TINY)
    after = {p.name: p.stat().st_mtime_ns for p in pp.iterdir()}
    assert after[f"{ids[0]}_image.npy"] != before[f"{ids[0]}_image.npy"]
    assert after[f"{ids[1]}_image.npy"] == before[f"{ids[1]}_image.npy"]
    assert json.loads(props_path.read_text())["plan_hash"] == plans.preprocessing_hash()


def test_plan_and_preprocess_parallel_matches_serial(prepared, tmp_path):
    work, ids, plans = prepared
    dl = json.loads((work / "datalist.json").read_text())
    for entry in dl["training"]:
        for key in ("pp_image", "pp_label", "pp_properties"):
            entry.pop(key)
    (tmp_path / "datalist.json").write_text(json.dumps(dl))
    assert plan_and_preprocess(tmp_path, num_workers=2, **TINY) == plans
    for cid in ids:
        for suffix in ("_image.npy", "_seg.npy"):
            np.testing.assert_array_equal(np.load(tmp_path / "preprocessed" / f"{cid}{suffix}"),
                                          np.load(work / "preprocessed" / f"{cid}{suffix}"))
    assert json.loads((tmp_path / "fingerprint.json").read_text())["shapes_after_crop"] == \
        json.loads((work / "fingerprint.json").read_text())["shapes_after_crop"]


@pytest.mark.parametrize("num_workers", [1, 2])
def test_plan_and_preprocess_names_a_broken_case(prepared, tmp_path, num_workers):
    work, ids, plans = prepared
    dl = json.loads((work / "datalist.json").read_text())
    broken = tmp_path / "broken-t2f.nii.gz"
    broken.write_bytes(b"this is not a NIfTI file")
    dl["training"][1]["image"][2] = str(broken)
    (tmp_path / "datalist.json").write_text(json.dumps(dl))
    before = (tmp_path / "datalist.json").read_text()
    with pytest.raises(BraTSInputError, match="broken-t2f.nii.gz") as info:
        plan_and_preprocess(tmp_path, num_workers=num_workers, **TINY)
    problems = info.value.problems  # one problem, not an error nested in an error from the worker
    assert len(problems) == 1 and "broken-t2f" in problems[0] and "invalid BraTS input" not in problems[0]
    assert not (tmp_path / "plans.json").exists() and not (tmp_path / "fingerprint.json").exists()
    assert (tmp_path / "datalist.json").read_text() == before


def test_plan_and_preprocess_errors(tmp_path):
    with pytest.raises(BraTSInputError, match="datalist"):
        plan_and_preprocess(tmp_path)
    (tmp_path / "datalist.json").write_text(json.dumps(
        {"modalities": ["t1c", "t1n", "t2f", "t2w"], "num_folds": 2, "training": [], "inference": []}))
    with pytest.raises(BraTSInputError, match="no valid training case"):
        plan_and_preprocess(tmp_path)
    assert not (tmp_path / "plans.json").exists()
    missing = [str(tmp_path / f"gone-{m}.nii.gz") for m in ("t1c", "t1n", "t2f", "t2w")]
    (tmp_path / "datalist.json").write_text(json.dumps(
        {"modalities": ["t1c", "t1n", "t2f", "t2w"], "num_folds": 2, "inference": [],
         "training": [{"case_id": "BraTS-GLI-00009-000", "image": missing, "label": missing[0], "fold": 0}]}))
    with pytest.raises(BraTSInputError, match="gone-t1c.nii.gz: cannot be read"):
        plan_and_preprocess(tmp_path)
    assert not (tmp_path / "plans.json").exists()


def test_load_preprocessed_transform(prepared):
    work, ids, plans = prepared
    entry = json.loads((work / "datalist.json").read_text())["training"][1]
    entry.pop("case_id")
    d = LoadPreprocessedd(keys=("image", "label"))(entry)
    assert d["case_id"] == ids[1]
    assert d["image"].dtype == torch.float32 and d["image"].shape[0] == 4
    assert d["label"].dtype == torch.uint8 and d["label"].shape == (1, *d["image"].shape[1:])
    np.testing.assert_array_equal(d["image"].numpy(), np.load(entry["pp_image"]))
    assert d["image_properties"]["case_id"] == ids[1]
    d["image"][0, 0, 0, 0] = 123.0  # a private copy, not a read-only memory map
    m = LoadPreprocessedd(keys=("image", "label"), mmap=True)(entry)
    assert isinstance(m["image"], np.memmap) and not m["image"].flags.writeable
    np.testing.assert_array_equal(np.asarray(m["label"][0]), np.load(entry["pp_label"]))
    with pytest.raises(KeyError, match="pp_label"):
        LoadPreprocessedd(keys=("image", "label"))({"case_id": "x", "pp_image": entry["pp_image"]})


@pytest.mark.parametrize("index", [0, 2], ids=["1mm", "resampled"])
def test_inference_preprocessing_matches_training_cache(prepared, index):
    """LoadImaged -> BraTSPreprocessd gives the cached training arrays exactly; RestoreOriginalGridd inverts it."""
    work, ids, plans = prepared
    entry = json.loads((work / "datalist.json").read_text())["training"][index]
    pipeline = Compose([
        LoadImaged(keys=("image", "label"), image_only=True),
        EnsureChannelFirstd(keys=("image", "label")),
        BraTSPreprocessd(keys="image", plans=work / "plans.json", label_key="label"),
    ])
    d = pipeline({"image": entry["image"], "label": entry["label"]})
    cached = np.load(entry["pp_image"])
    assert isinstance(d["image"], MetaTensor) and d["image"].shape == cached.shape
    np.testing.assert_array_equal(d["image"].numpy(), cached)
    np.testing.assert_array_equal(d["label"][0].numpy(), np.load(entry["pp_label"]))
    props = d["image_properties"]
    cached_props = json.loads(open(entry["pp_properties"]).read())
    assert props["bbox"] == cached_props["bbox"]
    # the preprocessed grid keeps world coordinates: its outer voxel edges are those of the crop box
    original_affine = np.asarray(props["affine"])
    pp_affine = d["image"].affine.numpy()
    for pp_edge, edge in (([-0.5] * 3, [b[0] - 0.5 for b in props["bbox"]]),
                          ([n - 0.5 for n in props["preprocessed_shape"]], [b[1] - 0.5 for b in props["bbox"]])):
        np.testing.assert_allclose(pp_affine @ np.array([*pp_edge, 1.0]), original_affine @ np.array([*edge, 1.0]),
                                   atol=1e-5)

    d["pred"] = d["image"][:3].sigmoid()
    d["labels_pp"] = d["label"]
    out = RestoreOriginalGridd(keys=("pred", "labels_pp"), orders=(1, 0))(d)
    assert out["pred"].shape == (3, *props["original_shape"]) and isinstance(out["pred"], MetaTensor)
    np.testing.assert_allclose(out["pred"].affine.numpy(), original_affine)
    raw_label = np.asarray(LoadImaged(keys="label", image_only=True)({"label": entry["label"]})["label"])
    restored_label = out["labels_pp"][0].numpy()
    if props["resampled"]:
        assert (restored_label == raw_label).mean() > 0.97
    else:
        np.testing.assert_array_equal(restored_label, raw_label.astype(np.uint8))


def test_brats_preprocessd_spacing_key_and_errors(case):
    image, seg = case
    plans = tiny_plans()
    d = BraTSPreprocessd(keys="image", plans=plans, spacing_key="spacing")(
        {"image": torch.from_numpy(image), "spacing": np.array([1.2, 0.9, 2.0])})
    assert d["image_properties"]["resampled"] is True
    assert list(d["image"].shape[1:]) == d["image_properties"]["preprocessed_shape"]
    restored = RestoreOriginalGridd(keys="image")(d)["image"]
    assert restored.shape == image.shape
    with pytest.raises(BraTSInputError, match="no spacing"):
        BraTSPreprocessd(keys="image", plans=plans)({"image": torch.from_numpy(image)})
    with pytest.raises(ValueError, match="needs plans"):
        BraTSPreprocessd(keys="image")
    with pytest.raises(KeyError, match="image_properties"):
        RestoreOriginalGridd(keys="image")({"image": torch.zeros(1, 2, 2, 2)})


def test_preprocess_refuses_a_spacing_that_would_blow_up_the_volume():
    """Issue 15.5: the resampled size is checked from shape and spacing before any work, in the one function every
    entry point (bundle run, BraTSPreprocessd of MONAI Label's bundle task, Triton, training cache) goes through."""
    from custom.core.errors import BraTSInputError
    from custom.preprocessing.functional import MAX_PREPROCESSED_VOXELS, preprocess_case

    plans = tiny_plans()
    image = np.ones((4, 64, 64, 48), np.float32)
    with pytest.raises(BraTSInputError, match="voxels, above the limit") as info:
        preprocess_case(image, (6.0, 6.0, 6.0), plans, name="case-X")
    assert "case-X" in str(info.value) and "[384, 384, 288]" in str(info.value)
    # a limit is a parameter; a normal case passes
    assert 64 * 64 * 48 < MAX_PREPROCESSED_VOXELS
    with pytest.raises(BraTSInputError):
        preprocess_case(image, (1.0, 1.0, 1.0), plans, max_voxels=1000)
