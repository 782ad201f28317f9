"""Per-case Dice, uncertainty agreement, the validation metric and its Ignite handler (custom/training/metrics.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine

from custom.training.handlers.validation import ValidationMetricsHandler
from custom.training.metrics import ValidationCaseMetric, dice_per_region
from custom.transforms.array import labels_to_regions
from custom.uncertainty.agreement import uncertainty_agreement
from custom.uncertainty.targets import compute_prediction_variance


def np_pearson(x, y, w):
    mx, my = (w * x).sum() / w.sum(), (w * y).sum() / w.sum()
    cov = (w * (x - mx) * (y - my)).sum() / w.sum()
    return cov / math.sqrt((w * (x - mx) ** 2).sum() / w.sum() * (w * (y - my) ** 2).sum() / w.sum())


def test_dice_per_region_by_hand():
    gt = np.zeros((4, 4, 4), np.uint8)
    gt[0, :2, 0] = 2  # ED: 2 voxels
    gt[1, :2, 0] = 1  # NCR: 2 voxels
    pred = np.zeros_like(gt)
    pred[0, :2, 0] = 2
    pred[1, 0, 0] = 3
    d = dice_per_region(pred, gt)
    # WT: pred 3, gt 4, overlap 3 -> 6/7; TC: pred 1, gt 2, overlap 1 -> 2/3; ET: pred 1, gt 0 -> 0
    assert d["WT"] == pytest.approx(6 / 7) and d["TC"] == pytest.approx(2 / 3) and d["ET"] == 0
    assert d["mean"] == pytest.approx((6 / 7 + 2 / 3) / 3)
    # both empty counts as 1; regions and probabilities accepted
    empty = dice_per_region(np.zeros_like(gt), np.zeros_like(gt))
    assert empty == {"WT": 1.0, "TC": 1.0, "ET": 1.0, "mean": 1.0}
    probs = labels_to_regions(pred) * 0.8 + 0.1
    assert dice_per_region(probs, labels_to_regions(gt)) == pytest.approx(d)


def test_uncertainty_agreement_and_exclusions():
    rng = np.random.default_rng(0)
    x = rng.random((6, 6, 6))
    e = rng.random((6, 6, 6))
    m = rng.random((6, 6, 6)) > 0.5
    r, c = uncertainty_agreement(x, e, m)
    assert r == pytest.approx(math.sqrt(((x - e) ** 2 * m).sum() / (m.sum() + 1e-5)))
    assert c == pytest.approx(np_pearson(x, e, m.astype(float)))
    r0, c0 = uncertainty_agreement(x, e, np.zeros_like(m))
    assert math.isnan(r0) and math.isnan(c0)
    r1, c1 = uncertainty_agreement(np.full_like(x, 0.2), e, m)
    assert not math.isnan(r1) and math.isnan(c1)


def _validation_output(rng, first_case: int = 0):
    """An evaluator output of two cases: probabilities [p_WT, p_TC, p_ET, unc], the targets dict, and the maps
    ValidationErrorMapHandler adds (unc_output, var1shot, error_stable, variance_stable)."""
    gt = np.zeros((2, 8, 8, 8), np.uint8)
    gt[0, 2:6, 2:6, 2:6] = 2
    gt[0, 3:5, 3:5, 3:5] = 3
    gt[1, 1:4, 1:4, 1:4] = 1
    label = torch.stack([labels_to_regions(torch.from_numpy(g)) for g in gt])
    pred = torch.from_numpy(rng.random((2, 4, 8, 8, 8)).astype(np.float32))
    error = torch.from_numpy(rng.random((2, 1, 8, 8, 8)).astype(np.float32))
    variance = torch.from_numpy(rng.random((2, 1, 8, 8, 8)).astype(np.float32))
    ids = [f"case{first_case + b}" for b in range(2)]
    return {"pred": pred, "label": {"label": label, "case_id": ids}, "unc_output": pred[:, 3:4],
            "var1shot": compute_prediction_variance(pred[:, 0:1]), "error_stable": error,
            "variance_stable": variance}


def test_validation_metrics_handler_in_an_engine():
    """The handler (Ignite) wraps the one metric: case means of Dice and of each map's agreement."""
    rng = np.random.default_rng(1)
    outputs = [_validation_output(rng, 2 * i) for i in range(2)]
    engine = Engine(lambda eng, batch: batch)
    ValidationMetricsHandler(with_uncertainty=True).attach(engine)
    state = engine.run(outputs, max_epochs=1)

    cases = [{k: (v["label"][b] if k == "label" else v[b]) for k, v in out.items()} for out in outputs
             for b in range(2)]
    ref_dice = [dice_per_region(c["pred"], c["label"]) for c in cases]
    assert state.metrics["val_dice_mean"] == pytest.approx(np.mean([d["mean"] for d in ref_dice]))
    assert state.metrics["val_dice_wt"] == pytest.approx(np.mean([d["WT"] for d in ref_dice]))
    for source, stem in (("unc_output", "unc"), ("variance_stable", "variance_stable"), ("var1shot", "var1shot")):
        vals = []
        for c in cases:
            x = {"unc_output": c["pred"][3], "variance_stable": c["variance_stable"][0],
                 "var1shot": 4 * c["pred"][0] * (1 - c["pred"][0])}[source]
            vals.append(uncertainty_agreement(x, c["error_stable"][0], c["label"][0]))
        assert state.metrics[f"val_rmsd_{stem}"] == pytest.approx(np.mean([v[0] for v in vals]), rel=1e-6)
        assert state.metrics[f"val_corr_{stem}"] == pytest.approx(np.mean([v[1] for v in vals]), rel=1e-6)
    assert [r["case_id"] for r in state.per_case_metrics] == ["case0", "case1", "case2", "case3"]


def test_metric_skips_undefined_cases_and_names_missing_maps():
    rng = np.random.default_rng(2)
    out = _validation_output(rng)
    out["label"]["label"][1] = 0  # no tumour: agreement undefined for case 1
    metric = ValidationCaseMetric(with_uncertainty=True)
    rows = metric.update(out["label"]["case_id"], out["pred"], out["label"]["label"], out)
    expected = uncertainty_agreement(out["pred"][0, 3], out["error_stable"][0, 0], out["label"]["label"][0, 0])
    assert math.isnan(rows[1]["corr_unc"]) and metric.aggregate()["val_corr_unc"] == pytest.approx(expected[1])
    assert len(metric.rows) == 2 and rows[1]["dice_wt"] == 0.0
    metric.reset()
    assert metric.rows == [] and math.isnan(metric.aggregate()["val_dice_mean"])
    with pytest.raises(KeyError, match="variance_stable"):
        metric.update(["a", "b"], out["pred"], out["label"]["label"],
                      {k: v for k, v in out.items() if k != "variance_stable"})
    no_unc = ValidationCaseMetric(with_uncertainty=False)
    no_unc.update(["a", "b"], out["pred"][:, :3], out["label"]["label"])
    assert set(no_unc.aggregate()) == {"val_dice_wt", "val_dice_tc", "val_dice_et", "val_dice_mean"}
