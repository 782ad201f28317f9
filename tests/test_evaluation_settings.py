"""Evaluation settings on cases whose answer depends on them: the HD95 percentile, the ECE bin count, the region
where uncertainty is scored, the brain mask of QU-BraTS, the uncertainty scale and the voxel spacing read from the
NIfTI header. (Cases where any setting gives the same number, such as perfect or constant maps, test nothing here.)
"""

from __future__ import annotations

import csv
import math

import nibabel as nib
import numpy as np
import pytest

from custom.core.constants import MODALITIES
from custom.evaluation.folder import evaluate_folder
from custom.evaluation.segmentation import evaluate_segmentation, hd95, lesionwise_metrics
from custom.evaluation.surface import robust_hausdorff
from custom.evaluation.uncertainty import expected_calibration_error, qubrats_score, uncertainty_quality


def _box(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


# ------------------------------------------------------------------------------------------ HD95
def test_hd95_is_the_95th_percentile_on_a_case_where_the_percentile_matters():
    """A cube predicted with a thin spike along x: the spike's surfels are a few % of the prediction's surface, so
    the 90th, 95th, 99th and 100th percentiles of their distances differ; HD95 is the 95th percentile of the larger
    direction (prediction -> ground truth here: the cube's own surfels all lie on the prediction's surface)."""
    from custom.evaluation.surface import directed_percentile, surface_distances

    shape = (40, 24, 24)
    gt = _box(shape, (4, 6, 6), (14, 16, 16))
    pred = gt | _box(shape, (14, 10, 10), (30, 11, 11))
    spacing = (1.5, 1.2, 0.8)
    sd = surface_distances(gt, pred, spacing)
    to_gt = {p: directed_percentile(sd.distances_pred_to_gt, sd.areas_pred, p) for p in (90, 95, 99, 100)}
    assert to_gt == {90: 0.0, 95: 9.0, 99: 21.0, 100: 24.0}   # multiples of the 1.5 mm x spacing
    assert directed_percentile(sd.distances_gt_to_pred, sd.areas_gt, 100) == 0.0
    assert hd95(pred, gt, spacing) == 9.0 == robust_hausdorff(gt, pred, spacing, 95)
    assert evaluate_segmentation(pred.astype(np.uint8) * 2, gt.astype(np.uint8) * 2, spacing)["WT"]["legacy_hd95"] \
        == 9.0
    assert hd95(pred, gt, (1.0, 1.0, 1.0)) == 5.0


def test_directed_percentile_takes_the_first_surfel_that_reaches_the_fraction():
    """20 surfels of equal area: the cumulative fraction reaches exactly 0.95 at the 19th, whose distance is the
    95th percentile (surface-distance's ``searchsorted`` on the left); 0.951 needs the 20th."""
    from custom.evaluation.surface import directed_percentile

    distances, areas = np.arange(20, dtype=float), np.ones(20)
    assert directed_percentile(distances, areas, 95) == 18.0
    assert directed_percentile(distances, areas, 95.1) == 19.0
    assert directed_percentile(distances, areas, 100) == 19.0
    # area-weighted: one surfel holding half the area reaches 50 % by itself
    assert directed_percentile(np.array([1.0, 2.0, 3.0]), np.array([1.0, 1.0, 2.0]), 50) == 2.0
    assert directed_percentile(np.array([1.0, 2.0, 3.0]), np.array([1.0, 1.0, 2.0]), 51) == 3.0


# ------------------------------------------------------------------------------------------ ECE
def test_ece_depends_on_the_bin_count():
    # 10 bins: each value alone: (.95 + .15 + .25 + .65) / 4 ; 5 bins: {.05, .15} and {.25, .35}: (.8 + .4) / 4
    p, e = [0.05, 0.15, 0.25, 0.35], [1, 0, 0, 1]
    assert expected_calibration_error(p, e) == pytest.approx(0.5)
    assert expected_calibration_error(p, e, n_bins=10) == pytest.approx(0.5)
    assert expected_calibration_error(p, e, n_bins=5) == pytest.approx(0.3)
    assert expected_calibration_error(p, e, n_bins=20) == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------ region of interest
SHAPE = (40, 36, 36)


def _roi_case():
    """Predicted WT [10,20)^3, true WT shifted by 2 in x: 400 error voxels. The map: 0.95 on errors, 0.85 on
    correct voxels, and 1.0 on a far block of correct background (outside any sensible region)."""
    pred = np.zeros(SHAPE, np.uint8)
    pred[10:20, 10:20, 10:20] = 2
    gt = np.zeros(SHAPE, np.uint8)
    gt[12:22, 10:20, 10:20] = 2
    err = (pred > 0) ^ (gt > 0)
    unc = np.full(SHAPE, 0.85)
    unc[err] = 0.95
    unc[30:36, 30:34, 30:34] = 1.0
    return unc, pred, gt, err


def test_uncertainty_is_scored_inside_the_union_dilated_by_3():
    """Region = (pred WT | true WT) dilated by 3 in the 26-neighbourhood: the box [7,25) x [7,23) x [7,23),
    4608 voxels of which 400 are errors. The far block is outside it: AUROC 1, and the ECE of the region's voxels."""
    unc, pred, gt, err = _roi_case()
    q = uncertainty_quality(unc, pred, gt)
    n_roi, n_err = 18 * 16 * 16, 400
    assert err.sum() == n_err
    assert q["error_fraction_wt"] == pytest.approx(n_err / n_roi)
    assert q["auroc_wt_error"] == pytest.approx(1.0)
    assert q["spearman_wt_error"] == pytest.approx(1.0)
    # 10 bins: .85 (correct) and .95 (errors) apart: (4208 * .85 + 400 * .05) / 4608
    assert q["ece_wt_error"] == pytest.approx((4208 * 0.85 + 400 * 0.05) / n_roi)
    # the whole volume would score the far block: ties with the errors' higher score, AUROC below 1
    everywhere = np.ones(SHAPE, bool)
    from custom.evaluation.uncertainty import auroc

    assert auroc(unc, err, everywhere) < 0.999


def test_region_dilation_and_ece_bins_are_the_callers():
    unc, pred, gt, err = _roi_case()
    q1 = uncertainty_quality(unc, pred, gt, dilation=1)
    assert q1["error_fraction_wt"] == pytest.approx(400 / (14 * 12 * 12))
    # 5 bins: .85 and .95 share the bin [.8, 1]: |4208 * .85 + 400 * .95 - 400| / 4608
    q5 = uncertainty_quality(unc, pred, gt, n_bins=5)
    assert q5["ece_wt_error"] == pytest.approx((4208 * 0.85 + 400 * 0.95 - 400) / 4608)
    assert q5["auroc_wt_error"] == pytest.approx(1.0)


def test_unc_max_rescales_the_map_for_every_measure():
    unc, pred, gt, _ = _roi_case()
    brain = _box(SHAPE, (2, 2, 2), (38, 34, 34))
    a = uncertainty_quality(unc, pred, gt, brain_mask=brain)
    b = uncertainty_quality(unc * 100.0, pred, gt, brain_mask=brain, unc_max=100.0)
    assert a.keys() == b.keys()
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-9, nan_ok=True), key
    # QU-BraTS gets the map on its 0..100 scale
    ref = qubrats_score(unc * 100.0, pred > 0, gt > 0, brain_mask=brain)
    assert a["qubrats_WT"] == pytest.approx(ref["score"])


