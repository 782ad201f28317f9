"""The training run's setup from the config: work directory checks, the fold's items, the EMA store, the run config."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from custom.core.atomic import atomic_write_json
from custom.core.cli import as_bool
from custom.core.dist import dist_ready, is_main_process
from custom.core.errors import BraTSInputError
from custom.core.layout import WorkDir
from custom.core.run_config import RESUMABLE_KEYS, config_differences, jsonable, read_run_config
from custom.data.datalist import fold_split, load_datalist
from custom.uncertainty.store import ErrorMapStore
from custom.uncertainty.store_device import DeviceErrorMapStore

logger = logging.getLogger(__name__)

#: keys of a datalist entry written by the preprocessing step
_PP_KEYS = ("pp_image", "pp_label", "pp_properties")


def _to_item(entry: Mapping, datalist_path: Path) -> dict:
    missing = [k for k in _PP_KEYS if not entry.get(k)]
    if missing:
        raise BraTSInputError(
            f"{datalist_path}: case {entry.get('case_id', '?')} has no {', '.join(missing)}; "
            "run scripts/prepare_data.py with planning enabled (the default) before training",
            header="work directory not prepared for training",
        )
    for key in ("pp_image", "pp_label"):
        if not Path(entry[key]).is_file():
            raise BraTSInputError(
                f"{entry[key]}: preprocessed file of case {entry['case_id']} is missing "
                f"(listed in {datalist_path}); re-run scripts/prepare_data.py",
                header="work directory not prepared for training",
            )
    return {"case_id": entry["case_id"], **{k: str(entry[k]) for k in _PP_KEYS}}


def check_work_dir(work_dir, datalist_path=None, plans_path=None) -> str:
    """Fail early, before any output is written, when the work directory was not prepared.

    Raises:
        BraTSInputError: naming the missing ``datalist.json`` / ``plans.json``.
    """
    work = WorkDir(work_dir)
    needed = [Path(datalist_path) if datalist_path else work.datalist,
              Path(plans_path) if plans_path else work.plans]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise BraTSInputError(
            [f"{p}: not found" for p in missing]
            + [f"run: .venv/bin/python scripts/prepare_data.py --dataset_dir <BraTS folder> --work_dir {work.path}"],
            header=f"work directory {work.path} is not prepared for training",
        )
    return str(work.path)


def prepared_from(datalist_path) -> str | None:
    """The raw data set ``datalist.json`` was built from (``scripts/prepare_data.py --dataset_dir``): the
    bundle's ``dataset_dir`` property in ``train.json`` (training itself reads the prepared work directory)."""
    return load_datalist(datalist_path).get("dataset_dir")


def check_dataset_dir(datalist_path, dataset_dir) -> None:
    """Refuse a ``--dataset_dir`` that is not the folder the work directory was prepared from.

    Training never reads the raw folder: a different ``dataset_dir`` would be silently ignored, so a run
    that names one must find it recorded in ``datalist.json``.

    Raises:
        BraTSInputError: naming both folders and the command that prepares a work directory from the new one.
    """
    if dataset_dir in (None, ""):
        return
    recorded = prepared_from(datalist_path)
    if recorded is None or Path(dataset_dir).expanduser().resolve() != Path(recorded).expanduser().resolve():
        work = Path(datalist_path).parent
        raise BraTSInputError(
            [f"{datalist_path}: prepared from {recorded}, not from dataset_dir {dataset_dir}",
             f"run: python scripts/prepare_data.py --dataset_dir {dataset_dir} --work_dir <new work dir> "
             f"(or leave --dataset_dir out to train on {work})"],
            header="dataset_dir does not match the prepared work directory")


def load_fold_data(datalist_path, fold: int) -> tuple[list[dict], list[dict]]:
    """Training and validation items of ``fold`` for :class:`custom.preprocessing.dictionary.LoadPreprocessedd`.

    Each item is ``{"case_id", "pp_image": <.npy>, "pp_label": <seg .npy>, "pp_properties": <.json>}``.

    Raises:
        BraTSInputError: the datalist is missing, lacks the preprocessing keys, the fold is out of range,
            or a fold side is empty.
    """

    datalist_path = Path(datalist_path)
    if not datalist_path.is_file():
        raise BraTSInputError(
            f"{datalist_path}: datalist not found; run scripts/prepare_data.py --work_dir <W> first",
            header="work directory not prepared for training",
        )
    datalist = load_datalist(datalist_path)
    num_folds = int(datalist.get("num_folds", 0))
    if not isinstance(fold, (int, np.integer)) or not 0 <= int(fold) < num_folds:
        raise BraTSInputError(f"{datalist_path}: fold {fold!r} is not in 0..{num_folds - 1}", header="invalid fold")
    train_entries, val_entries = fold_split(datalist, int(fold))
    if not train_entries or not val_entries:
        raise BraTSInputError(
            f"{datalist_path}: fold {fold} has {len(train_entries)} training and {len(val_entries)} validation "
            "cases; both must be non-empty",
            header="invalid fold",
        )
    return [_to_item(e, datalist_path) for e in train_entries], [_to_item(e, datalist_path) for e in val_entries]


def preprocessed_shapes(items: Sequence[Mapping]) -> dict[str, tuple[int, int, int]]:
    """``{case_id: (X', Y', Z')}`` read from the ``.npy`` headers (memory-mapped, no data read)."""
    shapes = {}
    for item in items:
        try:
            shape = np.load(item["pp_image"], mmap_mode="r").shape
        except (OSError, ValueError) as exc:
            raise BraTSInputError(f"{item['pp_image']}: cannot read preprocessed image ({exc})") from None
        if len(shape) != 4:
            raise BraTSInputError(f"{item['pp_image']}: expected a (4, X, Y, Z) array, found shape {shape}")
        shapes[item["case_id"]] = tuple(int(s) for s in shape[1:])
    return shapes


