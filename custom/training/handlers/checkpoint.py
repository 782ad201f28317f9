"""Run folder state: setup, ``checkpoint_last.pt`` + store snapshot as one unit, ``model_final.pt``, resume,
and the stop on a non-finite loss."""

from __future__ import annotations

import logging
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Mapping

import torch
from ignite.engine import Engine, Events

from custom.core.atomic import atomic_torch_save, atomic_write_bytes, verify_checksum
from custom.core.cli import as_bool
from custom.core.dist import barrier, is_main_process, unwrap_network
from custom.core.errors import BraTSInputError
from custom.core.layout import RunDir, is_temporary_name
from custom.uncertainty.store_files import read_meta

logger = logging.getLogger(__name__)


class NonFiniteTrainingError(RuntimeError):
    """The training loss (or the state about to be saved) became NaN or infinite: the run stops, nothing more is written."""


def _state_of(obj: Any) -> Any:
    if isinstance(obj, torch.nn.Module):
        return unwrap_network(obj).state_dict()
    return obj.state_dict()


def _load_into(obj: Any, state: Any) -> None:
    if isinstance(obj, torch.nn.Module):
        unwrap_network(obj).load_state_dict(state)
    else:
        obj.load_state_dict(state)


def non_finite_entries(state: Any, prefix: str = "", limit: int = 5) -> list[str]:
    """Names (``network.conv.weight``) of floating tensors and floats in a nested state that hold NaN or inf."""
    found: list[str] = []

    def walk(obj, name):
        if len(found) >= limit:
            return
        if torch.is_tensor(obj):
            if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
                found.append(name)
        elif isinstance(obj, float):
            if not math.isfinite(obj):
                found.append(name)
        elif isinstance(obj, Mapping):
            for k, v in obj.items():
                walk(v, f"{name}.{k}" if name else str(k))
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{name}[{i}]")

    walk(state, prefix)
    return found


class NonFiniteLossGuard:
    """Stop training with :class:`NonFiniteTrainingError` when an iteration's loss is NaN or infinite.

    Ignite's ``TerminateOnNan`` ends the run *normally*: ``COMPLETED`` still fires, so ``model_final.pt``
    (NaN weights) and the ``FINISHED`` marker are written and the process exits 0. This guard raises
    instead (``ITERATION_COMPLETED``), so the run fails, nothing is checkpointed after the last good
    epoch, and ``--resume true`` retries from it.

    Args:
        output_dir: run folder (named in the message).
        loss_key: key of the loss in ``engine.state.output``.
    """

    def __init__(self, output_dir, loss_key: str = "loss") -> None:
        self.run = RunDir(output_dir)
        self.loss_key = loss_key

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        loss = output.get(self.loss_key) if isinstance(output, Mapping) else output
        if loss is None:
            return
        value = float(loss.detach().float().mean()) if torch.is_tensor(loss) else float(loss)
        if not math.isfinite(value):
            last = self.run.checkpoint_last
            raise NonFiniteTrainingError(
                f"training loss is {value} at epoch {engine.state.epoch}, iteration {engine.state.iteration}; "
                f"training stopped with nothing written after the last checkpoint "
                f"({last if last.exists() else 'none yet'}); lower the learning rate or check the inputs, then "
                f"resume with --resume true")