# ------------------------------------------------------------------------------------------ QU-BraTS brain mask
def test_qubrats_counts_true_negatives_inside_the_brain_only():
    # voxels: a TP unc 0, b TP unc 60, c FP unc 60, d TN unc 0, e TN unc 80; thresholds 100, 50, 0
    unc = np.array([0, 60, 60, 0, 80], float)
    pred = np.array([1, 1, 1, 0, 0], bool)
    gt = np.array([1, 1, 0, 0, 0], bool)
    everywhere = qubrats_score(unc, pred, gt, num_thresholds=3)
    assert everywhere["auc_ftn"] == pytest.approx(0.375)
    # e outside the brain: the only true negative, d, is never filtered -> FTN 0
    no_e = qubrats_score(unc, pred, gt, brain_mask=np.array([1, 1, 1, 1, 0], bool), num_thresholds=3)
    assert no_e["auc_ftn"] == pytest.approx(0.0)
    assert no_e["score"] == pytest.approx((0.95 + 0.625 + 1.0) / 3)
    # d outside the brain: e alone, filtered at t = 0 and 50: FTN = 1, 1, 0 -> AUC 0.75
    no_d = qubrats_score(unc, pred, gt, brain_mask=np.array([1, 1, 1, 0, 1], bool), num_thresholds=3)
    assert no_d["auc_ftn"] == pytest.approx(0.75)


