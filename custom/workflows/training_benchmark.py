"""Measure training step time, the data-loading share and the error-map store's share from the real bundle config
(scripts/benchmark_training.py)."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from custom.uncertainty.store_kernels import warm_up


def measure_training(config_files: Sequence[str], overrides: Mapping, iterations: int = 4, warmup: int = 1,
                     loader_samples: int | None = None) -> dict:
    """Time training iterations of a bundle config in this process (benchmarks).

    Runs ``warmup + iterations`` iterations of one epoch without validation and measures, per batch, the time
    the trainer waits for the DataLoader (``GET_BATCH_STARTED`` -> ``GET_BATCH_COMPLETED``) and the iteration
    itself (forward, error-map store update, loss, backward, step), and the time the training thread spends
    in the error-map store's calls (``update_and_gather_batch``, ``gather_batch``, ``gather``; on CUDA the device is
    synchronised before and after each call, so that the store's asynchronous GPU work is counted as its
    own). It also times the data pipeline alone, synchronously (``loader_samples`` samples of the training
    dataset, default ``iterations`` batches), which is the work a loader process must do per batch. Peak
    memory: process RSS (MB) and, on CUDA, the peak allocated tensor memory.

    Returns:
        dict with ``iterations_per_s, data_wait_ms_per_batch, compute_ms_per_batch, store_ms_per_batch,
        store_share_ratio (store time / iteration time), store, data_ms_per_batch_sync, batch_size, patch_size,
        filters, num_workers, peak_rss_mb, cuda_peak_mb``.
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
    store = parser.get_parsed_content("store")
    store_times: list[list[float]] = []
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda engine: store_times.append([]))
    if store is not None:
        depth = [0]  # gather_batch calls gather: count the outermost store call only

        def _timed(call):
            def wrapper(*args, **kwargs):
                depth[0] += 1
                try:
                    if depth[0] > 1:
                        return call(*args, **kwargs)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    t0 = time.perf_counter()
                    out = call(*args, **kwargs)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    if store_times:
                        store_times[-1].append(time.perf_counter() - t0)
                    return out
                finally:
                    depth[0] -= 1
            return wrapper

        # what the error-map handlers call (``gather``: the paper transform's per-case reference)
        for name in ("update_and_gather_batch", "gather_batch", "gather"):
            setattr(store, name, _timed(getattr(store, name)))
        warm_up()  # the compiled kernels' one-off loading is not part of a training step
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    data = marks["data"][int(warmup):]
    compute = marks["compute"][int(warmup):]
    in_store = [sum(t) for t in store_times[int(warmup):]]
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
        "store_ms_per_batch": 1000.0 * float(np.mean(in_store)) if store is not None else 0.0,
        "store_share_ratio": float(np.sum(in_store) / max(np.sum(compute), 1e-9)) if store is not None else 0.0,
        "store": type(store).__name__ if store is not None else None,
        "store_mode": getattr(store, "mode", "cpu") if store is not None else None,
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
