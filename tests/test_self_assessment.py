"""The held-out self-assessment (custom.evaluation.self_assessment, calibration, bootstrap), by hand.

Every expected number below is worked out on paper from a crafted input where a wrong region, voxel type, bin
count, calibration split, percentile or sort order gives a different answer.
"""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest

from custom.core.errors import BraTSInputError
from custom.evaluation.bootstrap import bootstrap_indices, case_weights, percentile_interval
from custom.evaluation.calibration import (SCORE_GRID_BINS, IsotonicCalibrator, cross_fit_calibrators, ece_bin,
                                           grid_bin, pool_adjacent_violators)
from custom.evaluation.self_assessment import (MethodCases, auroc_and_average_precision, aurc, calibrate_case,
                                               combine_seeds, error_probability_map, evaluate_methods,
                                               predicted_dice, render_markdown,
                                               render_reliability_diagram, render_risk_coverage,
                                               render_seed_markdown, reporting_region, risk_coverage,
                                               summarize_case, summarize_method_case, voxel_types)
from custom.evaluation.uncertainty import auroc as reference_auroc
from custom.evaluation.uncertainty import expected_calibration_error


# ------------------------------------------------------------------------------------------ crafted case
def _crafted_case():
    """15^3 volume: predicted WT a 3^3 cube at [6:9]^3, true WT the cube shifted +1 in x plus one far voxel.

    By hand: region = the cube dilated by 3 in the 26-neighbourhood = [3:12]^3 = 729 voxels; tp = x 7..8 = 18;
    fp = slab x = 6 = 9; missed in region = slab x = 9 = 9; missed outside = voxel (0, 0, 0) = 1;
    tn_region = 729 - 27 - 9 = 693.
    Map (masked to the region): 0.9 on the ring (region minus seg, so missed-in-region and TN), 0.1 inside seg.
    """
    shape = (15, 15, 15)
    seg = np.zeros(shape, bool)
    seg[6:9, 6:9, 6:9] = True
    gt = np.zeros(shape, bool)
    gt[7:10, 6:9, 6:9] = True
    gt[0, 0, 0] = True
    region = np.zeros(shape, bool)
    region[3:12, 3:12, 3:12] = True
    unc = np.where(seg, 0.1, 0.9) * region
    return gt, seg, unc, region


def test_region_is_the_prediction_dilated_by_3_in_the_26_neighbourhood():
    gt, seg, unc, region = _crafted_case()
    assert np.array_equal(reporting_region(seg), region)
    types = voxel_types(gt, seg, region)
    assert {k: int(v.sum()) for k, v in types.items()} == {
        "missed_in_region": 9, "missed_outside_region": 1, "tp": 18, "fp": 9, "tn_region": 693}


def test_voxel_type_figures_of_a_map_high_on_the_ring():
    gt, seg, unc, _ = _crafted_case()
    s = summarize_case("BraTS-GLI-00001-000", gt, seg, unc)  # region from seg: the dilation is under test
    assert s.counts == {"missed_in_region": 9, "missed_outside_region": 1, "tp": 18, "fp": 9, "tn_region": 693}
    # missed (9 at 0.9, 1 outside the region at 0.0) vs tp (18 at 0.1): 9 * 18 / (10 * 18)
    assert s.auroc["missed_vs_tp"] == pytest.approx(0.9, abs=1e-12)
    # thresholds 0.9: 9 TP 0 FP; 0.1: no positive; 0.0: 10 TP 18 FP -> 0.9 * 1 + 0.1 * 10 / 28
    assert s.auprc["missed_vs_tp"] == pytest.approx(0.9 + 0.1 * 10 / 28, abs=1e-12)
    # fp (0.1) all below tn (0.9)
    assert s.auroc["fp_vs_tn"] == 0.0
    assert s.auprc["fp_vs_tn"] == pytest.approx(9 / 702, abs=1e-12)
    # overall: missed-in (9 at 0.9) beat tp (18) and tie tn (693, 1/2 each); fp (9 at 0.1) tie tp (18)
    expected = Fraction(9 * 18 * 2 + 9 * 693 + 9 * 18, 2) / (18 * 711)
    assert s.auroc["overall"] == pytest.approx(float(expected), abs=1e-12)
    assert s.true_dice == pytest.approx(2 * 18 / (2 * 18 + 9 + 10))


