"""The training target of the uncertainty channel: prediction failure, its case-space EMA, variance baselines.

METHOD.md, "Error map": each iteration, from the detached forward pass,
``f = [p_WT > 0.5] != GT_WT`` (prediction failure), ``f_s = mean_3x3x3(f)`` (zero padding), and for
every case voxel ``v`` covered by the patch: ``n_v += 1``, ``a_v = max(1/n_v, 1/W)``,
``e_v <- (1 - a_v) e_v + a_v f_s(v)`` (``W = ema_window``). ``error_stable = e``. The same schedule on
``var1shot = 4 p_WT (1 - p_WT)`` gives ``variance_stable``.

The EMA lives in CASE space (the preprocessed case grid), not patch space, so that it stays aligned
with the anatomy under random crops, flips, rotations and zooms: the training pipeline carries each
voxel's case coordinates (index + 1, 0 = padding, see :class:`custom.transforms.dictionary.AddCaseCoordinatesd`)
through the augmentation, and :class:`ErrorMapStore` gathers/scatters through them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------- formulas
@torch.no_grad()
def compute_prediction_failure(p_wt: torch.Tensor, gt_wt: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Whole-tumour prediction failure ``f = [p_WT > threshold] XOR [GT_WT > 0.5]`` as float32 (same shape).

    Args:
        p_wt: predicted WT probability, e.g. ``(B, 1, X, Y, Z)`` in [0, 1].
        gt_wt: ground-truth WT (0/1), same shape.
    """
    if p_wt.shape != gt_wt.shape:
        raise ValueError(f"p_wt {tuple(p_wt.shape)} and gt_wt {tuple(gt_wt.shape)} must have the same shape")
    return ((p_wt > threshold) != (gt_wt > 0.5)).to(torch.float32)


@torch.no_grad()
def smooth_failure(f: torch.Tensor) -> torch.Tensor:
    """3x3x3 mean filter, stride 1, zero padding (a border voxel averages over 27 including the padding).

    Args:
        f: ``(B, C, X, Y, Z)`` or ``(C, X, Y, Z)`` float tensor. Returns the same shape, float32.
    """
    if f.ndim not in (4, 5):
        raise ValueError(f"smooth_failure expects (B,C,X,Y,Z) or (C,X,Y,Z), got {tuple(f.shape)}")
    x = f.to(torch.float32)
    out = F.avg_pool3d(x if x.ndim == 5 else x[None], kernel_size=3, stride=1, padding=1, count_include_pad=True)
    return out if f.ndim == 5 else out[0]


@torch.no_grad()
def compute_prediction_variance(p_wt: torch.Tensor) -> torch.Tensor:
    """``var1shot = 4 p (1 - p)``: single-pass Bernoulli variance of the WT probability, scaled to [0, 1]."""
    p = p_wt.to(torch.float32)
    return 4.0 * p * (1.0 - p)


def ema_rates(count_after, ema_window: int):
    """``a = max(1/n, 1/W)`` for visit counts ``n >= 1`` (numpy or torch)."""
    if isinstance(count_after, torch.Tensor):
        n = count_after.to(torch.float32).clamp_min(1.0)
        return torch.clamp_min(1.0 / n, 1.0 / ema_window)
    n = np.maximum(np.asarray(count_after, dtype=np.float32), 1.0)
    return np.maximum(np.float32(1.0) / n, np.float32(1.0 / ema_window))


def compute_prediction_error_probability(e, n, value, ema_window: int = 30, visited=None, max_count: int = 255):
    """One EMA step on arrays (pure function; the store applies the same step in place).

    For every visited voxel: ``n += 1`` (saturating at ``max_count``), ``a = max(1/n, 1/W)``,
    ``e <- (1 - a) e + a value``. The first ``W`` visits are a running mean, later an EMA with rate 1/W.

    Args:
        e: current estimate (any shape), numpy or torch.
        n: visit counts, same shape.
        value: the new observation (``f_s`` or ``var1shot``), same shape.
        ema_window: ``W``.
        visited: optional boolean mask; unvisited voxels are returned unchanged.
    Returns:
        ``(e_new, n_new)``, same types as the inputs.
    """
    if not 1 <= int(ema_window) <= max_count:
        raise ValueError(f"ema_window must be in [1, {max_count}], got {ema_window}")
    is_torch = isinstance(e, torch.Tensor)
    if is_torch:
        n_new = torch.clamp(n.to(torch.int64) + 1, max=max_count)
        a = ema_rates(n_new, ema_window)
        e_new = e + a * (value - e)
        if visited is not None:
            e_new = torch.where(visited, e_new, e)
            n_new = torch.where(visited, n_new, n.to(torch.int64))
        return e_new.to(e.dtype), n_new.to(n.dtype)
    e = np.asarray(e)
    n = np.asarray(n)
    n_new = np.minimum(n.astype(np.int64) + 1, max_count)
    a = ema_rates(n_new, ema_window)
    e_new = (e + a * (np.asarray(value, dtype=np.float32) - e)).astype(e.dtype)
    if visited is not None:
        e_new = np.where(visited, e_new, e)
        n_new = np.where(visited, n_new, n)
    return e_new, n_new.astype(n.dtype)


