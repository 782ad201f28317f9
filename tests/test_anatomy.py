"""Synthetic cases on real anatomy (custom.data.anatomy): BraTS layout, determinism, realism checks, named errors.

The realism checks run on 20 cases at 3 mm (a 180x216x156 mm field of view holds the brain at its real size,
so volumes are 1 mm equivalents without any zoom correction) to keep the file under ~30 s on two cores.
"""

from __future__ import annotations

import inspect
import sys

import nibabel as nib
import numpy as np
import pytest
from conftest import run_cmd
from scipy import ndimage

from custom.core.constants import MODALITIES
from custom.core.errors import BraTSInputError
from custom.data.anatomy import fit_zoom, load_template, make_anatomy_case
from custom.data.synthetic import make_affine, make_case, write_dataset

GRID, SPACING = (60, 72, 52), (3.0, 3.0, 3.0)
NUM_CASES = 20
FILES = [f"{m}.nii.gz" for m in MODALITIES] + ["seg.nii.gz"]

# Reference region volumes (ml) for adult glioma in BraTS. We could not open a published table of BraTS
# 2021/2023 region-volume statistics while writing this test (no network), so the bands below are deliberately
# wide and the figures behind them are UNVERIFIED recollections, not citations: whole-tumour volumes of
# BraTS adult gliomas span roughly 10 to 250+ ml with a median of the order of 90-100 ml; the tumour core is
# typically a third of the whole tumour (median some 30-40 ml) and the enhancing tumour some 15-25 ml; a
# minority of cases (mostly lower-grade gliomas, of the order of 5-15 %) have no enhancing tumour. Replace the
# bands with the numbers of a checked source (e.g. the BraTS 2021 summary paper, Baid et al. arXiv:2107.02314,
# or statistics computed on the released BraTS 2023 GLI labels) when one is at hand.
WT_MEDIAN_ML = (40.0, 160.0)
WT_RANGE_ML = (5.0, 400.0)
TC_MEDIAN_ML = (10.0, 60.0)
ET_MEDIAN_ML = (5.0, 40.0)  # over cases that have an enhancing tumour
TC_OVER_WT_MEDIAN = (0.15, 0.6)
BRAIN_ML = (1100.0, 2100.0)  # skull-stripped adult brain with cerebellum (the MNI152 mask is ~1.9 l at scale 1)


def _tree_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cases():
    """NUM_CASES cases as write_dataset draws them (seed 0), with their deformed tissue maps."""
    assert fit_zoom(GRID, SPACING) == 1.0
    out = []
    for i in range(NUM_CASES):
        image, seg, tissue = make_anatomy_case(np.random.default_rng([0, i]), GRID, SPACING, 0.5,
                                               return_tissue=True)
        out.append((image, seg, tissue))
    return out


def test_signature_mirrors_make_case():
    blob = inspect.signature(make_case).parameters
    anat = inspect.signature(make_anatomy_case).parameters
    assert list(anat)[: len(blob)] == list(blob)
    for name, param in blob.items():
        assert anat[name].default == param.default and anat[name].kind == param.kind, name


def test_labels_nested_and_inside_the_brain(cases):
    for image, seg, tissue in cases:
        assert image.shape == (4,) + GRID and image.dtype == np.float32 and seg.dtype == np.uint8
        brain = image[0] > 0
        # skull stripped: all four contrasts exactly 0 outside one brain mask, positive inside
        assert (image[:, ~brain] == 0).all() and (image[:, brain] > 0).all()
        np.testing.assert_array_equal(brain, tissue["brain"])
        assert set(np.unique(seg)) <= {0, 1, 2, 3}
        wt, tc, ncr = seg > 0, np.isin(seg, (1, 3)), seg == 1
        assert wt.sum() > 50 and not (wt & ~brain).any()
        # the core (NCR, ET) is wrapped in edema: its 6-neighbourhood stays inside the whole tumour
        assert tc.any() and not (ndimage.binary_dilation(tc) & ~wt).any()
        if ncr.any() and (seg == 3).any():
            assert not (ndimage.binary_dilation(ncr) & ~tc).any(), "necrosis enclosed by the enhancing rim"


