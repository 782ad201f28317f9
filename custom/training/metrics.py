"""Validation metrics (METHOD.md, "Metrics"): per-case region Dice and uncertainty agreement."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced

from custom.core.constants import REGIONS
from custom.uncertainty.agreement import uncertainty_agreement

#: uncertainty sources compared against error_stable, with their metric-name stems
UNC_SOURCES = (("unc_output", "unc"), ("variance_stable", "variance_stable"), ("var1shot", "var1shot"))

UNCERTAINTY_SOURCES = ("unc_output", "variance_stable", "var1shot")


def _as_regions(x, threshold: float = 0.5) -> torch.Tensor:
    """Labels ``(X,Y,Z)``/``(1,X,Y,Z)`` or regions/probabilities ``(>=3, X,Y,Z)`` -> bool ``(3, X,Y,Z)``."""
    t = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x.detach()
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]
    if t.ndim == 3:
        if t.is_floating_point() and not torch.equal(t, t.round()):
            raise ValueError("a 3-D input must be a label map (0..3), got non-integer values")
        t = t.to(torch.int64)
        return torch.stack([t > 0, (t == 1) | (t == 3), t == 3])
    if t.ndim == 4 and t.shape[0] >= 3:
        t = t[:3]
        return t > threshold if t.is_floating_point() else t > 0
    raise ValueError(f"expected labels (X,Y,Z) or regions (3,X,Y,Z), got shape {tuple(t.shape)}")


def region_dice(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Hard Dice per sample and region, both empty = 1.

    Args:
        pred, gt: bool/0-1 ``(B, 3, X, Y, Z)``.
    Returns:
        float64 ``(B, 3)``.
    """
    if pred.shape != gt.shape:
        raise ValueError(f"region_dice: pred {tuple(pred.shape)} vs gt {tuple(gt.shape)}")
    p, g = pred.bool(), gt.bool()
    dims = tuple(range(2, p.ndim))
    inter = (p & g).sum(dims).double()
    total = p.sum(dims).double() + g.sum(dims).double()
    return torch.where(total > 0, 2.0 * inter / torch.clamp_min(total, 1.0), torch.ones_like(total))


def dice_per_region(pred, gt, threshold: float = 0.5) -> dict:
    """Dice of one case for WT, TC, ET and their mean.

    Args:
        pred: labels ``(X,Y,Z)`` (0..3) or region probabilities/masks ``(3 or 4, X,Y,Z)`` (thresholded).
        gt: labels or regions, same conventions.
    Returns:
        ``{"WT": float, "TC": float, "ET": float, "mean": float}``; both empty -> 1.
    """
    d = region_dice(_as_regions(pred, threshold)[None], _as_regions(gt, threshold)[None])[0].tolist()
    out = dict(zip(REGIONS, d))
    out["mean"] = float(np.mean(d))
    return out


def _samples(output) -> list:
    """Normalise engine output into a list of per-sample dicts of tensors without batch dim."""
    if isinstance(output, Mapping):
        batch = len(output["pred"])
        return [{k: v[b] for k, v in output.items() if isinstance(v, (torch.Tensor, np.ndarray))}
                for b in range(batch)]
    if isinstance(output, Sequence) and not isinstance(output, (str, bytes)):
        if output and not isinstance(output[0], Mapping):
            raise TypeError("metric output must be a dict or a list of dicts with keys 'pred', 'label', ...")
        return list(output)
    raise TypeError(f"metric output must be a dict or a list of dicts, got {type(output).__name__}")


def _tensor(x) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if hasattr(t, "as_tensor"):
        t = t.as_tensor()
    return t.detach()


class _DictOutputMetric(Metric):
    """Ignite metric fed the whole (transformed) output, a dict or list of dicts, not ``(y_pred, y)``."""

    @torch.no_grad()
    def iteration_completed(self, engine) -> None:
        self.update(self._output_transform(engine.state.output))


