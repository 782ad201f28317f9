"""Synthetic BraTS generator: BraTS naming and geometry, determinism, label nesting, contrasts, label noise."""

from __future__ import annotations

import importlib.util
import inspect
import sys

import nibabel as nib
import numpy as np
import pytest
from conftest import run_cmd
from scipy import ndimage

from custom.core.constants import CASE_ID_PATTERN, MODALITIES
from custom.data.synthetic import make_affine, make_case, write_dataset
from custom.data.tissue_model import INTENSITY_TABLE, TISSUES, smooth_field

SHAPE = (40, 40, 28)
FILES = [f"{m}.nii.gz" for m in MODALITIES] + ["seg.nii.gz"]


def _tree_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_cli_naming_geometry_and_determinism(tmp_path):
    args = ["--num_cases", 3, "--shape", "[24,24,16]", "--spacing", "[1,1.5,2]"]
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        run_cmd([sys.executable, "scripts/make_synthetic.py", "--out_dir", tmp_path / name, "--seed", seed, *args])
    a, b, c = (_tree_bytes(tmp_path / n) for n in "abc")

    expected = {f"BraTS-GLI-{i:05d}-000/BraTS-GLI-{i:05d}-000-{f}" for i in range(3) for f in FILES}
    assert set(a) == expected
    assert a == b, "same seed must give the same bytes"
    assert set(c) == expected and all(a[k] != c[k] for k in a if not k.endswith("seg.nii.gz"))

    affine = make_affine((24, 24, 16), (1, 1.5, 2))
    for case_dir in sorted((tmp_path / "a").iterdir()):
        assert CASE_ID_PATTERN.match(case_dir.name)
        imgs = [nib.load(case_dir / f"{case_dir.name}-{f}") for f in FILES]
        for img in imgs:
            assert img.shape == (24, 24, 16)
            np.testing.assert_allclose(img.affine, affine)
            np.testing.assert_allclose(img.header.get_zooms(), (1, 1.5, 2))
        data = np.stack([np.asanyarray(i.dataobj) for i in imgs[:4]])
        seg = np.asanyarray(imgs[4].dataobj)
        assert imgs[4].get_data_dtype() == np.uint8 and imgs[0].get_data_dtype() == np.int16
        brain = data[0] > 0
        # skull-stripped: every modality is exactly 0 outside the same brain mask, positive inside
        assert (data[:, ~brain] == 0).all() and (data[:, brain] > 0).all()
        assert 0.05 < brain.mean() < 0.6
        assert seg[~brain].max(initial=0) == 0


def test_cases_do_not_depend_on_num_cases(tmp_path):
    write_dataset(tmp_path / "two", num_cases=2, shape=(24, 24, 16), seed=7)
    write_dataset(tmp_path / "one", num_cases=1, shape=(24, 24, 16), seed=7)
    one, two = _tree_bytes(tmp_path / "one"), _tree_bytes(tmp_path / "two")
    assert all(two[k] == v for k, v in one.items())


def test_cli_rejects_bad_shape(tmp_path):
    proc = run_cmd([sys.executable, "scripts/make_synthetic.py", "--out_dir", tmp_path, "--shape", "[24,24]"],
                   check=False)
    assert proc.returncode != 0
    assert "shape" in proc.stderr and "Traceback" not in proc.stderr


def _is_inside(inner, outer):
    return not (inner & ~outer).any()


@pytest.mark.parametrize("seed", range(6))
def test_label_values_and_nesting(seed):
    image, seg = make_case(np.random.default_rng(seed), SHAPE, (1, 1, 1), label_noise=1.0)
    assert image.shape == (4,) + SHAPE and image.dtype == np.float32
    assert seg.shape == SHAPE and seg.dtype == np.uint8
    assert set(np.unique(seg)) <= {0, 1, 2, 3}
    wt, tc, ncr, et = seg > 0, np.isin(seg, (1, 3)), seg == 1, seg == 3
    assert wt.sum() > 50, "every case has a tumour"
    brain = image[0] > 0
    assert _is_inside(wt, brain)
    # the core (NCR and ET) lies inside the whole tumour with edema all around it (6-neighbourhood)
    assert tc.any() and _is_inside(ndimage.binary_dilation(tc), wt)
    # the edema (label 2) surrounds the core: it is the outer layer of the whole tumour
    assert _is_inside(wt & ~ndimage.binary_erosion(wt), seg == 2)
    if ncr.any() and et.any():
        # necrotic core enclosed by the enhancing rim
        assert _is_inside(ndimage.binary_dilation(ncr), tc)


@pytest.mark.parametrize("tumour_type, absent", [("no_et", 3), ("no_ncr", 1), ("both", None)])
def test_tumour_types(tumour_type, absent):
    _, seg = make_case(np.random.default_rng(1), SHAPE, (1, 1, 1), tumour_type=tumour_type)
    labels = set(np.unique(seg).tolist())
    if absent is None:
        assert {1, 2, 3} <= labels
    else:
        assert absent not in labels and 2 in labels


def test_random_tumour_types_and_sizes_vary():
    segs = [make_case(np.random.default_rng(s), (32, 32, 24), (1, 1, 1))[1] for s in range(16)]
    assert any(not (s == 3).any() for s in segs) and any(not (s == 1).any() for s in segs)
    assert any((s == 1).any() and (s == 3).any() for s in segs)
    sizes = [int((s > 0).sum()) for s in segs]
    assert max(sizes) > 2 * min(sizes)
    centres = np.array([np.argwhere(s > 0).mean(0) for s in segs])
    assert centres.std(0).min() > 1.0


