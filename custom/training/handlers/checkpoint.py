"""Run folder state: setup, ``checkpoint_last.pt`` + store snapshot, ``model_final.pt``, resume."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from ignite.engine import Engine, Events

from custom.core.atomic import atomic_torch_save, atomic_write_bytes, atomic_write_json
from custom.core.cli import as_bool
from custom.core.dist import barrier, is_main_process, unwrap_network
from custom.core.errors import BraTSInputError

logger = logging.getLogger(__name__)


def _state_of(obj: Any) -> Any:
    if isinstance(obj, torch.nn.Module):
        return unwrap_network(obj).state_dict()
    return obj.state_dict()


def _load_into(obj: Any, state: Any) -> None:
    if isinstance(obj, torch.nn.Module):
        unwrap_network(obj).load_state_dict(state)
    else:
        obj.load_state_dict(state)


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
        barrier()
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
        barrier()

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
        barrier()


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

            raise BraTSInputError(f"{path}: cannot load checkpoint ({type(exc).__name__}: {exc})",
                                  header="cannot resume training") from exc
        missing = [k for k in self.load_dict if k not in state]
        if missing:
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
            barrier()
        logger.info("resumed from %s at epoch %s (iteration %s)", path, engine.state.epoch, engine.state.iteration)


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
