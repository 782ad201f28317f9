"""Monitoring: ``metrics.csv`` one row per epoch, and the composite loss terms in TensorBoard."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from custom.core.atomic import atomic_write_bytes
from custom.core.dist import dist_ready, is_main_process
from custom.core.layout import METRICS_CSV_COLUMNS
from custom.core.numeric import nanmean


class MetricsCSVHandler:
    """One row per trainer epoch in ``metrics.csv`` (columns :data:`METRICS_CSV_COLUMNS`), rewritten atomically.

    ``train_loss`` is the mean iteration loss of the epoch, ``lr`` the learning rate the epoch ran with,
    ``time_s`` the epoch's wall time including validation; validation columns are empty on epochs without
    validation. Rows of epochs later than the current one (left by a killed run before a resume) are dropped.

    Args:
        path: the CSV file.
        validator: the evaluator whose ``state.metrics`` hold the ``val_*`` values of this epoch.
        optimizer: source of the learning rate (first parameter group).
    """

    def __init__(self, path, validator: Engine | None = None, optimizer=None) -> None:
        self.path = Path(path)
        self.validator = validator
        self.optimizer = optimizer
        self._losses: list[float] = []
        self._lr = float("nan")
        self._t0 = time.perf_counter()

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def epoch_started(self, engine: Engine) -> None:
        self._losses, self._t0 = [], time.perf_counter()
        if self.optimizer is not None:
            self._lr = float(self.optimizer.param_groups[0]["lr"])

    def iteration_completed(self, engine: Engine) -> None:
        out = engine.state.output
        loss = out.get("loss") if isinstance(out, dict) else None
        if loss is not None:
            self._losses.append(float(loss.detach().item() if isinstance(loss, torch.Tensor) else loss))

    def _read_rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path, newline="") as fh:
            return list(csv.DictReader(fh))

    def epoch_completed(self, engine: Engine) -> None:
        epoch = int(engine.state.epoch)
        row: dict[str, Any] = dict.fromkeys(METRICS_CSV_COLUMNS, "")
        losses = self._losses
        if dist_ready():
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, losses)
            losses = [v for part in gathered for v in part]
        row.update(epoch=epoch, train_loss=nanmean(losses), lr=self._lr, time_s=time.perf_counter() - self._t0)
        validator = self.validator
        if validator is not None and getattr(validator.state, "epoch", None) == epoch:
            for col in METRICS_CSV_COLUMNS[4:]:
                value = validator.state.metrics.get(col)
                if value is not None:
                    row[col] = float(value)
        if not is_main_process():
            return
        rows = [r for r in self._read_rows() if r.get("epoch", "").isdigit() and int(r["epoch"]) < epoch]
        rows.append(row)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(METRICS_CSV_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(self.path, buf.getvalue().encode())


class LossTermsHandler:
    """Write the composite loss terms (``loss_function.last_terms``) of each iteration to TensorBoard."""

    def __init__(self, loss_function, summary_writer=None, log_dir: str | None = None, prefix: str = "loss/") -> None:
        self.loss_function = loss_function
        self.prefix = prefix
        if summary_writer is None and log_dir is not None and is_main_process():
            from torch.utils.tensorboard import SummaryWriter

            summary_writer = SummaryWriter(log_dir=log_dir)
        self.writer = summary_writer

    def attach(self, engine: Engine) -> None:
        from monai.engines.utils import IterationEvents

        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        terms = getattr(self.loss_function, "last_terms", None) or {}
        if self.writer is None:
            return
        for name, value in terms.items():
            self.writer.add_scalar(self.prefix + name, float(value), engine.state.iteration)
