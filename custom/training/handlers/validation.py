"""Validation handlers: per-case metrics, nnU-Net's EMA pseudo-Dice checkpoint, per-case CSV for evaluate.json."""

from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path
from typing import Mapping

import torch
from ignite.engine import Engine, Events
from monai.utils import CommonKeys as Keys

from custom.core.atomic import atomic_torch_save, atomic_write_bytes, atomic_write_json
from custom.core.dist import dist_ready, is_main_process, unwrap_network
from custom.core.layout import RunDir
from custom.training.handlers.error_maps import case_ids
from custom.training.metrics import ValidationCaseMetric

logger = logging.getLogger(__name__)


class ValidationMetricsHandler:
    """Ignite wrapper of :class:`custom.training.metrics.ValidationCaseMetric` (as MONAI's ``MeanDice`` wraps
    ``DiceMetric``).

    ``EPOCH_STARTED``: reset; ``ITERATION_COMPLETED``: the metric's ``update`` with the evaluator output (``pred``
    probabilities, the targets dict's ``label`` regions and ``case_id``; with uncertainty the maps that
    :class:`~custom.training.handlers.error_maps.ValidationErrorMapHandler` put into the output);
    ``EPOCH_COMPLETED``: the per-case rows, gathered over ranks and sorted by case id, go to
    ``engine.state.per_case_metrics`` and their means (``val_dice_wt, …, val_corr_var1shot``) to
    ``engine.state.metrics``.
    """

    def __init__(self, with_uncertainty: bool = True) -> None:
        self.metric = ValidationCaseMetric(with_uncertainty=with_uncertainty)

    @property
    def with_uncertainty(self) -> bool:
        return self.metric.with_uncertainty

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.compute)

    def reset(self, engine: Engine) -> None:
        self.metric.reset()

    def update(self, engine: Engine) -> None:
        output = engine.state.output
        probs = output[Keys.PRED].float()
        targets = output[Keys.LABEL]
        regions = targets["label"] if isinstance(targets, dict) else targets
        ids = case_ids(targets) if isinstance(targets, dict) else [
            str(c) for c in (engine.state.batch.get("case_id") or [f"case{engine.state.iteration}"])]
        self.metric.update(ids, probs, regions, output if self.with_uncertainty else None)

    def compute(self, engine: Engine) -> None:
        rows = self.metric.rows
        if dist_ready():
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        rows = sorted(rows, key=lambda r: r["case_id"])
        engine.state.per_case_metrics = rows
        engine.state.metrics.update(self.metric.aggregate(rows))


class PseudoDiceCheckpointHandler:
    """nnU-Net's best-checkpoint rule: EMA (0.9 old / 0.1 new) of the validation pseudo-Dice.

    At the evaluator's ``EPOCH_COMPLETED`` (after :class:`ValidationMetricsHandler`) updates
    ``ema_pseudo_dice`` (the first value is taken as is), puts it into ``engine.state.metrics`` and, when it
    improves, saves ``{"model": state_dict}`` to ``output_dir/model.pt`` atomically (rank 0). Its
    ``state_dict`` goes into ``checkpoint_last.pt`` so a resumed run keeps the best value.
    """

    def __init__(self, network: torch.nn.Module, output_dir, metric_name: str = "val_dice_mean",
                 alpha: float = 0.9) -> None:
        if not 0.0 <= float(alpha) < 1.0:
            raise ValueError(f"alpha must be in [0, 1), got {alpha}")
        self.network = network
        self.path = RunDir(output_dir).best_model
        self.metric_name = metric_name
        self.alpha = float(alpha)
        self.ema: float | None = None
        self.best: float | None = None
        self.best_epoch: int = -1

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def state_dict(self) -> dict:
        return {"ema": self.ema, "best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: Mapping) -> None:
        self.ema, self.best, self.best_epoch = state.get("ema"), state.get("best"), int(state.get("best_epoch", -1))

    def __call__(self, engine: Engine) -> None:
        value = engine.state.metrics.get(self.metric_name)
        if value is None or math.isnan(float(value)):
            logger.warning("PseudoDiceCheckpointHandler: no %s this round; best checkpoint unchanged",
                           self.metric_name)
            return
        self.ema = float(value) if self.ema is None else self.alpha * self.ema + (1 - self.alpha) * float(value)
        engine.state.metrics["ema_pseudo_dice"] = self.ema
        if self.best is None or self.ema > self.best:
            self.best, self.best_epoch = self.ema, int(engine.state.epoch)
            if is_main_process():
                atomic_torch_save({"model": unwrap_network(self.network).state_dict(), "epoch": self.best_epoch,
                                   "ema_pseudo_dice": self.ema}, self.path)
            logger.info("new best EMA pseudo-Dice %.4f at epoch %d -> %s", self.ema, self.best_epoch, self.path)


class PerCaseMetricsWriter:
    """At the evaluator's ``EPOCH_COMPLETED`` (after :class:`ValidationMetricsHandler`), write the per-case rows to
    ``csv_path`` and the case means (``engine.state.metrics``) to ``summary_path`` (JSON), atomically, rank 0."""

    def __init__(self, csv_path, summary_path=None) -> None:
        self.csv_path = Path(csv_path)
        self.summary_path = None if summary_path is None else Path(summary_path)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        rows = getattr(engine.state, "per_case_metrics", None) or []
        if not is_main_process():
            return
        columns = list(rows[0]) if rows else ["case_id"]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(self.csv_path, buf.getvalue().encode())
        if self.summary_path is not None:
            summary = {k: (None if isinstance(v, float) and math.isnan(v) else float(v))
                       for k, v in engine.state.metrics.items() if isinstance(v, (int, float))}
            summary["num_cases"] = len(rows)
            atomic_write_json(self.summary_path, summary)
        logger.info("per-case metrics of %d cases -> %s", len(rows), self.csv_path)
