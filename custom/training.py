"""Training-side data plumbing for the bundle: fold lists, the nnU-Net patch sampler, batch preparation, the store.

The configs (``bundle/configs/train.json`` and its overlays) declare what is built; this module holds the few
pieces a JSON config cannot express: nnU-Net's per-iteration random case sampling with forced foreground,
the ``(image, targets dict)`` batch layout the composite loss and :class:`custom.handlers.ErrorMapHandler`
share, and the creation of the case-space error-map store for the cases of one fold.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from custom.cli import as_bool
from custom.errors import BraTSInputError

logger = logging.getLogger(__name__)

__all__ = [
    "check_work_dir",
    "load_fold_data",
    "preprocessed_shapes",
    "create_error_map_store",
    "PatchDataset",
    "UncertaintyPrepareBatch",
    "write_run_config",
    "close_store",
    "open_error_map_store",
    "load_model_weights",
    "attach_progress_bar",
    "is_main_process",
    "measure_training",
    "learning_summary",
]

#: keys of a datalist entry written by the preprocessing step
_PP_KEYS = ("pp_image", "pp_label", "pp_properties")


def is_main_process() -> bool:
    """True outside ``torch.distributed`` or on rank 0: only this process writes files."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


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
    work = Path(work_dir)
    needed = [Path(datalist_path) if datalist_path else work / "datalist.json",
              Path(plans_path) if plans_path else work / "plans.json"]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise BraTSInputError(
            [f"{p}: not found" for p in missing]
            + [f"run: python scripts/prepare_data.py --dataset_dir <BraTS folder> --work_dir {work}"],
            header=f"work directory {work} is not prepared for training",
        )
    return str(work)


def load_fold_data(datalist_path, fold: int) -> tuple[list[dict], list[dict]]:
    """Training and validation items of ``fold`` for :class:`custom.preprocess.LoadPreprocessedd`.

    Each item is ``{"case_id", "pp_image": <.npy>, "pp_label": <seg .npy>, "pp_properties": <.json>}``.

    Raises:
        BraTSInputError: the datalist is missing, lacks the preprocessing keys, the fold is out of range,
            or a fold side is empty.
    """
    from custom.data import fold_split, load_datalist

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


def create_error_map_store(store_dir, items: Sequence[Mapping], ema_window: int = 30, reset: bool = False):
    """Open (or create) the case-space EMA store for every case in ``items`` (train + val of one fold).

    Args:
        store_dir: ``output_dir/store``.
        items: fold items (:func:`load_fold_data`), their preprocessed shapes size the maps.
        ema_window: ``W`` of the EMA.
        reset: start from zero maps (a new run in an existing output folder); a resumed run keeps them
            and then restores ``store_snapshot/`` (:class:`custom.handlers.ResumeHandler`).
    """
    from custom.error_maps import ErrorMapStore

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
    return store


def open_error_map_store(store_dir, ema_window: int = 30):
    """Open an existing store read-only for evaluation; None (with a warning) when there is none."""
    from custom.error_maps import ErrorMapStore

    if not (Path(store_dir) / "index.json").exists():
        logger.warning("no error-map store in %s: error_stable falls back to the current smoothed failure", store_dir)
        return None
    return ErrorMapStore(str(store_dir), ema_window=int(ema_window))


