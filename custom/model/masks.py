"""``get_cancer_mask``: the region where the uncertainty map is trained (GT WT) and reported (predicted WT, dilated)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def get_cancer_mask(p_wt: torch.Tensor, dilation: int = 3, threshold: float = 0.5) -> torch.Tensor:
    """Predicted (or given) whole tumour dilated by ``dilation`` voxels in the 26-neighbourhood.

    Args:
        p_wt: ``(B, 1, X, Y, Z)``: float WT probabilities (thresholded at ``threshold``), bool masks,
            or integer BraTS labels (WT = label > 0).
        dilation: voxels (Chebyshev distance) added around the tumour; 0 for none.
    Returns:
        bool ``(B, 1, X, Y, Z)``.
    """
    if p_wt.ndim != 5:
        raise ValueError(f"get_cancer_mask expects (B,1,X,Y,Z), got {tuple(p_wt.shape)}")
    if dilation < 0:
        raise ValueError(f"dilation must be >= 0, got {dilation}")
    if p_wt.dtype == torch.bool:
        mask = p_wt
    elif p_wt.is_floating_point():
        mask = p_wt > threshold
    else:
        mask = p_wt > 0
    if dilation == 0:
        return mask
    # a (2d+1)^3 max filter == d iterations of 26-neighbourhood dilation
    k = 2 * int(dilation) + 1
    return F.max_pool3d(mask.to(torch.float32), kernel_size=k, stride=1, padding=int(dilation)) > 0.5


def training_cancer_mask(gt_wt: torch.Tensor, dilation: int = 0, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Where the uncertainty head is trained on a patch: GT WT (the paper, ``dilation`` 0), or GT WT dilated by
    ``dilation`` voxels exactly as :func:`get_cancer_mask` dilates at inference, and never outside the case.

    Args:
        gt_wt: ``(B, 1, X, Y, Z)`` ground-truth WT (0/1 float or bool).
        dilation: voxels of 26-neighbourhood dilation.
        valid: ``(B, 1, X, Y, Z)`` bool, True where the patch voxel comes from the case (case coordinates > 0);
            padding added by cropping, rotation or zoom has no case voxel and no error target.
    Returns:
        bool ``(B, 1, X, Y, Z)``.
    """
    mask = get_cancer_mask(gt_wt > 0.5 if gt_wt.dtype != torch.bool else gt_wt, dilation=dilation)
    if valid is not None:
        if valid.shape != mask.shape:
            raise ValueError(f"valid {tuple(valid.shape)} must match the WT mask {tuple(mask.shape)}")
        mask = mask & valid.to(torch.bool)
    return mask
