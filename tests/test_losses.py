"""Region Dice+BCE and the composite uncertainty loss against plain numpy references (custom/training/losses.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from custom.training.losses import (
    PEARSON_VAR_FLOOR,
    CompositeUncertaintyLoss,
    RegionDiceBCELoss,
    deep_supervision_weights,
    downsample_target,
)
from custom.uncertainty.agreement import weighted_pearson, weighted_rmsd


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_rmsd(x, y, w):
    return math.sqrt((w * (x - y) ** 2).sum() / (w.sum() + 1e-5))


def np_pearson(x, y, w, x_var_floor=0.0):
    mx, my = (w * x).sum() / w.sum(), (w * y).sum() / w.sum()
    cov = (w * (x - mx) * (y - my)).sum() / w.sum()
    vx = (w * (x - mx) ** 2).sum() / w.sum()
    vy = (w * (y - my) ** 2).sum() / w.sum()
    return cov / math.sqrt((vx + x_var_floor) * vy)


def test_weighted_rmsd_by_hand():
    x = torch.tensor([[0.1, 0.5, 0.9, 0.3]], dtype=torch.float64)
    y = torch.tensor([[0.2, 0.1, 0.9, 0.0]], dtype=torch.float64)
    w = torch.tensor([[1.0, 1.0, 0.0, 1.0]], dtype=torch.float64)
    r, valid = weighted_rmsd(x, y, w)
    # (0.01 + 0.16 + 0.09) / (3 + 1e-5)
    assert r.item() == pytest.approx(math.sqrt(0.26 / (3 + 1e-5)))
    assert valid.tolist() == [True]
    r0, v0 = weighted_rmsd(x, y, torch.zeros_like(w))
    assert v0.tolist() == [False] and torch.isfinite(r0).all()


def test_weighted_pearson_weights_and_exclusions():
    rng = np.random.default_rng(0)
    x = rng.random((4, 1, 5, 5, 5))
    y = 0.3 * x + rng.random((4, 1, 5, 5, 5))
    w = (rng.random((4, 1, 5, 5, 5)) > 0.4).astype(np.float64)
    w[1] = 0  # empty mask
    y[2] = 0.7  # constant target
    x[3][w[3] > 0] = 0.25  # constant prediction on the mask (varies outside, which must not count)
    corr, valid = weighted_pearson(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(w))
    assert valid.tolist() == [True, False, False, False]
    assert corr[0].item() == pytest.approx(np_pearson(x[0], y[0], w[0]), rel=1e-9)
    assert corr[1:].tolist() == [0, 0, 0]
    # non-binary weights enter as weights
    w2 = rng.random((1, 1, 5, 5, 5))
    c2, _ = weighted_pearson(torch.from_numpy(x[:1]), torch.from_numpy(y[:1]), torch.from_numpy(w2))
    assert c2.item() == pytest.approx(np_pearson(x[0], y[0], w2[0]), rel=1e-9)
    # perfectly (anti-)correlated
    c3, _ = weighted_pearson(torch.from_numpy(x[:1]), torch.from_numpy(1 - 2 * x[:1]), torch.ones(1, 1, 5, 5, 5,
                                                                                                    dtype=torch.float64))
    assert c3.item() == pytest.approx(-1.0)


def test_region_dice_bce_matches_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 3, 4, 4, 4))
    target = (rng.random((2, 3, 4, 4, 4)) > 0.6).astype(np.float64)
    target[1, 2] = 0  # an empty region: dice = smooth / (sum p + smooth)
    p = np_sigmoid(logits)
    dice = []
    for b in range(2):
        for c in range(3):
            dice.append((2 * (p[b, c] * target[b, c]).sum() + 1e-5) / (p[b, c].sum() + target[b, c].sum() + 1e-5))
    bce = np.mean(-(target * np.log(p) + (1 - target) * np.log(1 - p)))
    loss_fn = RegionDiceBCELoss()
    loss = loss_fn(torch.from_numpy(logits), torch.from_numpy(target))
    assert loss.item() == pytest.approx(bce - np.mean(dice), rel=1e-8)
    assert loss_fn.last_terms["dice"].item() == pytest.approx(np.mean(dice))
    # a perfect confident prediction reaches -1
    perfect = torch.from_numpy(np.where(target > 0, 30.0, -30.0))
    assert loss_fn(perfect, torch.from_numpy(target)).item() == pytest.approx(-1.0, abs=1e-5)


def _composite_reference(logits, label, error, weights=(0.4, 0.5, 0.4)):
    seg_target = label
    p = np_sigmoid(logits[:, :3])
    dice = [(2 * (p[b, c] * seg_target[b, c]).sum() + 1e-5) / (p[b, c].sum() + seg_target[b, c].sum() + 1e-5)
            for b in range(len(p)) for c in range(3)]
    bce = np.mean(-(seg_target * np.log(p) + (1 - seg_target) * np.log(1 - p)))
    seg = bce - np.mean(dice)
    unc = np_sigmoid(logits[:, 3:4])
    m = label[:, 0:1]
    mse = np.mean((unc * m - error * m) ** 2)
    rmsds, corrs = [], []
    for b in range(len(unc)):
        w = m[b]
        if w.sum() == 0:
            continue
        rmsds.append(np_rmsd(unc[b], error[b], w))  # every sample with a non-empty mask
        my = (w * error[b]).sum() / w.sum()
        if (w * (error[b] - my) ** 2).sum() / w.sum() <= 1e-10:
            continue  # a constant target has no correlation
        corrs.append(np_pearson(unc[b], error[b], w, PEARSON_VAR_FLOOR))
    rmsd = np.mean(rmsds) if rmsds else 0.0
    corr_term = 1 - np.mean(corrs) if corrs else 0.0
    total = seg + weights[0] * mse + weights[1] * rmsd + weights[2] * corr_term
    return dict(seg=seg, unc_mse=mse, rmsd=rmsd, corr_term=corr_term, total=total, n_valid=len(corrs))


def _batch(rng, b=4):
    logits = rng.normal(size=(b, 4, 6, 6, 6))
    label = np.zeros((b, 3, 6, 6, 6))
    label[:, 0, 1:5, 1:5, 1:5] = 1
    label[:, 1, 2:4, 2:4, 2:4] = 1
    label[:, 2, 2:3, 2:4, 2:4] = 1
    error = rng.random((b, 1, 6, 6, 6))
    return logits, label, error


def test_composite_loss_terms_and_total():
    rng = np.random.default_rng(2)
    logits, label, error = _batch(rng)
    label[1] = 0  # empty mask: excluded from RMSD and corr
    error[2] = 0.3  # constant e on the mask: excluded from corr only
    logits[3, 3] = 0.1  # constant prediction: still counts in both (bounded correlation)
    ref = _composite_reference(logits, label, error)
    assert ref["n_valid"] == 2
    loss_fn = CompositeUncertaintyLoss(unc_weight=0.4, rmsd_weight_cancer=0.5, corr_weight=0.4)
    loss = loss_fn(torch.from_numpy(logits), {"label": torch.from_numpy(label), "error_stable": torch.from_numpy(error)})
    assert loss.item() == pytest.approx(ref["total"], rel=1e-7)
    t = loss_fn.last_terms
    assert t["seg"] == pytest.approx(ref["seg"], rel=1e-6)
    assert t["unc_mse"] == pytest.approx(ref["unc_mse"], rel=1e-6)
    assert t["rmsd"] == pytest.approx(ref["rmsd"], rel=1e-6)
    assert 1 - t["corr"] == pytest.approx(ref["corr_term"], rel=1e-6)
    assert t["n_valid"] == 2 and t["loss"] == pytest.approx(ref["total"], rel=1e-6)
    # other weights, from the config
    loss_fn2 = CompositeUncertaintyLoss(unc_weight=1.0, rmsd_weight_cancer=0.0, corr_weight=2.0)
    loss2 = loss_fn2(torch.from_numpy(logits), {"label": torch.from_numpy(label), "error_stable": torch.from_numpy(error)})
    ref2 = _composite_reference(logits, label, error, weights=(1.0, 0.0, 2.0))
    assert loss2.item() == pytest.approx(ref2["total"], rel=1e-7)


def test_all_samples_excluded_gives_zero_terms_with_graph():
    rng = np.random.default_rng(3)
    logits, label, error = _batch(rng, b=2)
    label[:] = 0
    x = torch.from_numpy(logits).float().requires_grad_(True)
    loss_fn = CompositeUncertaintyLoss()
    loss = loss_fn(x, {"label": torch.from_numpy(label).float(), "error_stable": torch.from_numpy(error).float()})
    assert loss_fn.last_terms["rmsd"] == 0 and loss_fn.last_terms["n_valid"] == 0
    assert loss_fn.last_terms["unc_mse"] == 0
    loss.backward()
    assert torch.isfinite(x.grad).all()
    # empty mask: nothing pushes the uncertainty channel
    assert x.grad[:, 3].abs().max() == 0


def test_targets_detached_and_gradients_flow():
    rng = np.random.default_rng(4)
    logits, label, error = _batch(rng, b=2)
    x = torch.from_numpy(logits).float().requires_grad_(True)
    e = torch.from_numpy(error).float().requires_grad_(True)
    loss = CompositeUncertaintyLoss()(x, {"label": torch.from_numpy(label).float(), "error_stable": e})
    loss.backward()
    assert e.grad is None
    for c in range(4):
        assert x.grad[:, c].abs().sum() > 0
    assert torch.isfinite(x.grad).all()
    # a perfect uncertainty (unc == e) keeps finite gradients
    target = torch.sigmoid(x.detach()[:, 3:4])
    x2 = x.detach().clone().requires_grad_(True)
    CompositeUncertaintyLoss()(x2, {"label": torch.from_numpy(label).float(), "error_stable": target}).backward()
    assert torch.isfinite(x2.grad).all()


def test_without_uncertainty_is_region_loss():
    rng = np.random.default_rng(5)
    logits, label, _ = _batch(rng)
    l3 = torch.from_numpy(logits[:, :3])
    loss_fn = CompositeUncertaintyLoss(with_uncertainty=False)
    got = loss_fn(l3, torch.from_numpy(label))
    assert got.item() == pytest.approx(RegionDiceBCELoss()(l3, torch.from_numpy(label)).item())
    assert loss_fn(l3, {"label": torch.from_numpy(label)}).item() == pytest.approx(got.item())
    with pytest.raises(ValueError, match="channels"):
        loss_fn(torch.from_numpy(logits), torch.from_numpy(label))
    with pytest.raises(ValueError, match="error_stable"):
        CompositeUncertaintyLoss()(torch.from_numpy(logits), {"label": torch.from_numpy(label)})
    with pytest.raises(ValueError, match="unc_weight"):
        CompositeUncertaintyLoss(unc_weight=-1)


def _dilate_np(m, k):
    """26-neighbourhood dilation by ``k`` voxels of a (B, 1, X, Y, Z) 0/1 array (numpy reference)."""
    out = m.copy()
    for _ in range(k):
        pad = np.pad(out, [(0, 0), (0, 0), (1, 1), (1, 1), (1, 1)])
        s = out.shape[2:]
        out = np.max([pad[:, :, i:i + s[0], j:j + s[1], l:l + s[2]]
                      for i in range(3) for j in range(3) for l in range(3)], axis=0)
    return out


def test_paper_head_and_ring_head_masks():
    rng = np.random.default_rng(7)
    b, n = 3, 9
    logits = rng.normal(size=(b, 4, n, n, n))
    label = np.zeros((b, 3, n, n, n))
    label[:, 0, 3:6, 3:6, 4:6] = 1
    label[:, 1, 4:5, 4:5, 4:5] = 1
    label[2] = 0  # empty GT WT: stays empty after dilation (excluded)
    error = rng.random((b, 1, n, n, n))
    target = {"label": torch.from_numpy(label), "error_stable": torch.from_numpy(error)}

    # a ring of 0 voxels is exactly the default (paper) loss: value, logged terms and gradients
    lg_a = torch.from_numpy(logits).requires_grad_(True)
    lg_b = torch.from_numpy(logits).requires_grad_(True)
    ref_fn, k0_fn = CompositeUncertaintyLoss(), CompositeUncertaintyLoss(unc_loss="ring", mask_dilation=0)
    la, lb = ref_fn(lg_a, target), k0_fn(lg_b, target)
    la.backward()
    lb.backward()
    assert la.item() == lb.item() and ref_fn.last_terms == k0_fn.last_terms
    assert torch.equal(lg_a.grad, lg_b.grad)
    assert la.item() == pytest.approx(_composite_reference(logits, label, error)["total"], rel=1e-7)

    # k = 1: the mask grows by one voxel (26-neighbourhood); MSE, RMSD and corr use it
    m1 = _dilate_np(label[:, 0:1], 1)
    assert m1.sum() > label[:, 0:1].sum() and np.all(m1 >= label[:, 0:1]) and m1[2].sum() == 0
    assert m1[0, 0, 2, 2, 3] == 1 and m1[0, 0, 1, 1, 1] == 0
    k1_fn = CompositeUncertaintyLoss(unc_loss="ring", mask_dilation=1)
    k1_fn(torch.from_numpy(logits), target)
    unc = np_sigmoid(logits[:, 3:4])
    assert k1_fn.last_terms["unc_mse"] == pytest.approx(np.mean((unc * m1 - error * m1) ** 2), rel=1e-6)
    rmsd_ref = np.mean([np_rmsd(unc[i], error[i], m1[i]) for i in range(2)])
    corr_ref = np.mean([np_pearson(unc[i], error[i], m1[i], PEARSON_VAR_FLOOR) for i in range(2)])
    assert k1_fn.last_terms["rmsd"] == pytest.approx(rmsd_ref, rel=1e-6)
    assert k1_fn.last_terms["corr"] == pytest.approx(corr_ref, rel=1e-6)
    assert k1_fn.last_terms["n_valid"] == 2

    # the ring voxel gets a gradient only with k > 0; a voxel beyond the ring never does
    for k, ring_grad in ((0, False), (1, True)):
        lg = torch.from_numpy(logits).requires_grad_(True)
        CompositeUncertaintyLoss(unc_loss="paper" if k == 0 else "ring", mask_dilation=k)(lg, target).backward()
        g = lg.grad[0, 3]
        assert (g[2, 2, 3].abs().item() > 0) == ring_grad
        assert g[1, 1, 1].item() == 0.0

    with pytest.raises(ValueError):
        CompositeUncertaintyLoss(unc_loss="ring", mask_dilation=-1)


# ------------------------------------------------------------------ issue 11: bounded correlation, padding, DS
def _corr_term_grad(logit_spread: float, x_var_floor: float | None, n: int = 16, seed: int = 0) -> float:
    """Norm of d(1 - corr)/d(logits of the unc channel) for a prediction of the given logit spread."""
    rng = np.random.default_rng(seed)
    logits = torch.from_numpy(rng.normal(size=(1, 1, n, n, n)) * logit_spread).requires_grad_(True)
    e = torch.from_numpy(rng.random((1, 1, n, n, n)))
    w = torch.ones_like(e)
    kw = {} if x_var_floor is None else {"x_var_floor": x_var_floor}
    corr, valid = weighted_pearson(torch.sigmoid(logits), e, w, **kw)
    assert bool(valid[0])
    (1 - corr[0]).backward()
    return float(logits.grad.norm())


def test_pearson_term_gradient_is_bounded_for_a_near_constant_prediction():
    n = 16
    bound = 0.25 * 2 / math.sqrt(n**3 * PEARSON_VAR_FLOOR)  # sigmoid' <= 1/4 times the bound of weighted_pearson
    for spread in (1e-6, 1e-3, 1e-1, 1.0, 3.0):
        g = _corr_term_grad(spread, PEARSON_VAR_FLOOR, n)
        assert math.isfinite(g) and g <= bound, f"spread {spread}: gradient norm {g} > bound {bound}"
    # the exact form (what the paper's code trains with) blows up as the spread shrinks
    assert _corr_term_grad(1e-3, None, n) > 20 * _corr_term_grad(1e-3, PEARSON_VAR_FLOOR, n)


def test_loss_keeps_a_constant_prediction_in_rmsd_and_corr():
    rng = np.random.default_rng(11)
    logits, label, error = _batch(rng, b=2)
    logits[0, 3] = 0.0  # unc exactly constant on sample 0
    loss_fn = CompositeUncertaintyLoss()
    x = torch.from_numpy(logits).requires_grad_(True)
    loss_fn(x, {"label": torch.from_numpy(label), "error_stable": torch.from_numpy(error)}).backward()
    assert loss_fn.last_terms["n_valid"] == 2
    unc = np_sigmoid(logits[:, 3:4])
    m = label[:, 0:1]
    assert loss_fn.last_terms["rmsd"] == pytest.approx(np.mean([np_rmsd(unc[b], error[b], m[b]) for b in range(2)]),
                                                       rel=1e-6)
    assert torch.isfinite(x.grad).all() and x.grad[0, 3].abs().sum() > 0


def test_dilated_mask_leaves_padding_out():
    """The ring head's dilated mask may reach padding (coords 0): no case voxel, no target, no loss."""
    rng = np.random.default_rng(12)
    n = 8
    logits = rng.normal(size=(1, 4, n, n, n))
    label = np.zeros((1, 3, n, n, n))
    label[0, 0, 0:3, 2:5, 2:5] = 1  # tumour at the patch edge x = 0 ...
    coords = np.ones((1, 3, n, n, n))
    coords[:, :, 0] = 0  # ... where the patch was padded (rotation / crop beyond the case)
    label[:, :, 0] = 0   # padding has label 0
    error = rng.random((1, 1, n, n, n))
    target = {"label": torch.from_numpy(label), "error_stable": torch.from_numpy(error),
              "coords": torch.from_numpy(coords)}
    x = torch.from_numpy(logits).requires_grad_(True)
    CompositeUncertaintyLoss(unc_loss="ring", mask_dilation=2)(x, target).backward()
    assert x.grad[0, 3, 0].abs().max() == 0, "padding voxels of the dilated ring got a gradient"
    assert x.grad[0, 3, 1].abs().max() > 0
    # without coords (or with every voxel valid) the ring does reach x = 0
    x2 = torch.from_numpy(logits).requires_grad_(True)
    CompositeUncertaintyLoss(unc_loss="ring", mask_dilation=2)(
        x2, {k: v for k, v in target.items() if k != "coords"}).backward()
    assert x2.grad[0, 3, 0].abs().max() > 0


