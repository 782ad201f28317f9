"""Probabilities on the preprocessed grid -> labels and the masked uncertainty map on the original grid."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from custom.core.constants import NUM_REGIONS
from custom.model.masks import get_cancer_mask
from custom.preprocessing.functional import restore_original_grid
from custom.transforms.array import regions_to_labels
from custom.uncertainty.targets import compute_prediction_variance


# ------------------------------------------------------------------------------------------ postprocessing
@dataclass
class Prediction:
    """One case on its original grid.

    labels: uint8 ``(X,Y,Z)`` 0..3; unc: float32 ``(X,Y,Z)`` in [0, 1], zero outside the cancer mask;
    probs: float32 ``(3,X,Y,Z)`` region probabilities [WT, TC, ET]; unc_source: "unc_output" or, for a
    network without the uncertainty channel, "var1shot" (4 p_WT (1 - p_WT)); maps: further float32 ``(X,Y,Z)``
    maps written beside the labels as ``<case_id>-<suffix>.nii.gz``, keyed by their
    :data:`custom.core.layout.PREDICTION_MAP_SUFFIXES` suffix (the fold ensemble's ``ensvar``).
    """

    labels: np.ndarray
    unc: np.ndarray
    probs: np.ndarray
    unc_source: str = "unc_output"
    info: dict = field(default_factory=dict)
    maps: dict = field(default_factory=dict)


def predicted_tumour(probs: torch.Tensor) -> torch.Tensor:
    """``(1, 1, …)`` probability that a voxel gets a tumour label: the max over the region channels.

    ``regions_to_labels`` labels a voxel as tumour when ANY region is > 0.5, so this, thresholded at 0.5, is
    exactly the predicted WT of the written labels (for a trained net with nested regions it is p_WT).
    """
    return probs[:NUM_REGIONS].amax(dim=0, keepdim=True)[None]


def masked_uncertainty(probs_pp: torch.Tensor, mask_dilation: int = 3) -> tuple[torch.Tensor, str]:
    """Uncertainty ``(X',Y',Z')`` on the preprocessed grid, times the cancer mask of the predicted WT.

    ``probs_pp`` is ``(C,X',Y',Z')``: channel 3 is ``unc_output`` when C == 4; with C == 3 (no uncertainty
    channel) the Bernoulli variance var1shot = 4 p_WT (1 - p_WT) stands in.
    """

    mask = get_cancer_mask(predicted_tumour(probs_pp), dilation=int(mask_dilation))
    mask = torch.as_tensor(mask).reshape(probs_pp.shape[1:]).to(probs_pp.device, torch.float32)
    if probs_pp.shape[0] > NUM_REGIONS:
        return probs_pp[NUM_REGIONS] * mask, "unc_output"
    return compute_prediction_variance(probs_pp[0]) * mask, "var1shot"


def postprocess_probabilities(probs_pp, properties: Mapping, mask_dilation: int = 3) -> Prediction:
    """Probabilities on the preprocessed grid -> ``Prediction`` on the original grid.

    Args:
        probs_pp: ``(C,X',Y',Z')`` probabilities (C = 4 or 3), torch or numpy.
        properties: the ``preprocess_case`` properties of the case (bbox, shapes, spacings).
        mask_dilation: voxels by which the predicted WT is dilated to form the cancer mask.

    The mask is applied on the full preprocessed volume (where the network's WT lives), the maps are pasted
    back with linear interpolation, and the mask is re-applied on the original grid from the restored
    labels, so that the written map is exactly zero outside the cancer mask also after resampling.
    """

    probs_pp = torch.as_tensor(np.asarray(probs_pp) if not torch.is_tensor(probs_pp) else probs_pp)
    probs_pp = (probs_pp.as_tensor() if hasattr(probs_pp, "as_tensor") else probs_pp).float()
    if probs_pp.ndim != 4 or probs_pp.shape[0] not in (NUM_REGIONS, NUM_REGIONS + 1):
        raise ValueError(f"probs_pp must be (3 or 4, X', Y', Z'), got shape {tuple(probs_pp.shape)}")
    unc_pp, unc_source = masked_uncertainty(probs_pp, mask_dilation)
    stacked = torch.cat([probs_pp[:NUM_REGIONS], unc_pp[None]]).cpu().numpy().astype(np.float32)
    restored = np.asarray(restore_original_grid(stacked, properties, order=1, fill=0.0), dtype=np.float32)
    probs = np.clip(restored[:NUM_REGIONS], 0.0, 1.0)
    labels = np.asarray(regions_to_labels(probs), dtype=np.uint8)
    mask = get_cancer_mask(predicted_tumour(torch.from_numpy(probs)), dilation=int(mask_dilation))
    mask = torch.as_tensor(mask).reshape(labels.shape).cpu().numpy().astype(bool)
    unc = np.where(mask, np.clip(restored[NUM_REGIONS], 0.0, 1.0), 0.0).astype(np.float32)
    return Prediction(labels=labels, unc=unc, probs=probs, unc_source=unc_source)


class UncertaintyPostprocessd(MapTransform):
    """Dict wrapper of ``postprocess_probabilities`` for the bundle's ``postprocessing``.

    Reads ``data[key]`` = probabilities ``(C,X',Y',Z')`` from ``UncertaintyInferer`` and
    ``data[properties_key]`` from ``BraTSPreprocessd``; writes ``data[key]`` = labels ``(1,X,Y,Z)`` uint8,
    ``data[unc_key]`` = ``(1,X,Y,Z)`` float32 and, if ``probs_key``, ``(3,X,Y,Z)`` region probabilities,
    all on the original grid (channel-first, as MONAI Label and SaveImaged expect).
    """

    def __init__(self, keys: KeysCollection = "pred", properties_key: str = "image_properties",
                 unc_key: str = "unc", probs_key: str | None = None, mask_dilation: int = 3,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.properties_key = properties_key
        self.unc_key = unc_key
        self.probs_key = probs_key
        self.mask_dilation = int(mask_dilation)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        if self.properties_key not in d:
            raise KeyError(f"UncertaintyPostprocessd needs '{self.properties_key}' (set by BraTSPreprocessd)")
        for key in self.key_iterator(d):
            probs = d[key]
            if probs.ndim == 5:  # a batch of one case (the bundle evaluator does not decollate)
                if probs.shape[0] != 1:
                    raise ValueError(f"UncertaintyPostprocessd handles one case at a time, got batch {probs.shape[0]}")
                probs = probs[0]
            pred = postprocess_probabilities(probs, d[self.properties_key], self.mask_dilation)
            d[key] = torch.from_numpy(pred.labels[None])
            d[self.unc_key] = torch.from_numpy(pred.unc[None])
            if self.probs_key:
                d[self.probs_key] = torch.from_numpy(pred.probs)
            d["unc_source"] = pred.unc_source
        return d
