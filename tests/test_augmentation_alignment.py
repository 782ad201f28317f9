"""Image, label and case coordinates stay on one grid under the REAL training augmentation of train.json.

The error target is written and read through the case coordinates that travel with the patch; the segmentation is
scored against the label. If a spatial transform resamples the image on a grid shifted from the one of the label and
the coordinates (e.g. trilinear image vs legacy ``nearest`` label, or a nearest downsampling whose sample positions
differ from the linear upsampling's), a perfect segmenter "fails" along every boundary of an affected patch and those
fake failures go into ``error_stable``.

The test builds ``train#preprocessing`` from bundle/configs/train.json exactly as the bundle does, feeds it a case
whose image channels ARE the case coordinates (``index + 1`` along x, y, z), forces one spatial transform at a time
(then all of them) and measures the signed mean offset image - coords per axis over many draws. Nearest
interpolation rounds every voxel by up to half a voxel, so a mean *absolute* difference cannot fall below that; a
signed mean can, and a grid shift shows in it at once (0.4-0.6 voxel with the old modes).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import RandomizableTransform
from scipy import ndimage

from custom.core.layout import CONFIG_DIR

PATCH = [32, 32, 32]
CASE_SHAPE = (48, 46, 40)
SPATIAL = ("RandRotated", "RandZoomd", "RandSimulateLowResolutiond", "RandFlipd")
DRAWS = 24
MAX_SIGNED_OFFSET = 0.05


@pytest.fixture(scope="module")
def ramp_case(tmp_path_factory):
    """A preprocessed case whose four image channels are the x, y, z (and x) case coordinates; a blob label."""
    d = tmp_path_factory.mktemp("ramp_case")
    grids = np.meshgrid(*[np.arange(1, n + 1, dtype=np.float32) for n in CASE_SHAPE], indexing="ij")
    image = np.stack([grids[0], grids[1], grids[2], grids[0]]).astype(np.float32)
    centre = np.array(CASE_SHAPE) / 2
    r = np.sqrt(sum(((g - 1 - c) / (n / 3)) ** 2 for g, c, n in zip(grids, centre, CASE_SHAPE)))
    label = np.zeros(CASE_SHAPE, np.uint8)
    label[r < 1.0] = 2
    label[r < 0.6] = 1
    label[(r < 0.8) & (r >= 0.6)] = 3
    np.save(d / "case_image.npy", image)
    np.save(d / "case_seg.npy", label[None])
    (d / "case.json").write_text(json.dumps({}))
    item = {"case_id": "BraTS-GLI-00000-000", "pp_image": str(d / "case_image.npy"),
            "pp_label": str(d / "case_seg.npy"), "pp_properties": str(d / "case.json"), "force_fg": True}
    return item, label


def _pipeline(enabled: set[str]):
    """train#preprocessing of train.json with the named transforms forced on and every other random one off."""
    parser = ConfigParser()
    parser.read_config(str(CONFIG_DIR / "train.json"))
    parser["patch_size"] = PATCH
    compose = parser.get_parsed_content("train#preprocessing", instantiate=True)
    names = []
    for t in compose.transforms:
        name = type(t).__name__
        names.append(name)
        if isinstance(t, RandomizableTransform):
            t.prob = 1.0 if name in enabled else 0.0
    missing = set(enabled) - set(names)
    assert not missing, f"train.json has no {missing} (transforms: {names})"
    return compose


def _offsets(compose, item, label_case, draws: int = DRAWS) -> tuple[np.ndarray, int, int]:
    """Signed mean (image - coords) per axis over interior valid voxels of ``draws`` patches, plus label mismatches."""
    sums, count, label_mismatch = np.zeros(3), 0, 0
    for seed in range(draws):
        compose.set_random_state(seed=seed)
        out = compose(dict(item))
        image = torch.as_tensor(out["image"]).numpy()
        coords = torch.as_tensor(out["coords"]).numpy()
        regions = torch.as_tensor(out["label"]).numpy()
        valid = (coords > 0).all(axis=0)
        # voxels whose interpolation footprint touched padding or the case border carry zeros: leave them out
        interior = ndimage.binary_erosion(valid, structure=np.ones((3, 3, 3), bool), iterations=2)
        if not interior.any():
            continue
        for axis in range(3):
            sums[axis] += float((image[axis][interior] - coords[axis][interior]).sum())
        count += int(interior.sum())
        # the label travels on the coordinates' grid: it must be the case label at the carried coordinates
        idx = tuple(coords[a][valid].astype(np.int64) - 1 for a in range(3))
        wt_case = label_case[idx] > 0
        label_mismatch += int((wt_case != (regions[0][valid] > 0.5)).sum())
    assert count > 0, "no interior voxels in any draw"
    return sums / count, count, label_mismatch


@pytest.mark.parametrize("transform", SPATIAL + ("all",))
def test_image_does_not_drift_from_label_and_coords(ramp_case, transform):
    item, label_case = ramp_case
    enabled = set(SPATIAL) if transform == "all" else {transform}
    offsets, count, label_mismatch = _offsets(_pipeline(enabled), item, label_case)
    assert np.all(np.abs(offsets) < MAX_SIGNED_OFFSET), (
        f"{transform}: image drifts from the coordinates by {np.round(offsets, 3).tolist()} voxel (x, y, z) "
        f"over {count} voxels of {DRAWS} patches")
    assert label_mismatch == 0, f"{transform}: {label_mismatch} voxels whose label is not the case label at their coords"


def test_the_measure_sees_a_grid_shift(ramp_case):
    """Guard of the guard: the legacy ``nearest`` mode for label and coords (the old train.json) is caught."""
    item, label_case = ramp_case
    compose = _pipeline({"RandZoomd"})
    zoom = next(t for t in compose.transforms if type(t).__name__ == "RandZoomd")
    zoom.rand_zoom.mode = ["trilinear", "nearest", "nearest"]  # what train.json had before
    zoom.mode = ("trilinear", "nearest", "nearest")
    offsets, _, _ = _offsets(compose, item, label_case, draws=8)
    assert np.any(np.abs(offsets) > 0.2), f"a legacy-nearest zoom should shift the grid, measured {offsets}"
