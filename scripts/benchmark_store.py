"""Benchmark the case-space EMA error-map store at real size (custom/uncertainty/).

A 128^3 patch into a 140x170x140 case (the BraTS median after cropping), side by side in one run:
- ``fast``: axis-aligned random crops with random mirroring (p 0.5 per axis): the slicing fast path;
- ``augmented``: nnU-Net's spatial augmentation through the real MONAI transforms on the coordinate
  channels (rotation p 0.2 +-30 deg per axis, scaling p 0.2 in 0.7-1.4, mirroring p 0.5 per axis);
- ``rotated``: every patch rotated and zoomed (the general path, worst case).
For each: the time of one scatter + one gather (scatter the smoothed failure and var1shot, gather
error_stable and variance_stable), mean and p95 in ms, and of the fused ``update_and_gather`` (what the
training handler calls, through ``update_and_gather_batch``); also the disk size per case, the
projection to 1248 cases and the process's resident memory. The augmentation itself is not timed.
The general path runs the compiled numba kernel unless ``--numba False`` (torch fallback); its first
call (compilation, or loading numba's cache) happens in the warm-up and is reported, not timed.

Usage: python scripts/benchmark_store.py --out store_benchmark.json [--iterations 40] [--numba False]
"""

from __future__ import annotations

import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import fire
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from custom.core.atomic import atomic_write_json  # noqa: E402
from custom.transforms.array import make_case_coordinates  # noqa: E402
from custom.uncertainty.store import ErrorMapStore  # noqa: E402
from custom.uncertainty.store_kernels import HAVE_NUMBA  # noqa: E402

TARGET_MS = 15.0
NUM_CASES_REAL = 1248


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _stats(times_s) -> dict:
    ms = np.asarray(times_s) * 1e3
    return {"mean_ms": float(ms.mean()), "p95_ms": float(np.percentile(ms, 95)), "median_ms": float(np.median(ms)),
            "n": int(ms.size)}


def _augmenter(patch: int, rot_prob: float, zoom_prob: float, seed: int):
    from monai.transforms import Compose, RandFlipd, RandRotated, RandZoomd

    t = Compose([
        RandRotated(keys="coords", range_x=np.pi / 6, range_y=np.pi / 6, range_z=np.pi / 6, prob=rot_prob,
                    mode="nearest", padding_mode="zeros", keep_size=True),
        RandZoomd(keys="coords", prob=zoom_prob, min_zoom=0.7, max_zoom=1.4, mode="nearest",
                  padding_mode="constant", keep_size=True),
        RandFlipd(keys="coords", prob=0.5, spatial_axis=0),
        RandFlipd(keys="coords", prob=0.5, spatial_axis=1),
        RandFlipd(keys="coords", prob=0.5, spatial_axis=2),
    ])
    t.set_random_state(seed)
    return t


def _random_patch_coords(case_coords: np.ndarray, patch: int, rng) -> np.ndarray:
    shape = case_coords.shape[1:]
    starts = [int(rng.integers(0, max(s - patch, 0) + 1)) for s in shape]
    return case_coords[:, starts[0]:starts[0] + patch, starts[1]:starts[1] + patch, starts[2]:starts[2] + patch]


def _time_scenario(store, case_id, case_coords, patch, iterations, rng, augment=None, fused=False):
    f = torch.rand(1, patch, patch, patch)
    v = torch.rand(1, patch, patch, patch)
    staging = (torch.empty(1, patch, patch, patch), torch.empty(1, patch, patch, patch))
    times, cpu_times, paths = [], [], []
    for _ in range(iterations):
        c = _random_patch_coords(case_coords, patch, rng)
        if augment is not None:
            c = torch.as_tensor(augment({"coords": torch.from_numpy(np.ascontiguousarray(c))})["coords"]).as_tensor()
        else:
            c = np.ascontiguousarray(c[tuple([slice(None)] + [slice(None, None, -1) if rng.random() < 0.5
                                                                else slice(None) for _ in range(3)])])
            c = torch.from_numpy(c)
        paths.append(store._analyse(case_id, c)[0])
        t0, p0 = time.perf_counter(), time.thread_time()
        if fused:
            store.update_and_gather(case_id, c, f, v, out=staging)
        else:
            store.scatter(case_id, c, f, v)
            store.gather(case_id, c, out=staging)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.thread_time() - p0)
    return times, cpu_times, paths