def create_error_map_store(store_dir, items: Sequence[Mapping], ema_window: int = 30, reset: bool = False,
                           device="cpu"):
    """Open (or create) the case-space EMA store for every case in ``items`` (train + val of one fold).

    Args:
        store_dir: ``output_dir/store``.
        items: fold items (:func:`load_fold_data`), their preprocessed shapes size the maps.
        ema_window: ``W`` of the EMA.
        reset: start from zero maps (a new run in an existing output folder); a resumed run keeps them
            and then restores ``store_snapshot/`` (:class:`custom.training.handlers.checkpoint.ResumeHandler`).
        device: ``store_device``: ``"cpu"`` (the memory-mapped store, updated by compiled CPU kernels) or a
            CUDA device (``"cuda"``: the current one): the update runs there, the maps resident on the GPU
            when they fit, else streamed per patch (:class:`custom.uncertainty.store_device.DeviceErrorMapStore`;
            always streamed under ``torch.distributed``, where the processes share the files).
    """

    if int(ema_window) < 1:
        raise ValueError(f"ema_window must be >= 1, got {ema_window}")
    store = ErrorMapStore(str(store_dir), ema_window=int(ema_window))
    if as_bool(reset, "reset") and is_main_process():
        store.remove()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    if is_main_process():
        store.create(preprocessed_shapes(items))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    device = torch.device(device)
    if device.type == "cpu":
        return store
    if device.type != "cuda":
        raise ValueError(f"store_device must be 'cpu' or a CUDA device, got {device}")
    return DeviceErrorMapStore(store, device, mode="streamed" if dist_ready() else "auto")


def open_error_map_store(store_dir, ema_window: int = 30):
    """Open an existing store read-only for evaluation; None (with a warning) when there is none."""

    if not (Path(store_dir) / "index.json").exists():
        logger.warning("no error-map store in %s: error_stable falls back to the current smoothed failure", store_dir)
        return None
    return ErrorMapStore(str(store_dir), ema_window=int(ema_window))


def close_store(store) -> None:
    """Flush and close an error-map store (None is accepted: the baseline has none)."""
    if store is not None:
        store.close()


def attach_progress_bar(trainer, enabled: bool = True):
    """Attach Ignite's tqdm ``ProgressBar`` showing the iteration loss (main process only)."""
    if not as_bool(enabled, "progress_bar") or not is_main_process():
        return None
    from ignite.handlers import ProgressBar

    def _loss(output):
        loss = output.get("loss") if isinstance(output, dict) else None
        return {} if loss is None else {"loss": float(loss.detach() if torch.is_tensor(loss) else loss)}

    bar = ProgressBar(persist=False)
    bar.attach(trainer, output_transform=_loss)
    return bar


#: what ``--resume true`` does when the resumed command's settings differ from the run's (``resume_config_mismatch``)
RESUME_MISMATCH_ACTIONS = ("refuse", "warn")


def check_resume_settings(path, config: Mapping, resume=False, mismatch: str = "refuse") -> list[str]:
    """Before a resumed run overwrites ``train_config.json``: compare the resumed command's settings (``config``,
    the ``run_config`` of train.json) with the run's saved ones on :data:`custom.core.run_config.RESULT_KEYS`;
    ``num_epochs`` may change (training longer). Nothing to check without ``resume`` or without a saved config.

    ``mismatch``: ``"refuse"`` (default) raises, ``"warn"`` logs each difference and the run continues with the
    resumed command's settings (its epoch length too: :class:`custom.training.handlers.checkpoint.ResumeHandler`).

    Returns:
        the differences (empty when the settings agree).

    Raises:
        BraTSInputError: with ``"refuse"``, naming each differing setting with both values.
    """
    if mismatch not in RESUME_MISMATCH_ACTIONS:
        raise BraTSInputError(f"--resume_config_mismatch must be one of {', '.join(RESUME_MISMATCH_ACTIONS)}, "
                              f"got {mismatch!r}", header="invalid command-line option")
    if not as_bool(resume, "resume"):
        return []
    saved = read_run_config(path)
    if saved is None:
        return []
    differences = config_differences(jsonable(dict(config)), saved, ignore=RESUMABLE_KEYS,
                                     labels=("now", f"in {Path(path).name}"))
    if differences and mismatch == "refuse":
        raise BraTSInputError(
            differences + [f"resume with the run's own settings (the config files and overrides it was started "
                           f"with), or pass --resume_config_mismatch warn to continue with these"],
            header=f"cannot resume {Path(path).parent}: other settings than the run was trained with")
    for d in differences:
        logger.warning("resuming %s with another setting (continuing with the new one): %s", Path(path).parent, d)
    return differences


def write_run_config(path, config: Mapping) -> str:
    """Write the resolved run settings (paths, hyper-parameters, versions) as JSON, atomically, on rank 0.

    Values are made JSON by :func:`custom.core.run_config.jsonable`, the form
    :func:`custom.core.run_config.config_differences` compares.
    """
    if is_main_process():
        import monai

        out = jsonable(dict(config))
        out["versions"] = {"monai": monai.__version__, "torch": torch.__version__, "numpy": np.__version__}
        out["pid"] = os.getpid()
        atomic_write_json(path, out)
    return str(path)
