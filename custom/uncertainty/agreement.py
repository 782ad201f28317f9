"""Agreement of a map with ``error_stable`` over a mask: weighted RMSD and Pearson correlation (loss and metric)."""

from __future__ import annotations

import math

import numpy as np
import torch


def uncertainty_agreement(x, e, wt_mask) -> tuple[float, float]:
    """RMSD and weighted Pearson correlation of ``x`` against ``e`` over ``wt_mask``, for ONE case.

    Args:
        x: uncertainty map ``(X,Y,Z)`` or ``(1,X,Y,Z)`` in [0, 1].
        e: error_stable, same shape.
        wt_mask: ground-truth WT, same shape (0/1 or bool).
    Returns:
        ``(rmsd, corr)`` floats; NaN when undefined (empty mask; corr also for constant x or e).
    """
    xt, et, mt = (torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v.detach()
                  for v in (x, e, wt_mask))
    xt, et, mt = (v.reshape(1, -1).double() for v in (xt, et, mt))
    if not xt.shape == et.shape == mt.shape:
        raise ValueError("uncertainty_agreement: x, e and wt_mask must have the same number of voxels")
    rmsd, rmsd_valid = weighted_rmsd(xt, et, mt)
    corr, corr_valid = weighted_pearson(xt, et, mt)
    r = float(rmsd[0]) if bool(rmsd_valid[0]) else math.nan
    c = float(corr[0]) if bool(corr_valid[0]) else math.nan
    return r, c


#: a sample whose weighted variance is at or below this is treated as constant (excluded from corr)
VARIANCE_EPS = 1e-10


def _weights(w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if w.shape != like.shape:
        raise ValueError(f"weights {tuple(w.shape)} must match values {tuple(like.shape)}")
    return w.to(like.dtype)


def weighted_rmsd(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, eps: float = 1e-5):
    """Per-sample ``sqrt(sum w (x - y)^2 / (sum w + eps))`` over all non-batch dims.

    Args:
        x, y, w: ``(B, …)``; ``w`` is the mask (e.g. ground-truth WT, 0/1).
    Returns:
        ``(rmsd (B,), valid (B,) bool)``; ``valid`` is False for an empty mask. The square root is
        taken of ``max(., 1e-12)`` so that a perfect sample has a finite gradient (value 1e-6).
    """
    w = _weights(w, x)
    dims = tuple(range(1, x.ndim))
    wsum = w.sum(dims)
    msd = (w * (x - y) ** 2).sum(dims) / (wsum + eps)
    return torch.sqrt(torch.clamp_min(msd, 1e-12)), wsum > 0


def weighted_pearson(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, var_eps: float = VARIANCE_EPS,
                     x_var_floor: float = 0.0):
    """Per-sample Pearson correlation of ``x`` and ``y`` weighted by ``w`` over all non-batch dims.

    ``m_x = sum w x / sum w``, ``cov = sum w (x - m_x)(y - m_y) / sum w``, ``corr = cov / sqrt(var_x var_y)``.

    Args:
        x, y, w: ``(B, …)``; ``w`` is the mask (0/1).
        var_eps: a weighted variance at or below this counts as constant.
        x_var_floor: 0 (the metric) gives the exact correlation, undefined (invalid) when ``x`` or ``y`` is
            constant. ``> 0`` gives the bounded form the loss trains with: ``corr = cov / sqrt((var_x + floor)
            var_y)``. Its gradient with respect to ``x`` has norm at most ``2 / sqrt(sum(w) floor)`` whatever the
            spread of ``x`` (the exact form's grows as ``1 / std(x)``, so a near-constant prediction blows it up),
            ``|corr| <= 1`` still, and a sample counts as long as its target ``y`` varies.
    Returns:
        ``(corr (B,), valid (B,) bool)``; ``valid`` is False if the mask is empty or a required variance is
        <= ``var_eps``; invalid entries hold 0 and carry no NaN into gradients.
    """
    if x_var_floor < 0:
        raise ValueError(f"x_var_floor must be >= 0, got {x_var_floor}")
    w = _weights(w, x)
    dims = tuple(range(1, x.ndim))
    wsum = w.sum(dims)
    nonempty = wsum > 0
    wsum_safe = torch.where(nonempty, wsum, torch.ones_like(wsum))
    shape = (-1,) + (1,) * (x.ndim - 1)
    mx = ((w * x).sum(dims) / wsum_safe).reshape(shape)
    my = ((w * y).sum(dims) / wsum_safe).reshape(shape)
    dx, dy = x - mx, y - my
    var_x = (w * dx * dx).sum(dims) / wsum_safe
    var_y = (w * dy * dy).sum(dims) / wsum_safe
    cov = (w * dx * dy).sum(dims) / wsum_safe
    valid = nonempty & (var_y > var_eps)
    if x_var_floor == 0:
        valid = valid & (var_x > var_eps)
    denom = torch.where(valid, torch.sqrt(torch.clamp_min((var_x + x_var_floor) * var_y, 1e-30)),
                        torch.ones_like(var_x))
    corr = torch.where(valid, cov / denom, torch.zeros_like(cov))
    return corr, valid