class TrainingCheckpointHandler:
    """``checkpoint_last.pt`` + ``store_snapshot/`` every ``interval`` epochs and at the end; ``model_final.pt``
    and the ``FINISHED`` marker when training completes. Each ``.pt`` gets its SHA-256 beside it
    (``<name>.sha256``, :func:`custom.core.atomic.atomic_torch_save`).

    The checkpoint and the store snapshot are one unit: the snapshot is written (checked, fsynced) to
    ``.store_snapshot.pending/`` with a fresh token and the epoch in ``epoch.json``; then the checkpoint,
    which records that token, is renamed into place (the commit); then the pending snapshot is renamed to
    ``store_snapshot/``. :class:`ResumeHandler` restores the snapshot whose token the checkpoint names,
    wherever a kill left it, so a resumed run never pairs a checkpoint with a store of another epoch. A
    failed write (disk full: ``OSError`` ``ENOSPC`` naming the file) leaves the previous checkpoint and
    snapshot as they were. A state with non-finite values is never written. All ranks call it
    (barrier), rank 0 writes.

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
        self.run = RunDir(output_dir)
        self.save_dict = dict(save_dict)
        self.store = store
        self.interval = int(interval)
        self.network = network if network is not None else self.save_dict.get("network")

    def attach(self, engine: Engine) -> None:
        self.save_dict.setdefault("trainer", engine)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def _refuse_non_finite(self, state: Mapping, what: str) -> None:
        bad = non_finite_entries(state)
        if bad:
            raise NonFiniteTrainingError(f"{what}: non-finite values in {', '.join(bad)}; not written (the previous "
                                     f"{self.run.checkpoint_last.name} stays)")

    def save_last(self, engine: Engine) -> None:
        barrier()
        if is_main_process():
            epoch = int(engine.state.epoch)
            state = {k: _state_of(v) for k, v in self.save_dict.items()}
            scaler = getattr(engine, "scaler", None)
            if scaler is not None:  # AMP loss scale, so a resumed CUDA run does not restart its calibration
                state["grad_scaler"] = scaler.state_dict()
            state["epoch"] = epoch
            self._refuse_non_finite({k: state[k] for k in ("network", "optimizer") if k in state},
                                    f"{self.run.checkpoint_last} of epoch {epoch}")
            if self.store is None:
                atomic_torch_save(state, self.run.checkpoint_last)
            else:
                record = {"epoch": epoch, "token": uuid.uuid4().hex}
                pending = self.run.store_snapshot_pending
                shutil.rmtree(pending, ignore_errors=True)
                try:
                    self.store.snapshot(pending, meta=record)
                    state["store_snapshot"] = record
                    atomic_torch_save(state, self.run.checkpoint_last)  # the commit
                except BaseException:
                    shutil.rmtree(pending, ignore_errors=True)
                    raise
                promote_pending_snapshot(self.run)
        barrier()

    def epoch_completed(self, engine: Engine) -> None:
        if engine.state.epoch % self.interval == 0:
            self.save_last(engine)

    def completed(self, engine: Engine) -> None:
        if engine.state.epoch % self.interval != 0:
            self.save_last(engine)
        if is_main_process() and self.network is not None:
            weights = unwrap_network(self.network).state_dict()
            self._refuse_non_finite({"network": weights}, str(self.run.final_model))
            atomic_torch_save({"model": weights, "epoch": int(engine.state.epoch)}, self.run.final_model)
            atomic_write_bytes(self.run.finished_marker, f"epoch {int(engine.state.epoch)}\n".encode())
        barrier()


def promote_pending_snapshot(run: RunDir) -> Path:
    """``.store_snapshot.pending/`` -> ``store_snapshot/`` (the replaced one via ``.store_snapshot.previous/``)."""
    pending, current, previous = run.store_snapshot_pending, run.store_snapshot, run.store_snapshot_previous
    if current.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(current, previous)
    os.replace(pending, current)
    shutil.rmtree(previous, ignore_errors=True)
    return current


def remove_stale_temporaries(run: RunDir) -> list[str]:
    """Remove what killed writes left in the run folder (hidden ``.name.tmp-PID`` files and folders)."""
    removed = []
    for entry in run.path.iterdir():
        if is_temporary_name(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry.name)
    if removed:
        logger.warning("removed unfinished writes of an earlier process in %s: %s", run.path, ", ".join(removed))
    return removed


def find_store_snapshot(run: RunDir, record: Mapping | None, checkpoint: Path) -> Path:
    """The store snapshot written with ``checkpoint`` (its ``store_snapshot`` record): ``store_snapshot/``, or
    the pending / previous copy a kill left during the renames (a pending one is renamed into place).

    Raises:
        BraTSInputError: the checkpoint records no snapshot, or no copy carries its token (named, with what
            each copy holds).
    """
    if not isinstance(record, Mapping) or "token" not in record:
        raise BraTSInputError(f"{checkpoint}: records no store snapshot (not written by this version, or by a run "
                              "without the EMA store), so the EMA store cannot be restored to match it; start a "
                              "new run (--resume false)", header="cannot resume training")
    seen = []
    for candidate in (run.store_snapshot, run.store_snapshot_pending, run.store_snapshot_previous):
        meta = read_meta(candidate)
        if meta is not None and meta.get("token") == record["token"]:
            if candidate == run.store_snapshot_pending:
                logger.warning("completing the interrupted rename of the store snapshot of epoch %s", record["epoch"])
                return promote_pending_snapshot(run)
            return candidate
        if candidate.exists():
            seen.append(f"{candidate}: " + (f"epoch {meta.get('epoch')}, another save" if meta else "no epoch.json"))
    raise BraTSInputError(
        [f"{checkpoint}: epoch {record.get('epoch')} was saved with a store snapshot that is not in {run.path}"]
        + (seen or [f"{run.store_snapshot}: missing"])
        + ["the EMA store cannot be restored to match the checkpoint; start a new run (--resume false)"],
        header="cannot resume training")


class ResumeHandler:
    """``--resume true``: at ``STARTED`` verify ``checkpoint_last.pt`` (its ``.sha256``, finite values), load it
    (``weights_only=True``) into the objects of ``load_dict`` (network, optimizer, lr_scheduler, …; the engine
    itself as ``"trainer"``) and restore the store from the snapshot written with it (checked map by map).

    The trainer keeps its configured ``max_epochs`` (training can be extended; the learning rate then follows the
    new horizon: :class:`custom.training.schedule.PolyLRScheduler`) and epoch length. Without a checkpoint it warns
    and starts from scratch, like nnU-Net's ``--c``, with the store reset to zero (a run killed before its
    first checkpoint left updates in it). Disabled (a no-op) when ``enabled`` is False.

    Raises (at ``STARTED``):
        BraTSInputError: a corrupt checkpoint (checksum), non-finite values in it, a store snapshot that
            does not match it or is damaged; each names the file.
    """

    def __init__(self, output_dir, load_dict: Mapping[str, Any], store=None, enabled: bool = True,
                 map_location: Any = "cpu") -> None:
        self.run = RunDir(output_dir)
        self.load_dict = dict(load_dict)
        self.store = store
        self.enabled = as_bool(enabled, "resume")
        self.map_location = map_location

    @property
    def checkpoint_path(self) -> Path:
        return self.run.checkpoint_last

    def attach(self, engine: Engine) -> None:
        self.load_dict.setdefault("trainer", engine)
        engine.add_event_handler(Events.STARTED, self)

    def _load_checkpoint(self) -> dict:
        path = self.checkpoint_path
        verify_checksum(path)
        try:
            state = torch.load(str(path), map_location=self.map_location, weights_only=True)
        except Exception as exc:  # a truncated or foreign file: say which one
            raise BraTSInputError(f"{path}: cannot load checkpoint ({type(exc).__name__}: {exc})",
                                  header="cannot resume training") from exc
        if not isinstance(state, dict):
            raise BraTSInputError(f"{path}: holds a {type(state).__name__}, not a training checkpoint",
                                  header="cannot resume training")
        missing = [k for k in self.load_dict if k not in state]
        if missing:
            raise BraTSInputError(f"{path}: checkpoint lacks {missing} (has {sorted(state)})",
                                  header="cannot resume training")
        bad = non_finite_entries({k: state[k] for k in self.load_dict if k != "trainer"})
        if bad:
            raise BraTSInputError(f"{path}: non-finite values in {', '.join(bad)}", header="cannot resume training")
        return state

    def __call__(self, engine: Engine) -> None:
        if not self.enabled:
            return
        path = self.checkpoint_path
        if not path.exists():
            logger.warning("resume requested but %s does not exist: starting a new training", path)
            if self.store is not None:
                if is_main_process():
                    self.store.reset()
                else:
                    self.store.close()
                barrier()
            return
        state = self._load_checkpoint()
        if is_main_process():
            remove_stale_temporaries(self.run)
        if self.store is not None:
            if is_main_process():
                snap = find_store_snapshot(self.run, state.get("store_snapshot"), path)
                self.store.restore(snap)
                for stale in (self.run.store_snapshot_pending, self.run.store_snapshot_previous):
                    if stale != snap:
                        shutil.rmtree(stale, ignore_errors=True)
            else:
                self.store.close()
            barrier()
        max_epochs, epoch_length = engine.state.max_epochs, engine.state.epoch_length
        for key, obj in self.load_dict.items():
            _load_into(obj, state[key])
        engine.state.max_epochs = max_epochs
        if epoch_length is not None and engine.state.epoch_length != epoch_length:
            # resumed with another iterations_per_epoch (--resume_config_mismatch warn): the configured length
            # holds from the epoch reached, whose boundary the iteration counter keeps
            engine.state.epoch_length = epoch_length
            engine.state.iteration = engine.state.epoch * epoch_length
        scaler = getattr(engine, "scaler", None)
        if scaler is not None and "grad_scaler" in state:
            scaler.load_state_dict(state["grad_scaler"])
        logger.info("resumed from %s at epoch %s (iteration %s)", path, engine.state.epoch, engine.state.iteration)


class RunSetupHandler:
    """At ``STARTED`` (rank 0): create ``output_dir``, copy ``plans.json`` into it and remove a stale ``FINISHED``."""

    def __init__(self, output_dir, plans_path) -> None:
        self.run = RunDir(output_dir)
        self.plans_path = Path(plans_path)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if not is_main_process():
            return
        self.run.path.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.run.plans, self.plans_path.read_bytes())
        self.run.finished_marker.unlink(missing_ok=True)