def test_tissue_contrasts_ordered_as_in_real_mri(cases):
    """Per modality, the median over (nearly) pure tissue voxels outside the tumour, pooled over cases."""
    ratios = {m: {"gm": [], "csf": [], "ed": [], "et": [], "ncr": []} for m in MODALITIES}
    for image, seg, tissue in cases:
        normal = seg == 0
        masks = {"wm": normal & (tissue["wm"] > 0.8), "gm": normal & (tissue["gm"] > 0.6),
                 "csf": normal & (tissue["csf"] > 0.8), "ed": seg == 2, "et": seg == 3, "ncr": seg == 1}
        for c, m in enumerate(MODALITIES):
            ref = np.median(image[c][masks["wm"]])
            for t in ratios[m]:
                if masks[t].sum() >= 5:
                    ratios[m][t].append(np.median(image[c][masks[t]]) / ref)
    r = {m: {t: float(np.median(v)) for t, v in d.items()} for m, d in ratios.items()}
    # T1 (native and post-contrast): WM > GM > CSF; enhancing tumour bright only after contrast
    for m in ("t1n", "t1c"):
        assert 1.0 > r[m]["gm"] > r[m]["csf"], (m, r[m])
    assert r["t1c"]["et"] > 1.3 and r["t1n"]["et"] < 1.0 and r["t1c"]["ncr"] < r["t1c"]["gm"]
    # T2: CSF > GM > WM, edema and necrosis bright
    assert r["t2w"]["csf"] > r["t2w"]["gm"] > 1.0 and r["t2w"]["ed"] > 1.3 and r["t2w"]["ncr"] > 1.3
    # FLAIR: CSF suppressed (darker than both), GM slightly above WM, edema bright
    assert r["t2f"]["csf"] < 0.6 and 1.0 < r["t2f"]["gm"] < 1.6 and r["t2f"]["ed"] > 1.3


def test_edema_spreads_mostly_in_white_matter(cases):
    fractions = []
    for _, seg, tissue in cases:
        ed = seg == 2
        fractions.append(float((tissue["wm"][ed] > tissue["gm"][ed]).mean()))
    pooled_ok = np.median(fractions)
    assert pooled_ok > 0.6, fractions
    assert min(fractions) > 0.3, fractions
    # and more than the white-matter share of the brain around it would give by chance
    share = [float((t["wm"] > t["gm"])[t["brain"]].mean()) for _, _, t in cases]
    assert np.median(fractions) > np.median(share) + 0.1, (fractions, share)


def test_region_volumes_in_the_range_brats_reports(cases):
    ml = float(np.prod(SPACING)) / 1000.0
    wt = np.array([(seg > 0).sum() * ml for _, seg, _ in cases])
    tc = np.array([np.isin(seg, (1, 3)).sum() * ml for _, seg, _ in cases])
    et = np.array([(seg == 3).sum() * ml for _, seg, _ in cases])
    ncr = np.array([(seg == 1).sum() * ml for _, seg, _ in cases])
    brain = np.array([t["brain"].sum() * ml for _, _, t in cases])
    assert WT_MEDIAN_ML[0] <= np.median(wt) <= WT_MEDIAN_ML[1], wt
    assert WT_RANGE_ML[0] <= wt.min() and wt.max() <= WT_RANGE_ML[1], wt
    assert np.percentile(wt, 90) > 1.5 * np.percentile(wt, 10), "sizes vary"
    assert TC_MEDIAN_ML[0] <= np.median(tc) <= TC_MEDIAN_ML[1], tc
    assert ET_MEDIAN_ML[0] <= np.median(et[et > 0]) <= ET_MEDIAN_ML[1], et
    assert TC_OVER_WT_MEDIAN[0] <= np.median(tc / wt) <= TC_OVER_WT_MEDIAN[1], tc / wt
    assert BRAIN_ML[0] <= brain.min() and brain.max() <= BRAIN_ML[1], brain
    # as in BraTS, some cases have no enhancing tumour or no necrosis, most have both
    assert (et == 0).sum() >= 1 and ((et > 0) & (ncr > 0)).sum() >= NUM_CASES // 2


def test_no_two_brains_identical(cases):
    brains = [t["brain"] for _, _, t in cases[:6]]
    wms = [t["wm"] for _, _, t in cases[:6]]
    for i in range(len(brains)):
        for j in range(i + 1, len(brains)):
            a, b = brains[i], brains[j]
            dice = 2 * (a & b).sum() / (a.sum() + b.sum())
            assert dice < 0.97, (i, j, dice)
            assert np.corrcoef(wms[i].ravel(), wms[j].ravel())[0, 1] < 0.95


@pytest.mark.parametrize("tumour_type, absent", [("no_et", 3), ("no_ncr", 1), ("both", None)])
def test_tumour_types(tumour_type, absent):
    _, seg = make_anatomy_case(np.random.default_rng(3), GRID, SPACING, tumour_type=tumour_type)
    labels = set(np.unique(seg).tolist())
    assert 2 in labels and (labels >= {1, 2, 3} if absent is None else absent not in labels)


