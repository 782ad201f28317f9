"""The cancer mask and the paste-back of the uncertainty map at inference, on crafted probabilities.

An untrained network predicts tumour over most of a crop, so "unc is zero outside the mask" holds there even with
no mask at all. Here the probabilities are made by hand: a small predicted tumour, ``unc_output = 1`` everywhere,
distinct values per channel, isotropic and anisotropic spacing, so that a missing, misplaced or wrongly sized mask,
a wrong channel or a wrong interpolation changes the written map.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from custom.core.constants import MODALITIES
from custom.inference.postprocess import UncertaintyPostprocessd, masked_uncertainty, postprocess_probabilities
from custom.model.masks import get_cancer_mask
from custom.preprocessing.functional import preprocess_case, restore_original_grid

PLANS = {"target_spacing": [1.0, 1.0, 1.0], "patch_size": [16, 16, 16], "batch_size": 2,
         "kernels": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]], "filters": [4, 8, 16],
         "median_shape": [24, 24, 24], "modalities": list(MODALITIES), "regions": ["WT", "TC", "ET"],
         "regions_class_order": [2, 1, 3], "normalization": "zscore", "gpu_memory_gb": 8, "planner_version": 1}

#: the original grid and the nonzero box (the crop) inside it
SHAPE = (20, 18, 16)
BOX = (slice(3, 17), slice(2, 16), slice(4, 14))


def _image(shape=SHAPE, box=BOX) -> np.ndarray:
    image = np.zeros((4, *shape), np.float32)
    image[(slice(None), *box)] = 1.0 + np.random.default_rng(0).random((4, *[s.stop - s.start for s in box]))
    return image


def _properties(spacing):
    """Real ``preprocess_case`` properties of a case on ``SHAPE`` with the crop box ``BOX``."""
    _, _, props = preprocess_case(_image(), spacing, PLANS)
    return props


def _cube(shape, lo, size):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, a + s) for a, s in zip(lo, size))] = True
    return m


def _dilate(mask: np.ndarray, d: int) -> np.ndarray:
    """26-neighbourhood dilation by ``d`` voxels of a cube-shaped mask, by its bounding box (no library code)."""
    out = np.zeros_like(mask)
    if not mask.any():
        return out
    idx = np.nonzero(mask)
    out[tuple(slice(max(int(i.min()) - d, 0), int(i.max()) + 1 + d) for i in idx)] = True
    return out


def _probs(shape, wt=None, tc=None, et=None, unc=1.0, background=(0.2, 0.1, 0.05)) -> np.ndarray:
    """``(4, *shape)`` probabilities: distinct background per channel, 0.9 / 0.8 / 0.7 inside the given masks."""
    probs = np.empty((4, *shape), np.float32)
    for c, (mask, inside) in enumerate(((wt, 0.9), (tc, 0.8), (et, 0.7))):
        probs[c] = background[c]
        if mask is not None:
            probs[c][mask] = inside
    probs[3] = unc
    return probs


# ------------------------------------------------------------------------------------------ isotropic
@pytest.mark.parametrize("dilation", [0, 1, 3])
def test_unc_is_one_exactly_on_the_dilated_tumour_pasted_into_the_crop_box(dilation):
    """Equal spacing: no resampling; unc = 1 (the network's value) on the predicted WT dilated by ``dilation``,
    moved by the crop box's offset, and exactly 0 elsewhere; labels in 2, 1, 3 order."""
    props = _properties((1.0, 1.0, 1.0))
    assert not props["resampled"] and props["bbox"] == [[3, 17], [2, 16], [4, 14]]
    pp_shape = tuple(props["preprocessed_shape"])
    wt = _cube(pp_shape, (5, 6, 4), (3, 2, 2))
    tc = _cube(pp_shape, (6, 6, 4), (1, 1, 1))
    pred = postprocess_probabilities(_probs(pp_shape, wt=wt, tc=tc), props, mask_dilation=dilation)
    offset = (3, 2, 4)
    wt_orig = _cube(SHAPE, (5 + offset[0], 6 + offset[1], 4 + offset[2]), (3, 2, 2))
    expected = _dilate(wt_orig, dilation).astype(np.float32)
    np.testing.assert_array_equal(pred.unc, expected)
    assert pred.unc_source == "unc_output" and pred.unc.dtype == np.float32 and pred.unc.shape == SHAPE
    labels = np.zeros(SHAPE, np.uint8)
    labels[wt_orig] = 2
    labels[9, 8, 8] = 1
    np.testing.assert_array_equal(pred.labels, labels)
    np.testing.assert_allclose(pred.probs[1][9, 8, 8], 0.8)
    np.testing.assert_allclose(pred.probs[2][wt_orig], 0.05)


def test_the_mask_is_the_tumour_of_the_written_labels_whatever_channel_predicts_it():
    """A voxel labelled TC (p_TC > 0.5) where p_WT < 0.5 is tumour in the written labels: the map is reported
    around it too. The uncertainty channel itself (1 everywhere) is no tumour."""
    props = _properties((1.0, 1.0, 1.0))
    pp_shape = tuple(props["preprocessed_shape"])
    wt = _cube(pp_shape, (1, 1, 1), (2, 2, 2))
    tc = _cube(pp_shape, (10, 10, 6), (2, 2, 2))   # p_WT 0.2 there
    pred = postprocess_probabilities(_probs(pp_shape, wt=wt, tc=tc), props, mask_dilation=1)
    assert (pred.labels == 1).sum() == 8 and (pred.labels == 2).sum() == 8
    expected = _dilate(np.pad(wt, [(3, 3), (2, 2), (4, 2)]), 1) | _dilate(np.pad(tc, [(3, 3), (2, 2), (4, 2)]), 1)
    np.testing.assert_array_equal(pred.unc, expected.astype(np.float32))


def test_without_the_uncertainty_channel_var1shot_of_p_wt_is_masked():
    """3 channels: the map is var1shot = 4 p_WT (1 - p_WT) from channel 0, times the same mask."""
    props = _properties((1.0, 1.0, 1.0))
    pp_shape = tuple(props["preprocessed_shape"])
    wt = _cube(pp_shape, (5, 6, 4), (3, 2, 2))
    probs = _probs(pp_shape, wt=wt, background=(0.2, 0.5, 0.3))[:3]   # var1shot of p_TC would be 1.0
    pred = postprocess_probabilities(probs, props, mask_dilation=1)
    assert pred.unc_source == "var1shot"
    wt_orig = np.pad(wt, [(3, 3), (2, 2), (4, 2)])
    ring = _dilate(wt_orig, 1) & ~wt_orig
    np.testing.assert_allclose(pred.unc[wt_orig], 4 * 0.9 * 0.1, rtol=1e-6)
    np.testing.assert_allclose(pred.unc[ring], 4 * 0.2 * 0.8, rtol=1e-6)
    assert not pred.unc[~_dilate(wt_orig, 1)].any()
    unc_pp, source = masked_uncertainty(torch.from_numpy(probs), mask_dilation=1)
    assert source == "var1shot"
    np.testing.assert_allclose(unc_pp.numpy()[_dilate(wt, 1) & ~wt], 0.64, rtol=1e-6)


# ------------------------------------------------------------------------------------------ anisotropic
def test_anisotropic_paste_back_masks_before_and_after_linear_resampling():
    """Spacing (2, 1, 0.5) mm to a 1 mm plan: the mask is applied on the preprocessed grid (dilation in
    preprocessed voxels), the masked map is resampled linearly to the original grid, and the mask of the written
    labels (dilation in original voxels) is applied again. With unc = 1 everywhere the written map is therefore
    exactly the linearly restored preprocessed mask, cut to the labels' mask: fractional at the mask's edge along
    x, and never beyond the labels' mask where the preprocessed mask reaches further (z)."""
    props = _properties((2.0, 1.0, 0.5))
    assert props["resampled"] and props["preprocessed_shape"] == [28, 14, 5]
    pp_shape = tuple(props["preprocessed_shape"])
    wt_pp = _cube(pp_shape, (11, 5, 2), (6, 4, 2))
    d = 2
    pred = postprocess_probabilities(_probs(pp_shape, wt=wt_pp), props, mask_dilation=d)
    tumour = pred.labels > 0
    assert 24 <= tumour.sum() <= 48 and set(np.unique(pred.labels)) == {0, 2}
    final_mask = get_cancer_mask(torch.from_numpy(tumour)[None, None], dilation=d)[0, 0].numpy()
    pp_mask = _dilate(wt_pp, d).astype(np.float32)
    restored = np.asarray(restore_original_grid(pp_mask[None], props, order=1))[0]
    expected = np.where(final_mask, np.clip(restored, 0, 1), 0).astype(np.float32)
    np.testing.assert_allclose(pred.unc, expected, atol=1e-6)
    # the crafted case separates the alternatives: values strictly between 0 and 1 (linear, masked before the
    # resampling), ones inside, and a preprocessed mask that reaches beyond the labels' mask
    assert ((pred.unc > 0.05) & (pred.unc < 0.95)).any() and (pred.unc == 1).any()
    assert (restored[~final_mask] > 0.5).any()
    assert not pred.unc[~final_mask].any()
    # the same two masks for a network without the uncertainty channel (var1shot of p_WT, 0.64 around the tumour)
    probs3 = _probs(pp_shape, wt=wt_pp)[:3]
    pred3 = postprocess_probabilities(probs3, props, mask_dilation=d)
    np.testing.assert_array_equal(pred3.labels, pred.labels)
    var1shot_pp = 4 * probs3[0] * (1 - probs3[0]) * pp_mask
    restored3 = np.asarray(restore_original_grid(var1shot_pp[None], props, order=1))[0]
    np.testing.assert_allclose(pred3.unc, np.where(final_mask, restored3, 0), atol=1e-6)


# ------------------------------------------------------------------------------------------ wrappers
def test_postprocess_transform_uses_its_mask_dilation():
    """``UncertaintyPostprocessd(mask_dilation=1)`` (what inference.json declares) on a batch of one."""
    props = _properties((1.0, 1.0, 1.0))
    pp_shape = tuple(props["preprocessed_shape"])
    probs = _probs(pp_shape, wt=_cube(pp_shape, (5, 6, 4), (2, 2, 2)))
    out = UncertaintyPostprocessd(keys="pred", mask_dilation=1, probs_key="probs")(
        {"pred": torch.from_numpy(probs)[None], "image_properties": props})
    ref = postprocess_probabilities(probs, props, mask_dilation=1)
    assert out["pred"].shape == (1, *SHAPE) and out["unc"].shape == (1, *SHAPE) and out["probs"].shape == (3, *SHAPE)
    np.testing.assert_array_equal(out["unc"][0].numpy(), ref.unc)
    np.testing.assert_array_equal(out["pred"][0].numpy(), ref.labels)
    assert out["unc_source"] == "unc_output" and int(out["unc"].sum()) == 4 ** 3


def _crafted_patch_fn(batch: torch.Tensor) -> torch.Tensor:
    """Probabilities from the image: p_WT 0.9 where the z-scored t2f is bright, TC/ET never; unc 1 everywhere."""
    t2f = batch[:, MODALITIES.index("t2f")]
    p_wt = torch.where(t2f > 2.0, 0.9, 0.1)
    return torch.stack([p_wt, torch.full_like(p_wt, 0.3), torch.full_like(p_wt, 0.2), torch.ones_like(p_wt)], 1)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 1.0, 0.5)])
