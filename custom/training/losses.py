"""nnU-Net region loss and the paper's composite uncertainty loss (METHOD.md, "Composite loss").

    L = L_seg + unc_weight * L_unc + rmsd_weight_cancer * mean_b(RMSD_b) + corr_weight * (1 - mean_b(corr_b))

with M = ground-truth WT, unc = sigmoid(logit channel 3), e = error_stable (a constant target).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from custom.model.masks import get_cancer_mask
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


class RegionDiceBCELoss(nn.Module):
    """nnU-Net's region loss: ``BCE-with-logits (mean) + (-soft Dice)``, weights 1:1.

    The Dice term is ``-dice`` (as nnU-Net's ``MemoryEfficientSoftDiceLoss``), averaged over regions
    and samples (per-sample Dice, no batch Dice; all regions count, there is no background channel),
    so the loss lies in [-1, inf) and reaches -1 + 0 for a perfect prediction.

    ``forward(logits (B, 3, …), target (B, 3, …))`` -> scalar. ``last_terms`` holds ``dice``/``bce`` tensors.
    """

    def __init__(self, smooth: float = 1e-5, weight_dice: float = 1.0, weight_ce: float = 1.0):
        super().__init__()
        self.smooth = float(smooth)
        self.weight_dice = float(weight_dice)
        self.weight_ce = float(weight_ce)
        self.last_terms: dict = {}

    def forward(self, logits: torch.Tensor, target) -> torch.Tensor:
        if isinstance(target, Mapping):  # the targets dict of the uncertainty pipeline
            target = target["label"]
        if logits.shape != target.shape:
            raise ValueError(f"RegionDiceBCELoss: logits {tuple(logits.shape)} vs target {tuple(target.shape)}")
        target = target.to(logits.dtype)
        dice = soft_dice_per_sample(torch.sigmoid(logits), target, self.smooth).mean()
        bce = F.binary_cross_entropy_with_logits(logits, target)
        self.last_terms = {"dice": dice.detach(), "bce": bce.detach()}
        return self.weight_ce * bce - self.weight_dice * dice


def _masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over valid samples; 0 (graph kept) when none is valid."""
    v = valid.to(values.dtype)
    return (values * v).sum() / torch.clamp_min(v.sum(), 1.0)


def _deep_supervision_weights(n: int) -> list:
    """nnU-Net: weights 1/2^i, the lowest resolution head ignored, normalised to sum 1."""
    w = [1.0 / (2**i) for i in range(n)]
    if n > 1:
        w[-1] = 0.0
    s = sum(w)
    return [x / s for x in w]


class CompositeUncertaintyLoss(nn.Module):
    """``L_seg + unc_weight L_unc + rmsd_weight_cancer mean_b RMSD_b + corr_weight (1 - mean_b corr_b)``.

    - ``L_seg``: :class:`RegionDiceBCELoss` on channels 0..2 against the region target.
    - ``L_unc = mean((unc M - e M)^2)`` over all voxels, ``unc = sigmoid(logits[:, 3])``, ``M`` = GT WT.
    - ``RMSD_b``, ``corr_b``: :func:`weighted_rmsd`, :func:`weighted_pearson` with weights ``M``.
      A sample with an empty mask, or with zero weighted variance of unc or e, is left out of both
      means (METHOD.md); with ``exclude_constant_from_rmsd=False`` only empty masks leave the RMSD mean.
      When no sample is valid the term is 0 (graph kept).
    - ``e`` (error_stable) is detached: a constant target.

    Args:
        unc_weight, rmsd_weight_cancer, corr_weight: term weights (paper: 0.4, 0.5, 0.4).
        with_uncertainty: False -> plain region loss on 3-channel logits (``target`` is the region tensor
            or a dict with ``"label"``).
        smooth: soft Dice smoothing.
        unc_mask_dilation: 0 (the paper) -> ``M`` = GT WT; ``k > 0`` -> ``M`` = GT WT dilated by ``k`` voxels
            (26-neighbourhood, as :func:`custom.model.masks.get_cancer_mask`) for the MSE, RMSD and Pearson terms,
            so that the ring just outside the tumour, where inference reports unc_output, is trained too.

    ``forward(logits (B, 4, X, Y, Z), target)`` with ``target = {"label": (B, 3, …) regions,
    "error_stable": (B, 1, …)}``. With deep supervision, ``logits`` may be ``(B, H, C, …)`` (DynUNet's
    stacked heads, all at full resolution): segmentation is supervised on every head with nnU-Net's
    weights, the uncertainty terms on the full-resolution head only.
    After each call ``last_terms`` holds floats: loss, seg, dice, bce, unc_mse, rmsd, corr, n_valid.
    """

    def __init__(self, unc_weight: float = 0.4, rmsd_weight_cancer: float = 0.5, corr_weight: float = 0.4,
                 with_uncertainty: bool = True, smooth: float = 1e-5, exclude_constant_from_rmsd: bool = True,
                 unc_mask_dilation: int = 0):
        super().__init__()
        if int(unc_mask_dilation) != unc_mask_dilation or int(unc_mask_dilation) < 0:
            raise ValueError(f"unc_mask_dilation must be an integer >= 0, got {unc_mask_dilation}")
        self.unc_mask_dilation = int(unc_mask_dilation)
        for name, val in (("unc_weight", unc_weight), ("rmsd_weight_cancer", rmsd_weight_cancer),
                          ("corr_weight", corr_weight)):
            if float(val) < 0:
                raise ValueError(f"{name} must be >= 0, got {val}")
        self.unc_weight = float(unc_weight)
        self.rmsd_weight_cancer = float(rmsd_weight_cancer)
        self.corr_weight = float(corr_weight)
        self.with_uncertainty = bool(with_uncertainty)
        self.exclude_constant_from_rmsd = bool(exclude_constant_from_rmsd)
        self.seg_loss = RegionDiceBCELoss(smooth=smooth)
        self.last_terms: dict = {}

    def _unpack(self, logits, target):
        if isinstance(target, Mapping):
            if "label" not in target:
                raise KeyError(f"CompositeUncertaintyLoss: target dict needs 'label', got keys {list(target)}")
            label, error = target["label"], target.get("error_stable")
        else:
            label, error = target, None
        if self.with_uncertainty and error is None:
            raise ValueError("CompositeUncertaintyLoss(with_uncertainty=True) needs target['error_stable']")
        return label, error

    def forward(self, logits: torch.Tensor, target) -> torch.Tensor:
        label, error = self._unpack(logits, target)
        heads = logits.ndim == label.ndim + 1
        n_out = 4 if self.with_uncertainty else 3
        channels = logits.shape[2] if heads else logits.shape[1]
        if channels != n_out:
            raise ValueError(f"CompositeUncertaintyLoss(with_uncertainty={self.with_uncertainty}) expects "
                             f"{n_out} channels, got logits {tuple(logits.shape)}")
        label = label.to(logits.dtype)
        if heads:
            weights = _deep_supervision_weights(logits.shape[1])
            seg = sum(w * self.seg_loss(logits[:, i, :3], label) for i, w in enumerate(weights) if w > 0)
            logits = logits[:, 0]
            self.seg_loss(logits[:, :3], label)  # last_terms of the full-resolution head
        else:
            seg = self.seg_loss(logits[:, :3], label)
        terms = {"seg": seg.detach(), **self.seg_loss.last_terms}
        total = seg
        if self.with_uncertainty:
            e = error.detach().to(logits.dtype)
            mask = label[:, 0:1]
            if self.unc_mask_dilation > 0:
                mask = get_cancer_mask(mask > 0.5, dilation=self.unc_mask_dilation).to(logits.dtype)
            if e.shape != mask.shape:
                raise ValueError(f"error_stable {tuple(e.shape)} must be (B,1,…) like the WT mask {tuple(mask.shape)}")
            unc = torch.sigmoid(logits[:, 3:4])
            unc_mse = torch.mean((unc * mask - e * mask) ** 2)
            rmsd, rmsd_valid = weighted_rmsd(unc, e, mask)
            corr, corr_valid = weighted_pearson(unc, e, mask)
            if self.exclude_constant_from_rmsd:
                rmsd_valid = corr_valid
            rmsd_mean = _masked_mean(rmsd, rmsd_valid)
            corr_mean = _masked_mean(corr, corr_valid)
            corr_term = torch.where(corr_valid.any(), 1.0 - corr_mean, torch.zeros_like(corr_mean))
            total = (total + self.unc_weight * unc_mse + self.rmsd_weight_cancer * rmsd_mean
                     + self.corr_weight * corr_term)
            terms.update(unc_mse=unc_mse.detach(), rmsd=rmsd_mean.detach(), corr=corr_mean.detach(),
                         n_valid=corr_valid.sum().detach().to(logits.dtype))
        terms["loss"] = total.detach()
        names = list(terms)
        # one device->host transfer for all logged terms
        self.last_terms = dict(zip(names, torch.stack([terms[k].float().reshape(()) for k in names]).tolist()))
        return total