def main(out: str = "store_benchmark.json", case_shape=(140, 170, 140), patch: int = 128, iterations: int = 40,
         rotated_iterations: int = 12, ema_window: int = 30, seed: int = 0, store_dir: str | None = None,
         threads: int = 1, numba: bool = True):
    """Measure the store; write one JSON object to ``out`` and print a one-line summary.

    Args:
        out: JSON output path.
        case_shape: preprocessed case shape (X, Y, Z).
        patch: cubic patch edge in voxels.
        iterations: patches per scenario (fast, augmented, fused).
        rotated_iterations: patches for the always-rotated worst case.
        store_dir: where to put the store (default: a temporary folder on the work disk, removed after).
        threads: torch threads (the store itself is single-threaded numpy).
        numba: general path through the compiled kernel (default; False: the torch fallback).
    """
    torch.set_num_threads(int(threads))
    case_shape = tuple(int(s) for s in case_shape)
    if len(case_shape) != 3 or min(case_shape) < 1 or int(patch) < 1:
        raise ValueError(f"case_shape must be 3 positive ints and patch positive, got {case_shape}, {patch}")
    rng = np.random.default_rng(seed)
    rss_before = _rss_mb()
    tmp = None
    if store_dir is None:
        tmp = tempfile.mkdtemp(prefix="store_bench_", dir=str(Path(out).resolve().parent))
        store_dir = tmp
    load_start = os.getloadavg()[0]
    try:
        store = ErrorMapStore(Path(store_dir) / "store", ema_window=ema_window)
        store.use_numba = bool(numba) and HAVE_NUMBA
        store.create({"case_0": case_shape})
        case_coords = make_case_coordinates(case_shape)
        # warm-up: first touch of every page of the memory maps is not the steady state
        c0 = torch.from_numpy(np.ascontiguousarray(_random_patch_coords(case_coords, patch, rng)))
        ones = torch.ones(1, patch, patch, patch)
        store.scatter("case_0", c0, ones, ones)
        store.gather("case_0", c0)
        # ... and the general path's first calls (numba compiles, or loads its cache, here)
        general_first_call_s = time.perf_counter()
        store.allow_fast_path = False
        store.update_and_gather("case_0", c0, ones, ones)
        store.scatter("case_0", c0, ones, ones)
        store.gather("case_0", c0)
        store.allow_fast_path = True
        general_first_call_s = time.perf_counter() - general_first_call_s

        fast_t, fast_c, _ = _time_scenario(store, "case_0", case_coords, patch, iterations, rng)
        fused_t, fused_c, _ = _time_scenario(store, "case_0", case_coords, patch, iterations, rng, fused=True)
        aug_t, aug_c, aug_paths = _time_scenario(store, "case_0", case_coords, patch, iterations, rng,
                                                 augment=_augmenter(patch, 0.2, 0.2, seed))
        rot_t, rot_c, _ = _time_scenario(store, "case_0", case_coords, patch, rotated_iterations, rng,
                                         augment=_augmenter(patch, 1.0, 1.0, seed + 1))
        aug_fused_t, aug_fused_c, aug_fused_paths = _time_scenario(
            store, "case_0", case_coords, patch, iterations, rng, augment=_augmenter(patch, 0.2, 0.2, seed + 2),
            fused=True)
        rot_fused_t, rot_fused_c, _ = _time_scenario(store, "case_0", case_coords, patch, rotated_iterations, rng,
                                                     augment=_augmenter(patch, 1.0, 1.0, seed + 3), fused=True)
        store.flush()
        case_files = [p for p in Path(store.store_dir).iterdir() if p.name.startswith("case_0.") and p.suffix == ".npy"]
        disk_bytes = sum(p.stat().st_size for p in case_files)
        rss_after = _rss_mb()
        maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        # what the store itself keeps in memory: its scratch buffers; the case maps are file-backed pages
        # (page cache, shared between processes, reclaimable), at most the case files' size
        buffers_mb = sum(b.nbytes for b in store._work.values()) / 1e6
        store.close()
    finally:
        if tmp is not None:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)

    fast, fused, aug, rot = _stats(fast_t), _stats(fused_t), _stats(aug_t), _stats(rot_t)
    aug_fused, rot_fused = _stats(aug_fused_t), _stats(rot_fused_t)
    cpu = {name: _stats(t) for name, t in (("fast", fast_c), ("fused", fused_c), ("augmented", aug_c),
                                           ("rotated", rot_c), ("augmented_fused", aug_fused_c),
                                           ("rotated_fused", rot_fused_c))}
    result = {
        "case_shape": list(case_shape),
        "patch_size": [int(patch)] * 3,
        "ema_window": int(ema_window),
        "fast_scatter_gather_mean_ms": fast["mean_ms"],
        "fast_scatter_gather_p95_ms": fast["p95_ms"],
        "fast_update_and_gather_mean_ms": fused["mean_ms"],
        "fast_update_and_gather_p95_ms": fused["p95_ms"],
        "augmented_scatter_gather_mean_ms": aug["mean_ms"],
        "augmented_scatter_gather_p95_ms": aug["p95_ms"],
        "augmented_general_path_ratio": float(np.mean([p == "general" for p in aug_paths])),
        "rotated_scatter_gather_mean_ms": rot["mean_ms"],
        "rotated_scatter_gather_p95_ms": rot["p95_ms"],
        "augmented_update_and_gather_mean_ms": aug_fused["mean_ms"],
        "augmented_update_and_gather_p95_ms": aug_fused["p95_ms"],
        "augmented_update_and_gather_general_path_ratio": float(np.mean([p == "general" for p in aug_fused_paths])),
        "rotated_update_and_gather_mean_ms": rot_fused["mean_ms"],
        "rotated_update_and_gather_p95_ms": rot_fused["p95_ms"],
        # CPU time of the calling thread: on a shared, overloaded machine the wall time includes waiting
        # for a core; the CPU time is what the store costs on an idle one
        "fast_scatter_gather_cpu_mean_ms": cpu["fast"]["mean_ms"],
        "fast_scatter_gather_cpu_p95_ms": cpu["fast"]["p95_ms"],
        "fast_update_and_gather_cpu_mean_ms": cpu["fused"]["mean_ms"],
        "augmented_scatter_gather_cpu_mean_ms": cpu["augmented"]["mean_ms"],
        "augmented_scatter_gather_cpu_p95_ms": cpu["augmented"]["p95_ms"],
        "rotated_scatter_gather_cpu_mean_ms": cpu["rotated"]["mean_ms"],
        "rotated_scatter_gather_cpu_p95_ms": cpu["rotated"]["p95_ms"],
        "augmented_update_and_gather_cpu_mean_ms": cpu["augmented_fused"]["mean_ms"],
        "rotated_update_and_gather_cpu_mean_ms": cpu["rotated_fused"]["mean_ms"],
        "general_path": "numba" if store.use_numba else "torch",
        "general_path_first_call_s": general_first_call_s,
        "target_ms": TARGET_MS,
        "augmented_meets_target_wall": bool(aug["mean_ms"] <= TARGET_MS),
        "augmented_meets_target_cpu": bool(cpu["augmented"]["mean_ms"] <= TARGET_MS),
        "augmented_update_and_gather_meets_target_wall": bool(aug_fused["mean_ms"] <= TARGET_MS),
        "augmented_update_and_gather_meets_target_cpu": bool(cpu["augmented_fused"]["mean_ms"] <= TARGET_MS),
        "disk_mb_per_case": disk_bytes / 1e6,
        "projected_disk_gb_1248_cases": disk_bytes * NUM_CASES_REAL / 1e9,
        "rss_mb": rss_after,
        "rss_increase_mb": rss_after - rss_before,
        "store_scratch_buffers_mb": buffers_mb,
        "store_mapped_mb_per_open_case": disk_bytes / 1e6,
        "max_rss_mb": maxrss_mb,
        "iterations": int(iterations),
        "rotated_iterations": int(rotated_iterations),
        "cpu_count": os.cpu_count(),
        "load_average_1min_start": load_start,
        "load_average_1min_end": os.getloadavg()[0],
        "torch_threads": int(threads),
    }
    atomic_write_json(out, result)
    print(f"store {case_shape} patch {patch}^3, scatter+gather wall/cpu ms: fast {fast['mean_ms']:.1f}/"
          f"{cpu['fast']['mean_ms']:.1f}, fused {fused['mean_ms']:.1f}/{cpu['fused']['mean_ms']:.1f}, augmented "
          f"{aug['mean_ms']:.1f}/{cpu['augmented']['mean_ms']:.1f} (p95 {aug['p95_ms']:.1f}/"
          f"{cpu['augmented']['p95_ms']:.1f}, {100 * result['augmented_general_path_ratio']:.0f}% general path), "
          f"rotated {rot['mean_ms']:.1f}/{cpu['rotated']['mean_ms']:.1f}; fused: augmented "
          f"{aug_fused['mean_ms']:.1f}/{cpu['augmented_fused']['mean_ms']:.1f}, rotated {rot_fused['mean_ms']:.1f}/"
          f"{cpu['rotated_fused']['mean_ms']:.1f} ({result['general_path']} general path, first call "
          f"{general_first_call_s:.1f} s); disk {result['disk_mb_per_case']:.1f} MB/case -> "
          f"{result['projected_disk_gb_1248_cases']:.1f} GB for {NUM_CASES_REAL}; RSS {rss_after:.0f} MB; "
          f"load {load_start:.1f} -> {result['load_average_1min_end']:.1f} -> {out}")
    return result


def cli(**kwargs) -> None:
    """fire entry point (returns nothing, so fire prints only the summary line)."""
    main(**kwargs)


cli.__doc__ = main.__doc__

if __name__ == "__main__":
    fire.Fire(main if "--help" in sys.argv else cli)