# ------------------------------------------------------------------------------------------ files
def _save(path, arr, spacing):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.diag([*spacing, 1.0])), str(path))


def test_folder_evaluation_reads_spacing_and_brain_from_the_files(tmp_path):
    """An anisotropic (2 x 1 x 1 mm) case on disk: HD95 in mm and the lesion volume threshold in mm^3 use the
    header's spacing (a 30-voxel lesion is 60 mm^3: kept); QU-BraTS counts true negatives inside the brain (the
    nonzero voxels of the modality images beside the ground truth) only."""
    spacing = (2.0, 1.0, 1.0)
    shape = (32, 40, 40)
    cid = "BraTS-GLI-00007-000"
    gt = np.zeros(shape, np.uint8)
    gt[8:14, 10:20, 10:20] = 2
    gt[20:22, 30:35, 30:33] = 2                     # 30 voxels = 60 mm^3 at this spacing
    pred = np.zeros(shape, np.uint8)
    pred[9:15, 10:20, 12:22] = 2
    unc = np.where((gt > 0) ^ (pred > 0), 0.9, 0.0).astype(np.float32)
    unc[2:4, 2:6, 2:6] = 0.7                        # uncertain background: outside the brain below
    brain = np.zeros(shape, np.float32)
    brain[6:30, 6:38, 6:38] = 1.0
    g_dir, p_dir, u_dir = tmp_path / "gt", tmp_path / "pred", tmp_path / "unc"
    _save(g_dir / cid / f"{cid}-seg.nii.gz", gt, spacing)
    for m in MODALITIES:
        _save(g_dir / cid / f"{cid}-{m}.nii.gz", brain, spacing)
    _save(p_dir / f"{cid}.nii.gz", pred, spacing)
    _save(u_dir / f"{cid}-unc.nii.gz", unc, spacing)
    evaluate_folder(p_dir, g_dir, tmp_path / "R", unc_dir=u_dir)
    with open(tmp_path / "R" / "per_case.csv") as fh:
        wt = next(r for r in csv.DictReader(fh) if r["region"] == "WT")
    p, g = pred > 0, gt > 0
    assert float(wt["legacy_hd95"]) == pytest.approx(hd95(p, g, spacing), abs=1e-4)
    assert not math.isclose(hd95(p, g, spacing), hd95(p, g), abs_tol=1e-3)
    lw = lesionwise_metrics(p, g, spacing)
    assert len(lw["lesions"]) == 2 and int(wt["num_fn"]) == 1
    assert float(wt["lesionwise_dice"]) == pytest.approx(lw["lesionwise_dice"], abs=1e-6)
    q_brain = qubrats_score(unc * 100.0, p, g, brain_mask=brain > 0)["score"]
    assert float(wt["qubrats"]) == pytest.approx(q_brain, abs=1e-6)
    assert not math.isclose(q_brain, qubrats_score(unc * 100.0, p, g)["score"], abs_tol=1e-4)
    assert float(wt["auroc_wt_error"]) == pytest.approx(
        uncertainty_quality(unc, pred, gt, brain_mask=brain > 0)["auroc_wt_error"], abs=1e-9)