def test_multimodal_contrast():
    """Each tumour part stands out in the modalities real MRI shows it in, and not in the others."""
    ratios = {t: [] for t in ("et_t1c", "et_t2w", "ncr_t1c", "ncr_t2w", "ed_t2f", "ed_t1c")}
    for s in range(4):
        image, seg = make_case(np.random.default_rng(s), (48, 48, 32), (1, 1, 1), label_noise=0.0,
                               tumour_type="both")
        brain = (image[0] > 0) & (seg == 0)
        ref = {m: np.median(image[i][brain]) for i, m in enumerate(MODALITIES)}
        rel = lambda lab, m: float(image[MODALITIES.index(m)][seg == lab].mean() / ref[m])  # noqa: E731
        ratios["et_t1c"].append(rel(3, "t1c"))
        ratios["et_t2w"].append(rel(3, "t2w"))
        ratios["ncr_t1c"].append(rel(1, "t1c"))
        ratios["ncr_t2w"].append(rel(1, "t2w"))
        ratios["ed_t2f"].append(rel(2, "t2f"))
        ratios["ed_t1c"].append(rel(2, "t1c"))
    mean = {k: np.mean(v) for k, v in ratios.items()}
    assert mean["et_t1c"] > 1.3 and mean["et_t1c"] > mean["et_t2w"]
    assert mean["ncr_t1c"] < 1.0 and mean["ncr_t2w"] > 1.3
    assert mean["ed_t2f"] > 1.2 and 0.85 < mean["ed_t1c"] < 1.15
    # the table encodes the overlaps that make single-modality thresholds fail
    t = {name: INTENSITY_TABLE[:, i] for i, name in enumerate(TISSUES)}
    assert abs(t["edema"][0] - t["gm"][0]) < 0.1  # edema ~ GM in t1c
    assert abs(t["necrosis"][3] - t["csf"][3]) < 0.2  # necrosis ~ CSF in t2w
    assert abs(t["wmh"][2] - t["edema"][2]) < 0.2  # WMH ~ edema in t2f


def test_single_modality_threshold_cannot_find_the_whole_tumour():
    image, seg = make_case(np.random.default_rng(2), (48, 48, 32), (1, 1, 1), tumour_type="both")
    brain, wt = image[0] > 0, seg > 0
    for m in range(4):
        values, target = image[m][brain], wt[brain]
        best = 0.0
        for q in np.quantile(values, np.linspace(0.02, 0.98, 49)):
            for pred in (values > q, values < q):
                best = max(best, 2 * (pred & target).sum() / (pred.sum() + target.sum()))
        assert best < 0.9, f"{MODALITIES[m]} alone separates the tumour (Dice {best:.2f})"


def test_label_noise_moves_only_label_boundaries():
    img0, seg0 = make_case(np.random.default_rng(5), SHAPE, (1, 1, 1), label_noise=0.0)
    img1, seg1 = make_case(np.random.default_rng(5), SHAPE, (1, 1, 1), label_noise=1.5)
    np.testing.assert_array_equal(img0, img1)  # the image does not depend on label noise
    wt0, wt1 = seg0 > 0, seg1 > 0
    assert (wt0 != wt1).any()
    dice = 2 * (wt0 & wt1).sum() / (wt0.sum() + wt1.sum())
    assert 0.6 < dice < 0.99
    # disagreements lie near the boundary (within a few label_noise), not anywhere in the volume
    dist = ndimage.distance_transform_edt(wt0) + ndimage.distance_transform_edt(~wt0)
    disagreement = dist[wt0 != wt1]
    assert np.percentile(disagreement, 90) <= 3 * 1.5 and np.median(disagreement) <= 1.5


def test_smooth_field_is_standardised_and_smooth():
    f = smooth_field(np.random.default_rng(0), (32, 30, 20), (1, 1, 1), 6.0)
    assert f.shape == (32, 30, 20) and f.dtype == np.float32
    assert abs(float(f.mean())) < 1e-4 and abs(float(f.std()) - 1) < 1e-3
    white = np.random.default_rng(0).standard_normal(f.shape)
    assert np.abs(np.diff(f, axis=0)).mean() < 0.3 * np.abs(np.diff(white, axis=0)).mean()


def test_defaults_and_argument_checks(repo_root):
    assert inspect.signature(make_case).parameters["shape"].default == (240, 240, 155)
    assert inspect.signature(make_case).parameters["spacing"].default == (1.0, 1.0, 1.0)
    spec = importlib.util.spec_from_file_location("make_synthetic_cli", repo_root / "scripts" / "make_synthetic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    main = module.main
    assert tuple(inspect.signature(main).parameters["shape"].default) == (240, 240, 155)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="shape"):
        make_case(rng, (24, 24), (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        make_case(rng, (24, 24, 16), (1, 0, 1))
    with pytest.raises(ValueError, match="label_noise"):
        make_case(rng, (24, 24, 16), (1, 1, 1), label_noise=-1)
    with pytest.raises(ValueError, match="tumour_type"):
        make_case(rng, (24, 24, 16), (1, 1, 1), tumour_type="big")
