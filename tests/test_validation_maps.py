"""The validation error-map path on crafted cases: which channel is p_WT and which label is GT WT, which voxels
unc_output, variance_stable and var1shot are compared on, what the validation store reads and writes, and the
per-case rows and means that decide model selection and Tables 1-2.

Every channel carries a different value, so that reading the wrong one changes an asserted number.
"""

from __future__ import annotations

import csv
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from monai.utils import CommonKeys as Keys

from custom.model.masks import get_cancer_mask
from custom.training.handlers.error_maps import ValidationErrorMapHandler
from custom.transforms.array import make_case_coordinates
from custom.uncertainty.agreement import uncertainty_agreement
from custom.uncertainty.store import ErrorMapStore
from custom.uncertainty.targets import smooth_failure

N = 14


def _engine(output, epoch=1, metrics=None):
    return SimpleNamespace(state=SimpleNamespace(output=output, epoch=epoch, metrics=metrics or {}, iteration=1,
                                                 batch={}))


def _box(lo, hi, n=N):
    m = torch.zeros(1, 1, n, n, n, dtype=torch.bool)
    m[..., lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    return m


def _case():
    """Regions: GT WT = [3,10)^3, GT TC a different box (so reading TC as WT changes the error map), GT ET inside TC.
    Probabilities: p_WT 0.8 on [4,9)^3 (a prediction that misses part of the tumour), 0.3 elsewhere; p_TC 0.9 on a
    box far from it (a wrong channel would move the mask there); p_ET 0.6 on one corner; unc_output a ramp."""
    label = torch.zeros(1, 3, N, N, N)
    label[:, 0:1][_box((3, 3, 3), (10, 10, 10))] = 1
    label[:, 1:2][_box((3, 3, 3), (6, 6, 6))] = 1
    label[:, 2:3][_box((3, 3, 3), (4, 4, 4))] = 1
    probs = torch.empty(1, 4, N, N, N)
    probs[:, 0] = 0.3
    probs[:, 0:1][_box((4, 4, 4), (9, 9, 9))] = 0.8
    probs[:, 1] = 0.2
    probs[:, 1:2][_box((10, 10, 10), (13, 13, 13))] = 0.9
    probs[:, 2] = 0.1
    probs[:, 2:3][_box((0, 0, 0), (2, 2, 2))] = 0.6
    probs[:, 3] = torch.linspace(0.05, 0.95, N ** 3).reshape(N, N, N)
    return label, probs


def _targets(label):
    coords = torch.from_numpy(make_case_coordinates((N, N, N)))[None]
    return {"label": label, "coords": coords, "case_id": ["c"]}


def test_maps_come_from_p_wt_and_gt_wt_and_share_one_mask(tmp_path):
    """unc_output = channel 3, var1shot = 4 p(1-p) of channel 0, the mask = channel 0 > 0.5 dilated; error_stable
    (a fresh store: the first observation) = smoothed (p_WT > 0.5) xor GT WT, from label channel 0."""
    label, probs = _case()
    store = ErrorMapStore(tmp_path / "store", ema_window=30).create({"c": (N, N, N)})
    out = {Keys.LABEL: _targets(label), Keys.PRED: probs}
    ValidationErrorMapHandler(store, mask_dilation=1)(_engine(out))
    mask = _box((3, 3, 3), (10, 10, 10))   # predicted WT [4,9) dilated by 1
    assert torch.equal(get_cancer_mask(probs[:, 0:1], 1), mask)
    p_wt = probs[:, 0:1]
    torch.testing.assert_close(out["unc_output"], probs[:, 3:4] * mask)
    torch.testing.assert_close(out["var1shot"], 4 * p_wt * (1 - p_wt) * mask)
    failure = ((p_wt > 0.5) != (label[:, 0:1] > 0.5)).float()
    torch.testing.assert_close(out["error_stable"], smooth_failure(failure))
    torch.testing.assert_close(out["variance_stable"], 4 * p_wt * (1 - p_wt) * mask)   # first visit: = var1shot
    # error_stable is the target, read over GT WT by the metrics: never masked by the prediction
    assert out["error_stable"][~mask].sum() > 0


def test_update_store_writes_one_ema_step_and_read_only_leaves_the_store_alone(tmp_path):
    label, probs = _case()
    store = ErrorMapStore(tmp_path / "store", ema_window=30).create({"c": (N, N, N)})
    first = {Keys.LABEL: _targets(label), Keys.PRED: probs}
    ValidationErrorMapHandler(store, mask_dilation=1)(_engine(first))
    after_one = store.full("c")
    assert (after_one["count"] == 1).all()
    # a second, perfect round: the running mean of the two observations
    perfect = probs.clone()
    perfect[:, 0] = torch.where(label[0, 0] > 0, 0.9, 0.1)
    second = {Keys.LABEL: _targets(label), Keys.PRED: perfect}
    ValidationErrorMapHandler(store, mask_dilation=1)(_engine(second))
    torch.testing.assert_close(second["error_stable"], first["error_stable"] / 2)
    assert (store.full("c")["count"] == 2).all()
    # evaluation of a finished run (update_store=False): reads the store, writes nothing
    before = store.full("c")
    third = {Keys.LABEL: _targets(label), Keys.PRED: probs}
    ValidationErrorMapHandler(store, mask_dilation=1, update_store=False)(_engine(third))
    after = store.full("c")
    for key in ("error", "variance", "count"):
        np.testing.assert_array_equal(after[key], before[key])
    torch.testing.assert_close(third["error_stable"][0, 0], torch.from_numpy(before["error"]))
    torch.testing.assert_close(third["variance_stable"][0, 0], torch.from_numpy(before["variance"])
                               * get_cancer_mask(probs[:, 0:1], 1)[0, 0])


def test_without_a_store_the_target_is_this_rounds_smoothed_failure():
    label, probs = _case()
    out = {Keys.LABEL: _targets(label), Keys.PRED: probs}
    ValidationErrorMapHandler(None, mask_dilation=0)(_engine(out))
    p_wt = probs[:, 0:1]
    torch.testing.assert_close(out["error_stable"], smooth_failure(((p_wt > 0.5) != (label[:, 0:1] > 0.5)).float()))
    torch.testing.assert_close(out["variance_stable"], out["var1shot"])
    torch.testing.assert_close(out["var1shot"], 4 * p_wt * (1 - p_wt) * (p_wt > 0.5))


def test_paper_transform_in_validation_uses_each_maps_own_gt_wt_mean(tmp_path):
    """target_transform paper: error_stable, variance_stable AND var1shot each become sigmoid(max(x, 1e-3) - the
    mean of x over GT WT), then the three maps are masked."""
    label, probs = _case()
    out = {Keys.LABEL: _targets(label), Keys.PRED: probs}
    ValidationErrorMapHandler(None, mask_dilation=1, target_transform="paper")(_engine(out))
    p_wt = probs[:, 0:1]
    wt = label[:, 0:1] > 0.5
    mask = get_cancer_mask(p_wt, 1)
    e = smooth_failure(((p_wt > 0.5) != wt).float())
    v = 4 * p_wt * (1 - p_wt)
    paper = {name: torch.sigmoid(torch.clamp_min(x, 1e-3) - x[wt].mean()) for name, x in (("e", e), ("v", v))}
    torch.testing.assert_close(out["error_stable"], paper["e"])
    torch.testing.assert_close(out["var1shot"], paper["v"] * mask)
    torch.testing.assert_close(out["variance_stable"], paper["v"] * mask)
    torch.testing.assert_close(out["unc_output"], probs[:, 3:4] * mask)


# ------------------------------------------------------------------------------------------ metrics and records
def _validated_output(tmp_path):
    """A batch of two cases through two rounds of ValidationErrorMapHandler (case "b": the crafted case; case "a":
    its mirror image with a perfect WT prediction but a missed TC)."""
    label, probs = _case()
    label2, probs2 = torch.flip(label, dims=[2]), torch.flip(probs, dims=[2])
    probs2[:, 0] = torch.where(label2[0, 0] > 0, 0.7, 0.2)
    probs2[:, 1] = 0.1
    labels, all_probs = torch.cat([label, label2]), torch.cat([probs, probs2])
    coords = torch.from_numpy(make_case_coordinates((N, N, N)))[None].repeat(2, 1, 1, 1, 1)
    store = ErrorMapStore(tmp_path / "store", ema_window=30).create({"a": (N, N, N), "b": (N, N, N)})
    targets = {"label": labels, "coords": coords, "case_id": ["b", "a"]}
    # an earlier round with other probabilities, so that variance_stable (the EMA) differs from var1shot: case "b"
    # p_WT 0.6 everywhere, case "a" perfect again (its target stays 0: constant, so it has no correlation)
    earlier = all_probs.clone()
    earlier[0, 0] = 0.6
    earlier[1, 0] = torch.where(label2[0, 0] > 0, 0.9, 0.15)
    ValidationErrorMapHandler(store, mask_dilation=1)(_engine({Keys.LABEL: dict(targets), Keys.PRED: earlier}))
    out = {Keys.LABEL: targets, Keys.PRED: all_probs}
    ValidationErrorMapHandler(store, mask_dilation=1)(_engine(out))
    return out


def _dice(p, g):
    p, g = np.asarray(p, bool), np.asarray(g, bool)
    return 1.0 if p.sum() + g.sum() == 0 else 2 * (p & g).sum() / (p.sum() + g.sum())


def test_per_case_rows_read_each_region_and_each_map_over_gt_wt(tmp_path):
    from custom.training.handlers.validation import ValidationMetricsHandler

    out = _validated_output(tmp_path)
    engine = _engine(out)
    handler = ValidationMetricsHandler(with_uncertainty=True)
    handler.reset(engine)
    handler.update(engine)
    handler.compute(engine)
    rows = {r["case_id"]: r for r in engine.state.per_case_metrics}
    assert [r["case_id"] for r in engine.state.per_case_metrics] == ["a", "b"]
    labels, probs = out[Keys.LABEL]["label"].numpy(), out[Keys.PRED].numpy()
    for b, case_id in enumerate(["b", "a"]):
        row = rows[case_id]
        for c, region in enumerate(("wt", "tc", "et")):
            assert row[f"dice_{region}"] == pytest.approx(_dice(probs[b, c] > 0.5, labels[b, c])), (case_id, region)
        assert row["dice_mean"] == pytest.approx(np.mean([row["dice_wt"], row["dice_tc"], row["dice_et"]]))
        wt = labels[b, 0] > 0.5
        e = out["error_stable"][b, 0].numpy()
        for key, stem in (("unc_output", "unc"), ("variance_stable", "variance_stable"), ("var1shot", "var1shot")):
            x = out[key][b, 0].numpy()
            rmsd = math.sqrt(((x - e)[wt] ** 2).sum() / (wt.sum() + 1e-5))
            assert row[f"rmsd_{stem}"] == pytest.approx(rmsd, rel=1e-5), (case_id, stem)
            _, corr = uncertainty_agreement(x, e, wt)
            if math.isnan(corr):
                assert math.isnan(row[f"corr_{stem}"]), (case_id, stem)
            else:
                assert row[f"corr_{stem}"] == pytest.approx(float(np.corrcoef(x[wt], e[wt])[0, 1]), abs=1e-6)
    # the crafted cases tell the maps apart, and case "a" (perfect WT) has a constant target: no correlation
    assert len({round(rows["b"][f"rmsd_{s}"], 6) for s in ("unc", "variance_stable", "var1shot")}) == 3
    assert math.isnan(rows["a"]["corr_unc"]) and not math.isnan(rows["b"]["corr_unc"])
    # means over cases skip undefined values
    m = engine.state.metrics
    assert m["val_dice_tc"] == pytest.approx((rows["a"]["dice_tc"] + rows["b"]["dice_tc"]) / 2)
    assert m["val_rmsd_var1shot"] == pytest.approx((rows["a"]["rmsd_var1shot"] + rows["b"]["rmsd_var1shot"]) / 2)
    assert m["val_corr_unc"] == pytest.approx(rows["b"]["corr_unc"])


def test_per_case_writer_records_rows_and_means_with_nan_as_null(tmp_path):
    from custom.training.handlers.validation import PerCaseMetricsWriter, ValidationMetricsHandler

    out = _validated_output(tmp_path)
    engine = _engine(out)
    handler = ValidationMetricsHandler(with_uncertainty=True)
    handler.reset(engine)
    handler.update(engine)
    handler.compute(engine)
    engine.state.metrics["val_corr_var1shot"] = float("nan")
    PerCaseMetricsWriter(tmp_path / "eval" / "per_case.csv", tmp_path / "eval" / "summary.json")(engine)
    with open(tmp_path / "eval" / "per_case.csv") as fh:
        written = list(csv.DictReader(fh))
    assert [r["case_id"] for r in written] == ["a", "b"]
    for got, row in zip(written, engine.state.per_case_metrics):
        assert float(got["dice_tc"]) == pytest.approx(row["dice_tc"])
        assert float(got["rmsd_variance_stable"]) == pytest.approx(row["rmsd_variance_stable"])
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text(), parse_constant=lambda c: c)
    assert summary["num_cases"] == 2 and summary["val_corr_var1shot"] is None
    assert summary["val_dice_tc"] == pytest.approx(engine.state.metrics["val_dice_tc"])