def load_model_weights(network: torch.nn.Module, checkpoint, map_location="cpu") -> torch.nn.Module:
    """Load ``model.pt`` / ``model_final.pt`` (``{"model": state_dict}``) or ``checkpoint_last.pt``
    (``{"network": state_dict, …}``) into ``network`` with ``weights_only=True``.

    Raises:
        BraTSInputError: missing, unreadable or incompatible checkpoint (named).
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise BraTSInputError(f"{path}: checkpoint not found", header="cannot load model weights")
    try:
        state = torch.load(str(path), map_location=map_location, weights_only=True)
    except Exception as exc:
        raise BraTSInputError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})",
                              header="cannot load model weights") from None
    weights = state.get("model", state.get("network")) if isinstance(state, dict) else None
    if weights is None:
        raise BraTSInputError(f"{path}: no 'model' or 'network' entry (keys: {sorted(state) if isinstance(state, dict) else type(state).__name__})",
                              header="cannot load model weights")
    from custom.handlers import unwrap_network

    try:
        unwrap_network(network).load_state_dict(weights)
    except RuntimeError as exc:
        raise BraTSInputError(f"{path}: weights do not fit the network built from the plan ({exc})".splitlines()[0],
                              header="cannot load model weights") from None
    return network


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


class PatchDataset(Dataset):
    """nnU-Net patch sampling as a map-style dataset: one epoch is ``iterations_per_epoch`` batches.

    Sample ``i`` of epoch ``e`` draws a random case from ``data`` and seeds the random transforms with a
    generator derived from ``(seed, rank, e, i)``, so the stream of patches depends neither on the number of
    DataLoader workers nor on where a resumed run restarts. The last ``round(batch_size * fg_fraction)``
    positions of every batch get ``force_fg=True`` (nnU-Net's foreground oversampling, read by
    :class:`custom.transforms.ForegroundOversampledCropd`). Use it with ``shuffle=False`` and the same
    ``batch_size`` in the DataLoader, and call :meth:`set_epoch` at the start of every epoch
    (:class:`custom.handlers.SetEpochHandler`).

    Args:
        data: items (dicts) handed to ``transform``; each sample is a shallow copy plus ``force_fg``.
        transform: a MONAI ``Compose`` (or any callable); Randomizable transforms are re-seeded per sample.
        batch_size: samples per batch (>= 1).
        iterations_per_epoch: batches per epoch (>= 1).
        fg_fraction: fraction of each batch forced to contain foreground, in [0, 1].
        seed: base seed.
        rank: distributed rank; every rank draws its own stream.
        force_fg_key: key receiving the boolean flag.
    """

    def __init__(
        self,
        data: Sequence[Mapping],
        transform: Callable | None,
        batch_size: int,
        iterations_per_epoch: int,
        fg_fraction: float = 0.33,
        seed: int = 0,
        rank: int = 0,
        force_fg_key: str = "force_fg",
    ) -> None:
        if len(data) == 0:
            raise ValueError("PatchDataset needs at least one training case, got an empty list")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if int(iterations_per_epoch) < 1:
            raise ValueError(f"iterations_per_epoch must be >= 1, got {iterations_per_epoch}")
        if not 0.0 <= float(fg_fraction) <= 1.0:
            raise ValueError(f"fg_fraction must be in [0, 1], got {fg_fraction}")
        self.data = list(data)
        self.transform = transform
        self.batch_size = int(batch_size)
        self.iterations_per_epoch = int(iterations_per_epoch)
        self.fg_fraction = float(fg_fraction)
        self.seed = int(seed)
        self.rank = int(rank)
        self.force_fg_key = force_fg_key
        self.num_forced = int(round(self.batch_size * self.fg_fraction))
        self.epoch = 1

    def set_epoch(self, epoch: int) -> None:
        """Select the sample stream of ``epoch`` (1-based, as Ignite counts)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.batch_size * self.iterations_per_epoch

    def force_fg(self, index: int) -> bool:
        """Whether sample ``index`` (position ``index % batch_size`` in its batch) must contain foreground."""
        return index % self.batch_size >= self.batch_size - self.num_forced

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.rank, self.epoch, int(index)])

    def case_index(self, index: int) -> int:
        """Index into ``data`` of the case drawn for sample ``index`` of the current epoch."""
        return int(self._rng(index).integers(len(self.data)))

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < len(self):
            raise IndexError(f"PatchDataset index {index} out of range 0..{len(self) - 1}")
        rng = self._rng(index)
        item = dict(self.data[int(rng.integers(len(self.data)))])
        item[self.force_fg_key] = self.force_fg(index)
        if self.transform is None:
            return item
        if hasattr(self.transform, "set_random_state"):
            self.transform.set_random_state(seed=int(rng.integers(2**31 - 1)))
        from monai.transforms import apply_transform

        return apply_transform(self.transform, item)


def _plain(x):
    """MetaTensor -> torch.Tensor: the loss and the store need no metadata, and plain tensors are faster."""
    from monai.data import MetaTensor

    return x.as_tensor() if isinstance(x, MetaTensor) else x


class UncertaintyPrepareBatch:
    """``prepare_batch`` for MONAI engines: ``batch -> (image, targets)``.

    With ``with_uncertainty`` (default) ``targets`` is the dict the composite loss and the error-map handlers
    share: ``{"label": (B,3,…) regions, "coords": (B,3,…) case coordinates (index + 1, 0 = padding),
    "case_id": list[str], "error_stable": None}``; ``error_stable`` is filled by
    :class:`custom.handlers.ErrorMapHandler` after the forward pass. Without it, ``targets`` is the region
    tensor (the baseline's plain region loss).
    """

    def __init__(self, with_uncertainty: bool = True, coords_key: str = "coords") -> None:
        self.with_uncertainty = bool(with_uncertainty)
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


def write_run_config(path, config: Mapping) -> str:
    """Write the resolved run settings (paths, hyper-parameters, versions) as JSON, atomically, on rank 0."""
    from custom.io_utils import atomic_write_json

    def _jsonable(v):
        if isinstance(v, (str, int, float, bool)) or v is None:
            return v
        if isinstance(v, (list, tuple)):
            return [_jsonable(x) for x in v]
        if isinstance(v, Mapping):
            return {str(k): _jsonable(x) for k, x in v.items()}
        if hasattr(v, "to_dict"):
            return _jsonable(v.to_dict())
        return str(v)

    if is_main_process():
        import monai

        out = _jsonable(dict(config))
        out["versions"] = {"monai": monai.__version__, "torch": torch.__version__, "numpy": np.__version__}
        out["pid"] = os.getpid()
        atomic_write_json(path, out)
    return str(path)


