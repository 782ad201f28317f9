"""Region/label conversion, case coordinates and foreground-oversampled cropping (custom/transforms/)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import RandFlipd, RandRotated, RandZoomd, SpatialPadd

from custom.transforms.array import labels_to_regions, make_case_coordinates, regions_to_labels
from custom.transforms.dictionary import (
    AddCaseCoordinatesd,
    ForegroundOversampledCropd,
    LabelToRegionsd,
    RegionsToLabelsd,
)


def test_labels_to_regions_by_hand():
    label = np.array([0, 1, 2, 3], np.uint8).reshape(1, 4, 1, 1)
    r = labels_to_regions(label)
    assert r.shape == (3, 4, 1, 1) and r.dtype == np.float32
    assert r[:, :, 0, 0].tolist() == [[0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1]]  # WT, TC, ET
    rt = labels_to_regions(MetaTensor(torch.from_numpy(label[0])))
    assert isinstance(rt, MetaTensor) and rt.dtype == torch.float32
    np.testing.assert_array_equal(rt.numpy(), r)
    with pytest.raises(ValueError, match="one channel"):
        labels_to_regions(np.zeros((2, 3, 3, 3)))


def test_regions_to_labels_order_2_1_3():
    # p_WT, p_TC, p_ET per voxel: nnU-Net writes 2 for WT, then 1 for TC, then 3 for ET
    probs = np.array([[0.9, 0.9, 0.9, 0.2, 0.1, 0.9],
                      [0.1, 0.8, 0.8, 0.9, 0.6, 0.5],
                      [0.2, 0.1, 0.7, 0.1, 0.9, 0.4]], np.float32).reshape(3, 6, 1, 1)
    labels = regions_to_labels(probs)
    assert labels.dtype == np.uint8
    # TC/ET win over WT even where p_WT <= 0.5 (later regions overwrite); 0.5 is not > 0.5
    assert labels.flatten().tolist() == [2, 1, 3, 1, 3, 2]
    lt = regions_to_labels(torch.from_numpy(probs))
    assert lt.dtype == torch.uint8 and lt.flatten().tolist() == labels.flatten().tolist()
    # a 4th (uncertainty) channel is ignored
    assert regions_to_labels(np.concatenate([probs, probs[:1]])).flatten().tolist() == labels.flatten().tolist()


def test_roundtrip_and_dict_versions():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 4, (1, 7, 6, 5)).astype(np.uint8)
    d = LabelToRegionsd(keys="label")({"label": label})
    np.testing.assert_array_equal(regions_to_labels(d["label"]), label[0])
    back = RegionsToLabelsd(keys="label", keepdim=True)(d)
    assert back["label"].shape == (1, 7, 6, 5)
    np.testing.assert_array_equal(back["label"], label)


def test_case_coordinates():
    c = make_case_coordinates((3, 4, 5))
    assert c.shape == (3, 3, 4, 5) and c.dtype == np.float32
    assert c[0, :, 1, 2].tolist() == [1, 2, 3] and c[2, 1, 1, :].tolist() == [1, 2, 3, 4, 5]
    assert c.min() == 1
    img = MetaTensor(torch.zeros(4, 3, 4, 5), affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])))
    out = AddCaseCoordinatesd()({"image": img})
    assert isinstance(out["coords"], MetaTensor)
    torch.testing.assert_close(out["coords"].affine, img.affine)
    np.testing.assert_array_equal(out["coords"].numpy(), c)
    with pytest.raises(KeyError, match="image"):
        AddCaseCoordinatesd()({"label": img})


def test_coords_survive_monai_spatial_transforms_exactly():
    """nearest + zero padding: every coordinate is an exact integer triple or all-zero padding."""
    shape = (20, 22, 18)
    img = np.random.default_rng(0).standard_normal((4,) + shape).astype(np.float32)
    d = AddCaseCoordinatesd()({"image": img})
    keys = ["image", "coords"]
    for t in (RandRotated(keys, range_x=0.4, range_y=0.4, range_z=0.4, prob=1.0, mode=["bilinear", "nearest"],
                          padding_mode="zeros"),
              RandZoomd(keys, prob=1.0, min_zoom=0.7, max_zoom=0.8, mode=["trilinear", "nearest"],
                        padding_mode="constant"),
              RandFlipd(keys, prob=1.0, spatial_axis=1),
              SpatialPadd(keys, spatial_size=(24, 24, 24), mode="constant")):
        if hasattr(t, "set_random_state"):
            t.set_random_state(1)
        d = t(d)
    c = torch.as_tensor(d["coords"]).numpy()
    assert c.shape == (3, 24, 24, 24)
    np.testing.assert_array_equal(c, np.rint(c))
    valid = (c > 0).all(0)
    invalid = (c == 0).all(0)
    assert (valid | invalid).all() and invalid.any() and valid.any()
    for axis in range(3):
        assert c[axis][valid].max() <= shape[axis]


@pytest.mark.parametrize("as_tensor", [False, True])
def test_foreground_oversampled_crop(as_tensor):
    shape = (30, 28, 26)
    label = np.zeros((1,) + shape, np.uint8)
    label[0, 25:28, 2:4, 20:22] = 3  # a small tumour near a corner
    image = np.random.default_rng(0).standard_normal((4,) + shape).astype(np.float32)
    data = AddCaseCoordinatesd()({"image": image, "label": label})
    if as_tensor:
        data = {k: MetaTensor(torch.from_numpy(v)) for k, v in data.items()}
    crop = ForegroundOversampledCropd(["image", "label", "coords"], "label", (16, 16, 16))
    crop.set_random_state(0)
    for trial in range(10):
        out = crop({**data, "force_fg": True})
        assert tuple(out["image"].shape) == (4, 16, 16, 16) and tuple(out["label"].shape) == (1, 16, 16, 16)
        assert (torch.as_tensor(out["label"]) == 3).any()
        # image and label are cut from the same box as the coordinates say
        c = torch.as_tensor(out["coords"]).numpy().astype(int) - 1
        np.testing.assert_array_equal(torch.as_tensor(out["image"]).numpy()[0], image[0][c[0], c[1], c[2]])
    hits = 0
    for trial in range(30):
        out = crop({**data, "force_fg": False})
        hits += bool((torch.as_tensor(out["label"]) == 3).any())
    assert hits < 30  # uniform sampling usually misses a corner tumour


def test_crop_pads_small_cases_with_zeros():
    shape = (10, 20, 30)
    data = AddCaseCoordinatesd()({"image": np.ones((4,) + shape, np.float32),
                                 "label": np.ones((1,) + shape, np.uint8)})
    crop = ForegroundOversampledCropd(["image", "label", "coords"], "label", (16, 16, 16))
    crop.set_random_state(3)
    out = crop({**data, "force_fg": True})
    assert out["image"].shape == (4, 16, 16, 16)
    valid = (out["coords"] > 0).all(0)
    assert valid.sum() == 10 * 16 * 16
    assert (out["image"][:, valid] == 1).all() and (out["image"][:, ~valid] == 0).all()
    assert (out["label"][:, ~valid] == 0).all() and (out["coords"][:, ~valid] == 0).all()
    # x is centred: 3 voxels of padding before, 3 after
    assert valid[3:13].all()
    assert not valid[:3].any() and not valid[13:].any()
    with pytest.raises(ValueError, match="patch_size"):
        ForegroundOversampledCropd(["image"], "label", (16, 16))
    with pytest.raises(ValueError, match="shape"):
        crop({"image": np.ones((4, 5, 5, 5)), "label": np.ones((1, 6, 5, 5)), "coords": np.ones((3, 5, 5, 5))})