# ------------------------------------------------------------------------------------------ ranking
def test_average_precision_by_hand_with_ties():
    # thresholds 0.9: 1 TP 1 FP (P = 1/2); 0.5: 2 TP 2 FP (1/2); 0.1: 3 TP 2 FP (3/5); each adds recall 1/3
    ap = auroc_and_average_precision([0.9, 0.9, 0.5, 0.5, 0.1], [1, 0, 1, 0, 1])[1]
    assert ap == pytest.approx((0.5 + 0.5 + 0.6) / 3, abs=1e-12)
    # AUROC: positive 0.9 ties a 0.9 and beats a 0.5; positive 0.5 ties the 0.5; positive 0.1 beats none
    assert auroc_and_average_precision([0.9, 0.9, 0.5, 0.5, 0.1], [1, 0, 1, 0, 1])[0] == pytest.approx(2 / 6)


def test_ranking_agrees_with_independent_implementations():
    rng = np.random.default_rng(3)
    scores = np.round(rng.random(2000), 2)  # many ties
    labels = rng.random(2000) < 0.2 + 0.5 * scores
    au, ap = auroc_and_average_precision(scores, labels)
    assert au == pytest.approx(reference_auroc(scores, labels), abs=1e-12)
    metrics = pytest.importorskip("sklearn.metrics")
    assert ap == pytest.approx(metrics.average_precision_score(labels, scores), abs=1e-12)


def test_pooled_figures_resolve_tiny_variances():
    # errors at 1e-4, correct voxels at 1e-5: the geometric part of the grid keeps them apart
    shape = (1, 1, 20)
    seg = np.zeros(shape, bool)
    seg[0, 0, 5:15] = True
    gt = seg.copy()
    gt[0, 0, 5:7] = False  # 2 fp
    region = np.ones(shape, bool)
    unc = np.where(gt ^ seg, 1e-4, 1e-5)
    s = summarize_case("a", gt, seg, unc, region=region)
    r = evaluate_methods({"m": MethodCases([s], _identity_calibrator())}, n_boot=20)
    assert r.flat["m.pooled_auroc_fp_vs_tn"] == 1.0
    assert r.flat["m.auroc_fp_vs_tn"] == 1.0
    assert grid_bin([1e-5])[0] != grid_bin([1.2e-5])[0]


# ------------------------------------------------------------------------------------------ calibration
def _identity_calibrator(ids=("validation-only",)):
    """P(error) = lower edge of the map value's grid bin (a calibrator fitted elsewhere)."""
    from custom.evaluation.calibration import SCORE_GRID_EDGES

    return IsotonicCalibrator(SCORE_GRID_EDGES[:-1], ids, 0)


def _flat_case(case_id, values, errors):
    """A case of voxels in a row: all in the region, predicted WT empty, so each error is a missed voxel."""
    values = np.asarray(values, float)[None, None]
    errors = np.asarray(errors, bool)[None, None]
    return summarize_case(case_id, errors, np.zeros_like(errors), values, region=np.ones_like(errors))


def test_pool_adjacent_violators_by_hand():
    assert np.allclose(pool_adjacent_violators([0.1, 0.5, 0.3, 0.9], [1, 1, 1, 1]), [0.1, 0.4, 0.4, 0.9])
    assert np.allclose(pool_adjacent_violators([0.1, 0.5, 0.3, 0.9], [1, 1, 3, 1]), [0.1, 0.35, 0.35, 0.9])


def test_calibrator_learns_the_validation_error_rate_and_is_monotone():
    # map 0.2: 1 error in 4; map 0.8: 3 in 4; map 0.5: 0 in 2 (a violation pooled with its neighbours)
    val = _flat_case("v", [0.2] * 4 + [0.5] * 2 + [0.8] * 4, [1, 0, 0, 0, 0, 0, 1, 1, 1, 0])
    cal = IsotonicCalibrator.fit([val])
    assert cal.fitted_case_ids == {"v"}
    # 0.2 and 0.5 pooled: 1 error in 6
    assert cal.predict([0.2, 0.5, 0.8]) == pytest.approx([1 / 6, 1 / 6, 0.75])
    assert np.all(np.diff(cal.table) >= 0)
    assert cal.predict([0.0])[0] == pytest.approx(1 / 6) and cal.predict([1.0])[0] == pytest.approx(0.75)
    sklearn_iso = pytest.importorskip("sklearn.isotonic")
    ref = sklearn_iso.IsotonicRegression(out_of_bounds="clip").fit(
        [0.2] * 4 + [0.5] * 2 + [0.8] * 4, [1, 0, 0, 0, 0, 0, 1, 1, 1, 0])
    assert cal.predict([0.2, 0.5, 0.8]) == pytest.approx(ref.predict([0.2, 0.5, 0.8]))