def measure_training(config_files: Sequence[str], overrides: Mapping, iterations: int = 4, warmup: int = 1,
                     loader_samples: int | None = None) -> dict:
    """Time training iterations of a bundle config in this process (benchmarks).

    Runs ``warmup + iterations`` iterations of one epoch without validation and measures, per batch, the time
    the trainer waits for the DataLoader (``GET_BATCH_STARTED`` -> ``GET_BATCH_COMPLETED``) and the iteration
    itself (forward, error-map store update, loss, backward, step). It also times the data pipeline alone,
    synchronously (``loader_samples`` samples of the training dataset, default ``iterations`` batches), which
    is the work a loader process must do per batch. Peak memory: process RSS (MB) and, on CUDA, the peak
    allocated tensor memory.

    Returns:
        dict with ``iterations_per_s, data_wait_ms_per_batch, compute_ms_per_batch, data_ms_per_batch_sync,
        batch_size, patch_size, filters, num_workers, peak_rss_mb, cuda_peak_mb``.
    """
    import resource

    from ignite.engine import Events
    from monai.bundle import ConfigParser

    if int(iterations) < 1 or int(warmup) < 0:
        raise ValueError(f"iterations must be >= 1 and warmup >= 0, got {iterations}, {warmup}")
    parser = ConfigParser()
    parser.read_config([str(f) for f in config_files])
    parser.update(dict(overrides))
    parser.update({"num_epochs": 1, "iterations_per_epoch": int(iterations) + int(warmup), "val_interval": 10**6,
                   "checkpoint_interval": 10**6, "progress_bar": False})
    parser.get_parsed_content("initialize")
    trainer = parser.get_parsed_content("trainer")
    marks: dict[str, list[float]] = {"data": [], "compute": []}
    clock: dict[str, float] = {}
    import time

    def _mark(name, key):
        def _handler(engine):
            now = time.perf_counter()
            if key == "start":
                clock[name] = now
            else:
                marks[name].append(now - clock.pop(name))
        return _handler

    trainer.add_event_handler(Events.GET_BATCH_STARTED, _mark("data", "start"))
    trainer.add_event_handler(Events.GET_BATCH_COMPLETED, _mark("data", "stop"))
    trainer.add_event_handler(Events.ITERATION_STARTED, _mark("compute", "start"))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, _mark("compute", "stop"))
    device = parser.get_parsed_content("device")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    data = marks["data"][int(warmup):]
    compute = marks["compute"][int(warmup):]
    dataset = parser.get_parsed_content("train#dataset")
    batch_size = int(parser.get_parsed_content("batch_size"))
    n_samples = int(loader_samples) if loader_samples else int(iterations) * batch_size
    dataset.set_epoch(10**6)  # fresh draws, not the ones just trained on
    t0 = time.perf_counter()
    for i in range(n_samples):
        dataset[i % len(dataset)]
    sync_ms = (time.perf_counter() - t0) / n_samples * batch_size * 1000.0
    plans = parser.get_parsed_content("plans")
    result = {
        "iterations": len(compute),
        "iterations_per_s": len(compute) / max(sum(data) + sum(compute), 1e-9),
        "data_wait_ms_per_batch": 1000.0 * float(np.mean(data)),
        "compute_ms_per_batch": 1000.0 * float(np.mean(compute)),
        "data_ms_per_batch_sync": sync_ms,
        "batch_size": batch_size,
        "patch_size": [int(p) for p in parser.get_parsed_content("patch_size")],
        "filters": list(plans.filters),
        "num_workers": int(parser.get_parsed_content("num_workers")),
        "device": str(device),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "cuda_peak_mb": (torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None,
    }
    parser.get_parsed_content("finalize")
    return result


def learning_summary(metrics_csv, last_k: int = 1) -> dict:
    """Validation metrics of a run from its ``metrics.csv``: the mean over the last ``last_k`` validated epochs.

    Returns ``{"val_dice_wt", …, "val_corr_var1shot", "ema_pseudo_dice", "epochs", "validated_epochs"}``;
    NaN-valued entries (e.g. an undefined correlation) are skipped by :func:`custom.metrics.last_k_mean`.
    """
    import csv

    from custom.metrics import last_k_mean

    with open(metrics_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    validated = [r for r in rows if r.get("val_dice_wt", "") != ""]
    if not validated:
        raise ValueError(f"{metrics_csv}: no validated epoch yet")
    out: dict = {"epochs": len(rows), "validated_epochs": [int(r["epoch"]) for r in validated]}
    for col in rows[0]:
        if col.startswith("val_") or col == "ema_pseudo_dice":
            values = [float(r[col]) if r[col] != "" else float("nan") for r in validated]
            out[col] = float(last_k_mean(values, int(last_k)))
    return out


def read_json(path) -> dict:
    with open(path) as fh:
        return json.load(fh)
