"""``prepare_batch`` of the training engines: ``batch -> (image, targets dict)`` shared by the loss and the handlers."""

from __future__ import annotations

from typing import Mapping

from custom.core.cli import as_bool


def _plain(x):
    """MetaTensor -> torch.Tensor: the loss and the store need no metadata, and plain tensors are faster."""
    from monai.data import MetaTensor

    return x.as_tensor() if isinstance(x, MetaTensor) else x


class UncertaintyPrepareBatch:
    """``prepare_batch`` for MONAI engines: ``batch -> (image, targets)``.

    With ``with_uncertainty`` (default) ``targets`` is the dict the composite loss and the error-map handlers
    share: ``{"label": (B,3,…) regions, "coords": (B,3,…) case coordinates (index + 1, 0 = padding),
    "case_id": list[str], "error_stable": None}``; ``error_stable`` is filled by
    :class:`custom.training.handlers.error_maps.ErrorMapHandler` after the forward pass. Without it, ``targets`` is the region
    tensor (the baseline's plain region loss).
    """

    def __init__(self, with_uncertainty: bool = True, coords_key: str = "coords") -> None:
        self.with_uncertainty = as_bool(with_uncertainty, "with_uncertainty")
        self.coords_key = coords_key

    def __call__(self, batchdata: Mapping, device=None, non_blocking: bool = False, **kwargs):
        for key in ("image", "label"):
            if key not in batchdata:
                raise KeyError(f"batch has no '{key}' (keys: {sorted(batchdata)}); check the data transforms")
        image = _plain(batchdata["image"]).to(device=device, non_blocking=non_blocking, **kwargs)
        label = _plain(batchdata["label"]).to(device=device, non_blocking=non_blocking, **kwargs)
        if not self.with_uncertainty:
            return image, label
        if self.coords_key not in batchdata:
            raise KeyError(
                f"batch has no '{self.coords_key}'; AddCaseCoordinatesd must run before the spatial transforms"
            )
        coords = _plain(batchdata[self.coords_key]).to(device=device, non_blocking=non_blocking)
        case_id = batchdata.get("case_id")
        if case_id is None:
            raise KeyError("batch has no 'case_id'; LoadPreprocessedd adds it")
        case_ids = [case_id] if isinstance(case_id, str) else [str(c) for c in case_id]
        targets = {"label": label, "coords": coords, "case_id": case_ids, "error_stable": None}
        return image, targets