def test_calibration_is_fitted_on_validation_cases_and_scored_on_others():
    # validation: at map 0.5 one voxel in 4 is wrong; scored case: every voxel at 0.5 is wrong.
    val = _flat_case("val", [0.5] * 8, [1, 0, 0, 0, 1, 0, 0, 0])
    scored = _flat_case("test", [0.5] * 4, [1, 1, 1, 1])
    cal = IsotonicCalibrator.fit([val])
    r = evaluate_methods({"m": MethodCases([scored], cal)}, n_boot=10)
    # P(error) = 0.25 from validation, observed 1.0 -> ECE 0.75, Brier 0.75^2 (0 if fitted on the scored case)
    assert r.flat["m.ece_calibrated"] == pytest.approx(0.75)
    assert r.flat["m.brier_calibrated"] == pytest.approx(0.5625)
    with pytest.raises(ValueError, match="fitted on case"):
        evaluate_methods({"m": MethodCases([scored], IsotonicCalibrator.fit([scored]))}, n_boot=10)
    with pytest.raises(ValueError, match="fitted on case"):
        calibrate_case(val, cal)


def test_cross_fit_calibrators_never_see_the_case_they_score():
    cases = [_flat_case(f"c{i}", [0.3, 0.6], [i % 2, 1]) for i in range(6)]
    group = {f"c{i}": i % 3 for i in range(6)}
    cals = cross_fit_calibrators(cases, group)
    for cid, cal in cals.items():
        assert cal.fitted_case_ids == {c for c, g in group.items() if g != group[cid]}
    with pytest.raises(ValueError, match=">= 2 groups"):
        cross_fit_calibrators(cases, {c: 0 for c in group})


def test_ece_uses_10_equal_width_bins():
    # 0.62 (error) and 0.68 (correct) share bin 6 of 10: |0.65 - 0.5| = 0.15; with 15 bins they split (0.53)
    case = _flat_case("a", [0.62, 0.68], [1, 0])
    r = evaluate_methods({"m": MethodCases([case], _identity_calibrator())}, n_boot=10)
    assert r.flat["m.ece_raw"] == pytest.approx(0.15)
    assert r.flat["m.brier_raw"] == pytest.approx((0.38 ** 2 + 0.68 ** 2) / 2)
    assert ece_bin([0.62, 0.68]).tolist() == [6, 6]
    assert ece_bin([0.62, 0.68], 15).tolist() == [9, 10]


def test_pooled_calibration_matches_the_voxel_level_definition():
    rng = np.random.default_rng(5)
    cases, voxels = [], []
    for i in range(4):
        shape = (6, 6, 6)
        gt, seg = rng.random(shape) < 0.4, rng.random(shape) < 0.4
        region = reporting_region(seg, 1)
        unc = rng.random(shape) * region
        cases.append(summarize_case(f"c{i}", gt, seg, unc, region=region))
        voxels.append((unc[region], (gt ^ seg)[region]))
    val = [summarize_case(f"v{i}", rng.random((6, 6, 6)) < 0.4, s := rng.random((6, 6, 6)) < 0.4,
                          rng.random((6, 6, 6)) * reporting_region(s, 1)) for i in range(3)]
    cal = IsotonicCalibrator.fit(val)
    r = evaluate_methods({"m": MethodCases(cases, cal)}, n_boot=10)
    u = np.concatenate([v for v, _ in voxels])
    e = np.concatenate([x for _, x in voxels])
    assert r.flat["m.ece_raw"] == pytest.approx(expected_calibration_error(u, e), abs=1e-12)
    assert r.flat["m.ece_calibrated"] == pytest.approx(expected_calibration_error(cal.predict(u), e), abs=1e-12)
    assert r.flat["m.brier_calibrated"] == pytest.approx(np.mean((cal.predict(u) - e) ** 2), abs=1e-12)


# ------------------------------------------------------------------------------------------ case level
def test_predicted_dice_by_hand_for_three_voxels():
    seg = np.array([True, True, False, False])
    region = np.array([True, True, True, False])
    p = np.array([0.2, 0.5, 0.4, 0.9])  # the last voxel is outside the region: ignored
    # E[TP] = 0.8 + 0.5, E[FP] = 0.2 + 0.5, E[FN] = 0.4
    assert predicted_dice(p, seg, region) == pytest.approx(2.6 / (2.6 + 0.7 + 0.4))
    assert predicted_dice(np.zeros(4), np.zeros(4, bool), np.zeros(4, bool)) == 1.0