def test_segmenter_reports_the_map_only_near_the_predicted_tumour(spacing):
    """The whole inference path (crop, z-score, resampling, sliding window, mask, paste-back) with a patch_fn that
    finds a bright t2f spot: labels on the spot, unc = 0 beyond the labels dilated by the segmenter's
    mask_dilation, and (equal spacing) exactly 1 on the spot dilated by it."""
    from custom.inference.segmenter import UncertaintySegmenter

    image = _image()
    spot = _cube(SHAPE, (9, 8, 8), (2, 2, 2))
    image[MODALITIES.index("t2f")][spot] = 50.0
    seg = UncertaintySegmenter(None, PLANS, mask_dilation=2)
    pred = seg.predict(image, spacing, patch_fn=_crafted_patch_fn)
    tumour = pred.labels > 0
    mask = get_cancer_mask(torch.from_numpy(tumour)[None, None], dilation=2)[0, 0].numpy()
    assert tumour[spot].all() and tumour.sum() <= 4 * spot.sum()
    assert not pred.unc[~mask].any() and pred.unc[spot].min() > 0.5
    if spacing == (1.0, 1.0, 1.0):
        np.testing.assert_array_equal(tumour, spot)
        np.testing.assert_array_equal(pred.unc, _dilate(spot, 2).astype(np.float32))
