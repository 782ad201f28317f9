"""The error-map handlers: the uncertainty target of each patch (training) and of each case (validation)."""

from __future__ import annotations

from typing import Mapping

import torch
from ignite.engine import Engine

from custom.model.masks import get_cancer_mask
from custom.uncertainty.targets import (
    compute_prediction_failure,
    compute_prediction_variance,
    paper_target_transform,
    smooth_failure,
)


def case_ids(targets: Mapping) -> list[str]:
    ids = targets.get("case_id")
    if ids is None:
        raise KeyError("targets have no 'case_id'; use custom.training.batch.UncertaintyPrepareBatch")
    return [ids] if isinstance(ids, str) else [str(c) for c in ids]


def _check_target_transform(target_transform: str) -> str:
    if target_transform not in ("none", "paper"):
        raise ValueError(f"target_transform must be 'none' or 'paper', got {target_transform!r}")
    return target_transform


def _update_and_gather(store, ids, coords, failure_smoothed, var1shot, device):
    """EMA step at the patch's case voxels, then read back: the target includes this iteration's observation."""
    if hasattr(store, "update_and_gather_batch"):  # one coordinate analysis per patch instead of two
        return store.update_and_gather_batch(ids, coords, failure_smoothed, var1shot, device=device)
    store.scatter_batch(ids, coords, failure_smoothed, var1shot)
    return store.gather_batch(ids, coords, device=device)


def _error_map_step(store, targets: Mapping, p_wt: torch.Tensor, gt_wt: torch.Tensor, target_transform: str,
                    update_store: bool = True):
    """The shared error-map step of training and validation, all ``(B, 1, ...)``.

    ``p_WT`` vs GT WT -> failure -> 3x3x3 smoothing, and ``var1shot``; with a store, the EMA step at the
    case coordinates of ``targets`` (or a plain read when ``update_store`` is False) gives ``error_stable``
    and ``variance_stable``; without one, they are this observation itself.
    Returns ``(error_stable, variance_stable, var1shot)``.
    """

    failure_smoothed = smooth_failure(compute_prediction_failure(p_wt, gt_wt))
    var1shot = compute_prediction_variance(p_wt)
    if store is None:
        error_stable, variance_stable = failure_smoothed, var1shot
    else:
        ids, coords = case_ids(targets), targets["coords"]
        if update_store:
            error_stable, variance_stable = _update_and_gather(store, ids, coords, failure_smoothed, var1shot,
                                                               p_wt.device)
        else:
            error_stable, variance_stable = store.gather_batch(ids, coords, device=p_wt.device)
    if target_transform == "paper":
        error_stable = paper_target_transform(error_stable, gt_wt.to(error_stable.device))
    return error_stable, variance_stable, var1shot


class ErrorMapHandler:
    """Training: the uncertainty target ``error_stable`` of each patch, from the case-space EMA store.

    Attached at ``IterationEvents.FORWARD_COMPLETED`` of the ``SupervisedTrainer`` (after the forward pass,
    before the loss): ``p_WT = sigmoid(pred[:, 0])`` (detached) -> failure vs GT WT -> 3x3x3 smoothing ->
    ``store.scatter_batch`` at the patch's case coordinates -> ``store.gather_batch`` ->
    ``targets["error_stable"]`` (B,1,…) in place, so the loss receives it. ``var1shot`` is scattered the
    same way and ``variance_stable`` gathered into ``targets["variance_stable"]``.

    Args:
        store: :class:`custom.uncertainty.store.ErrorMapStore` holding the fold's cases.
        target_transform: ``"none"`` (error_stable as is) or ``"paper"`` (``paper_target_transform``).
    """

    def __init__(self, store, target_transform: str = "none") -> None:
        if store is None:
            raise ValueError("ErrorMapHandler needs the fold's ErrorMapStore (the training target comes from it)")
        self.store = store
        self.target_transform = _check_target_transform(target_transform)

    def attach(self, engine: Engine) -> None:
        from monai.engines.utils import IterationEvents

        engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, self)

    @torch.no_grad()
    def __call__(self, engine: Engine) -> None:
        from monai.utils import CommonKeys as Keys

        output = engine.state.output
        targets = output[Keys.LABEL]
        if not isinstance(targets, dict):
            raise TypeError("ErrorMapHandler needs the targets dict of UncertaintyPrepareBatch(with_uncertainty=True)")
        pred = output[Keys.PRED]
        if isinstance(pred, (list, tuple)):  # deep supervision: full-resolution head first
            pred = pred[0]
        if pred.ndim == 6:  # DynUNet stacks deep-supervision heads on dim 1 in training
            pred = pred[:, 0]
        p_wt = torch.sigmoid(pred[:, 0:1].detach().float())
        gt_wt = targets["label"][:, 0:1].float()
        error_stable, variance_stable, _ = _error_map_step(self.store, targets, p_wt, gt_wt, self.target_transform)
        targets["error_stable"] = error_stable
        targets["variance_stable"] = variance_stable


class ValidationErrorMapHandler:
    """Validation: full-volume outputs and the validation cases' own ``error_stable``.

    Attached at ``IterationEvents.FORWARD_COMPLETED`` of the ``SupervisedEvaluator`` whose network returns
    probabilities ``(B, 4, X, Y, Z)`` of whole preprocessed cases (sliding window over
    :class:`custom.model.networks.PatchProbabilityNetwork`). Adds to ``engine.state.output``:
    ``unc_output`` = channel 3 x ``get_cancer_mask(p_WT, mask_dilation)`` (as at inference), ``var1shot``,
    and, from the store updated with the same EMA schedule (identity coordinates), ``error_stable`` and
    ``variance_stable``; all ``(B, 1, X, Y, Z)``.

    Args:
        store: the fold's store (val cases included), or None to skip the store (then error_stable is
            the current prediction failure, smoothed).
        mask_dilation: voxels of dilation of the predicted WT for the cancer mask.
        target_transform: as :class:`ErrorMapHandler` (applied to the reported error_stable).
        update_store: False reads the store without an EMA step (evaluation of a finished run).
    """

    def __init__(self, store=None, mask_dilation: int = 3, target_transform: str = "none",
                 update_store: bool = True) -> None:
        if int(mask_dilation) < 0:
            raise ValueError(f"mask_dilation must be >= 0, got {mask_dilation}")
        self.store = store
        self.mask_dilation = int(mask_dilation)
        self.target_transform = _check_target_transform(target_transform)
        self.update_store = bool(update_store)

    def attach(self, engine: Engine) -> None:
        from monai.engines.utils import IterationEvents

        engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, self)

    @torch.no_grad()
    def __call__(self, engine: Engine) -> None:
        from monai.utils import CommonKeys as Keys

        output = engine.state.output
        probs = output[Keys.PRED].float()
        if probs.shape[1] < 4:
            raise ValueError(f"ValidationErrorMapHandler needs 4 output channels, got {probs.shape[1]}")
        targets = output[Keys.LABEL]
        gt_wt = targets["label"][:, 0:1].float()
        p_wt = probs[:, 0:1]
        cancer_mask = get_cancer_mask(p_wt, dilation=self.mask_dilation)
        output["unc_output"] = probs[:, 3:4] * cancer_mask.to(probs.dtype)
        error_stable, variance_stable, var1shot = _error_map_step(self.store, targets, p_wt, gt_wt,
                                                                  self.target_transform, self.update_store)
        output["var1shot"] = var1shot
        output["error_stable"] = error_stable
        output["variance_stable"] = variance_stable
