"""nnU-Net region loss (with nnU-Net's deep supervision) and the paper's composite uncertainty loss.

    L = L_seg + unc_weight * L_unc + rmsd_weight_cancer * mean_b(RMSD_b) + corr_weight * (1 - mean_b(corr_b))

with M = ground-truth WT (valid case voxels only), unc = sigmoid(logit channel 3), e = error_stable (a constant
target). METHOD.md, "Composite loss"; the two places where this departs from the paper's code are said in
:class:`CompositeUncertaintyLoss` and bundle/docs/README.md. ``unc_loss`` selects how the head is trained
(:data:`UNC_LOSSES`): the paper's terms, or candidates that also train it where inference reads it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from custom.core.cli import as_bool
from custom.model.masks import get_cancer_mask, training_cancer_mask
from custom.uncertainty.agreement import weighted_pearson, weighted_rmsd


def soft_dice_per_sample(probs: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """nnU-Net soft Dice ``(2 sum(p y) + smooth) / (sum p + sum y + smooth)`` per sample and channel.

    Args:
        probs: ``(B, C, X, Y, Z)`` probabilities.
        target: ``(B, C, X, Y, Z)`` 0/1 regions.
    Returns:
        ``(B, C)`` Dice values.
    """
    dims = tuple(range(2, probs.ndim))
    intersect = (probs * target).sum(dims)
    denom = probs.sum(dims) + target.sum(dims)
    return (2.0 * intersect + smooth) / torch.clamp_min(denom + smooth, 1e-8)


def deep_supervision_weights(n: int) -> list[float]:
    """nnU-Net's deep-supervision weights for ``n`` outputs (highest resolution first): ``1/2^i``, the lowest
    resolution output weighted 0, normalised to sum 1; e.g. 5 outputs -> [8, 4, 2, 1, 0] / 15."""
    if n < 1:
        raise ValueError(f"need at least one output, got {n}")
    w = [1.0 / (2**i) for i in range(n)]
    if n > 1:
        w[-1] = 0.0
    total = sum(w)
    return [x / total for x in w]


def downsample_target(target: torch.Tensor, shape) -> torch.Tensor:
    """Region target ``(B, C, X, Y, Z)`` resized to ``shape`` as nnU-Net does for deep supervision: nearest
    (``nearest-exact``, the pixel-centre convention), values stay 0/1."""
    if tuple(target.shape[2:]) == tuple(shape):
        return target
    return F.interpolate(target.float(), size=tuple(int(s) for s in shape), mode="nearest-exact").to(target.dtype)


class RegionDiceBCELoss(nn.Module):
    """nnU-Net's region loss: ``BCE-with-logits (mean) + (-soft Dice)``, weights 1:1.

    The Dice term is ``-dice`` (as nnU-Net's ``MemoryEfficientSoftDiceLoss``), averaged over regions
    and samples (per-sample Dice, no batch Dice; all regions count, there is no background channel),
    so the loss lies in [-1, inf) and reaches -1 + 0 for a perfect prediction.

    ``forward(logits, target (B, 3, …))`` -> scalar. ``logits`` is ``(B, 3, …)``, or nnU-Net's deep-supervision
    list ``[full, 1/2, ...]`` (:class:`custom.model.networks.TrainingDynUNet`): then the loss is
    ``sum_i w_i loss(logits_i, target resized to logits_i)`` with :func:`deep_supervision_weights`.
    Only the first 3 channels of the logits are used. ``last_terms`` holds the full-resolution ``dice``/``bce``.
    """

    def __init__(self, smooth: float = 1e-5, weight_dice: float = 1.0, weight_ce: float = 1.0):
        super().__init__()
        self.smooth = float(smooth)
        self.weight_dice = float(weight_dice)
        self.weight_ce = float(weight_ce)
        self.last_terms: dict = {}

    def _single(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict]:
        logits = logits[:, :3]
        if logits.shape != target.shape:
            raise ValueError(f"RegionDiceBCELoss: logits {tuple(logits.shape)} vs target {tuple(target.shape)}")
        target = target.to(logits.dtype)
        dice = soft_dice_per_sample(torch.sigmoid(logits), target, self.smooth).mean()
        bce = F.binary_cross_entropy_with_logits(logits, target)
        return self.weight_ce * bce - self.weight_dice * dice, {"dice": dice.detach(), "bce": bce.detach()}

    def forward(self, logits, target) -> torch.Tensor:
        if isinstance(target, Mapping):  # the targets dict of the uncertainty pipeline
            target = target["label"]
        if not isinstance(logits, (list, tuple)):
            loss, self.last_terms = self._single(logits, target)
            return loss
        total, terms = None, {}
        for i, (head, weight) in enumerate(zip(logits, deep_supervision_weights(len(logits)))):
            # a head weighted 0 still enters (with zero gradient), so DDP sees every parameter used
            loss, head_terms = self._single(head, downsample_target(target, head.shape[2:]))
            total = weight * loss if total is None else total + weight * loss
            if i == 0:
                terms = head_terms
        self.last_terms = terms
        return total


def _masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over valid samples; 0 (graph kept) when none is valid."""
    v = valid.to(values.dtype)
    return (values * v).sum() / torch.clamp_min(v.sum(), 1.0)


#: variance floor of the predicted map in the loss's Pearson term (std 0.01 on a [0, 1] map): bounds its
#: gradient when the head's output is nearly flat (see :func:`custom.uncertainty.agreement.weighted_pearson`)
PEARSON_VAR_FLOOR = 1e-4

#: how the uncertainty head is trained (config value ``unc_loss``); see :class:`CompositeUncertaintyLoss`
UNC_LOSSES = ("paper", "ring", "two_region", "proper", "paper_proper")


def reporting_region(gt_wt: torch.Tensor, p_wt: torch.Tensor, mask_dilation: int,
                     valid: torch.Tensor | None = None) -> torch.Tensor:
    """bool ``(B, 1, …)``: where the head is read at inference, seen from a training patch: (GT WT union the
    predicted WT ``p_wt > 0.5``) dilated by ``mask_dilation`` as :func:`custom.model.masks.get_cancer_mask` does
    at inference, restricted to case voxels (``valid``)."""
    region = get_cancer_mask((gt_wt > 0.5) | (p_wt > 0.5), dilation=mask_dilation)
    return region if valid is None else region & valid


class CompositeUncertaintyLoss(nn.Module):
    """``L_seg`` plus the uncertainty head's terms, as ``unc_loss`` selects.

    The paper's terms over a mask ``M``:
    ``unc_weight L_unc + rmsd_weight_cancer mean_b RMSD_b + corr_weight (1 - mean_b corr_b)`` with
    - ``L_unc = mean((unc M - e M)^2)`` over all voxels, ``unc = sigmoid(logits[:, 3])`` at full resolution;
    - ``RMSD_b``: :func:`weighted_rmsd` over ``M``; every sample with a non-empty ``M`` counts;
    - ``corr_b``: :func:`weighted_pearson` over ``M`` in its bounded form (``x_var_floor`` =
      :data:`PEARSON_VAR_FLOOR`): a near-constant prediction gets a bounded gradient instead of one that grows as
      1/std; a sample counts when its target ``e`` varies over ``M``. When no sample counts the term is 0.
      (The paper's code divides by ``std(unc) std(e)`` and drops samples of near-zero variance from both RMSD and
      correlation; these are the two departures, bundle/docs/README.md.)
    - ``e`` (error_stable) is detached: a constant target. Only case voxels count (``target["coords"] > 0``).

    ``unc_loss``:
    - ``"paper"``: the paper's terms over ``M`` = GT WT. The head never sees a voxel outside the tumour.
    - ``"ring"``: the paper's terms over ``M`` = GT WT dilated by ``mask_dilation``.
    - ``"two_region"``: the paper's terms over GT WT unchanged, plus ``ring_weight mean_b RMSD_b`` over the rest
      of the reporting region (:func:`reporting_region` minus GT WT), normalised separately so the ring's many
      correct voxels cannot dilute the within-tumour terms.
    - ``"proper"``: a proper scoring rule over the reporting region: ``proper_weight`` times the per-sample mean
      BCE of ``unc`` against the current smoothed failure ``f_s`` (``target["failure_smoothed"]``); its
      minimiser is the probability that the voxel is wrong.
    - ``"paper_proper"``: the paper's terms over GT WT plus the proper term.

    Args:
        unc_weight, rmsd_weight_cancer, corr_weight: paper term weights (paper: 0.4, 0.5, 0.4).
        with_uncertainty: False -> plain region loss on 3-channel logits (``target`` is the region tensor
            or a dict with ``"label"``).
        smooth: soft Dice smoothing.
        unc_loss: one of :data:`UNC_LOSSES`.
        mask_dilation: voxels of dilation of the reporting region (inference's, 3) for ring/two_region/proper.
        ring_weight: weight of the ring RMSD of ``two_region``.
        proper_weight: weight of the BCE of ``proper`` / ``paper_proper``.

    ``forward(logits, target)`` with ``logits (B, 4, X, Y, Z)`` or the deep-supervision list (full resolution
    first; the uncertainty terms use the full-resolution output only) and ``target = {"label": (B, 3, …) regions,
    "error_stable": (B, 1, …), "failure_smoothed": (B, 1, …) (proper losses), "coords": (B, 3, …) (optional)}``.
    After each call ``last_terms`` holds floats: loss, seg, dice, bce, unc_mse, rmsd, corr, n_valid (+ ring_rmsd,
    proper_bce).
    """

    def __init__(self, unc_weight: float = 0.4, rmsd_weight_cancer: float = 0.5, corr_weight: float = 0.4,
                 with_uncertainty: bool = True, smooth: float = 1e-5, unc_loss: str = "paper",
                 mask_dilation: int = 3, ring_weight: float = 0.5, proper_weight: float = 1.0):
        super().__init__()
        if unc_loss not in UNC_LOSSES:
            raise ValueError(f"unc_loss must be one of {UNC_LOSSES}, got {unc_loss!r}")
        if int(mask_dilation) != mask_dilation or int(mask_dilation) < 0:
            raise ValueError(f"mask_dilation must be an integer >= 0, got {mask_dilation}")
        for name, val in (("unc_weight", unc_weight), ("rmsd_weight_cancer", rmsd_weight_cancer),
                          ("corr_weight", corr_weight), ("ring_weight", ring_weight), ("proper_weight", proper_weight)):
            if float(val) < 0:
                raise ValueError(f"{name} must be >= 0, got {val}")
        self.unc_loss = unc_loss
        self.mask_dilation = int(mask_dilation)
        self.unc_weight = float(unc_weight)
        self.rmsd_weight_cancer = float(rmsd_weight_cancer)
        self.corr_weight = float(corr_weight)
        self.ring_weight = float(ring_weight)
        self.proper_weight = float(proper_weight)
        self.with_uncertainty = as_bool(with_uncertainty, "with_uncertainty")
        self.seg_loss = RegionDiceBCELoss(smooth=smooth)
        self.last_terms: dict = {}

    def _unpack(self, target):
        if isinstance(target, Mapping):
            if "label" not in target:
                raise KeyError(f"CompositeUncertaintyLoss: target dict needs 'label', got keys {list(target)}")
            return target["label"], target
        return target, {}

    def _paper_terms(self, total: torch.Tensor, unc: torch.Tensor, e: torch.Tensor, mask: torch.Tensor,
                     terms: dict) -> torch.Tensor:
        unc_mse = torch.mean((unc * mask - e * mask) ** 2)
        rmsd, rmsd_valid = weighted_rmsd(unc, e, mask)
        corr, corr_valid = weighted_pearson(unc, e, mask, x_var_floor=PEARSON_VAR_FLOOR)
        rmsd_mean = _masked_mean(rmsd, rmsd_valid)
        corr_mean = _masked_mean(corr, corr_valid)
        corr_term = torch.where(corr_valid.any(), 1.0 - corr_mean, torch.zeros_like(corr_mean))
        terms.update(unc_mse=unc_mse.detach(), rmsd=rmsd_mean.detach(), corr=corr_mean.detach(),
                     n_valid=corr_valid.sum().detach().to(unc.dtype))
        # added to total one by one, in this order (the loss value is reproducible bit for bit)
        return total + self.unc_weight * unc_mse + self.rmsd_weight_cancer * rmsd_mean + self.corr_weight * corr_term

    def _uncertainty_terms(self, total: torch.Tensor, full: torch.Tensor, label: torch.Tensor, target: Mapping,
                           terms: dict) -> torch.Tensor:
        dtype = full.dtype
        coords = target.get("coords")
        valid = None if coords is None else (coords > 0).all(dim=1, keepdim=True)
        gt_wt = label[:, 0:1]
        unc_logit = full[:, 3:4]
        unc = torch.sigmoid(unc_logit)
        if self.unc_loss in ("paper", "ring", "two_region", "paper_proper"):
            e = target.get("error_stable")
            if e is None:
                raise ValueError(f"CompositeUncertaintyLoss(unc_loss={self.unc_loss!r}) needs target['error_stable']")
            e = e.detach().to(dtype)
            dilation = self.mask_dilation if self.unc_loss == "ring" else 0
            mask = training_cancer_mask(gt_wt, dilation, valid).to(dtype)
            if e.shape != mask.shape:
                raise ValueError(f"error_stable {tuple(e.shape)} must be (B,1,…) like the WT mask {tuple(mask.shape)}")
            total = self._paper_terms(total, unc, e, mask, terms)
        if self.unc_loss in ("two_region", "proper", "paper_proper"):
            p_wt = torch.sigmoid(full[:, 0:1].detach())
            region = reporting_region(gt_wt, p_wt, self.mask_dilation, valid)
        if self.unc_loss == "two_region":
            ring = (region & ~(gt_wt > 0.5)).to(dtype)
            ring_rmsd, ring_valid = weighted_rmsd(unc, e, ring)
            ring_mean = _masked_mean(ring_rmsd, ring_valid)
            terms["ring_rmsd"] = ring_mean.detach()
            total = total + self.ring_weight * ring_mean
        if self.unc_loss in ("proper", "paper_proper"):
            f_s = target.get("failure_smoothed")
            if f_s is None:
                raise ValueError(f"CompositeUncertaintyLoss(unc_loss={self.unc_loss!r}) needs "
                                 "target['failure_smoothed'] (set by ErrorMapHandler)")
            f_s = f_s.detach().to(dtype)
            w = region.to(dtype)
            bce = F.binary_cross_entropy_with_logits(unc_logit, f_s, reduction="none")
            dims = tuple(range(1, bce.ndim))
            count = w.sum(dims)
            per_sample = (bce * w).sum(dims) / count.clamp_min(1.0)
            proper = _masked_mean(per_sample, count > 0)
            terms["proper_bce"] = proper.detach()
            total = total + self.proper_weight * proper
        return total

    def forward(self, logits, target) -> torch.Tensor:
        label, target_dict = self._unpack(target)
        full = logits[0] if isinstance(logits, (list, tuple)) else logits
        n_out = 4 if self.with_uncertainty else 3
        if full.ndim != label.ndim or full.shape[1] != n_out:
            raise ValueError(f"CompositeUncertaintyLoss(with_uncertainty={self.with_uncertainty}) expects {n_out} "
                             f"channels, got logits {tuple(full.shape)} for the target {tuple(label.shape)}")
        label = label.to(full.dtype)
        seg = self.seg_loss(logits, label)
        terms = {"seg": seg.detach(), **self.seg_loss.last_terms}
        total = seg
        if self.with_uncertainty:
            total = self._uncertainty_terms(total, full, label, target_dict, terms)
        terms["loss"] = total.detach()
        names = list(terms)
        # one device->host transfer for all logged terms
        self.last_terms = dict(zip(names, torch.stack([terms[k].float().reshape(()) for k in names]).tolist()))
        return total
