"""Validation metrics (METHOD.md, "Metrics"): per-case region Dice and uncertainty agreement, one implementation.

:class:`ValidationCaseMetric` computes them (``reset`` / ``update`` / ``aggregate``, like a MONAI metric);
:class:`custom.training.handlers.validation.ValidationMetricsHandler` wraps it for Ignite, as MONAI's ``MeanDice``
handler wraps ``DiceMetric``. Dice is :func:`custom.evaluation.segmentation.dice` (both empty = 1), agreement is
:func:`custom.uncertainty.agreement.uncertainty_agreement`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from custom.core.cli import as_bool
from custom.core.constants import REGIONS
from custom.core.numeric import nanmean
from custom.evaluation.segmentation import dice, region_mask
from custom.uncertainty.agreement import uncertainty_agreement

#: uncertainty sources compared against error_stable (keys of the validation output), with their column stems
UNC_SOURCES = (("unc_output", "unc"), ("variance_stable", "variance_stable"), ("var1shot", "var1shot"))


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.as_tensor() if hasattr(x, "as_tensor") else x
        return x.detach().cpu().numpy()
    return np.asarray(x)


def region_masks(x, threshold: float = 0.5) -> np.ndarray:
    """Labels ``(X,Y,Z)``/``(1,X,Y,Z)`` or regions/probabilities ``(>=3, X,Y,Z)`` -> bool ``(3, X,Y,Z)`` [WT, TC, ET].

    Probabilities are thresholded (``> threshold``); integer regions count where ``> 0``.
    """
    a = _numpy(x)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 3:
        if a.dtype.kind == "f" and not np.array_equal(a, np.round(a)):
            raise ValueError("a 3-D input must be a label map (0..3), got non-integer values")
        return np.stack([region_mask(a.astype(np.int64), r) for r in REGIONS])
    if a.ndim == 4 and a.shape[0] >= len(REGIONS):
        a = a[: len(REGIONS)]
        return a > threshold if a.dtype.kind == "f" else a > 0
    raise ValueError(f"expected labels (X,Y,Z) or regions (3,X,Y,Z), got shape {tuple(a.shape)}")


def dice_per_region(pred, gt, threshold: float = 0.5) -> dict:
    """Dice of one case for WT, TC, ET and their mean.

    Args:
        pred: labels ``(X,Y,Z)`` (0..3) or region probabilities/masks ``(3 or 4, X,Y,Z)`` (thresholded).
        gt: labels or regions, same conventions.
    Returns:
        ``{"WT": float, "TC": float, "ET": float, "mean": float}``; both empty -> 1.
    """
    p, g = region_masks(pred, threshold), region_masks(gt, threshold)
    if p.shape != g.shape:
        raise ValueError(f"dice_per_region: pred {p.shape} vs gt {g.shape}")
    out = {r: dice(p[i], g[i]) for i, r in enumerate(REGIONS)}
    out["mean"] = float(np.mean([out[r] for r in REGIONS]))
    return out


class ValidationCaseMetric:
    """Per-case validation metrics of whole preprocessed cases, and their means.

    Per case: Dice WT/TC/ET (prediction ``probs[:3] > threshold`` per region) and their mean; with uncertainty,
    RMSD and weighted Pearson correlation against ``error_stable`` over GT WT for each map of
    :data:`UNC_SOURCES`. :meth:`aggregate` averages the rows NaN-skipping (a constant map has no correlation)
    into the ``metrics.csv`` columns ``val_dice_wt, …, val_corr_var1shot``.

    Args:
        with_uncertainty: also compute the agreement of the three maps (the maps must be passed to ``update``).
        threshold: on the region probabilities.
    """

    def __init__(self, with_uncertainty: bool = True, threshold: float = 0.5) -> None:
        self.with_uncertainty = as_bool(with_uncertainty, "with_uncertainty")
        self.threshold = float(threshold)
        self.rows: list[dict] = []

    @property
    def keys(self) -> list[str]:
        """Row keys that :meth:`aggregate` averages (``val_`` + key is the metrics.csv column)."""
        keys = ["dice_wt", "dice_tc", "dice_et", "dice_mean"]
        if self.with_uncertainty:
            keys += [f"{m}_{stem}" for _, stem in UNC_SOURCES for m in ("rmsd", "corr")]
        return keys

    def reset(self) -> None:
        self.rows = []

    @torch.no_grad()
    def update(self, case_ids: Sequence[str], probs: torch.Tensor, regions: torch.Tensor,
               maps: Mapping[str, torch.Tensor] | None = None) -> list[dict]:
        """Add one row per case of a batch; returns the new rows.

        Args:
            case_ids: ``B`` case ids.
            probs: ``(B, C>=3, X, Y, Z)`` probabilities [p_WT, p_TC, p_ET, ...].
            regions: ``(B, 3, X, Y, Z)`` ground-truth regions.
            maps: with uncertainty, ``error_stable`` and every source of :data:`UNC_SOURCES`, each ``(B, 1, X, Y, Z)``.
        """
        if len(case_ids) != probs.shape[0]:
            raise ValueError(f"{len(case_ids)} case ids for a batch of {probs.shape[0]}")
        if self.with_uncertainty:
            needed = ["error_stable"] + [key for key, _ in UNC_SOURCES]
            missing = [k for k in needed if maps is None or k not in maps]
            if missing:
                raise KeyError(f"ValidationCaseMetric(with_uncertainty=True) needs the maps {missing}")
        new = []
        for b, case_id in enumerate(case_ids):
            gt = regions[b].float()
            d = dice_per_region((probs[b, :3] > self.threshold).float(), gt)
            row = {"case_id": str(case_id), "dice_wt": d["WT"], "dice_tc": d["TC"], "dice_et": d["ET"],
                   "dice_mean": d["mean"]}
            if self.with_uncertainty:
                wt = gt[0:1] > 0.5
                for key, stem in UNC_SOURCES:
                    rmsd, corr = uncertainty_agreement(maps[key][b], maps["error_stable"][b], wt)
                    row[f"rmsd_{stem}"], row[f"corr_{stem}"] = float(rmsd), float(corr)
            new.append(row)
        self.rows.extend(new)
        return new

    def aggregate(self, rows: Sequence[Mapping] | None = None) -> dict:
        """``{"val_<key>": NaN-skipping mean over rows}`` (default rows: those added since :meth:`reset`)."""
        rows = self.rows if rows is None else rows
        return {f"val_{key}": nanmean([r.get(key) for r in rows]) for key in self.keys}