def test_label_noise_moves_only_label_boundaries():
    img0, seg0 = make_anatomy_case(np.random.default_rng(5), GRID, SPACING, label_noise=0.0)
    img1, seg1 = make_anatomy_case(np.random.default_rng(5), GRID, SPACING, label_noise=1.0)
    np.testing.assert_array_equal(img0, img1)
    wt0, wt1 = seg0 > 0, seg1 > 0
    dice = 2 * (wt0 & wt1).sum() / (wt0.sum() + wt1.sum())
    assert 0.6 < dice < 0.995
    dist = ndimage.distance_transform_edt(wt0) + ndimage.distance_transform_edt(~wt0)
    assert np.percentile(dist[wt0 != wt1], 90) <= 4.0


def test_mass_effect_pushes_tissue_near_the_tumour_only():
    _, seg0, t0 = make_anatomy_case(np.random.default_rng(7), GRID, SPACING, mass_effect=0.0, return_tissue=True)
    _, seg1, t1 = make_anatomy_case(np.random.default_rng(7), GRID, SPACING, mass_effect=1.0, return_tissue=True)
    changed = np.abs(t1["wm"] - t0["wm"]) > 0.2
    assert changed.sum() > 20
    dist_mm = ndimage.distance_transform_edt(seg1 == 0, sampling=SPACING)
    assert np.median(dist_mm[changed]) < 15.0
    # the brain outline moves little: the push decays away from the tumour
    a, b = t0["brain"], t1["brain"]
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.98


def test_small_field_of_view_shrinks_the_brain_to_fit():
    assert fit_zoom((240, 240, 155), (1, 1, 1)) == 1.0
    assert fit_zoom((96, 96, 64), (2, 2, 2.4)) > 0.95
    zoom = fit_zoom((40, 40, 28), (1, 1, 1))
    assert 0.1 < zoom < 0.3
    image, seg = make_anatomy_case(np.random.default_rng(0), (40, 40, 28), (1, 1, 1))
    brain = image[0] > 0
    assert 0.1 < brain.mean() < 0.5 and (seg > 0).any()
    # the brain is whole: nothing touches the left/right/front/back faces of the field of view
    assert not brain[[0, -1]].any() and not brain[:, [0, -1]].any()


def test_cli_layout_determinism_and_id_offset(tmp_path):
    args = ["--num_cases", 2, "--shape", "[32,40,28]", "--spacing", "[6,6,6]", "--anatomy", "mni152"]
    for name, extra in (("a", []), ("d", ["--id_offset", 500])):
        run_cmd([sys.executable, "scripts/make_synthetic.py", "--out_dir", tmp_path / name, *args, *extra])
    # the same arguments in this process (another process, another template load) and another seed
    for name, seed in (("b", 0), ("c", 1)):
        write_dataset(tmp_path / name, 2, (32, 40, 28), (6, 6, 6), seed, anatomy="mni152")
    a, b, c, d = (_tree_bytes(tmp_path / n) for n in "abcd")
    expected = {f"BraTS-GLI-{i:05d}-000/BraTS-GLI-{i:05d}-000-{f}" for i in range(2) for f in FILES}
    assert set(a) == expected and a == b, "same seed must give the same bytes"
    assert all(a[k] != c[k] for k in a if not k.endswith("seg.nii.gz"))
    # id_offset renames the cases without changing them
    assert {k.replace("-005", "-000", 2) for k in d} == set(a)
    assert all(d[k] == a[k.replace("-005", "-000", 2)] for k in d)
    affine = make_affine((32, 40, 28), (6, 6, 6))
    case = tmp_path / "a" / "BraTS-GLI-00000-000"
    for f in FILES:
        img = nib.load(case / f"BraTS-GLI-00000-000-{f}")
        assert img.shape == (32, 40, 28)
        np.testing.assert_allclose(img.affine, affine)


def test_write_dataset_rejects_unknown_anatomy(tmp_path):
    with pytest.raises(ValueError, match="anatomy"):
        write_dataset(tmp_path, 1, (16, 16, 16), anatomy="atlas")
    with pytest.raises(ValueError, match="id_offset"):
        write_dataset(tmp_path, 1, (16, 16, 16), id_offset=-1)
    assert not any(tmp_path.iterdir())


def test_missing_nilearn_is_a_named_error(monkeypatch, tmp_path):
    load_template.cache_clear()
    monkeypatch.setitem(sys.modules, "nilearn", None)  # import nilearn -> ModuleNotFoundError
    try:
        with pytest.raises(BraTSInputError, match="nilearn") as info:
            write_dataset(tmp_path, 1, (32, 40, 28), (6, 6, 6), anatomy="mni152")
        assert "pip install 'nilearn==0.14.1'" in str(info.value)
        assert "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz" in str(info.value)
    finally:
        monkeypatch.undo()
        load_template.cache_clear()
    assert load_template().maps.shape[0] == 3