def test_case_summary_gives_the_voxel_level_predicted_dice():
    rng = np.random.default_rng(7)
    shape = (10, 10, 10)
    gt, seg = rng.random(shape) < 0.3, np.zeros(shape, bool)
    seg[3:7, 3:7, 3:7] = True
    region = reporting_region(seg)
    unc = rng.random(shape) * region
    cal = IsotonicCalibrator.fit([_flat_case("v", rng.random(50), rng.random(50) < 0.3)])
    got = calibrate_case(summarize_case("c", gt, seg, unc), cal).predicted_dice
    assert got == pytest.approx(predicted_dice(cal.predict(unc), seg, region), abs=1e-12)


def test_aurc_by_hand_for_four_cases():
    predicted = [0.8, 0.6, 0.9, 0.3]
    true = [0.9, 0.5, 0.8, 0.1]  # losses 0.1, 0.5, 0.2, 0.9
    coverage, risk = risk_coverage(predicted, true)
    # kept best-predicted first: 0.2 | 0.2, 0.1 | + 0.5 | + 0.9
    assert coverage.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert risk == pytest.approx([0.2, 0.15, 0.8 / 3, 1.7 / 4])
    assert aurc(predicted, true) == pytest.approx((0.2 + 0.15 + 0.8 / 3 + 0.425) / 4)
    assert aurc(true, true) == pytest.approx((0.1 + 0.15 + 0.8 / 3 + 0.425) / 4)  # oracle


def test_aurc_ties_take_the_expectation_over_orders():
    # two cases tied at 0.5 (losses 0 and 1) after one kept first (loss 0.2)
    assert aurc([0.5, 0.5, 0.9], [1.0, 0.0, 0.8]) == pytest.approx((0.2 + 0.35 + 0.4) / 3)
    assert aurc([0.5, 0.5, 0.9], [0.0, 1.0, 0.8]) == pytest.approx((0.2 + 0.35 + 0.4) / 3)


# ------------------------------------------------------------------------------------------ bootstrap
def test_percentile_interval_is_the_central_95_percent():
    assert percentile_interval(np.arange(1001)) == (25.0, 975.0)
    assert percentile_interval(np.arange(1001), ci=90) == (50.0, 950.0)
    assert np.isnan(percentile_interval([np.nan, np.nan])[0])


def test_case_weights_count_draws():
    idx = bootstrap_indices(5, 7, seed=1)
    w = case_weights(idx, 5)
    assert w.sum(1).tolist() == [5] * 7
    assert all(w[b, i] == (idx[b] == i).sum() for b in range(7) for i in range(5))


def _synthetic_cases(n, seed, prefix="c"):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        shape = (12, 12, 12)
        x, y, z = np.indices(shape)
        d = np.sqrt((x - 6) ** 2 + (y - 6) ** 2 + (z - 6) ** 2)
        r = rng.uniform(2.5, 4.5)
        gt = d < r
        seg = d + rng.normal(0, 1.0, shape) < r
        region = reporting_region(seg)
        unc = np.clip(np.exp(-np.abs(d - r)) + rng.normal(0, 0.1, shape), 0, 1) * region
        out.append(summarize_case(f"{prefix}{i:03d}", gt, seg, unc, region=region))
    return out


def test_bootstrap_interval_holds_the_estimate_and_shrinks_with_more_cases():
    val = _synthetic_cases(6, 99, prefix="v")
    cal = IsotonicCalibrator.fit(val)
    widths = []
    for n in (8, 64):
        r = evaluate_methods({"m": MethodCases(_synthetic_cases(n, n), cal)}, n_boot=300, seed=0)
        for key in ("auroc_missed_vs_tp", "pooled_auroc_overall", "spearman_pred_dice", "brier_calibrated"):
            assert r.flat[f"m.{key}_ci_low"] <= r.flat[f"m.{key}"] <= r.flat[f"m.{key}_ci_high"], key
        widths.append(r.flat["m.auroc_missed_vs_tp_ci_high"] - r.flat["m.auroc_missed_vs_tp_ci_low"])
    assert widths[1] < 0.6 * widths[0]
    # a 95 % interval of a mean spans about 2 x 1.96 standard errors (a 90 % one would be 16 % narrower)
    per_case = np.array([row["auroc_missed_vs_tp"] for row in r.per_case])
    per_case = per_case[np.isfinite(per_case)]
    assert 0.93 < widths[1] / (2 * 1.96 * per_case.std() / np.sqrt(per_case.size)) < 1.12