class RegionDiceMetric(_DictOutputMetric):
    """Per-case region Dice, averaged over the cases seen since ``reset``.

    Args:
        region: "WT", "TC", "ET" or "mean" (what :meth:`compute` returns).
        threshold: on the probabilities in ``pred[:3]``.
        pred_key, label_key: keys of the output dict.
    ``per_case`` keeps ``(n_cases, 3)`` Dice values; :meth:`results` returns all regions and the mean.
    """

    def __init__(self, region: str = "mean", threshold: float = 0.5, pred_key: str = "pred",
                 label_key: str = "label", output_transform=lambda x: x, device="cpu"):
        if region not in REGIONS + ("mean",):
            raise ValueError(f"region must be one of {REGIONS + ('mean',)}, got {region!r}")
        self.region = region
        self.threshold = float(threshold)
        self.pred_key, self.label_key = pred_key, label_key
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._values: list = []

    @reinit__is_reduced
    def update(self, output) -> None:
        for s in _samples(output):
            pred = _as_regions(_tensor(s[self.pred_key]), self.threshold)
            gt = _as_regions(_tensor(s[self.label_key]), self.threshold)
            self._values.append(region_dice(pred[None], gt[None])[0].cpu())

    @property
    def per_case(self) -> torch.Tensor:
        return torch.stack(self._values) if self._values else torch.zeros(0, 3, dtype=torch.float64)

    def results(self) -> dict:
        if not self._values:
            raise NotComputableError("RegionDiceMetric needs at least one case")
        means = self.per_case.mean(0).tolist()
        out = dict(zip(REGIONS, means))
        out["mean"] = float(np.mean(means))
        return out

    def compute(self) -> float:
        return float(self.results()[self.region])


class UncertaintyAgreementMetric(_DictOutputMetric):
    """RMSD or weighted Pearson correlation of an uncertainty source against error_stable over GT WT.

    Args:
        source: "unc_output" (``pred[3]``), "variance_stable" (``output["variance_stable"]``) or
            "var1shot" (``4 p_WT (1 - p_WT)`` from ``pred[0]``).
        stat: "rmsd" or "corr" (what :meth:`compute` returns; both are accumulated).
    Per case, then averaged over the cases where the value is defined; NaN if none is.
    """

    def __init__(self, source: str = "unc_output", stat: str = "rmsd", pred_key: str = "pred",
                 label_key: str = "label", error_key: str = "error_stable",
                 variance_key: str = "variance_stable", output_transform=lambda x: x, device="cpu"):
        if source not in UNCERTAINTY_SOURCES:
            raise ValueError(f"source must be one of {UNCERTAINTY_SOURCES}, got {source!r}")
        if stat not in ("rmsd", "corr"):
            raise ValueError(f"stat must be 'rmsd' or 'corr', got {stat!r}")
        self.source, self.stat = source, stat
        self.pred_key, self.label_key = pred_key, label_key
        self.error_key, self.variance_key = error_key, variance_key
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._rmsd: list = []
        self._corr: list = []

    def _source(self, s) -> torch.Tensor:
        if self.source == "unc_output":
            pred = _tensor(s[self.pred_key])
            if pred.shape[0] < 4:
                raise ValueError(f"source 'unc_output' needs 4 prediction channels, got {tuple(pred.shape)}")
            return pred[3]
        if self.source == "variance_stable":
            if self.variance_key not in s:
                raise KeyError(f"source 'variance_stable' needs output key '{self.variance_key}'")
            return _tensor(s[self.variance_key])
        p = _tensor(s[self.pred_key])[0].double()
        return 4.0 * p * (1.0 - p)

    @reinit__is_reduced
    def update(self, output) -> None:
        for s in _samples(output):
            if self.error_key not in s:
                raise KeyError(f"UncertaintyAgreementMetric needs output key '{self.error_key}'")
            label = _tensor(s[self.label_key])
            wt = _as_regions(label)[0]
            rmsd, corr = uncertainty_agreement(self._source(s), _tensor(s[self.error_key]), wt)
            self._rmsd.append(rmsd)
            self._corr.append(corr)

    def results(self) -> dict:
        if not self._rmsd:
            raise NotComputableError("UncertaintyAgreementMetric needs at least one case")
        def nanmean(v):
            d = [x for x in v if not math.isnan(x)]
            return float(np.mean(d)) if d else math.nan
        return {"rmsd": nanmean(self._rmsd), "corr": nanmean(self._corr), "n_cases": len(self._rmsd)}

    def compute(self) -> float:
        return self.results()[self.stat]
