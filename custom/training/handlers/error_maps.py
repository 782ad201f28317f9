"""The error-map handlers: the uncertainty target of each patch (training) and of each case (validation).

Both run the same step (:func:`error_map_step`: failure -> 3x3x3 smoothing -> EMA in case space, and var1shot)
and, with ``target_transform: paper``, the same transform with the same per-case reference level
(:func:`custom.uncertainty.targets.paper_target_transform`), so a case voxel has one target whichever patch or
validation round it is seen in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from ignite.engine import Engine
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys

from custom.core.cli import as_bool
from custom.model.masks import get_cancer_mask
from custom.uncertainty.targets import (
    CaseWTReference,
    case_wt_mean,
    compute_prediction_failure,
    compute_prediction_variance,
    paper_target_transform,
    smooth_failure,
)

TARGET_TRANSFORMS = ("none", "paper")


def case_ids(targets: Mapping) -> list[str]:
    ids = targets.get("case_id")
    if ids is None:
        raise KeyError("targets have no 'case_id'; use custom.training.batch.UncertaintyPrepareBatch")
    return [ids] if isinstance(ids, str) else [str(c) for c in ids]


def _check_target_transform(target_transform: str) -> str:
    if target_transform not in TARGET_TRANSFORMS:
        raise ValueError(f"target_transform must be one of {TARGET_TRANSFORMS}, got {target_transform!r}")
    return target_transform


def _update_and_gather(store, ids, coords, failure_smoothed, var1shot, device):
    """EMA step at the patch's case voxels, then read back: the target includes this iteration's observation."""
    if hasattr(store, "update_and_gather_batch"):  # one coordinate analysis per patch instead of two
        return store.update_and_gather_batch(ids, coords, failure_smoothed, var1shot, device=device)
    store.scatter_batch(ids, coords, failure_smoothed, var1shot)
    return store.gather_batch(ids, coords, device=device)


class ErrorMaps(NamedTuple):
    """The maps of one error-map step, all ``(B, 1, ...)`` float32, untransformed."""

    error_stable: torch.Tensor
    variance_stable: torch.Tensor
    var1shot: torch.Tensor
    failure_smoothed: torch.Tensor


def error_map_step(store, targets: Mapping, p_wt: torch.Tensor, gt_wt: torch.Tensor,
                   update_store: bool = True) -> ErrorMaps:
    """The shared error-map step of training and validation.

    ``p_WT`` vs GT WT -> failure -> 3x3x3 smoothing (``failure_smoothed``), and ``var1shot``; with a store, the
    EMA step at the case coordinates of ``targets`` (or a plain read when ``update_store`` is False) gives
    ``error_stable`` and ``variance_stable``; without one, they are this observation itself.
    """
    failure_smoothed = smooth_failure(compute_prediction_failure(p_wt, gt_wt))
    var1shot = compute_prediction_variance(p_wt)
    if store is None:
        return ErrorMaps(failure_smoothed, var1shot, var1shot, failure_smoothed)
    ids, coords = case_ids(targets), targets["coords"]
    if update_store:
        error_stable, variance_stable = _update_and_gather(store, ids, coords, failure_smoothed, var1shot,
                                                           p_wt.device)
    else:
        error_stable, variance_stable = store.gather_batch(ids, coords, device=p_wt.device)
    return ErrorMaps(error_stable, variance_stable, var1shot, failure_smoothed)


class ErrorMapHandler:
    """Training: the uncertainty target ``error_stable`` of each patch, from the case-space EMA store.

    Attached at ``IterationEvents.FORWARD_COMPLETED`` of the ``SupervisedTrainer`` (after the forward pass,
    before the loss): ``p_WT = sigmoid(pred[:, 0])`` (detached; the full-resolution output under deep
    supervision) -> :func:`error_map_step` at the patch's case coordinates -> ``targets["error_stable"]``,
    ``targets["variance_stable"]`` and ``targets["failure_smoothed"]`` (this iteration's smoothed failure, the
    target of the proper-scoring heads) (B,1,…) in place, so the loss receives them.

    Args:
        store: :class:`custom.uncertainty.store.ErrorMapStore` holding the fold's cases.
        target_transform: ``"none"`` (error_stable as is) or ``"paper"`` (:func:`paper_target_transform` with
            the mean over the CASE's GT WT as reference, as validation uses).
        case_labels: ``{case_id: preprocessed label .npy}`` of the fold; needed for ``"paper"`` (the case's GT WT).
    """

    def __init__(self, store, target_transform: str = "none", case_labels: Mapping[str, str] | None = None) -> None:
        if store is None:
            raise ValueError("ErrorMapHandler needs the fold's ErrorMapStore (the training target comes from it)")
        self.store = store
        self.target_transform = _check_target_transform(target_transform)
        self.reference = None
        if self.target_transform == "paper":
            if not case_labels:
                raise ValueError("target_transform 'paper' needs case_labels ({case_id: pp_label}) for the case WT")
            self.reference = CaseWTReference(case_labels)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, self)

    @torch.no_grad()
    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        targets = output[Keys.LABEL]
        if not isinstance(targets, dict):
            raise TypeError("ErrorMapHandler needs the targets dict of UncertaintyPrepareBatch(with_uncertainty=True)")
        pred = output[Keys.PRED]
        if isinstance(pred, (list, tuple)):  # deep supervision: full-resolution output first
            pred = pred[0]
        p_wt = torch.sigmoid(pred[:, 0:1].detach().float())
        gt_wt = targets["label"][:, 0:1].float()
        error_stable, variance_stable, _, failure_smoothed = error_map_step(self.store, targets, p_wt, gt_wt)
        if self.reference is not None:
            ref_error, ref_variance = self.reference.means(self.store, case_ids(targets))
            error_stable = paper_target_transform(error_stable, ref_error)
            variance_stable = paper_target_transform(variance_stable, ref_variance)
        targets["error_stable"] = error_stable
        targets["variance_stable"] = variance_stable
        targets["failure_smoothed"] = failure_smoothed


class ValidationErrorMapHandler:
    """Validation: full-volume outputs and the validation cases' own ``error_stable``.

    Attached at ``IterationEvents.FORWARD_COMPLETED`` of the ``SupervisedEvaluator`` whose network returns
    probabilities ``(B, 4, X, Y, Z)`` of whole preprocessed cases (sliding window over
    :class:`custom.model.networks.PatchProbabilityNetwork`). Adds to ``engine.state.output``, all
    ``(B, 1, X, Y, Z)``: ``error_stable`` (from the store updated with the training's EMA schedule, identity
    coordinates) and the three maps compared with it, ``unc_output`` (channel 3), ``variance_stable`` and
    ``var1shot``, each multiplied by the SAME cancer mask, ``get_cancer_mask(p_WT, mask_dilation)``, the region
    inference reports (Table 2 compares the maps on equal terms). With ``target_transform: paper`` error_stable,
    variance_stable and var1shot are transformed with their own case-WT mean as reference.

    Args:
        store: the fold's store (val cases included), or None to skip the store (then error_stable is
            the current prediction failure, smoothed).
        mask_dilation: voxels of dilation of the predicted WT for the cancer mask.
        target_transform: as :class:`ErrorMapHandler`.
        update_store: False reads the store without an EMA step (evaluation of a finished run).
    """

    def __init__(self, store=None, mask_dilation: int = 3, target_transform: str = "none",
                 update_store: bool = True) -> None:
        if int(mask_dilation) < 0:
            raise ValueError(f"mask_dilation must be >= 0, got {mask_dilation}")
        self.store = store
        self.mask_dilation = int(mask_dilation)
        self.target_transform = _check_target_transform(target_transform)
        self.update_store = as_bool(update_store, "update_store")

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, self)

    @torch.no_grad()
    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        probs = output[Keys.PRED].float()
        if probs.shape[1] < 4:
            raise ValueError(f"ValidationErrorMapHandler needs 4 output channels, got {probs.shape[1]}")
        targets = output[Keys.LABEL]
        gt_wt = targets["label"][:, 0:1].float()
        p_wt = probs[:, 0:1]
        error_stable, variance_stable, var1shot, _ = error_map_step(self.store, targets, p_wt, gt_wt,
                                                                    self.update_store)
        if self.target_transform == "paper":
            error_stable, variance_stable, var1shot = (
                paper_target_transform(m, case_wt_mean(m, gt_wt)) for m in (error_stable, variance_stable, var1shot))
        cancer_mask = get_cancer_mask(p_wt, dilation=self.mask_dilation).to(probs.dtype)
        output["error_stable"] = error_stable
        output["unc_output"] = probs[:, 3:4] * cancer_mask
        output["variance_stable"] = variance_stable * cancer_mask
        output["var1shot"] = var1shot * cancer_mask
