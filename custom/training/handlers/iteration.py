"""Per-iteration mechanics: the epoch of the patch sampler and gradient-norm clipping."""

from __future__ import annotations

from typing import Any

import torch
from ignite.engine import Engine, Events


class SetEpochHandler:
    """Call ``target.set_epoch(engine.state.epoch)`` at every ``EPOCH_STARTED`` (e.g. :class:`PatchDataset`).

    Ignite builds the epoch's DataLoader iterator after ``EPOCH_STARTED``, so workers see the new epoch.
    """

    def __init__(self, target: Any) -> None:
        if not hasattr(target, "set_epoch"):
            raise TypeError(f"SetEpochHandler: {type(target).__name__} has no set_epoch()")
        self.target = target

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        self.target.set_epoch(engine.state.epoch)


class GradientClipHandler:
    """nnU-Net's gradient-norm clipping (12) after ``backward`` and before the optimizer step.

    With AMP the gradients are unscaled first (``engine.scaler.unscale_``), as nnU-Net does.
    """

    def __init__(self, network: torch.nn.Module, max_norm: float | None = 12.0) -> None:
        if max_norm is not None and float(max_norm) <= 0:
            raise ValueError(f"max_norm must be > 0 or None, got {max_norm}")
        self.network = network
        self.max_norm = None if max_norm is None else float(max_norm)

    def attach(self, engine: Engine) -> None:
        from monai.engines.utils import IterationEvents

        if self.max_norm is not None:
            engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        scaler = getattr(engine, "scaler", None)
        if scaler is not None and getattr(engine, "amp", False):
            scaler.unscale_(engine.optimizer)
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.max_norm)
