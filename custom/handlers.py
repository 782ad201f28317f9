"""Ignite handlers of the training bundle: error-map store updates, validation metrics, checkpoints, resume, CSV.

Each handler has ``attach(engine)`` so configs list it under ``train_handlers`` / ``val_handlers``. Files are
written only by the main process (rank 0) and always atomically (:mod:`custom.io_utils`).

Event order that the configs rely on (Ignite fires handlers of one event in attach order):
trainer ``EPOCH_COMPLETED``: LR step -> validation -> :class:`MetricsCSVHandler` -> :class:`TrainingCheckpointHandler`,
so ``checkpoint_last.pt`` holds the stepped scheduler and the validation state of the same epoch.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events

from custom.io_utils import atomic_torch_save, atomic_write_bytes, atomic_write_json
from custom.training import is_main_process

logger = logging.getLogger(__name__)

__all__ = [
    "METRICS_CSV_COLUMNS",
    "SetEpochHandler",
    "ErrorMapHandler",
    "ValidationErrorMapHandler",
    "ValidationMetricsHandler",
    "PseudoDiceCheckpointHandler",
    "MetricsCSVHandler",
    "TrainingCheckpointHandler",
    "ResumeHandler",
    "RunSetupHandler",
    "GradientClipHandler",
    "LossTermsHandler",
    "unwrap_network",
    "PerCaseMetricsWriter",
]

#: columns of ``metrics.csv``, exactly as bundle/docs/DESIGN.md lists them
METRICS_CSV_COLUMNS = (
    "epoch", "train_loss", "lr", "time_s", "val_dice_wt", "val_dice_tc", "val_dice_et", "val_dice_mean",
    "val_rmsd_unc", "val_corr_unc", "val_rmsd_variance_stable", "val_corr_variance_stable",
    "val_rmsd_var1shot", "val_corr_var1shot", "ema_pseudo_dice",
)
#: uncertainty sources compared against error_stable, with their metric-name stems
UNC_SOURCES = (("unc_output", "unc"), ("variance_stable", "variance_stable"), ("var1shot", "var1shot"))


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _barrier() -> None:
    if _dist_ready():
        torch.distributed.barrier()


def unwrap_network(network: torch.nn.Module) -> torch.nn.Module:
    """The module whose ``state_dict`` is saved: strips DDP / DataParallel wrappers (no ``module.`` prefix)."""
    while isinstance(network, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        network = network.module
    return network


def _state_of(obj: Any) -> Any:
    if isinstance(obj, torch.nn.Module):
        return unwrap_network(obj).state_dict()
    return obj.state_dict()


def _load_into(obj: Any, state: Any) -> None:
    if isinstance(obj, torch.nn.Module):
        unwrap_network(obj).load_state_dict(state)
    else:
        obj.load_state_dict(state)


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


def _case_ids(targets: Mapping) -> list[str]:
    ids = targets.get("case_id")
    if ids is None:
        raise KeyError("targets have no 'case_id'; use custom.training.UncertaintyPrepareBatch")
    return [ids] if isinstance(ids, str) else [str(c) for c in ids]


def _check_target_transform(target_transform: str) -> str:
    if target_transform not in ("none", "paper"):
        raise ValueError(f"target_transform must be 'none' or 'paper', got {target_transform!r}")
    return target_transform


def _update_and_gather(store, ids, coords, failure_smoothed, var1shot, device):
    """EMA step at the patch's case voxels, then read back: the target includes this iteration's observation."""
    if hasattr(store, "update_and_gather_batch"):  # one coordinate analysis per patch instead of two
        return store.update_and_gather_batch(ids, coords, failure_smoothed, var1shot, device=device)
    store.scatter_batch(ids, coords, failure_smoothed, var1shot)
    return store.gather_batch(ids, coords, device=device)


def _error_map_step(store, targets: Mapping, p_wt: torch.Tensor, gt_wt: torch.Tensor, target_transform: str,
                    update_store: bool = True):
    """The shared error-map step of training and validation, all ``(B, 1, ...)``.

    ``p_WT`` vs GT WT -> failure -> 3x3x3 smoothing, and ``var1shot``; with a store, the EMA step at the
    case coordinates of ``targets`` (or a plain read when ``update_store`` is False) gives ``error_stable``
    and ``variance_stable``; without one, they are this observation itself.
    Returns ``(error_stable, variance_stable, var1shot)``.
    """
    from custom.error_maps import (compute_prediction_failure, compute_prediction_variance,
                                   paper_target_transform, smooth_failure)

    failure_smoothed = smooth_failure(compute_prediction_failure(p_wt, gt_wt))
    var1shot = compute_prediction_variance(p_wt)
    if store is None:
        error_stable, variance_stable = failure_smoothed, var1shot
    else:
        ids, coords = _case_ids(targets), targets["coords"]
        if update_store:
            error_stable, variance_stable = _update_and_gather(store, ids, coords, failure_smoothed, var1shot,
                                                               p_wt.device)
        else:
            error_stable, variance_stable = store.gather_batch(ids, coords, device=p_wt.device)
    if target_transform == "paper":
        error_stable = paper_target_transform(error_stable, gt_wt.to(error_stable.device))
    return error_stable, variance_stable, var1shot


class ErrorMapHandler:
    """Training: the uncertainty target ``error_stable`` of each patch, from the case-space EMA store.

    Attached at ``IterationEvents.FORWARD_COMPLETED`` of the ``SupervisedTrainer`` (after the forward pass,
    before the loss): ``p_WT = sigmoid(pred[:, 0])`` (detached) -> failure vs GT WT -> 3x3x3 smoothing ->
    ``store.scatter_batch`` at the patch's case coordinates -> ``store.gather_batch`` ->
    ``targets["error_stable"]`` (B,1,…) in place, so the loss receives it. ``var1shot`` is scattered the
    same way and ``variance_stable`` gathered into ``targets["variance_stable"]``.

    Args:
        store: :class:`custom.error_maps.ErrorMapStore` holding the fold's cases.
        target_transform: ``"none"`` (error_stable as is) or ``"paper"`` (``paper_target_transform``).
    """

    def __init__(self, store, target_transform: str = "none") -> None:
        if store is None:
            raise ValueError("ErrorMapHandler needs the fold's ErrorMapStore (the training target comes from it)")
        self.store = store
        self.target_transform = _check_target_transform(target_transform)

    def attach(self, engine: Engine) -> None:
        from monai.engines.utils import IterationEvents

        engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, self)

    @torch.no_grad()
    def __call__(self, engine: Engine) -> None:
        from monai.utils import CommonKeys as Keys

        output = engine.state.output
        targets = output[Keys.LABEL]
        if not isinstance(targets, dict):
            raise TypeError("ErrorMapHandler needs the targets dict of UncertaintyPrepareBatch(with_uncertainty=True)")
        pred = output[Keys.PRED]
        if isinstance(pred, (list, tuple)):  # deep supervision: full-resolution head first
            pred = pred[0]
        if pred.ndim == 6:  # DynUNet stacks deep-supervision heads on dim 1 in training
            pred = pred[:, 0]
        p_wt = torch.sigmoid(pred[:, 0:1].detach().float())
        gt_wt = targets["label"][:, 0:1].float()
        error_stable, variance_stable, _ = _error_map_step(self.store, targets, p_wt, gt_wt, self.target_transform)
        targets["error_stable"] = error_stable
        targets["variance_stable"] = variance_stable


class ValidationErrorMapHandler:
    """Validation: full-volume outputs and the validation cases' own ``error_stable``.

    Attached at ``IterationEvents.FORWARD_COMPLETED`` of the ``SupervisedEvaluator`` whose network returns
    probabilities ``(B, 4, X, Y, Z)`` of whole preprocessed cases (sliding window over
    :class:`custom.networks.PatchProbabilityNetwork`). Adds to ``engine.state.output``:
    ``unc_output`` = channel 3 x ``get_cancer_mask(p_WT, mask_dilation)`` (as at inference), ``var1shot``,
    and, from the store updated with the same EMA schedule (identity coordinates), ``error_stable`` and
    ``variance_stable``; all ``(B, 1, X, Y, Z)``.

    Args:
        store: the fold's store (val cases included), or None to skip the store (then error_stable is
            the current prediction failure, smoothed).
        mask_dilation: voxels of dilation of the predicted WT for the cancer mask.
        target_transform: as :class:`ErrorMapHandler` (applied to the reported error_stable).
        update_store: False reads the store without an EMA step (evaluation of a finished run).
    """

    def __init__(self, store=None, mask_dilation: int = 3, target_transform: str = "none",
                 update_store: bool = True) -> None:
        if int(mask_dilation) < 0:
            raise ValueError(f"mask_dilation must be >= 0, got {mask_dilation}")
        self.store = store
        self.mask_dilation = int(mask_dilation)
        self.target_transform = _check_target_transform(target_transform)
        self.update_store = bool(update_store)

    def attach(self, engine: Engine) -> None:
        from monai.engines.utils import IterationEvents

        engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, self)

    @torch.no_grad()
    def __call__(self, engine: Engine) -> None:
        from monai.utils import CommonKeys as Keys

        from custom.networks import get_cancer_mask

        output = engine.state.output
        probs = output[Keys.PRED].float()
        if probs.shape[1] < 4:
            raise ValueError(f"ValidationErrorMapHandler needs 4 output channels, got {probs.shape[1]}")
        targets = output[Keys.LABEL]
        gt_wt = targets["label"][:, 0:1].float()
        p_wt = probs[:, 0:1]
        cancer_mask = get_cancer_mask(p_wt, dilation=self.mask_dilation)
        output["unc_output"] = probs[:, 3:4] * cancer_mask.to(probs.dtype)
        error_stable, variance_stable, var1shot = _error_map_step(self.store, targets, p_wt, gt_wt,
                                                                  self.target_transform, self.update_store)
        output["var1shot"] = var1shot
        output["error_stable"] = error_stable
        output["variance_stable"] = variance_stable


def _nanmean(values: Sequence[float]) -> float:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else float("nan")


class ValidationMetricsHandler:
    """Per-case validation metrics (custom.metrics) and their case means in ``engine.state.metrics``.

    Per case: Dice WT/TC/ET (prediction ``probs > 0.5`` per region) and their mean; with uncertainty, RMSD and
    weighted Pearson correlation against ``error_stable`` over GT WT for ``unc_output``, ``variance_stable``
    and ``var1shot``. At ``EPOCH_COMPLETED`` the per-case rows (gathered over ranks) are averaged
    (NaN-skipping, e.g. a constant map has no correlation) into ``val_dice_wt, …, val_corr_var1shot``;
    the rows stay in ``engine.state.per_case_metrics``.
    """

    def __init__(self, with_uncertainty: bool = True) -> None:
        self.with_uncertainty = bool(with_uncertainty)
        self._rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.compute)

    def reset(self, engine: Engine) -> None:
        self._rows = []

    @torch.no_grad()
    def update(self, engine: Engine) -> None:
        from monai.utils import CommonKeys as Keys

        from custom.metrics import dice_per_region, uncertainty_agreement

        output = engine.state.output
        probs = output[Keys.PRED].float()
        targets = output[Keys.LABEL]
        regions = targets["label"] if isinstance(targets, dict) else targets
        ids = _case_ids(targets) if isinstance(targets, dict) else [
            str(c) for c in (engine.state.batch.get("case_id") or [f"case{engine.state.iteration}"])]
        for b in range(probs.shape[0]):
            gt = regions[b].float()
            pred_regions = (probs[b, :3] > 0.5).float()
            dice = dice_per_region(pred_regions, gt)
            row = {"case_id": ids[b], "dice_wt": float(dice["WT"]), "dice_tc": float(dice["TC"]),
                   "dice_et": float(dice["ET"])}
            row["dice_mean"] = float(np.mean([row["dice_wt"], row["dice_tc"], row["dice_et"]]))
            if self.with_uncertainty:
                wt = gt[0:1] > 0.5
                e = output["error_stable"][b]
                for key, stem in UNC_SOURCES:
                    rmsd, corr = uncertainty_agreement(output[key][b], e, wt)
                    row[f"rmsd_{stem}"], row[f"corr_{stem}"] = float(rmsd), float(corr)
            self._rows.append(row)

    def compute(self, engine: Engine) -> None:
        rows = self._rows
        if _dist_ready():
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        rows = sorted(rows, key=lambda r: r["case_id"])
        engine.state.per_case_metrics = rows
        keys = ["dice_wt", "dice_tc", "dice_et", "dice_mean"]
        if self.with_uncertainty:
            keys += [f"{m}_{stem}" for _, stem in UNC_SOURCES for m in ("rmsd", "corr")]
        for key in keys:
            engine.state.metrics[f"val_{key}"] = _nanmean([r.get(key) for r in rows])


class PseudoDiceCheckpointHandler:
    """nnU-Net's best-checkpoint rule: EMA (0.9 old / 0.1 new) of the validation pseudo-Dice.

    At the evaluator's ``EPOCH_COMPLETED`` (after :class:`ValidationMetricsHandler`) updates
    ``ema_pseudo_dice`` (the first value is taken as is), puts it into ``engine.state.metrics`` and, when it
    improves, saves ``{"model": state_dict}`` to ``output_dir/model.pt`` atomically (rank 0). Its
    ``state_dict`` goes into ``checkpoint_last.pt`` so a resumed run keeps the best value.
    """

    def __init__(self, network: torch.nn.Module, output_dir, metric_name: str = "val_dice_mean",
                 alpha: float = 0.9, filename: str = "model.pt") -> None:
        if not 0.0 <= float(alpha) < 1.0:
            raise ValueError(f"alpha must be in [0, 1), got {alpha}")
        self.network = network
        self.path = Path(output_dir) / filename
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
        if _dist_ready():
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, losses)
            losses = [v for part in gathered for v in part]
        row.update(epoch=epoch, train_loss=_nanmean(losses), lr=self._lr, time_s=time.perf_counter() - self._t0)
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


class TrainingCheckpointHandler:
    """``checkpoint_last.pt`` + ``store_snapshot/`` every ``interval`` epochs and at the end; ``model_final.pt``
    and the ``FINISHED`` marker when training completes.

    The store snapshot is written first (with the epoch in ``store_snapshot/epoch.json``), then the checkpoint,
    both atomically; a run killed between the two resumes from the older checkpoint with a store at most one
    interval ahead (:class:`ResumeHandler` warns). All ranks call it (barrier), rank 0 writes.

    Args:
        output_dir: run folder.
        save_dict: ``{"network": …, "optimizer": …, "lr_scheduler": …, …}``; anything with ``state_dict()``;
            networks are saved unwrapped. The engine the handler is attached to is added as ``"trainer"``
            (a config cannot reference the trainer from inside its own handler list).
        store: the error-map store to snapshot, or None (baseline).
        interval: epochs between checkpoints (>= 1).
        network: network for ``model_final.pt`` (default ``save_dict["network"]``).
    """

    def __init__(self, output_dir, save_dict: Mapping[str, Any], store=None, interval: int = 1,
                 network: torch.nn.Module | None = None) -> None:
        if int(interval) < 1:
            raise ValueError(f"checkpoint interval must be >= 1, got {interval}")
        self.output_dir = Path(output_dir)
        self.save_dict = dict(save_dict)
        self.store = store
        self.interval = int(interval)
        self.network = network if network is not None else self.save_dict.get("network")

    def attach(self, engine: Engine) -> None:
        self.save_dict.setdefault("trainer", engine)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def save_last(self, engine: Engine) -> None:
        _barrier()
        if is_main_process():
            epoch = int(engine.state.epoch)
            if self.store is not None:
                snap = self.store.snapshot(self.output_dir / "store_snapshot")
                atomic_write_json(snap / "epoch.json", {"epoch": epoch})
            state = {k: _state_of(v) for k, v in self.save_dict.items()}
            scaler = getattr(engine, "scaler", None)
            if scaler is not None:  # AMP loss scale, so a resumed CUDA run does not restart its calibration
                state["grad_scaler"] = scaler.state_dict()
            state["epoch"] = epoch
            atomic_torch_save(state, self.output_dir / "checkpoint_last.pt")
        _barrier()

    def epoch_completed(self, engine: Engine) -> None:
        if engine.state.epoch % self.interval == 0:
            self.save_last(engine)

    def completed(self, engine: Engine) -> None:
        if engine.state.epoch % self.interval != 0:
            self.save_last(engine)
        if is_main_process() and self.network is not None:
            atomic_torch_save({"model": unwrap_network(self.network).state_dict(), "epoch": int(engine.state.epoch)},
                              self.output_dir / "model_final.pt")
            atomic_write_bytes(self.output_dir / "FINISHED", f"epoch {int(engine.state.epoch)}\n".encode())
        _barrier()


class ResumeHandler:
    """``--resume true``: at ``STARTED`` load ``checkpoint_last.pt`` (``weights_only=True``) into the objects of
    ``load_dict`` (network, optimizer, lr_scheduler, …; the engine itself as ``"trainer"``) and restore the
    store from ``store_snapshot/``.

    The trainer keeps its configured ``max_epochs`` (training can be extended). Without a checkpoint it warns
    and starts from scratch, like nnU-Net's ``--c``. Disabled (a no-op) when ``enabled`` is False.
    """

    def __init__(self, output_dir, load_dict: Mapping[str, Any], store=None, enabled: bool = True,
                 map_location: Any = "cpu") -> None:
        self.output_dir = Path(output_dir)
        self.load_dict = dict(load_dict)
        from custom.cli import as_bool

        self.store = store
        self.enabled = as_bool(enabled, "resume")
        self.map_location = map_location

    @property
    def checkpoint_path(self) -> Path:
        return self.output_dir / "checkpoint_last.pt"

    def attach(self, engine: Engine) -> None:
        self.load_dict.setdefault("trainer", engine)
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if not self.enabled:
            return
        path = self.checkpoint_path
        if not path.exists():
            logger.warning("resume requested but %s does not exist: starting a new training", path)
            return
        try:
            state = torch.load(str(path), map_location=self.map_location, weights_only=True)
        except Exception as exc:  # a truncated or foreign file: say which one
            from custom.errors import BraTSInputError

            raise BraTSInputError(f"{path}: cannot load checkpoint ({type(exc).__name__}: {exc})",
                                  header="cannot resume training") from exc
        missing = [k for k in self.load_dict if k not in state]
        if missing:
            from custom.errors import BraTSInputError

            raise BraTSInputError(f"{path}: checkpoint lacks {missing} (has {sorted(state)})",
                                  header="cannot resume training")
        max_epochs = engine.state.max_epochs
        for key, obj in self.load_dict.items():
            _load_into(obj, state[key])
        engine.state.max_epochs = max_epochs
        scaler = getattr(engine, "scaler", None)
        if scaler is not None and "grad_scaler" in state:
            scaler.load_state_dict(state["grad_scaler"])
        if self.store is not None:
            snap = self.output_dir / "store_snapshot"
            if is_main_process():
                if not (snap / "index.json").exists():
                    logger.warning("no store snapshot in %s: the EMA store starts from zero", snap)
                else:
                    epoch_file = snap / "epoch.json"
                    snap_epoch = None
                    if epoch_file.exists():
                        snap_epoch = json.loads(epoch_file.read_text()).get("epoch")
                    if snap_epoch != state.get("epoch"):
                        logger.warning("store snapshot is from epoch %s, checkpoint from epoch %s",
                                       snap_epoch, state.get("epoch"))
                    self.store.restore(snap)
            else:
                self.store.close()
            _barrier()
        logger.info("resumed from %s at epoch %s (iteration %s)", path, engine.state.epoch, engine.state.iteration)


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


class RunSetupHandler:
    """At ``STARTED`` (rank 0): create ``output_dir``, copy ``plans.json`` into it and remove a stale ``FINISHED``."""

    def __init__(self, output_dir, plans_path) -> None:
        self.output_dir = Path(output_dir)
        self.plans_path = Path(plans_path)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if not is_main_process():
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.output_dir / "plans.json", self.plans_path.read_bytes())
        (self.output_dir / "FINISHED").unlink(missing_ok=True)


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