def test_deep_supervision_weights_are_nnunets():
    # nnU-Net v2: w_i = 1/2^i, the lowest resolution output weighted 0, normalised
    assert deep_supervision_weights(5) == pytest.approx([8 / 15, 4 / 15, 2 / 15, 1 / 15, 0.0])
    assert deep_supervision_weights(3) == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert deep_supervision_weights(1) == [1.0]


def test_deep_supervision_targets_are_nearest_downsampled():
    t = torch.zeros(1, 3, 8, 8, 8)
    t[0, 0, 3:6, 1:4, 5:8] = 1
    small = downsample_target(t, (4, 4, 4))
    # nearest-exact keeps sample (2j + 1) of every pair
    torch.testing.assert_close(small, t[:, :, 1::2, 1::2, 1::2])
    assert set(small.unique().tolist()) <= {0.0, 1.0}


# --------------------------------------------------------------------------- issue 13: candidate heads
def _region_case(seed=21, n=10):
    """Two samples: GT WT a box, a predicted WT shifted by 2 voxels (false positives outside GT), e and f_s random."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(2, 4, n, n, n))
    label = np.zeros((2, 3, n, n, n))
    label[:, 0, 3:6, 3:6, 3:6] = 1
    logits[:, 0] = -8.0
    logits[:, 0, 5:8, 3:6, 3:6] = 8.0  # predicted WT: x 5..7 (x 6, 7 are false positives)
    error = rng.random((2, 1, n, n, n))
    failure = rng.random((2, 1, n, n, n))
    return logits, label, error, failure


def _np_region(label, logits, k):
    return _dilate_np(((label[:, 0:1] > 0.5) | (logits[:, 0:1] > 0)).astype(float), k)


def test_unknown_head_is_refused():
    with pytest.raises(ValueError, match="unc_loss"):
        CompositeUncertaintyLoss(unc_loss="magic")


def test_two_region_head_adds_a_separately_normalised_ring_term():
    logits, label, error, failure = _region_case()
    target = {"label": torch.from_numpy(label), "error_stable": torch.from_numpy(error)}
    paper, two = CompositeUncertaintyLoss(), CompositeUncertaintyLoss(unc_loss="two_region", mask_dilation=2,
                                                                        ring_weight=0.7)
    lp = paper(torch.from_numpy(logits), target)
    lt = two(torch.from_numpy(logits), target)
    region = _np_region(label, logits, 2)
    ring = region * (1 - label[:, 0:1])
    unc = np_sigmoid(logits[:, 3:4])
    ring_rmsd = np.mean([np_rmsd(unc[b], error[b], ring[b]) for b in range(2)])
    assert two.last_terms["ring_rmsd"] == pytest.approx(ring_rmsd, rel=1e-6)
    # the within-tumour terms are the paper's, untouched
    for key in ("unc_mse", "rmsd", "corr"):
        assert two.last_terms[key] == pytest.approx(paper.last_terms[key], rel=1e-12)
    assert lt.item() == pytest.approx(lp.item() + 0.7 * ring_rmsd, rel=1e-7)
    # gradient: ring voxels (incl. the false positives) get one, voxels beyond the region none
    x = torch.from_numpy(logits).requires_grad_(True)
    CompositeUncertaintyLoss(unc_loss="two_region", mask_dilation=2)(x, target).backward()
    g = x.grad[0, 3].numpy()
    assert np.abs(g[7, 4, 4]) > 0 and np.abs(g[1, 4, 4]) > 0  # false positive, ring
    assert np.all(g[region[0, 0] == 0] == 0)


def test_proper_head_is_bce_against_the_current_failure_over_the_region():
    logits, label, error, failure = _region_case()
    target = {"label": torch.from_numpy(label), "error_stable": torch.from_numpy(error),
              "failure_smoothed": torch.from_numpy(failure)}
    seg_only = RegionDiceBCELoss()(torch.from_numpy(logits), torch.from_numpy(label)).item()
    proper = CompositeUncertaintyLoss(unc_loss="proper", mask_dilation=1, proper_weight=2.0)
    total = proper(torch.from_numpy(logits), target).item()
    region = _np_region(label, logits, 1)
    p = np_sigmoid(logits[:, 3:4])
    bce = -(failure * np.log(p) + (1 - failure) * np.log(1 - p))
    per_sample = [(bce[b] * region[b]).sum() / region[b].sum() for b in range(2)]
    assert proper.last_terms["proper_bce"] == pytest.approx(np.mean(per_sample), rel=1e-6)
    assert total == pytest.approx(seg_only + 2.0 * np.mean(per_sample), rel=1e-7)
    assert "rmsd" not in proper.last_terms  # no paper terms
    # the minimiser is the failure probability: at unc = f_s the head's gradient vanishes inside the region
    at_target = logits.copy()
    at_target[:, 3:4] = np.log(failure / (1 - failure))
    x = torch.from_numpy(at_target).requires_grad_(True)
    CompositeUncertaintyLoss(unc_loss="proper", mask_dilation=1)(x, target).backward()
    assert x.grad[:, 3].abs().max() < 1e-12
    with pytest.raises(ValueError, match="failure_smoothed"):
        proper(torch.from_numpy(logits), {k: v for k, v in target.items() if k != "failure_smoothed"})
    # paper + proper: both
    both = CompositeUncertaintyLoss(unc_loss="paper_proper", mask_dilation=1)
    both(torch.from_numpy(logits), target)
    paper = CompositeUncertaintyLoss()
    paper(torch.from_numpy(logits), target)
    assert both.last_terms["proper_bce"] == pytest.approx(np.mean(per_sample), rel=1e-6)
    assert both.last_terms["rmsd"] == pytest.approx(paper.last_terms["rmsd"], rel=1e-12)