def case_wt_mean(values: torch.Tensor, wt_mask: torch.Tensor) -> torch.Tensor:
    """Mean of a map over the ground-truth WT voxels, per sample: ``(B, 1, …)`` -> ``(B,)``; 0 for an empty WT.

    The reference level of :func:`paper_target_transform`. Computed on a whole case it is THE definition; a
    training patch gets the same number from the store (:class:`CaseWTReference`).
    """
    if values.shape != wt_mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and wt_mask {tuple(wt_mask.shape)} must have the same shape")
    m = (wt_mask > 0.5).to(values.dtype) if wt_mask.dtype != torch.bool else wt_mask.to(values.dtype)
    dims = tuple(range(1, values.ndim))
    return (values * m).sum(dim=dims) / m.sum(dim=dims).clamp_min(1.0)


@torch.no_grad()
def paper_target_transform(x: torch.Tensor, reference: torch.Tensor, floor: float = 1e-3) -> torch.Tensor:
    """The paper's rescaling ``sigmoid(max(x, 1e-3) - reference)`` (``target_transform: paper``).

    Args:
        x: ``(B, 1, X, Y, Z)`` a case-space map (error_stable, variance_stable or var1shot) on a patch or a case.
        reference: ``(B,)`` the mean of the same map over the CASE's ground-truth WT (:func:`case_wt_mean` on a
            whole case, :meth:`CaseWTReference.means` for a training patch), so that one case voxel gets the same
            target in training and in validation, whichever patch it was seen in.
    """
    ref = torch.as_tensor(reference, dtype=x.dtype, device=x.device).reshape((-1,) + (1,) * (x.ndim - 1))
    if ref.shape[0] != x.shape[0]:
        raise ValueError(f"reference has {ref.shape[0]} values for a batch of {x.shape[0]}")
    return torch.sigmoid(torch.clamp_min(x, floor) - ref)


class CaseWTReference:
    """:func:`case_wt_mean` of the store's ``error`` and ``variance`` maps of a case, for a training patch.

    A patch sees part of its case; the paper transform's reference level is a property of the case. The store
    holds the case-space maps and the preprocessed label gives the case's GT WT: the mean is read from the store at
    the WT voxels' case coordinates (the store's own gather, so it is the same number a whole-case computation
    gives). WT coordinates are cached per case (at most ``max_cases`` cases).

    Args:
        label_paths: ``{case_id: preprocessed label .npy}`` (``pp_label`` of the fold items).
    """

    def __init__(self, label_paths: Mapping[str, str], max_cases: int = 32) -> None:
        self.label_paths = {str(k): str(v) for k, v in dict(label_paths).items()}
        self.max_cases = int(max_cases)
        self._coords: OrderedDict[str, np.ndarray] = OrderedDict()

    def wt_coords(self, case_id: str) -> np.ndarray:
        """float32 ``(3, N, 1, 1)`` case coordinates (index + 1) of the case's GT WT voxels."""
        if case_id in self._coords:
            self._coords.move_to_end(case_id)
            return self._coords[case_id]
        if case_id not in self.label_paths:
            raise KeyError(f"CaseWTReference: no preprocessed label for case {case_id!r}")
        label = np.load(self.label_paths[case_id], mmap_mode="r")
        label = label.reshape(label.shape[-3:])
        coords = (np.stack(np.nonzero(label > 0)).astype(np.float32) + 1.0)[:, :, None, None]
        self._coords[case_id] = coords
        if len(self._coords) > self.max_cases:
            self._coords.popitem(last=False)
        return coords

    def means(self, store, case_ids) -> tuple[torch.Tensor, torch.Tensor]:
        """``(error_reference (B,), variance_reference (B,))``: the case-WT means of the store's current maps."""
        err, var = [], []
        for case_id in case_ids:
            coords = self.wt_coords(str(case_id))
            if coords.shape[1] == 0:
                err.append(0.0), var.append(0.0)
                continue
            e, v = store.gather(str(case_id), coords)
            err.append(float(e.double().mean())), var.append(float(v.double().mean()))
        return torch.tensor(err, dtype=torch.float32), torch.tensor(var, dtype=torch.float32)
