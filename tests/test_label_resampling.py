"""Labels are resampled to the plan's spacing as nnU-Net resamples segmentations: linear interpolation of the
one-hot encoding, then the most likely label (not nearest neighbour, which keeps isolated voxels and moves borders
by up to half a voxel). Checked against an independent scipy implementation of that definition on random labels.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from custom.core.constants import LABEL_VALUES, MODALITIES
from custom.preprocessing.functional import preprocess_case

PLANS = {"target_spacing": [1.0, 1.0, 1.0], "patch_size": [16, 16, 16], "batch_size": 2,
         "kernels": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]], "filters": [4, 8, 16],
         "median_shape": [24, 24, 24], "modalities": list(MODALITIES), "regions": ["WT", "TC", "ET"],
         "regions_class_order": [2, 1, 3], "normalization": "zscore", "gpu_memory_gb": 8, "planner_version": 1}


def test_labels_are_resampled_by_linear_interpolation_of_the_one_hot_encoding():
    rng = np.random.default_rng(0)
    shape = (11, 12, 9)
    image = 1.0 + rng.random((4, *shape)).astype(np.float32)
    seg = rng.choice(4, size=shape, p=[0.4, 0.2, 0.3, 0.1]).astype(np.uint8)
    _, seg_pp, props = preprocess_case(image, (7 / 11, 1.25, 0.8), PLANS, seg=seg)
    new = props["preprocessed_shape"]
    assert props["cropped_shape"] == list(shape) and new == [7, 15, 7]
    # voxel centres aligned: x_in = (x_out + 0.5) * n_in / n_out - 0.5; edges replicated
    coords = np.meshgrid(*[(np.arange(m) + 0.5) * n / m - 0.5 for n, m in zip(shape, new)], indexing="ij")
    onehot = np.stack([ndimage.map_coordinates((seg == v).astype(np.float64), coords, order=1, mode="nearest")
                       for v in LABEL_VALUES])
    expected = np.asarray(LABEL_VALUES)[np.argmax(onehot, axis=0)]
    top2 = np.sort(onehot, axis=0)[-2:]
    clear = top2[1] - top2[0] > 1e-6   # exact ties may break either way in float32
    assert clear.mean() > 0.95
    np.testing.assert_array_equal(seg_pp[clear], expected[clear])
    # on this case nearest neighbour would differ on many voxels
    nearest = seg[np.ix_(*[np.minimum(((np.arange(m) + 0.5) * n / m).astype(int), n - 1) for n, m in zip(shape, new)])]
    assert (nearest != seg_pp).mean() > 0.1
