"""Per-case Dice, uncertainty agreement, Ignite metrics and last-K averaging (custom/training/metrics.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from ignite.exceptions import NotComputableError

from custom.evaluation.runs import last_k_mean
from custom.training.metrics import RegionDiceMetric, UncertaintyAgreementMetric, dice_per_region
from custom.transforms.array import labels_to_regions
from custom.uncertainty.agreement import uncertainty_agreement


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


def test_last_k_mean():
    assert last_k_mean([1, 2, 3, 4], 2) == 3.5
    assert last_k_mean([1, None, 3, float("nan"), 5], 2) == 4.0
    assert last_k_mean([2.0], 30) == 2.0
    assert math.isnan(last_k_mean([None, float("nan")], 3))
    with pytest.raises(ValueError):
        last_k_mean([1], 0)


def _validation_batch(rng):
    """Two cases: probabilities [p_WT, p_TC, p_ET, unc], GT regions, error/variance stable."""
    gt = np.zeros((2, 8, 8, 8), np.uint8)
    gt[0, 2:6, 2:6, 2:6] = 2
    gt[0, 3:5, 3:5, 3:5] = 3
    gt[1, 1:4, 1:4, 1:4] = 1
    label = torch.stack([labels_to_regions(torch.from_numpy(g)) for g in gt])
    pred = torch.from_numpy(rng.random((2, 4, 8, 8, 8)).astype(np.float32))
    error = torch.from_numpy(rng.random((2, 1, 8, 8, 8)).astype(np.float32))
    variance = torch.from_numpy(rng.random((2, 1, 8, 8, 8)).astype(np.float32))
    return {"pred": pred, "label": label, "error_stable": error, "variance_stable": variance}


def test_ignite_metrics_in_an_engine():
    rng = np.random.default_rng(1)
    batches = [_validation_batch(rng) for _ in range(2)]
    engine = Engine(lambda eng, batch: batch)
    RegionDiceMetric(region="mean").attach(engine, "dice_mean")
    RegionDiceMetric(region="WT").attach(engine, "dice_wt")
    for source in ("unc_output", "variance_stable", "var1shot"):
        for stat in ("rmsd", "corr"):
            UncertaintyAgreementMetric(source=source, stat=stat).attach(engine, f"{stat}_{source}")
    state = engine.run(batches, max_epochs=1)

    cases = [{k: v[b] for k, v in batch.items()} for batch in batches for b in range(2)]
    ref_dice = [dice_per_region(c["pred"], c["label"]) for c in cases]
    assert state.metrics["dice_mean"] == pytest.approx(np.mean([d["mean"] for d in ref_dice]))
    assert state.metrics["dice_wt"] == pytest.approx(np.mean([d["WT"] for d in ref_dice]))
    for source in ("unc_output", "variance_stable", "var1shot"):
        vals = []
        for c in cases:
            x = {"unc_output": c["pred"][3], "variance_stable": c["variance_stable"][0],
                 "var1shot": 4 * c["pred"][0] * (1 - c["pred"][0])}[source]
            vals.append(uncertainty_agreement(x, c["error_stable"][0], c["label"][0]))
        assert state.metrics[f"rmsd_{source}"] == pytest.approx(np.mean([v[0] for v in vals]), rel=1e-6)
        assert state.metrics[f"corr_{source}"] == pytest.approx(np.mean([v[1] for v in vals]), rel=1e-6)


def test_metric_accepts_decollated_lists_and_skips_undefined_cases():
    rng = np.random.default_rng(2)
    batch = _validation_batch(rng)
    decollated = [{k: v[b] for k, v in batch.items()} for b in range(2)]
    decollated[1]["label"] = torch.zeros_like(decollated[1]["label"])  # no tumour: agreement undefined
    m = UncertaintyAgreementMetric(source="unc_output", stat="corr")
    m.reset()
    m.update(decollated)
    expected = uncertainty_agreement(decollated[0]["pred"][3], decollated[0]["error_stable"], decollated[0]["label"][0])
    assert m.compute() == pytest.approx(expected[1])
    assert m.results()["n_cases"] == 2
    d = RegionDiceMetric(region="ET")
    d.reset()
    with pytest.raises(NotComputableError):
        d.compute()
    d.update(decollated)
    assert d.per_case.shape == (2, 3)
    with pytest.raises(ValueError, match="source"):
        UncertaintyAgreementMetric(source="entropy")
    with pytest.raises(KeyError, match="variance_stable"):
        mv = UncertaintyAgreementMetric(source="variance_stable")
        mv.update([{"pred": batch["pred"][0], "label": batch["label"][0], "error_stable": batch["error_stable"][0]}])
