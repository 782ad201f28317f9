"""nnU-Net's polynomial learning rate, computed from the epoch and the run's number of epochs (closed form).

``lr(e) = initial_lr * (1 - e / num_epochs) ** exponent`` for the epoch that starts after ``e`` completed epochs
(nnU-Net's ``PolyLRScheduler``: exponent 0.9, stepped once per epoch). Epoch 1 runs at ``initial_lr``; the last
epoch at ``initial_lr * (1 / num_epochs) ** 0.9``; after ``num_epochs`` epochs the rate is 0.

Why not ``torch.optim.lr_scheduler.PolynomialLR``: it multiplies the current rate by a factor per step and
restores its horizon (``total_iters``) from a checkpoint, so a run resumed with a larger ``--num_epochs`` kept the
old horizon and, once the old horizon was reached, trained every extra epoch at rate 0 (issue 21.1). Here the
horizon is always the running configuration's ``num_epochs`` and the rate a function of the epoch alone, as in
nnU-Net: a finished run resumed with more epochs continues on the new curve from the epoch it reached, so its
rate jumps from 0 (or its last value) up to ``initial_lr * (1 - e / num_epochs_new) ** 0.9`` and decays to 0 at
the new end.
"""

from __future__ import annotations

from typing import Any

import torch


class PolyLRScheduler(torch.optim.lr_scheduler.LRScheduler):
    """``lr(e) = base_lr * (1 - min(e, num_epochs) / num_epochs) ** exponent`` per parameter group, ``e`` = the
    scheduler's step count (``last_epoch``: completed epochs when stepped at each epoch's end).

    Args:
        optimizer: its groups' ``initial_lr`` (default: their ``lr`` at construction) is ``base_lr``.
        num_epochs: the horizon, >= 1: the running configuration's value, never one restored from a checkpoint.
        exponent: nnU-Net's 0.9.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, num_epochs: int, exponent: float = 0.9,
                 last_epoch: int = -1) -> None:
        if int(num_epochs) < 1:
            raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")
        if float(exponent) <= 0:
            raise ValueError(f"exponent must be > 0, got {exponent}")
        self.num_epochs = int(num_epochs)
        self.exponent = float(exponent)
        super().__init__(optimizer, last_epoch)

    def lr_at(self, epoch: int, base_lr: float) -> float:
        """The rate of the epoch that starts after ``epoch`` completed ones."""
        done = min(max(int(epoch), 0), self.num_epochs)
        return float(base_lr) * (1.0 - done / self.num_epochs) ** self.exponent

    def get_lr(self) -> list[float]:
        return [self.lr_at(self.last_epoch, base) for base in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        """The step count and base rates; the horizon and exponent come from the configuration, not from here."""
        state = super().state_dict()
        for key in ("num_epochs", "exponent"):
            state.pop(key, None)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the step count, keep this run's ``num_epochs``, and set every group's rate to the closed form (the
        optimizer's restored rate belongs to the old horizon)."""
        state = {k: v for k, v in state_dict.items() if k not in ("num_epochs", "exponent", "total_iters", "power")}
        super().load_state_dict(state)
        lrs = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = lrs