def test_case_level_figures_agree_with_the_per_case_rows():
    cal = IsotonicCalibrator.fit(_synthetic_cases(5, 11, prefix="v"))
    r = evaluate_methods({"m": MethodCases(_synthetic_cases(20, 12), cal)}, n_boot=50)
    pred = np.array([row["predicted_dice"] for row in r.per_case])
    true = np.array([row["true_dice"] for row in r.per_case])
    stats = pytest.importorskip("scipy.stats")
    assert r.flat["m.spearman_pred_dice"] == pytest.approx(stats.spearmanr(pred, true).statistic, abs=1e-12)
    assert r.flat["m.aurc"] == pytest.approx(aurc(pred, true), abs=1e-12)
    assert r.flat["m.aurc_oracle"] == pytest.approx(aurc(true, true), abs=1e-12)
    assert r.flat["m.aurc_random"] == pytest.approx(np.mean(1 - true), abs=1e-12)
    assert r.flat["m.excess_aurc"] == pytest.approx(aurc(pred, true) - aurc(true, true), abs=1e-12)
    assert r.flat["m.aurc_oracle"] <= r.flat["m.aurc"]


# ------------------------------------------------------------------------------------------ methods, seeds, report
def test_paired_scores_use_the_reference_segmentation_and_its_region():
    gt, seg, unc, region = _crafted_case()
    other = np.zeros_like(seg)
    other[6:10, 6:9, 6:9] = True  # a second method's own segmentation
    cal = _identity_calibrator()
    own_ref = summarize_case("a", gt, seg, unc)
    own_other, paired_other = summarize_method_case("a", gt, other, seg, unc * reporting_region(other))
    r = evaluate_methods({"ref": MethodCases([own_ref], cal, [own_ref], cal, forward_passes=1),
                          "other": MethodCases([own_other], cal, [paired_other], cal, forward_passes=8,
                                               seconds_per_case={"a": 2.5})}, n_boot=10)
    for m in ("ref", "other"):
        assert r.flat[f"{m}.paired_n_tn_region"] == 693 and r.flat[f"{m}.paired_n_fp"] == 9
    assert r.flat["other.n_tp"] == 27 and r.flat["other.n_fp"] == 9
    assert r.flat["other.forward_passes"] == 8 and r.flat["other.seconds_per_case"] == 2.5
    assert "ref.seconds_per_case" not in r.flat
    assert {row["target"] for row in r.per_case} == {"own", "paired"}
    with pytest.raises(ValueError, match="same held-out cases"):
        evaluate_methods({"ref": MethodCases([own_ref], cal),
                          "other": MethodCases([summarize_case("b", gt, seg, unc)], cal)}, n_boot=10)


def test_combine_seeds_side_by_side_with_mean_and_sd():
    per_seed = {k: {"unc.auroc_missed_vs_tp": v, "unc.auroc_missed_vs_tp_ci_low": v - 0.1, "n_boot": 10}
                for k, v in zip((0, 1, 2), (0.6, 0.7, 0.8))}
    out = combine_seeds(per_seed)
    assert out["seed1.unc.auroc_missed_vs_tp"] == 0.7
    assert out["seed_mean.unc.auroc_missed_vs_tp"] == pytest.approx(0.7)
    assert out["seed_sd.unc.auroc_missed_vs_tp"] == pytest.approx(0.1)
    assert "seed_mean.unc.auroc_missed_vs_tp_ci_low" not in out and out["n_seeds"] == 3
    text = render_seed_markdown(out)
    assert "| unc | 0.600 | 0.700 | 0.800 | 0.700 +- 0.100 |" in text