def test_best_checkpoint_follows_the_ema_of_the_pseudo_dice(tmp_path):
    """nnU-Net: ema <- 0.9 ema + 0.1 value (the first value taken as is); model.pt is written when the EMA
    improves, not when the raw value does."""
    from custom.training.handlers.validation import PseudoDiceCheckpointHandler

    net = torch.nn.Linear(2, 1)
    handler = PseudoDiceCheckpointHandler(net, tmp_path)
    emas, bests = [], []
    for epoch, value in enumerate([0.5, 0.8, 0.2, 0.6], start=1):
        engine = _engine({}, epoch=epoch, metrics={"val_dice_mean": value})
        handler(engine)
        emas.append(engine.state.metrics["ema_pseudo_dice"])
        bests.append(handler.best_epoch)
    assert emas == pytest.approx([0.5, 0.53, 0.497, 0.5073])
    assert bests == [1, 2, 2, 2]   # the raw 0.6 beats the best EMA 0.53, but the EMA (0.5073) does not
    saved = torch.load(handler.path, weights_only=True)
    assert saved["epoch"] == 2 and saved["ema_pseudo_dice"] == pytest.approx(0.53)
    assert handler.state_dict() == {"ema": pytest.approx(0.5073), "best": pytest.approx(0.53), "best_epoch": 2}
