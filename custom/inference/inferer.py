"""Sliding-window probabilities over a whole preprocessed volume, with optional mirroring TTA (nnU-Net settings)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from monai.inferers import Inferer, SlidingWindowInferer

from custom.core.cli import as_bool
from custom.uncertainty.baselines import (
    PatchFn,
    mean_of,
    mirror_axes_combinations,
    mirrored_predictions,
    probability_patch_fn,
)


class UncertaintyInferer(Inferer):
    """Sliding-window probabilities over a whole preprocessed volume, with optional mirroring TTA.

    ``inferer(inputs (B,4,X',Y',Z'), network)`` runs ``sigmoid(network(patch))`` on Gaussian-weighted
    patches (nnU-Net: overlap 0.5, sigma = patch/8) and returns averaged probabilities ``(B,C,X',Y',Z')``
    float32 (C = 4 with the uncertainty channel, 3 without). Probabilities, not logits, are averaged so
    that an external ``patch_fn`` (Triton BLS) and the local network are interchangeable.

    Args:
        roi_size: patch size of the plan ``(px, py, pz)``.
        overlap: fraction of overlap between neighbouring windows.
        sw_batch_size: patches per forward pass.
        tta: average over the 8 mirrorings of the spatial axes (8x the cost).
        sigma_scale: Gaussian sigma as a fraction of the patch size.
        sw_device: device the patches run on (default: the device of the inputs).
    """

    def __init__(self, roi_size: Sequence[int], overlap: float = 0.5, sw_batch_size: int = 2, tta: bool = False,
                 sigma_scale: float = 0.125, sw_device=None) -> None:
        super().__init__()
        roi_size = [int(r) for r in roi_size]
        if len(roi_size) != 3 or min(roi_size) < 1:
            raise ValueError(f"roi_size must be three positive ints, got {roi_size}")
        if not 0.0 <= float(overlap) < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        if int(sw_batch_size) < 1:
            raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
        self.roi_size = tuple(roi_size)
        self.overlap = float(overlap)
        self.sw_batch_size = int(sw_batch_size)
        self.tta = as_bool(tta, "tta")
        self.sigma_scale = float(sigma_scale)
        self.sliding_window = SlidingWindowInferer(
            roi_size=self.roi_size, sw_batch_size=self.sw_batch_size, overlap=self.overlap, mode="gaussian",
            sigma_scale=self.sigma_scale, padding_mode="constant", cval=0.0, sw_device=sw_device)

    @property
    def passes_per_volume(self) -> int:
        """Sliding-window sweeps per volume (8 with TTA)."""
        return len(mirror_axes_combinations(self.tta))

    def predict_probabilities(self, inputs: torch.Tensor, patch_fn: PatchFn) -> torch.Tensor:
        """``inputs (B,4,X',Y',Z')`` -> averaged probabilities ``(B,C,X',Y',Z')``; ``patch_fn`` returns probabilities."""
        if inputs.ndim != 5:
            raise ValueError(f"inputs must be (B, C, X, Y, Z), got shape {tuple(inputs.shape)}")
        inputs = inputs.as_tensor() if hasattr(inputs, "as_tensor") else inputs
        inputs = inputs.float()

        def sweep(x: torch.Tensor) -> torch.Tensor:
            p = self.sliding_window(x, patch_fn)
            return p.as_tensor() if hasattr(p, "as_tensor") else p

        with torch.no_grad():
            return mean_of(mirrored_predictions(sweep, inputs, self.tta))

    def __call__(self, inputs: torch.Tensor, network: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``network`` returns logits (as ``network_def`` does); sigmoid is applied per patch."""
        return self.predict_probabilities(inputs, probability_patch_fn(network))