def test_markdown_and_figures(tmp_path):
    val = _synthetic_cases(4, 1, prefix="v")
    cases = _synthetic_cases(6, 2)
    cal = IsotonicCalibrator.fit(val)
    r = evaluate_methods({"unc": MethodCases(cases, cal, forward_passes=1),
                          "var1shot": MethodCases(cases, cal, forward_passes=1)}, n_boot=50)
    text = render_markdown(r.flat)
    assert "| | unc | var1shot |" in text and "How to read this" in text
    v, lo, hi = (r.flat[f"unc.auroc_missed_vs_tp{s}"] for s in ("", "_ci_low", "_ci_high"))
    assert f"| AUROC missed vs correctly segmented tumour | {v:.3f} [{lo:.3f}, {hi:.3f}] |" in text
    render_reliability_diagram(r.reliability, tmp_path / "rel.png")
    render_risk_coverage(r.risk_coverage, tmp_path / "rc.png")
    for name in ("rel.png", "rc.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_is_named():
    gt, seg, unc, region = _crafted_case()
    with pytest.raises(ValueError, match="shapes differ"):
        summarize_case("a", gt, seg, unc[:-1])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        summarize_case("a", gt, seg, unc * 4)
    with pytest.raises(ValueError, match="must contain the predicted WT"):
        summarize_case("a", gt, seg, unc, region=np.zeros_like(region))
    with pytest.raises(ValueError, match="NaN"):
        summarize_case("a", gt, seg, np.where(region, np.nan, 0.0))
    s = summarize_case("a", gt, seg, unc)
    with pytest.raises(ValueError, match="no '.'"):
        evaluate_methods({"a.b": MethodCases([s], _identity_calibrator())})
    with pytest.raises(ValueError, match="table"):
        IsotonicCalibrator(np.linspace(1, 0, SCORE_GRID_BINS), [], 0)


# ------------------------------------------------------------------------------ the deployable calibration
def test_error_probability_map_of_a_new_case_matches_the_scored_predicted_dice(tmp_path):
    """What inference writes for a new case (P(error) map, predicted Dice) is what the study scores: the same
    calibrator, the same region, the same Dice; the saved and loaded calibrator gives the same answer."""
    gt, seg, unc, region = _crafted_case()
    # validation: map 0.9 wrong 3 in 4, map 0.1 wrong 1 in 4 (distinct rates: a swapped or raw map would show)
    val = _flat_case("v", [0.9] * 4 + [0.1] * 4, [1, 1, 1, 0, 1, 0, 0, 0])
    cal = IsotonicCalibrator.fit([val])
    path = cal.save(tmp_path / "calibration.json", map="unc_output", reporting_dilation=3)
    loaded = IsotonicCalibrator.load(path)
    assert np.array_equal(loaded.table, cal.table) and loaded.fitted_case_ids == {"v"}
    p, dice_pred = error_probability_map(unc, seg, loaded)
    # inside the region: the calibrated rate of the map value (0.1 in seg -> 0.25, 0.9 on the ring -> 0.75)
    assert p.dtype == np.float32 and p.shape == seg.shape
    assert np.all(p[~region] == 0.0)
    assert p[7, 7, 7] == pytest.approx(0.25) and p[4, 4, 4] == pytest.approx(0.75)
    # by hand: seg 27 voxels at 0.25 -> E[TP] 20.25, E[FP] 6.75; ring 702 voxels at 0.75 -> E[FN] 526.5
    assert dice_pred == pytest.approx(40.5 / (40.5 + 6.75 + 526.5), abs=1e-6)
    assert dice_pred == pytest.approx(predicted_dice(cal.predict(unc) * region, seg, region), abs=1e-6)
    assert dice_pred == pytest.approx(calibrate_case(summarize_case("c", gt, seg, unc), cal).predicted_dice, abs=1e-6)
    # a map that is 1 far outside the region says nothing there
    far = unc.copy()
    far[0, 0, 0] = 1.0
    assert error_probability_map(far, seg, loaded)[0][0, 0, 0] == 0.0


@pytest.mark.parametrize("content, problem", [
    ("not json", "cannot read it as JSON"),
    ('{"format": "other"}', "format must be 'brats-unc-isotonic-v1', got 'other'"),
    ('{"format": "brats-unc-isotonic-v1", "grid_edges": [0, 1], "p_error": [0.5]}', "score grid (2 edges)"),
])
def test_a_bad_calibration_file_is_named(tmp_path, content, problem):
    path = tmp_path / "calibration.json"
    path.write_text(content)
    with pytest.raises(BraTSInputError, match=str(path)) as err:
        IsotonicCalibrator.load(path)
    assert problem in str(err.value)
    # a table that decreases is refused (a hand-edited or corrupted file)
    cal = IsotonicCalibrator.fit([_flat_case("v", [0.2, 0.8], [0, 1])])
    doc = json.loads(cal.save(tmp_path / "ok.json").read_text())
    doc["p_error"][0] = 0.9
    path.write_text(json.dumps(doc))
    with pytest.raises(BraTSInputError, match="non-decreasing"):
        IsotonicCalibrator.load(path)
    with pytest.raises(BraTSInputError, match="file not found"):
        IsotonicCalibrator.load(tmp_path / "missing.json")
